// All-reduce kernels: one-stage and two-stage, for f32, f16 and bf16, for
// every world size 2..8. Appended to barrier.cu before compilation.
//
// Ranks are summed in order 0..W-1 on every rank (common.cu) so that all
// ranks produce bitwise-identical results. Elements past the last whole
// packet (the tail, fewer than one packet) take a scalar path. LR_THREADS,
// LR_SCRATCH_OFFSET (where a rank's scratch starts in its signal region)
// and LR_INDEX_BITS come from the host (src/kernels/mod.rs).

static_assert(sizeof(Signal) <= LR_SCRATCH_OFFSET, "scratch overlaps the counters");
static_assert(LR_SCRATCH_OFFSET % 256 == 0, "scratch must stay 256-byte aligned");

// Where a rank's input is, as a "source": an index into the buffer table
// (LR_INDEX_BITS bits) and an offset in packets above it. Every rank
// publishes its own source in the start barrier, so ranks may read their
// input from different places (registered in place, a staging copy, a
// buffer captured in a graph) without agreeing beforehand.
#define LR_INDEX_MASK ((1ull << LR_INDEX_BITS) - 1)

struct AllReduceArgs {
  BarrierArgs bar;
  // This rank's buffer table: entry [owner * capacity + index] is the
  // address, as this rank reaches it, of buffer `index` of rank `owner`.
  const u64* table;
  u64 source;    // this rank's input (index | offset in packets << LR_INDEX_BITS)
  char* output;  // this rank's output
  u64 count;     // elements
  u32 capacity;  // entries per owner in the table
};

// Sums element `e` of W arrays in rank order (the scalar tail path).
template <typename D, int W>
static __device__ __forceinline__ typename D::Bits lr_reduce_one(const char* const (&src)[W], u64 e) {
  float sum = D::to_f32(((const typename D::Bits*)src[0])[e]);
#pragma unroll
  for (int r = 1; r < W; ++r) sum += D::to_f32(((const typename D::Bits*)src[r])[e]);
  return (typename D::Bits)D::from_f32(sum);
}

// The first barrier of a call. Thread t tells rank t where to read this
// rank's input (`source_for(t)`: the same for every peer in the all-reduce,
// the peer's own block in the reduce-scatter), with its arrival, and turns
// rank t's source into an address this rank can read: `inputs[t]`, in
// shared memory, valid for the block once it returns true. No
// __syncthreads first: only the wait for the previous kernel precedes it.
template <int W, typename SourceFor>
static __device__ __forceinline__ bool lr_start_from(const AllReduceArgs& a, u32 epoch,
                                                     const char** inputs, SourceFor source_for) {
  bool timed_out = false;
  if (threadIdx.x < W) {
    const u32 peer = threadIdx.x;
    const u64 source = source_for(peer);
    const u64* row = a.table + (u64)peer * a.capacity;
    const u64 my_index = source & LR_INDEX_MASK;
    // Peers usually name the same index: fetch it while waiting for them.
    const u64 guess = row[my_index];
    const u64 word = (source << LR_EPOCH_BITS) | (epoch & LR_EPOCH_MASK);
    const u64 theirs = lr_meet<false>(a.bar, epoch, word, peer, 0, timed_out) >> LR_EPOCH_BITS;
    const u64 index = theirs & LR_INDEX_MASK;
    const u64 base = index == my_index ? guess : row[index];
    inputs[peer] = (const char*)(base + (theirs >> LR_INDEX_BITS) * sizeof(Pack));
  }
  return !__syncthreads_or(timed_out);
}

// The start barrier of an all-reduce: every peer reads the same input.
template <int W>
static __device__ __forceinline__ bool lr_start(const AllReduceArgs& a, u32 epoch,
                                                const char** inputs) {
  return lr_start_from<W>(a, epoch, inputs, [&](u32) { return a.source; });
}

// Where rank `rank`'s scratch starts, as this rank reaches it.
static __device__ __forceinline__ char* lr_scratch(const BarrierArgs& a, int rank) {
  return (char*)a.peers.rank[rank] + LR_SCRATCH_OFFSET;
}

