// Push: a one-shot all-reduce without barriers, for small messages.
// Appended to allreduce.cu before compilation.
//
// Every rank writes its input into a segment of every peer's push area and
// then polls its own area until every peer's data is there. Areas start
// filled with a marker that data never carries (LR_PUSH_EMPTY: negative
// zero in both halves of each 32-bit word), so the data is its own arrival
// signal: a reader waits until no element of a packet holds the marker,
// sums in rank order, and writes the marker back for a later call.
//
// Three slots rotate, one per call, chosen by a call counter that lives in
// device memory (so CUDA-graph replays advance it too). A rank writes slot
// s of a peer at call n only after finishing call n-1, which needed the
// peer's data of call n-1, which the peer sent after finishing call n-2 and
// with it the reset of the slot it used then: one slot of margin is needed,
// three give two. A programmatic launch (barrier.cu) may start call n's
// kernel before call n-1's has ended, but it waits for it before touching
// anything, so "after finishing" still holds.
//
// Values equal to the marker are rewritten before they are sent: -0.0
// becomes +0.0 in f16 and bf16, and the f32 denormal 0x80008000 becomes
// -0.0 (a change of 4.6e-41).

// The "barrier" a fault names when a push waited in vain for a peer's data.
#define LR_PUSH_WAIT 99u

// At the start of each rank's push area; only the owner touches it.
struct PushHeader {
  u32 calls;  // calls this rank has completed, modulo LR_PUSH_SLOTS
  u32 done;   // blocks of the current call that have finished
};

struct PushArgs {
  BarrierArgs bar;            // rank, fault report and deadline; peers unused
  char* push[LR_MAX_RANKS];   // every rank's push area
  const char* input;          // this rank's input
  char* output;               // this rank's output
  u64 count;                  // elements
  u64 segment_bytes;          // bytes of one rank's segment of a slot
};

static __device__ __forceinline__ void lr_store_volatile(Pack* p, const Pack& v) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.w[0]),
               "r"(v.w[1]), "r"(v.w[2]), "r"(v.w[3])
               : "memory");
}

static __device__ __forceinline__ Pack lr_load_volatile(const Pack* p) {
  Pack v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
               : "l"(p)
               : "memory");
  return v;
}

// Whether some element of the packet still holds the marker.
template <typename D>
static __device__ __forceinline__ bool lr_has_empty(const Pack& p) {
  bool empty = false;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if (D::BITS == 32) {
      empty |= p.w[w] == LR_PUSH_EMPTY;
    } else {
      empty |= (p.w[w] & 0xffffu) == 0x8000u || (p.w[w] >> 16) == 0x8000u;
    }
  }
  return empty;
}

// The packet with every element that equals the marker rewritten.
template <typename D>
static __device__ __forceinline__ Pack lr_without_empty(Pack p) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if (D::BITS == 32) {
      if (p.w[w] == LR_PUSH_EMPTY) p.w[w] = 0x80000000u;
    } else {
      if ((p.w[w] & 0xffffu) == 0x8000u) p.w[w] &= 0xffff0000u;
      if ((p.w[w] >> 16) == 0x8000u) p.w[w] &= 0x0000ffffu;
    }
  }
  return p;
}

// Where `writer`'s segment of `slot` starts in the push area at `area`.
template <int W>
static __device__ __forceinline__ Pack* lr_segment(char* area, u32 slot, int writer, u64 bytes) {
  return (Pack*)(area + LR_PUSH_HEADER + ((u64)slot * W + writer) * bytes);
}

// The slot of this rank's current call (its push area at `area`).
static __device__ __forceinline__ u32 lr_push_slot(char* area) {
  return *(volatile u32*)&((PushHeader*)area)->calls % LR_PUSH_SLOTS;
}

// Sends packet `j` of this rank (`mine`, marker already rewritten) into
// its segment of every peer's slot.
template <int W>
static __device__ __forceinline__ void lr_push_send(const PushArgs& a, u32 slot, u64 j,
                                                    const Pack& mine) {
  const int rank = (int)a.bar.rank;
#pragma unroll
  for (int r = 0; r < W; ++r) {
    if (r != rank) lr_store_volatile(lr_segment<W>(a.push[r], slot, rank, a.segment_bytes) + j, mine);
  }
}

