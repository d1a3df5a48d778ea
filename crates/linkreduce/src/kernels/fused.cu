// All-reduce fused with residual add and RMSNorm (docs/fused.md). Appended
// to norm.cu before compilation.
//
// One-stage: the one-stage frame (allreduce.cu: start barrier, the body,
// end barrier), whose body gives each block whole rows (rows b, b + grid,
// ...): the block reads its rows from every rank, sums them in rank order
// and rounds (what the all-reduce would have written), then adds and
// normalises exactly as the plain kernel does (norm.cu). No rank writes
// anything a peer reads, so the residual and the output may be anywhere.
//
// Two-stage: the two-stage frame (lr_two_stage_frame in allreduce.cu:
// start barrier, reduce into scratch, publishing barrier, gather, end
// barrier) with rows: each row's
// groups are cut into W runs of `share = ceil(groups / W)` groups, and rank
// k reduces run k of every row (its owner). Block b takes rows b, b + grid,
// ... in both stages, since a barrier orders block b here only after block
// b on the peers: it reduces its runs of those rows into its scratch, then,
// after the barrier, reads every run of them from the owners' scratch, adds
// this rank's own residual and normalises. Each rank normalises whole rows
// itself (not only the rows it owns, which the all-gather would then have
// to move twice, residual and output): the residual stays each rank's own,
// as in the unfused sequence, and only the sums cross NVLink.
//
// Push: the push protocol (push.cu: data as its own arrival flag, three
// rotating slots), with packets numbered by row: packet g of row `row` is
// row * groups + g, where groups = ceil(hidden / 8 or 4), so a row whose
// length is not a multiple of a packet still travels as whole packets
// (the last one padded with zeros). Each block sends its rows, then
// normalises them as the packets arrive: the sum the plain push would have
// written is formed per element from the same lanes in the same rank
// order, with the same marker rewrite, so the results are the same bits.

struct FusedNormArgs {
  AllReduceArgs all_reduce;  // its output and count are unused
  NormArgs norm;
};

template <typename D, int W>
static __device__ __forceinline__ void lr_fused_one_stage(const FusedNormArgs& a) {
  __shared__ float warp_sums[LR_WARPS];
  lr_one_stage_frame<W>(a.all_reduce, [&](const char* const (&src)[W]) {
    // Peers' inputs start on a packet, so rows are whole packets there
    // whenever hidden is a multiple of a packet's elements.
    const u32 rows_aligned = a.norm.hidden % D::PER_PACK == 0;
    for (u64 row = blockIdx.x; row < a.norm.rows; row += gridDim.x) {
      lr_add_rms_norm_row<D>(a.norm, row, warp_sums, [&](u64 e, u64 n) {
        Pack p[W];
#pragma unroll
        for (int r = 0; r < W; ++r) p[r] = lr_load_group<D>(src[r], e, n, rows_aligned);
        return lr_reduce<D, W>(p);
      });
    }
  });
}

