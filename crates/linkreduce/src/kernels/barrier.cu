// The barrier between GPUs: the one place that defines how ranks meet.
//
// Compiled by NVRTC with no CUDA headers: only built-in types and functions
// and inline PTX. LR_MAX_RANKS, LR_MAX_BLOCKS and LR_EPOCH_BITS come from
// the host (src/kernels/mod.rs generates them); the host mirrors the
// layouts below there, checked by its tests.

// What a peer writes to say it reached a barrier: the barrier's epoch in the
// low LR_EPOCH_BITS bits (only equality is tested, and a counter lags the
// epoch awaited by at most 2, so 16 bits never alias), and above them what
// the barrier carries (the start barrier: the sender's input, allreduce.cu).
// One 64-bit store, so a peer sees the epoch and its payload together.
#define LR_EPOCH_MASK ((1ull << LR_EPOCH_BITS) - 1)

// The chunked push's counters (chunked.cu says how they order a ring's
// slots), per block of its grid and per peer.
struct ChunkSignal {
  u64 ready[LR_CHUNK_BLOCKS][LR_MAX_RANKS];  // by the peer: its chunks in its ring here
  u64 freed[LR_CHUNK_BLOCKS][LR_MAX_RANKS];  // by the peer: this rank's chunks it is done with
  u64 sequence[LR_CHUNK_BLOCKS];             // chunks this block moved; only the owner's
};

// One rank's synchronisation counters, at the start of its signal region.
// counters[parity][block][peer] is written by `peer` and read by the owner.
// Two arrays alternate (by epoch parity) because a fast peer can already be
// at the next barrier while a slow owner still waits on this one.
struct Signal {
  u64 counters[2][LR_MAX_BLOCKS][LR_MAX_RANKS];
  ChunkSignal chunks;
  // Per block: the last epoch this block passed. Only the owner touches it.
  u32 epoch[LR_MAX_BLOCKS];
};

// Every rank's signal region, as seen from this rank.
struct SignalPeers {
  Signal* rank[LR_MAX_RANKS];
};

// What a timed-out block leaves for the host (mapped host memory).
struct Fault {
  u32 code;      // 0: none, 1: barrier timeout
  u32 rank;      // the rank that gave up waiting
  u32 peer;      // the rank it waited for
  u32 barrier;   // which barrier (0 = start; 99 = push data; 97, 98 = chunked push
                 // chunk and slot)
  u32 block;
  u32 expected;  // the epoch awaited (low bits; 0 for push; chunked push: chunk number)
  u32 seen;      // what the peer's counter held last (as `expected`)
};

// Everything a kernel needs to synchronise; passed by value.
struct BarrierArgs {
  SignalPeers peers;
  Fault* fault;
  u64 timeout_ns;
  u32 rank;
  // 1 where the host launched this kernel as a programmatic dependent
  // launch (and so launches the next all-reduce alike): the kernel then
  // lets the next kernel launch before it ends (lr_launch_dependents).
  u32 programmatic;
};

// Programmatic dependent launch (docs/design.md, "Programmatic dependent
// launch"): a kernel launched with it may start while the kernel before it
// on the stream still runs. griddepcontrol exists from sm_90 on; the host
// launches programmatically only there, and below it both helpers are
// empty.

