// All-reduce fused with residual add and RMSNorm (docs/fused.md). Appended
// to norm.cu before compilation.
//
// One-stage: the one-stage frame (allreduce.cu: start barrier, the body,
// end barrier), whose body gives each block whole rows (rows b, b + grid,
// ...): the block reads its rows from every rank, sums them in rank order
// and rounds (what the all-reduce would have written), then adds and
// normalises exactly as the plain kernel does (norm.cu). No rank writes
// anything a peer reads, so the residual and the output may be anywhere.

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

#define LR_FUSED_KERNELS(NAME, D, W)                                                            \
  extern "C" __global__ void __launch_bounds__(LR_THREADS)                                     \
      linkreduce_fused_norm_one_stage_##NAME##_w##W(FusedNormArgs a) {                         \
    lr_fused_one_stage<D, W>(a);                                                               \
  }

LR_FOR_WORLDS(LR_FUSED_KERNELS, f16, F16)
LR_FOR_WORLDS(LR_FUSED_KERNELS, bf16, BF16)
