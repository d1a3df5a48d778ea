// Reduce-scatter and all-gather (docs/scatter_gather.md), pull-based, in
// the one-stage frame of allreduce.cu (start barrier with source words,
// the body, one end barrier that keeps every input alive while peers read
// it). Appended to allreduce.cu before compilation.
//
// A rank tells each peer where to read through its own source word
// (`sources[peer]`): in the reduce-scatter, the block of its input that the
// peer reduces; in the all-gather, its whole input, the same for all.

struct ScatterGatherArgs {
  AllReduceArgs frame;        // frame.source is unused: `sources` name the inputs
  u64 sources[LR_MAX_RANKS];  // the source word this rank sends to each peer
  u64 out_stride;             // all-gather: elements between blocks of the output
};

// Rank r writes the rank-order sum of every rank's block r (frame.count
// elements) into frame.output: the first half of two-stage, straight into
// the output. In place (the output is this rank's own block of its input),
// only this rank reads that block, element by element before writing it.
template <typename D, int W>
static __device__ __forceinline__ void lr_reduce_scatter(const ScatterGatherArgs& a) {
  lr_one_stage_frame_from<W>(
      a.frame, [&](u32 peer) { return a.sources[peer]; },
      [&](const char* const (&src)[W]) {
        lr_sum_into<D, W>(src, a.frame.output, a.frame.count);
      });
}

// Block r of the output (frame.count elements at frame.output + r *
// out_stride elements, packet-aligned) is rank r's input. In place, this
// rank's block is its input, which peers may still read: left alone.
template <typename D, int W>
static __device__ __forceinline__ void lr_all_gather(const ScatterGatherArgs& a) {
  lr_one_stage_frame_from<W>(
      a.frame, [&](u32 peer) { return a.sources[peer]; },
      [&](const char* const (&src)[W]) {
        typedef typename D::Bits Bits;
        char* out[W];
#pragma unroll
        for (int r = 0; r < W; ++r) out[r] = a.frame.output + (u64)r * a.out_stride * sizeof(Bits);
        lr_for_packets<D, W>(
            src, a.frame.count,
            [&](u64 i, const Pack (&p)[W]) {
#pragma unroll
              for (int r = 0; r < W; ++r) {
                if (src[r] != out[r]) ((Pack*)out[r])[i] = p[r];
              }
            },
            [&](u64 e) {
#pragma unroll
              for (int r = 0; r < W; ++r) {
                if (src[r] != out[r]) ((Bits*)out[r])[e] = ((const Bits*)src[r])[e];
              }
            });
      });
}

#define LR_SCATTER_GATHER_KERNELS(NAME, D, W)                                                  \
  extern "C" __global__ void __launch_bounds__(LR_THREADS)                                     \
      linkreduce_reduce_scatter_##NAME##_w##W(const __grid_constant__ ScatterGatherArgs a) {   \
    lr_reduce_scatter<D, W>(a);                                                                \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(LR_THREADS)                                     \
      linkreduce_all_gather_##NAME##_w##W(const __grid_constant__ ScatterGatherArgs a) {       \
    lr_all_gather<D, W>(a);                                                                    \
  }

LR_FOR_WORLDS(LR_SCATTER_GATHER_KERNELS, f32, F32)
LR_FOR_WORLDS(LR_SCATTER_GATHER_KERNELS, f16, F16)
LR_FOR_WORLDS(LR_SCATTER_GATHER_KERNELS, bf16, BF16)