// The frame of a one-stage kernel: the wait for the previous kernel
// (barrier.cu), the start barrier (sources as in lr_start_from),
// `body(src)` with every rank's input readable at src[rank], the end
// barrier, before which a programmatic launch lets the next kernel launch. The fused kernels (fused.cu) and the
// reduce-scatter and all-gather (scatter_gather.cu) put their own body in
// the same frame.
template <int W, typename SourceFor, typename Body>
static __device__ __forceinline__ void lr_one_stage_frame_from(const AllReduceArgs& a,
                                                               SourceFor source_for, Body body) {
  lr_wait_for_previous_kernel();
  const u32 epoch = a.bar.peers.rank[a.bar.rank]->epoch[blockIdx.x];
  __shared__ const char* inputs[W];
  if (!lr_start_from<W>(a, epoch + 1, inputs, source_for)) return;
  const char* src[W];
#pragma unroll
  for (int r = 0; r < W; ++r) src[r] = inputs[r];
  body(src);
  lr_launch_dependents(a.bar);

  // Keeps this rank from returning (and its caller from overwriting the
  // input) while peers still read it.
  if (!lr_barrier<W, false>(a.bar, epoch + 2, 1)) return;
  lr_finish_epochs(a.bar, epoch + 2);
}

template <int W, typename Body>
static __device__ __forceinline__ void lr_one_stage_frame(const AllReduceArgs& a, Body body) {
  lr_one_stage_frame_from<W>(a, [&](u32) { return a.source; }, body);
}

// Grid-stride over `count` elements of every src[r]: `packet(i, p)` with
// packet i of each for the packets this thread takes, then `element(e)`
// for the element of the tail (under one packet) it takes, if any.
template <typename D, int W, typename Packet, typename Element>
static __device__ __forceinline__ void lr_for_packets(const char* const (&src)[W], u64 count,
                                                      Packet packet, Element element) {
  const u64 packs = count / D::PER_PACK;
  const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  const u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 i = first; i < packs; i += stride) {
    Pack p[W];
#pragma unroll
    for (int r = 0; r < W; ++r) p[r] = ((const Pack*)src[r])[i];
    packet(i, p);
  }
  const u64 tail = count - packs * D::PER_PACK;
  if (first < tail) element(packs * D::PER_PACK + first);
}

// Writes the rank-order sum of `count` elements of every src[r] into
// `output`. Each thread reads an element of every input before writing
// it, so an input that only this rank reads may be the output.
template <typename D, int W>
static __device__ __forceinline__ void lr_sum_into(const char* const (&src)[W], char* output,
                                                   u64 count) {
  lr_for_packets<D, W>(
      src, count, [&](u64 i, const Pack (&p)[W]) { ((Pack*)output)[i] = lr_reduce<D, W>(p); },
      [&](u64 e) { ((typename D::Bits*)output)[e] = lr_reduce_one<D, W>(src, e); });
}

// One-stage: every rank reads all of every peer's input and writes the sum.
// Must not run in place: a peer may still read the input being overwritten.
template <typename D, int W>
static __device__ __forceinline__ void lr_one_stage(const AllReduceArgs& a) {
  lr_one_stage_frame<W>(
      a, [&](const char* const (&src)[W]) { lr_sum_into<D, W>(src, a.output, a.count); });
}

// The frame of a two-stage kernel: the wait for the previous kernel, the
// start barrier, `reduce(src)` into this rank's scratch with every rank's
// input readable at src[rank], the publishing barrier (after which a
// programmatic launch lets the next kernel launch), `gather()` from the
// ranks' scratch, the end barrier. A barrier orders block b here only after
// block b on the peers, so a block may gather only what its own index
// reduced there. The fused two-stage kernel (fused.cu) puts its own stages
// in the same frame.
template <int W, typename Reduce, typename Gather>
static __device__ __forceinline__ void lr_two_stage_frame(const AllReduceArgs& a, Reduce reduce,
                                                          Gather gather) {
  lr_wait_for_previous_kernel();
  const u32 epoch = a.bar.peers.rank[a.bar.rank]->epoch[blockIdx.x];
  __shared__ const char* inputs[W];
  if (!lr_start<W>(a, epoch + 1, inputs)) return;
  const char* src[W];
#pragma unroll
  for (int r = 0; r < W; ++r) src[r] = inputs[r];
  reduce(src);

  if (!lr_barrier<W, true>(a.bar, epoch + 2, 1)) return;
  // The last phase: the gather and the end barrier.
  lr_launch_dependents(a.bar);
  gather();

  // Keeps this rank's scratch and input alive until peers finished reading.
  if (!lr_barrier<W, false>(a.bar, epoch + 3, 2)) return;
  lr_finish_epochs(a.bar, epoch + 3);
}

