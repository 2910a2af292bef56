// Lets neuron.cu compile as plain C++ (g++ -DSNN_HOST) so CI, which has no GPU, runs the kernel's own
// arithmetic on the host. The launch loops over blocks and threads in order (the kernel has no
// inter-thread communication, so order does not matter).
#pragma once
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict

struct snn_dim3 { unsigned int x = 0, y = 0, z = 0; };
static thread_local snn_dim3 blockIdx, threadIdx, blockDim, gridDim;

static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }

static inline float snn_f16_to_f32(unsigned short h) {
  unsigned int sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
  if (exp == 0) {
    if (man == 0) { u = sign; }
    else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      u = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) { u = sign | 0x7F800000u | (man << 13); }
  else { u = sign | ((exp + 127 - 15) << 23) | (man << 13); }
  return __uint_as_float(u);
}

static inline unsigned short snn_f32_to_f16(float f) {  // round to nearest even
  unsigned int u = __float_as_uint(f), sign = (u >> 16) & 0x8000u;
  int exp = (int)((u >> 23) & 0xFF) - 127 + 15;
  unsigned int man = u & 0x7FFFFFu;
  if (((u >> 23) & 0xFF) == 0xFF) return (unsigned short)(sign | 0x7C00u | (man ? 0x200u : 0));
  if (exp >= 31) return (unsigned short)(sign | 0x7C00u);
  if (exp <= 0) {
    if (exp < -10) return (unsigned short)sign;
    man |= 0x800000u;
    unsigned int shift = (unsigned int)(14 - exp), half = man >> shift, rem = man & ((1u << shift) - 1);
    unsigned int mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return (unsigned short)(sign | half);
  }
  unsigned int h = sign | ((unsigned int)exp << 10) | (man >> 13), rem = man & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return (unsigned short)h;
}

// Vector accesses: a GPU faults ("misaligned address") on a vector access not aligned to its size; here
// the access is counted in snn_host_misaligned (the launcher stand-in turns a count into that error) and
// done bytewise, so a bad launch is reported, never undefined behaviour.
static long long snn_host_misaligned = 0;
template <typename V, typename T> static inline V snn_host_load(const T* p) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(V) != 0) ++snn_host_misaligned;
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T> static inline void snn_host_store(T* p, const V& v) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(V) != 0) ++snn_host_misaligned;
  std::memcpy(p, &v, sizeof(V));
}

// Run a kernel over a grid on the host: SNN_HOST_LAUNCH(kernel<...>, blocks, threads, args...)
#define SNN_HOST_LAUNCH(kernel, blocks, threads, ...)                          \
  do {                                                                         \
    gridDim.x = (blocks); blockDim.x = (threads);                              \
    for (unsigned int b = 0; b < (unsigned int)(blocks); ++b)                  \
      for (unsigned int t = 0; t < (unsigned int)(threads); ++t) {             \
        blockIdx.x = b; threadIdx.x = t; kernel(__VA_ARGS__);                  \
      }                                                                        \
  } while (0)
