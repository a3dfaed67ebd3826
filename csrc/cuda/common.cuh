// Device helpers shared by the CUDA kernels. Deliberately free of torch headers: the .cu files
// only need the CUDA runtime, which keeps each of them a few seconds to compile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "launch.h"

namespace fastbptt {
namespace cuda {

// Storage type -> accumulation type (float for float/half/bfloat16, double for double).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

template <typename A> __device__ __forceinline__ A load(const float* p) { return static_cast<A>(*p); }
template <typename A> __device__ __forceinline__ A load(const double* p) { return static_cast<A>(*p); }
template <typename A> __device__ __forceinline__ A load(const __half* p) { return static_cast<A>(__half2float(*p)); }
template <typename A> __device__ __forceinline__ A load(const __nv_bfloat16* p) {
  return static_cast<A>(__bfloat162float(*p));
}

template <typename A> __device__ __forceinline__ void store(float* p, A v) { *p = static_cast<float>(v); }
template <typename A> __device__ __forceinline__ void store(double* p, A v) { *p = static_cast<double>(v); }
template <typename A> __device__ __forceinline__ void store(__half* p, A v) { *p = __float2half_rn(static_cast<float>(v)); }
template <typename A> __device__ __forceinline__ void store(__nv_bfloat16* p, A v) {
  *p = __float2bfloat16_rn(static_cast<float>(v));
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

// Row b of the step is real (nullptr: every row is).
__device__ __forceinline__ bool row_valid(const bool* valid_t, int64_t b) { return valid_t == nullptr || valid_t[b]; }

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// Turns a CUDA error into a C++ exception (the torch glue converts it into a RuntimeError).
inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastbptt CUDA kernel ") + what + " failed: " + cudaGetErrorString(err));
  }
}

}  // namespace cuda
}  // namespace fastbptt

// Calls body with `scalar_t` bound to the storage type of dtype `dt`.
#define FASTBPTT_DISPATCH(dt, ...)                                      \
  [&] {                                                                 \
    switch (dt) {                                                       \
      case ::fastbptt::cuda::Dtype::f32: { using scalar_t = float; return __VA_ARGS__(); }          \
      case ::fastbptt::cuda::Dtype::f64: { using scalar_t = double; return __VA_ARGS__(); }         \
      case ::fastbptt::cuda::Dtype::f16: { using scalar_t = __half; return __VA_ARGS__(); }         \
      default: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }                           \
    }                                                                   \
  }()
