// Shared machinery of the persistent kernels (persistent_gru.cu, persistent_lstm.cu): launch
// planning against the device's shared memory and co-residency, the cooperative launch, and the
// block-level product with the block's resident slice of the recurrent weights.
#pragma once

#include <cooperative_groups.h>

#include "common.cuh"

namespace fastbptt {
namespace cuda {
namespace persistent {

namespace cg = cooperative_groups;

constexpr int kBlockThreads = 256;  // 8 warps; a warp computes one hidden unit at a time
constexpr int kWarps = kBlockThreads / 32;
constexpr int kBT = 8;              // batch rows per tile (accumulators per lane and row)
constexpr int kKC = 256;            // columns of the staged vector tile
constexpr size_t kTileBytes = sizeof(float) * kBT * kKC;

__host__ __device__ constexpr size_t align16(size_t n) { return (n + 15) / 16 * 16; }

struct Plan {
  int blocks = 0;
  int units = 0;  // hidden units per block (the last block may own fewer)
  size_t smem = 0;
  std::string why;  // non-empty: declined, nothing may be launched
};

// Splits H units over at most one block per SM; the block keeps rows_per_unit x K weights of
// `elem` bytes per unit, a vector tile and `extra_per_unit` bytes per unit in shared memory.
inline Plan make_plan(int64_t B, int64_t H, int rows_per_unit, int64_t K, size_t elem, size_t extra_per_unit,
                      const void* kernel) {
  Plan plan;
  int dev = 0, sms = 0, smem_optin = 0, coop = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  if (err != cudaSuccess) {
    cudaGetLastError();
    plan.why = std::string("cannot query the device: ") + cudaGetErrorString(err);
    return plan;
  }
  if (!coop) {
    plan.why = "the device does not support cooperative launch";
    return plan;
  }
  if (H <= 0 || H > (1 << 20) || B > (1 << 24)) {
    plan.why = "hidden size or batch out of the kernel's index range";
    return plan;
  }
  plan.units = static_cast<int>((H + sms - 1) / sms);
  plan.blocks = static_cast<int>((H + plan.units - 1) / plan.units);
  plan.smem = align16(elem * rows_per_unit * plan.units * K) + kTileBytes + align16(extra_per_unit * plan.units);
  if (plan.smem > static_cast<size_t>(smem_optin)) {
    plan.why = "the recurrent weights need " + std::to_string(plan.smem) + " bytes of shared memory per block (" +
               std::to_string(plan.units) + " units x " + std::to_string(rows_per_unit) + " x " +
               std::to_string(K) + " x " + std::to_string(elem) + " bytes, plus tiles) on " + std::to_string(sms) +
               " SMs; the on-chip capacity is " + std::to_string(smem_optin) + " bytes per block";
    return plan;
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem));
  int per_sm = 0;
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlockThreads, plan.smem);
  if (err != cudaSuccess) {
    cudaGetLastError();
    plan.why = std::string("occupancy query failed: ") + cudaGetErrorString(err);
    return plan;
  }
  if (static_cast<int64_t>(per_sm) * sms < plan.blocks) {
    plan.why = std::to_string(plan.blocks) + " blocks cannot be co-resident (" + std::to_string(per_sm) +
               " per SM x " + std::to_string(sms) + " SMs)";
  }
  return plan;
}

inline std::string launch(const void* kernel, const Plan& plan, void** args, cudaStream_t stream) {
  const cudaError_t err =
      cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(kBlockThreads), args, plan.smem, stream);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("cooperative launch failed: ") + cudaGetErrorString(err);
  }
  return "";
}

// The block's product with its resident weights, for every batch row:
//   acc[r][bb] = sum_k w_s[(u * R + r) * K + k] * x[(b0 + bb) * K + k]
// for each owned unit u (one warp per unit per pass) and batch tile b0; x [B, K] float is
// published by other blocks, so it is read through L2 (__ldcg) into the shared tile x_s
// [kBT, kKC]. epilogue(u, b0, acc) runs in the unit's warp with the sums in every lane.
// Every thread of the block must call this (it has block barriers).
template <int R, typename T, typename Epilogue>
__device__ __forceinline__ void block_product(const T* w_s, float* x_s, const float* x, int B, int K, int n_units,
                                              Epilogue epilogue) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b0 = 0; b0 < B; b0 += kBT) {
    for (int p = 0; p < n_units; p += kWarps) {  // same trip count in every warp: barriers stay uniform
      const int u = p + warp;
      const bool active = u < n_units;
      float acc[R][kBT];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int bb = 0; bb < kBT; ++bb) acc[r][bb] = 0.f;
      for (int k0 = 0; k0 < K; k0 += kKC) {
        const int kc = min(kKC, K - k0);
        for (int idx = threadIdx.x; idx < kBT * kKC; idx += blockDim.x) {
          const int bb = idx / kKC, k = idx - bb * kKC;
          x_s[idx] = (b0 + bb < B && k < kc) ? __ldcg(x + static_cast<int64_t>(b0 + bb) * K + k0 + k) : 0.f;
        }
        __syncthreads();
        if (active) {
          const T* w0 = w_s + static_cast<int64_t>(u) * R * K + k0;
          for (int k = lane; k < kc; k += 32) {
            float w[R];
#pragma unroll
            for (int r = 0; r < R; ++r) w[r] = load<float>(w0 + r * K + k);
#pragma unroll
            for (int bb = 0; bb < kBT; ++bb) {
              const float xv = x_s[bb * kKC + k];
#pragma unroll
              for (int r = 0; r < R; ++r) acc[r][bb] += w[r] * xv;
            }
          }
        }
        __syncthreads();
      }
      if (!active) continue;
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int bb = 0; bb < kBT; ++bb)
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) acc[r][bb] += __shfl_xor_sync(0xffffffffu, acc[r][bb], off);
      epilogue(u, b0, acc);
    }
  }
}

}  // namespace persistent
}  // namespace cuda
}  // namespace fastbptt

// Binds scalar_t to the storage type of dt for the persistent kernels (no float64).
#define FASTBPTT_DISPATCH_PERSISTENT(dt, ...)                                             \
  [&]() -> std::string {                                                                  \
    switch (dt) {                                                                         \
      case ::fastbptt::cuda::Dtype::f32: { using scalar_t = float; return __VA_ARGS__(); }           \
      case ::fastbptt::cuda::Dtype::f16: { using scalar_t = __half; return __VA_ARGS__(); }          \
      case ::fastbptt::cuda::Dtype::bf16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }  \
      default: return "float64 is not supported by the persistent kernels";               \
    }                                                                                     \
  }()
