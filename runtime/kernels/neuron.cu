// Fused multi-step spiking neuron: one thread per neuron, the membrane in a register for all steps.
// Reads each input once (once in all if STATIC: the same input every step), writes each output once.
// Arithmetic matches runtime/torch_backend.py exactly in float32 (no FMA contraction: __fadd_rn etc.).
//
// Template parameters: DT storage dtype of x and out (0 float32, 1 float16, 2 bfloat16; state is float32),
// STATIC input fed at every step, SOFT reset (else hard, to v_reset), LEAK (LIF: v = decay * v + x),
// COUNT adds each neuron's spike count to `count` (firing rates, rate decoding). SIGNED (with SOFT and
// COUNT only): signed spikes, -theta where H < 0 while the net count is positive; `count` is then the net
// count itself, read at the start, updated every step, written back (runtime/torch_backend.py multistep_signed).
// Compiled by NVRTC through CuPy at run time, by nvcc to PTX in CI, and by g++ through host_shim.h.

#ifdef SNN_HOST
#include "host_shim.h"
#endif

typedef unsigned short snn_u16;

#ifndef SNN_HOST
__device__ __forceinline__ float snn_f16_to_f32(snn_u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ snn_u16 snn_f32_to_f16(float f) {
  snn_u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
#endif

template <int DT> struct SnnStorage { typedef snn_u16 type; };
template <> struct SnnStorage<0> { typedef float type; };

__device__ __forceinline__ float snn_bf16_to_f32(snn_u16 b) {
  return __uint_as_float(((unsigned int)b) << 16);
}
__device__ __forceinline__ snn_u16 snn_f32_to_bf16(float f) {  // round to nearest even; inputs are finite
  unsigned int u = __float_as_uint(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (snn_u16)(u >> 16);
}

template <int DT> __device__ __forceinline__ float snn_load(const typename SnnStorage<DT>::type v);
template <> __device__ __forceinline__ float snn_load<0>(const float v) { return v; }
template <> __device__ __forceinline__ float snn_load<1>(const snn_u16 v) { return snn_f16_to_f32(v); }
template <> __device__ __forceinline__ float snn_load<2>(const snn_u16 v) { return snn_bf16_to_f32(v); }

template <int DT> __device__ __forceinline__ typename SnnStorage<DT>::type snn_store(float v);
template <> __device__ __forceinline__ float snn_store<0>(float v) { return v; }
template <> __device__ __forceinline__ snn_u16 snn_store<1>(float v) { return snn_f32_to_f16(v); }
template <> __device__ __forceinline__ snn_u16 snn_store<2>(float v) { return snn_f32_to_bf16(v); }

template <int DT, int VEC> struct alignas(sizeof(typename SnnStorage<DT>::type) * VEC) SnnVec {
  typename SnnStorage<DT>::type v[VEC];
};

// Vector loads and stores: on the host (CI) the shim checks each address the way the GPU would fault on it.
template <typename V, typename T> __device__ __forceinline__ V snn_vload(const T* p) {
#ifdef SNN_HOST
  return snn_host_load<V>(p);
#else
  return *reinterpret_cast<const V*>(p);
#endif
}
template <typename V, typename T> __device__ __forceinline__ void snn_vstore(T* p, const V& v) {
#ifdef SNN_HOST
  snn_host_store<V>(p, v);
#else
  *reinterpret_cast<V*>(p) = v;
#endif
}

// Neuron i is element i of x[t], out[t], v and count, all laid out alike (any dense dim order: NCHW,
// channels-last, ...); its channel is (i / inner) % C, inner being the channel dim's stride (1 for
// channels-last). VEC consecutive neurons per thread (VEC = 4: 16-byte float32 / 8-byte 16-bit accesses);
// the launcher picks VEC = 4 only when M % 4 == 0 and x and out are aligned, so every access is aligned.
template <int DT, int VEC, bool STATIC, bool SOFT, bool LEAK, bool COUNT, bool SIGNED>
__global__ void snn_neuron(const typename SnnStorage<DT>::type* __restrict__ x,
                           typename SnnStorage<DT>::type* __restrict__ out, float* __restrict__ v,
                           const float* __restrict__ theta, float* __restrict__ count, long long M, int steps,
                           int C, long long inner, float v_reset, float decay) {
  typedef SnnVec<DT, VEC> Vec;
  const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (i0 >= M) return;
  float th[VEC], vi[VEC], xs[VEC], n[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    th[k] = theta[C == 1 ? 0 : (int)(((i0 + k) / inner) % C)];
    vi[k] = v[i0 + k];
    n[k] = SIGNED ? count[i0 + k] : 0.0f;  // SIGNED: the net count so far; else this call's spikes
  }
  if (STATIC) {
    const Vec xv = snn_vload<Vec>(x + i0);
#pragma unroll
    for (int k = 0; k < VEC; ++k) xs[k] = snn_load<DT>(xv.v[k]);
  }
#pragma unroll 4
  for (int t = 0; t < steps; ++t) {
    Vec xv, ov;
    if (!STATIC) xv = snn_vload<Vec>(x + (long long)t * M + i0);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float xt = STATIC ? xs[k] : snn_load<DT>(xv.v[k]);
      const float h = LEAK ? __fadd_rn(__fmul_rn(vi[k], decay), xt) : __fadd_rn(vi[k], xt);
      const bool s = h >= th[k];
      const bool neg = SIGNED && !s && h < 0.0f && n[k] > 0.0f;  // take back an earlier spike
      const float o = s ? th[k] : (neg ? -th[k] : 0.0f);
      ov.v[k] = snn_store<DT>(o);
      vi[k] = SOFT ? __fsub_rn(h, o) : (s ? v_reset : h);
      if (COUNT) n[k] += s ? 1.0f : (neg ? -1.0f : 0.0f);
    }
    snn_vstore<Vec>(out + (long long)t * M + i0, ov);
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    v[i0 + k] = vi[k];
    if (COUNT) count[i0 + k] = SIGNED ? n[k] : count[i0 + k] + n[k];
  }
}