// Waits until `writer`'s packet `j` has arrived in this rank's slot and
// returns it. Past the deadline it records the fault, sets `timed_out` and
// returns what is there; once `timed_out` is set it no longer waits.
template <typename D, int W>
static __device__ __forceinline__ Pack lr_push_wait(const PushArgs& a, u32 slot, u64 j, int writer,
                                                    bool& timed_out) {
  const Pack* at = lr_segment<W>(a.push[a.bar.rank], slot, writer, a.segment_bytes) + j;
  u64 start = 0;
  u32 spins = 0;
  Pack p = lr_load_volatile(at);
  while (!timed_out && lr_has_empty<D>(p)) {
    if ((++spins & LR_SPIN_MASK) == 0u && lr_past_deadline(start, a.bar.timeout_ns)) {
      lr_record_fault(a.bar, (u32)writer, LR_PUSH_WAIT, 0, 0);
      timed_out = true;
    }
    p = lr_load_volatile(at);
  }
  return p;
}

// Writes the marker back over every peer's packet `j` of this rank's slot,
// for the call that uses the slot next.
template <int W>
static __device__ __forceinline__ void lr_push_reset(const PushArgs& a, u32 slot, u64 j) {
  const int rank = (int)a.bar.rank;
  Pack empty;
#pragma unroll
  for (int w = 0; w < 4; ++w) empty.w[w] = LR_PUSH_EMPTY;
#pragma unroll
  for (int r = 0; r < W; ++r) {
    if (r != rank) lr_store_volatile(lr_segment<W>(a.push[rank], slot, r, a.segment_bytes) + j, empty);
  }
}

// The end of a call, by every thread of every block: the last block to
// finish moves this rank to the next slot. A block that timed out leaves
// the counter as it is: the host sees the fault and refuses further calls.
static __device__ __forceinline__ void lr_push_finish(const PushArgs& a, bool timed_out) {
  PushHeader* header = (PushHeader*)a.push[a.bar.rank];
  if (__syncthreads_or(timed_out)) return;
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&header->done, 1u) == gridDim.x - 1) {
      header->done = 0;
      // Kept below the slot count: a plain u32 would wrap onto the same
      // slot twice in a row (2^32 is not a multiple of 3).
      header->calls = (header->calls + 1) % LR_PUSH_SLOTS;
      __threadfence();
    }
  }
}

template <typename D, int W>
static __device__ __forceinline__ void lr_push(const PushArgs& a) {
  // Before the header: the previous call's last block advanced it.
  lr_wait_for_previous_kernel();
  const int rank = (int)a.bar.rank;
  const u32 slot = lr_push_slot(a.push[rank]);
  const u64 packs = (a.count + D::PER_PACK - 1) / D::PER_PACK;
  const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  const u64 stride = (u64)gridDim.x * blockDim.x;
  // This rank's packet j as it is sent.
  const auto mine = [&](u64 j) { return lr_without_empty<D>(lr_load_packet<D>(a.input, j, a.count)); };

  // Send: this rank's packets into its segment of every peer's slot. The
  // thread's first packet stays in registers for its sum below, so a
  // message of at most one packet per thread (every small one) reads its
  // input once. In place stays safe: each packet is still read before the
  // same thread writes its sum.
  Pack kept = {};
  if (first < packs) {
    kept = mine(first);
    lr_push_send<W>(a, slot, first, kept);
  }
  for (u64 j = first + stride; j < packs; j += stride) lr_push_send<W>(a, slot, j, mine(j));

  // Receive: wait for every peer's packet j, sum in rank order, reset.
  bool timed_out = false;
  for (u64 j = first; j < packs && !timed_out; j += stride) {
    Pack p[W];
#pragma unroll
    for (int r = 0; r < W; ++r) {
      p[r] = r != rank ? lr_push_wait<D, W>(a, slot, j, r, timed_out) : j == first ? kept : mine(j);
    }
    if (timed_out) break;
    lr_store_packet<D>(a.output, j, a.count, lr_reduce<D, W>(p));
    lr_push_reset<W>(a, slot, j);
  }
  // The last phase: this thread is done waiting for its peers.
  lr_launch_dependents(a.bar);
  lr_push_finish(a, timed_out);
}

// `__grid_constant__`: as for the kernels of allreduce.cu.
#define LR_PUSH_KERNELS(NAME, D, W)                                                             \
  extern "C" __global__ void __launch_bounds__(LR_THREADS)                                     \
      linkreduce_push_##NAME##_w##W(const __grid_constant__ PushArgs a) { lr_push<D, W>(a); }

LR_FOR_WORLDS(LR_PUSH_KERNELS, f32, F32)
LR_FOR_WORLDS(LR_PUSH_KERNELS, f16, F16)
LR_FOR_WORLDS(LR_PUSH_KERNELS, bf16, BF16)