// Two-stage: reduce-scatter into each rank's scratch, then all-gather.
// Slice r (packets [r*part, r*part+len_r)) is reduced by rank r; the last
// slice takes the remainder, and the last rank also reduces the tail.
// Index j of a slice is handled by the same thread in both stages, because
// visibility is only promised between the same block index across the
// publishing barrier.
template <typename D, int W>
static __device__ __forceinline__ void lr_two_stage(const AllReduceArgs& a) {
  const int rank = (int)a.bar.rank;
  const u64 packs = a.count / D::PER_PACK;
  const u64 part = packs / W;
  const u64 last_len = packs - (W - 1) * part;
  const u64 tail = a.count - packs * D::PER_PACK;
  const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  const u64 stride = (u64)gridDim.x * blockDim.x;

  const auto reduce = [&](const char* const (&src)[W]) {
    const u64 my_len = rank == W - 1 ? last_len : part;
    const u64 my_start = (u64)rank * part;
    Pack* mine = (Pack*)lr_scratch(a.bar, rank);
    for (u64 j = first; j < my_len; j += stride) {
      Pack p[W];
#pragma unroll
      for (int r = 0; r < W; ++r) p[r] = ((const Pack*)src[r])[my_start + j];
      mine[j] = lr_reduce<D, W>(p);
    }
    if (rank == W - 1 && first < tail) {
      const u64 e = packs * D::PER_PACK + first;
      ((typename D::Bits*)(mine + last_len))[first] = lr_reduce_one<D, W>(src, e);
    }
  };

  const auto gather = [&]() {
    const Pack* slices[W];
#pragma unroll
    for (int r = 0; r < W; ++r) slices[r] = (const Pack*)lr_scratch(a.bar, r);
    Pack* out = (Pack*)a.output;
    // Same packet-to-thread mapping as the reduce-scatter above (j from
    // `first` by `stride`, the last slice's extra packets included): this
    // thread may only read what its block index reduced on the peers, and
    // (in place) only overwrite inputs its block index has finished
    // reading.
    for (u64 j = first; j < last_len; j += stride) {
      if (j < part) {
        Pack p[W];
#pragma unroll
        for (int r = 0; r < W; ++r) p[r] = slices[r][j];
#pragma unroll
        for (int r = 0; r < W; ++r) out[(u64)r * part + j] = p[r];
      } else {
        out[(u64)(W - 1) * part + j] = slices[W - 1][j];
      }
    }
    if (first < tail) {
      const typename D::Bits* reduced_tail = (const typename D::Bits*)(slices[W - 1] + last_len);
      ((typename D::Bits*)a.output)[packs * D::PER_PACK + first] = reduced_tail[first];
    }
  };

  lr_two_stage_frame<W>(a, reduce, gather);
}

// `__grid_constant__`: threads read the argument where the launch put it.
// Without it, indexing `peers.rank[t]` made each thread copy the whole
// argument (128 bytes) to local memory first.
#define LR_KERNELS(NAME, D, W)                                                                  \
  extern "C" __global__ void __launch_bounds__(LR_THREADS)                                     \
      linkreduce_one_stage_##NAME##_w##W(const __grid_constant__ AllReduceArgs a) { lr_one_stage<D, W>(a); }           \
  extern "C" __global__ void __launch_bounds__(LR_THREADS)                                     \
      linkreduce_two_stage_##NAME##_w##W(const __grid_constant__ AllReduceArgs a) { lr_two_stage<D, W>(a); }

LR_FOR_WORLDS(LR_KERNELS, f32, F32)
LR_FOR_WORLDS(LR_KERNELS, f16, F16)
LR_FOR_WORLDS(LR_KERNELS, bf16, BF16)
