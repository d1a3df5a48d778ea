// Kernels that make and check data for correctness runs (`linkreduce check`,
// the GPU tests), compiled as their own program: all-reduce users never load
// them. No CUDA headers, like the all-reduce kernels.
//
// Values are random, non-integer, of mixed sign and magnitude, with some
// zeros of both signs and (in f32) the bit pattern push reserves as its
// marker. Element i of rank r depends only on (seed, r, i), so a check can
// regenerate every rank's input and sum it without reading any peer. The
// host mirrors the generator in src/verify/values.rs; change both together.

// splitmix64's finaliser.
static __device__ __forceinline__ u64 lr_mix(u64 x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

// The f32 bits of element `i` of `rank`'s input, before rounding to the
// element type: magnitudes 2^-8 to 2^9, one in 64 a signed zero, one in 64
// the f32 pattern 0x80008000.
static __device__ __forceinline__ u32 lr_value_bits(u64 seed, u32 rank, u64 i) {
  const u64 h = lr_mix(seed ^ lr_mix(((u64)rank << 56) ^ i));
  const u32 sign = (u32)(h >> 63) << 31;
  const u32 kind = (u32)(h >> 52) & 63u;
  if (kind == 0) return sign;
  if (kind == 1) return 0x80008000u;
  const u32 exponent = 119u + (u32)((h >> 32) % 18u);
  return sign | exponent << 23 | ((u32)h & 0x7fffffu);
}

// What push sends in place of an element equal to its marker (push.cu).
template <typename D>
static __device__ __forceinline__ u32 lr_unmarked(u32 b) {
  if (D::BITS == 32) return b == 0x80008000u ? 0x80000000u : b;
  return b == 0x8000u ? 0u : b;
}

// Element `i` of `rank`'s input, as storage bits.
template <typename D>
static __device__ __forceinline__ u32 lr_input(u64 seed, u32 rank, u64 i) {
  return D::from_f32(__uint_as_float(lr_value_bits(seed, rank, i)));
}

// What check kernels compare against.
enum Expect : u32 {
  EXPECT_INPUT = 0,     // rank `rank`'s input for `seed`
  EXPECT_SUM = 1,       // the sum of every rank's input, in rank order, in f32, rounded once
  EXPECT_PUSH_SUM = 2,  // the same with push's marker rewritten first
};

struct CheckArgs {
  const char* data;
  u64 count;
  u64 seed;
  u32 world;
  u32 rank;
  u32 expect;
  // Zeroed before the check: [0] elements that differ, [1] ~(the lowest
  // such index), [2] an order-independent digest of the bits seen.
  u64* result;
};

template <typename D>
static __device__ __forceinline__ u32 lr_expected(const CheckArgs& a, u64 i) {
  if (a.expect == EXPECT_INPUT) return lr_input<D>(a.seed, a.rank, i);
  float sum = 0.0f;
  for (u32 r = 0; r < a.world; ++r) {
    u32 bits = lr_input<D>(a.seed, r, i);
    if (a.expect == EXPECT_PUSH_SUM) bits = lr_unmarked<D>(bits);
    // Starting from the first rank's value, not 0.0f + it: -0.0 + +0.0
    // would lose the sign a lone -0.0 keeps.
    sum = r == 0 ? D::to_f32(bits) : sum + D::to_f32(bits);
  }
  return D::from_f32(sum);
}

template <typename D>
static __device__ void lr_fill(char* data, u64 count, u64 seed, u32 rank) {
  typename D::Bits* out = (typename D::Bits*)data;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < count;
       i += (u64)gridDim.x * blockDim.x) {
    out[i] = (typename D::Bits)lr_input<D>(seed, rank, i);
  }
}

template <typename D>
static __device__ void lr_check(const CheckArgs& a) {
  const typename D::Bits* data = (const typename D::Bits*)a.data;
  u64 digest = 0;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < a.count;
       i += (u64)gridDim.x * blockDim.x) {
    const u32 got = data[i];
    digest += lr_mix(i * 0x9e3779b97f4a7c15ull ^ got);
    if (got != lr_expected<D>(a, i)) {
      atomicAdd(&a.result[0], 1ull);
      atomicMax(&a.result[1], ~i);
    }
  }
  atomicAdd(&a.result[2], digest);
}

#define LR_CHECK_KERNELS(NAME, D)                                                               \
  extern "C" __global__ void __launch_bounds__(LR_CHECK_THREADS)                                     \
      linkreduce_fill_##NAME(char* data, u64 count, u64 seed, u32 rank) {                      \
    lr_fill<D>(data, count, seed, rank);                                                       \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(LR_CHECK_THREADS) linkreduce_check_##NAME(CheckArgs a) { \
    lr_check<D>(a);                                                                             \
  }

LR_CHECK_KERNELS(f32, F32)
LR_CHECK_KERNELS(f16, F16)
LR_CHECK_KERNELS(bf16, BF16)