// Returns once the kernel before this one on the stream has completed and
// its memory operations are performed and visible to this grid: what a
// kernel boundary promises without programmatic launch. Every kernel that
// may be launched programmatically calls it first, in every thread, before
// it reads anything: its epochs, counters, push header, table and inputs
// may all be the previous kernel's work. A no-op where the launch was not
// programmatic.
static __device__ __forceinline__ void lr_wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel on the stream, if it was launched programmatically,
// start launching once every block of this grid has called this or exited.
// Safe at any point of this kernel: the next kernel may then occupy SMs,
// but every block of this grid is already resident (the trigger needs them
// all), and its first act is lr_wait_for_previous_kernel, which returns
// only after this whole grid has completed and its writes are visible; so
// it cannot overtake anything this kernel still does with its peers. Where
// the callers place it only decides how much of the next launch hides
// behind this kernel's tail: once a block has begun its last phase. Ranks
// sharing a GPU never launch programmatically (early blocks of one rank's
// next kernel could keep a co-tenant's blocks from becoming resident while
// this kernel waits for them). Only launches that asked for it trigger, so
// without programmatic launch the kernels behave exactly as before.
static __device__ __forceinline__ void lr_launch_dependents(const BarrierArgs& a) {
#if __CUDA_ARCH__ >= 900
  if (a.programmatic) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

static __device__ __forceinline__ u64 lr_now_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

static __device__ __forceinline__ void lr_store_relaxed(u64* p, u64 v) {
  asm volatile("st.volatile.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

static __device__ __forceinline__ u64 lr_load_relaxed(u64* p) {
  u64 v;
  asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

static __device__ __forceinline__ void lr_store_release(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

static __device__ __forceinline__ u64 lr_load_acquire(u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// The deadline of every spin loop on a peer. A loop counts its spins and
// calls this only where the count & LR_SPIN_MASK is 0, every 1024th spin:
// reading the clock on every spin slows the common, short wait. The first
// call starts the clock (`start` 0: not started), so a short wait never
// reads it. True once the wait has run past `timeout_ns`.
#define LR_SPIN_MASK 1023u
static __device__ __forceinline__ bool lr_past_deadline(u64& start, u64 timeout_ns) {
  const u64 now = lr_now_ns();
  if (start == 0) {
    start = now;
    return false;
  }
  return now - start > timeout_ns;
}

// Several blocks may time out together; any one of their reports is true,
// so plain stores suffice (atomics on host memory need PCIe atomics).
static __device__ void lr_record_fault(const BarrierArgs& a, u32 peer, u32 barrier, u32 expected,
                                       u32 seen) {
  volatile Fault* f = a.fault;
  f->rank = a.rank;
  f->peer = peer;
  f->barrier = barrier;
  f->block = blockIdx.x;
  f->expected = expected;
  f->seen = seen;
  __threadfence_system();
  f->code = 1;
  __threadfence_system();
}

// Thread `peer`'s half of a barrier: tells rank `peer` that this block
// arrived (`word`: epoch and payload), then waits until rank `peer` said the
// same. Returns the peer's word, or records a fault and sets `timed_out`.
template <bool PUBLISH>
static __device__ __forceinline__ u64 lr_meet(const BarrierArgs& a, u32 epoch, u64 word, u32 peer,
                                              u32 barrier, bool& timed_out) {
  const u32 parity = epoch & 1u;
  u64* to_peer = &a.peers.rank[peer]->counters[parity][blockIdx.x][a.rank];
  u64* from_peer = &a.peers.rank[a.rank]->counters[parity][blockIdx.x][peer];
  if (PUBLISH) {
    lr_store_release(to_peer, word);
  } else {
    lr_store_relaxed(to_peer, word);
  }
  u64 start = 0;
  u32 spins = 0;
  for (;;) {
    const u64 seen = PUBLISH ? lr_load_acquire(from_peer) : lr_load_relaxed(from_peer);
    if ((seen & LR_EPOCH_MASK) == (epoch & LR_EPOCH_MASK)) return seen;
    if ((++spins & LR_SPIN_MASK) == 0u && lr_past_deadline(start, a.timeout_ns)) {
      lr_record_fault(a, peer, barrier, epoch & LR_EPOCH_MASK, (u32)(seen & LR_EPOCH_MASK));
      timed_out = true;
      return 0;
    }
  }
}

// Block-wide barrier with block `blockIdx.x` of every rank.
//
// Every thread of the block must call it. `epoch` must grow by one per
// barrier of this block (the caller derives it from Signal::epoch read once
// at kernel start). PUBLISH makes the writes this block made before the
// barrier visible to peers that read them after it.
// Returns false (in every thread) if some peer did not arrive in time; the
// fault is then recorded and the caller must leave the kernel.
template <int W, bool PUBLISH>
static __device__ __forceinline__ bool lr_barrier(const BarrierArgs& a, u32 epoch, u32 barrier) {
  // Arrive only once every thread of the block is done with the work before
  // the barrier: a peer that sees the arrival may overwrite what this block
  // still reads, or read what it has not yet written.
  __syncthreads();
  bool timed_out = false;
  if (threadIdx.x < W) {
    lr_meet<PUBLISH>(a, epoch, epoch & LR_EPOCH_MASK, threadIdx.x, barrier, timed_out);
  }
  return !__syncthreads_or(timed_out);
}

// Stores the last epoch this block passed, for the next kernel on this rank.
static __device__ __forceinline__ void lr_finish_epochs(const BarrierArgs& a, u32 last_epoch) {
  if (threadIdx.x == 0) a.peers.rank[a.rank]->epoch[blockIdx.x] = last_epoch;
}