template <typename D, int W>
static __device__ __forceinline__ void lr_fused_two_stage(const FusedNormArgs& a) {
  __shared__ float warp_sums[LR_WARPS];
  const AllReduceArgs& ar = a.all_reduce;
  const NormArgs& norm = a.norm;
  const int rank = (int)ar.bar.rank;
  const u64 groups = (norm.hidden + D::PER_PACK - 1) / D::PER_PACK;
  const u64 share = (groups + W - 1) / W;

  const auto reduce = [&](const char* const (&src)[W]) {
    // As in the one-stage body: peers' inputs start on a packet.
    const u32 rows_aligned = norm.hidden % D::PER_PACK == 0;
    // This rank's run of each row: groups [own_first, own_first + own).
    // The block's rows' runs are one list, so that short runs (many ranks,
    // short rows) still keep every thread busy.
    Pack* mine = (Pack*)lr_scratch(ar.bar, rank);
    const u64 own_first = (u64)rank * share;
    const u64 own =
        own_first >= groups ? 0 : (groups - own_first < share ? groups - own_first : share);
    const u64 block_rows =
        blockIdx.x < norm.rows ? (norm.rows - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    for (u64 i = threadIdx.x; i < block_rows * own; i += LR_THREADS) {
      const u64 row = blockIdx.x + (i / own) * gridDim.x;
      const u64 g = own_first + i % own;
      const u64 e = row * norm.hidden + g * D::PER_PACK;
      const u64 n = lr_group_lanes<D>(norm, g);
      Pack p[W];
#pragma unroll
      for (int r = 0; r < W; ++r) p[r] = lr_load_group<D>(src[r], e, n, rows_aligned);
      mine[row * share + (g - own_first)] = lr_reduce<D, W>(p);
    }
  };

  const auto gather = [&]() {
    // The owner's scratch straight from the (grid-constant) argument: an
    // array of the W addresses indexed at run time would live in local
    // memory.
    for (u64 row = blockIdx.x; row < norm.rows; row += gridDim.x) {
      lr_add_rms_norm_row<D>(norm, row, warp_sums, [&](u64 e, u64) {
        const u64 g = (e - row * norm.hidden) / D::PER_PACK;
        const u64 owner = g / share;
        const Pack* run = (const Pack*)lr_scratch(ar.bar, (int)owner);
        return run[row * share + (g - owner * share)];
      });
    }
  };

  lr_two_stage_frame<W>(ar, reduce, gather);
}

struct FusedPushArgs {
  PushArgs push;  // its output is unused; count: elements of the rows
  NormArgs norm;  // rows and hidden of this launch
};

template <typename D, int W>
static __device__ __forceinline__ void lr_fused_push(const FusedPushArgs& a) {
  __shared__ float warp_sums[LR_WARPS];
  const PushArgs& push = a.push;
  const NormArgs& norm = a.norm;
  const int rank = (int)push.bar.rank;
  const u32 slot = lr_push_slot(push.push[rank]);
  const u64 groups = (norm.hidden + D::PER_PACK - 1) / D::PER_PACK;
  // This rank's group at element e (n elements), marker rewritten.
  const auto mine = [&](u64 e, u64 n) {
    return lr_without_empty<D>(lr_load_group<D>(push.input, e, n, norm.vector));
  };

  // Send: the block's rows, in the groups its threads will normalise.
  for (u64 row = blockIdx.x; row < norm.rows; row += gridDim.x) {
    for (u64 g = threadIdx.x; g < groups; g += LR_THREADS) {
      const u64 e = row * norm.hidden + g * D::PER_PACK;
      lr_push_send<W>(push, slot, row * groups + g, mine(e, lr_group_lanes<D>(norm, g)));
    }
  }

  // Receive and normalise. A thread that timed out stops waiting but keeps
  // taking part in the block's sums (they hold __syncthreads). After each
  // row the whole block learns of a timeout, so a dead peer costs the block
  // one deadline, not one per row.
  bool timed_out = false;
  for (u64 row = blockIdx.x; row < norm.rows; row += gridDim.x) {
    lr_add_rms_norm_row<D>(norm, row, warp_sums, [&](u64 e, u64 n) {
      const u64 j = row * groups + (e - row * norm.hidden) / D::PER_PACK;
      Pack p[W];
#pragma unroll
      for (int r = 0; r < W; ++r) {
        p[r] = r == rank ? mine(e, n) : lr_push_wait<D, W>(push, slot, j, r, timed_out);
      }
      if (!timed_out) lr_push_reset<W>(push, slot, j);
      return lr_reduce<D, W>(p);
    });
    timed_out = __syncthreads_or(timed_out);
  }
  lr_push_finish(push, timed_out);
}

#define LR_FUSED_KERNELS(NAME, D, W)                                                            \
  extern "C" __global__ void __launch_bounds__(LR_THREADS)                                     \
      linkreduce_fused_norm_one_stage_##NAME##_w##W(const __grid_constant__ FusedNormArgs a) {  \
    lr_fused_one_stage<D, W>(a);                                                               \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(LR_THREADS)                                     \
      linkreduce_fused_norm_push_##NAME##_w##W(const __grid_constant__ FusedPushArgs a) {      \
    lr_fused_push<D, W>(a);                                                                    \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(LR_THREADS)                                     \
      linkreduce_fused_norm_two_stage_##NAME##_w##W(const __grid_constant__ FusedNormArgs a) { \
    lr_fused_two_stage<D, W>(a);                                                               \
  }

LR_FOR_WORLDS(LR_FUSED_KERNELS, f16, F16)
LR_FOR_WORLDS(LR_FUSED_KERNELS, bf16, BF16)
