// Residual add and RMSNorm of whole rows: the one definition of their
// arithmetic, shared by the plain kernel below and the fused all-reduce
// kernels (fused.cu), so that both round at the same points in the same
// order (docs/fused.md, "Rounding"). Appended to push.cu before compilation.
//
// Per element, in f32, each operation rounded to nearest even:
//   residual = D(residual + sum)
//   out      = D(residual * inv_rms * weight)     (two multiplies, in that order)
// per row:
//   inv_rms  = 1 / sqrt(sum_of_squares(residual) / hidden + eps)
// Explicit PTX with .rn keeps the compiler from contracting into FMAs we did
// not choose, and correctly rounded sqrt and reciprocal (not the
// approximate rsqrt) let the host mirror every bit (verify/norm.rs).

static __device__ __forceinline__ float lr_add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

static __device__ __forceinline__ float lr_mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

static __device__ __forceinline__ float lr_fma_rn(float a, float b, float c) {
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
}

// 1 / sqrt(mean + eps), each step correctly rounded.
static __device__ __forceinline__ float lr_inv_rms(float sum_of_squares, u64 hidden, float eps) {
  float mean, root, inv;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(mean) : "f"(sum_of_squares), "f"((float)hidden));
  asm("sqrt.rn.f32 %0, %1;" : "=f"(root) : "f"(lr_add_rn(mean, eps)));
  asm("rcp.rn.f32 %0, %1;" : "=f"(inv) : "f"(root));
  return inv;
}

#define LR_WARPS (LR_THREADS / 32)

// The block's total of one value per thread, in a fixed order: a butterfly
// within each warp (offsets 16, 8, 4, 2, 1; every lane ends with the same
// bits, since each addition is commutative), then the warps' totals added
// in warp order. Every thread gets the total. `warp_sums` is shared memory.
static __device__ __forceinline__ float lr_block_sum(float v, float* warp_sums) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    u32 other;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;"
                 : "=r"(other)
                 : "r"(__float_as_uint(v)), "r"(offset));
    v = lr_add_rn(v, __uint_as_float(other));
  }
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  float total = warp_sums[0];
#pragma unroll
  for (int w = 1; w < LR_WARPS; ++w) total = lr_add_rn(total, warp_sums[w]);
  // The next row's totals overwrite warp_sums only after every thread read.
  __syncthreads();
  return total;
}

// Where the rows are; the same on every rank but for the addresses.
struct NormArgs {
  char* residual;      // rows x hidden, added to in place
  const char* weight;  // hidden
  char* out;           // rows x hidden
  u64 rows;
  u64 hidden;
  float eps;
  // Whether whole packets may be moved: hidden is a multiple of a packet's
  // elements and every buffer this kernel names is 16-byte aligned.
  u32 vector;
};

// Group `g` of a row: its elements [g*PER_PACK, ...), at most a packet's.
template <typename D>
static __device__ __forceinline__ u64 lr_group_lanes(const NormArgs& a, u64 g) {
  const u64 left = a.hidden - g * D::PER_PACK;
  return left < (u64)D::PER_PACK ? left : (u64)D::PER_PACK;
}

// The `n` elements from element `e` of `base`, whole packets when `vector`.
template <typename D>
static __device__ __forceinline__ Pack lr_load_group(const char* base, u64 e, u64 n, u32 vector) {
  if (vector) return ((const Pack*)base)[e / D::PER_PACK];
  return lr_load_lanes<D>((const typename D::Bits*)base + e, n);
}

template <typename D>
static __device__ __forceinline__ void lr_store_group(char* base, u64 e, u64 n, u32 vector,
                                                      const Pack& p) {
  if (vector) {
    ((Pack*)base)[e / D::PER_PACK] = p;
  } else {
    lr_store_lanes<D>((typename D::Bits*)base + e, n, p);
  }
}

