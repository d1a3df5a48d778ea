// What every program shares: integer names, the element types (storage
// bits, packet width, conversion through f32), the 16-byte packet data moves
// in, and the rank-order reduction of packets.
// Compiled first in each program, after the constants the host generates
// (src/kernels/mod.rs); no CUDA headers.

typedef unsigned int u32;
typedef unsigned long long u64;

struct F32 {
  typedef u32 Bits;
  enum { PER_PACK = 4, BITS = 32 };
  static __device__ __forceinline__ float to_f32(u32 b) { return __uint_as_float(b); }
  static __device__ __forceinline__ u32 from_f32(float f) { return __float_as_uint(f); }
};

struct BF16 {
  typedef unsigned short Bits;
  enum { PER_PACK = 8, BITS = 16 };
  static __device__ __forceinline__ float to_f32(u32 b) { return __uint_as_float(b << 16); }
  static __device__ __forceinline__ u32 from_f32(float f) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
  }
};

struct F16 {
  typedef unsigned short Bits;
  enum { PER_PACK = 8, BITS = 16 };
  static __device__ __forceinline__ float to_f32(u32 b) {
    float f;
    unsigned short h = (unsigned short)b;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
  static __device__ __forceinline__ u32 from_f32(float f) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
  }
};

struct __align__(16) Pack {
  u32 w[4];
};

// Element `i` of a packet, as storage bits.
template <typename D>
static __device__ __forceinline__ u32 lr_lane(const Pack& p, int i) {
  if (D::BITS == 32) return p.w[i];
  return (p.w[i / 2] >> (16 * (i % 2))) & 0xffffu;
}

// A packet of the `n` (at most a packet's) elements at `at`, zeros after
// them: for data that does not start or end on a packet boundary. The loop
// runs over every lane with `n` as a condition, so that each lane's index
// is a constant and the packet stays in registers (a loop to `n` indexed
// it at run time, which put it in local memory).
template <typename D>
static __device__ __forceinline__ Pack lr_load_lanes(const typename D::Bits* at, u64 n) {
  Pack p;
#pragma unroll
  for (int w = 0; w < 4; ++w) p.w[w] = 0;
#pragma unroll
  for (int i = 0; i < D::PER_PACK; ++i) {
    if ((u64)i >= n) break;
    const u32 bits = at[i];
    if (D::BITS == 32) {
      p.w[i] = bits;
    } else {
      p.w[i / 2] |= bits << (16 * (i % 2));
    }
  }
  return p;
}

// Stores the first `n` elements of a packet at `at` (lanes as above).
template <typename D>
static __device__ __forceinline__ void lr_store_lanes(typename D::Bits* at, u64 n, const Pack& p) {
#pragma unroll
  for (int i = 0; i < D::PER_PACK; ++i) {
    if ((u64)i >= n) break;
    at[i] = (typename D::Bits)lr_lane<D>(p, i);
  }
}

// Packet `j` of the `count` elements at `base` (16-byte aligned): whole,
// or (the last, partial packet) its elements and zeros after them.
template <typename D>
static __device__ __forceinline__ Pack lr_load_packet(const char* base, u64 j, u64 count) {
  const u64 left = count - j * D::PER_PACK;
  if (left >= (u64)D::PER_PACK) return ((const Pack*)base)[j];
  return lr_load_lanes<D>((const typename D::Bits*)base + j * D::PER_PACK, left);
}

// Stores packet `j` of the `count` elements at `base`: whole, or only the
// elements of the last, partial packet.
template <typename D>
static __device__ __forceinline__ void lr_store_packet(char* base, u64 j, u64 count, const Pack& p) {
  const u64 left = count - j * D::PER_PACK;
  if (left >= (u64)D::PER_PACK) {
    ((Pack*)base)[j] = p;
    return;
  }
  lr_store_lanes<D>((typename D::Bits*)base + j * D::PER_PACK, left, p);
}

// Sums W packets in rank order and rounds once.
template <typename D, int W>
static __device__ __forceinline__ Pack lr_reduce(const Pack (&in)[W]) {
  Pack out;
#pragma unroll
  for (int w = 0; w < 4; ++w) out.w[w] = 0;
#pragma unroll
  for (int i = 0; i < D::PER_PACK; ++i) {
    float sum = D::to_f32(lr_lane<D>(in[0], i));
#pragma unroll
    for (int r = 1; r < W; ++r) sum += D::to_f32(lr_lane<D>(in[r], i));
    u32 bits = D::from_f32(sum);
    if (D::BITS == 32) {
      out.w[i] = bits;
    } else {
      out.w[i / 2] |= bits << (16 * (i % 2));
    }
  }
  return out;
}
