// Types every program shares: integer names and the element types, with
// their storage bits, packet width and conversion through f32. Prepended
// to each program before compilation (src/kernels/mod.rs); no CUDA headers.

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