// Applies `f(lane, x)` to each element of a packet as f32 and packs what
// it returns, rounded to D.
template <typename D, typename F>
static __device__ __forceinline__ Pack lr_map(const Pack& p, F f) {
  Pack out;
#pragma unroll
  for (int w = 0; w < 4; ++w) out.w[w] = 0;
#pragma unroll
  for (int i = 0; i < D::PER_PACK; ++i) {
    const u32 bits = D::from_f32(f(i, D::to_f32(lr_lane<D>(p, i))));
    if (D::BITS == 32) {
      out.w[i] = bits;
    } else {
      out.w[i / 2] |= bits << (16 * (i % 2));
    }
  }
  return out;
}

// Adds row `row` of the sum into the residual and normalises it, with the
// whole block. `load_sum(e, n)` gives the (rounded) sum of the `n` elements
// from element `e`. Thread t takes groups t, t + LR_THREADS, ... of the row
// in both passes: it rereads only what it wrote itself, and its squares
// are accumulated in that order, the fixed order the host mirrors.
template <typename D, typename LoadSum>
static __device__ __forceinline__ void lr_add_rms_norm_row(const NormArgs& a, u64 row,
                                                           float* warp_sums, LoadSum load_sum) {
  const u64 groups = (a.hidden + D::PER_PACK - 1) / D::PER_PACK;
  const u64 base = row * a.hidden;
  float squares = 0.0f;
  for (u64 g = threadIdx.x; g < groups; g += LR_THREADS) {
    const u64 e = base + g * D::PER_PACK;
    const u64 n = lr_group_lanes<D>(a, g);
    const Pack sum = load_sum(e, n);
    const Pack old = lr_load_group<D>(a.residual, e, n, a.vector);
    const Pack added = lr_map<D>(old, [&](int i, float x) {
      return lr_add_rn(x, D::to_f32(lr_lane<D>(sum, i)));
    });
    lr_store_group<D>(a.residual, e, n, a.vector, added);
    // Unrolled with constant lanes, so the packet stays in registers.
#pragma unroll
    for (int i = 0; i < D::PER_PACK; ++i) {
      if ((u64)i < n) {
        const float x = D::to_f32(lr_lane<D>(added, i));
        squares = lr_fma_rn(x, x, squares);
      }
    }
  }
  const float inv_rms = lr_inv_rms(lr_block_sum(squares, warp_sums), a.hidden, a.eps);
  for (u64 g = threadIdx.x; g < groups; g += LR_THREADS) {
    const u64 e = base + g * D::PER_PACK;
    const u64 n = lr_group_lanes<D>(a, g);
    const Pack residual = lr_load_group<D>(a.residual, e, n, a.vector);
    const Pack weight = lr_load_group<D>(a.weight, g * D::PER_PACK, n, a.vector);
    const Pack out = lr_map<D>(residual, [&](int i, float x) {
      return lr_mul_rn(lr_mul_rn(x, inv_rms), D::to_f32(lr_lane<D>(weight, i)));
    });
    lr_store_group<D>(a.out, e, n, a.vector, out);
  }
}

// The plain kernel: an all-reduce's output (`sum`) added into the residual
// and normalised, one row per block at a time. `sum` may be `out`.
struct AddRmsNormArgs {
  const char* sum;
  NormArgs norm;
};

template <typename D>
static __device__ __forceinline__ void lr_add_rms_norm(const AddRmsNormArgs& a) {
  __shared__ float warp_sums[LR_WARPS];
  for (u64 row = blockIdx.x; row < a.norm.rows; row += gridDim.x) {
    lr_add_rms_norm_row<D>(a.norm, row, warp_sums, [&](u64 e, u64 n) {
      return lr_load_group<D>(a.sum, e, n, a.norm.vector);
    });
  }
}

#define LR_NORM_KERNEL(NAME, D)                                                                 \
  extern "C" __global__ void __launch_bounds__(LR_THREADS)                                     \
      linkreduce_add_rms_norm_##NAME(AddRmsNormArgs a) { lr_add_rms_norm<D>(a); }

LR_NORM_KERNEL(f16, F16)
LR_NORM_KERNEL(bf16, BF16)
