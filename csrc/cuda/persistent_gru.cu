// Persistent GRU kernels: one cooperative launch per chunk (see docs/cuda.md).
//
// Hidden units are split across thread blocks; block k owns units [u0, u0 + units). Its slice of
// W_hh stays in shared memory for the whole chunk, in the storage dtype (float16/bfloat16 halve
// the footprint; products and sums are float32). Per step the blocks publish their part of the
// state (forward: h_t, backward: the gate gradients d_gh_t) to a float32 ping-pong buffer in
// global memory (L2) and meet at one grid-wide barrier.
//
//   forward  block k: W_hh rows {g*H + j : g in r,z,n; j owned}  -> smem [units*3, H]
//            per step: gh[b, g, j] = h_{t-1}[b, :] . W_hh[g*H + j, :], gate math, h_t[b, j]
//   backward block k: W_hh columns {j owned}                      -> smem [units, 3H]
//            phase A: gate gradients of owned units (local), publish d_gh_t[b, :, j]
//            barrier
//            phase B: dh_{t-1}[b, j] = direct term + d_gh_t[b, :] . W_hh[:, j]
#include "persistent.cuh"

namespace fastbptt {
namespace cuda {
namespace {

using namespace persistent;

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
persistent_gru_forward_kernel(const T* __restrict__ gi, const T* __restrict__ w_hh, const T* __restrict__ b_hh,
                              const bool* __restrict__ valid, T* __restrict__ out, T* __restrict__ gh_out,
                              float* __restrict__ h_buf, int C, int B, int H, int units) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* w_s = reinterpret_cast<T*>(smem);                                                 // [units*3, H]
  float* x_s = reinterpret_cast<float*>(smem + align16(sizeof(T) * 3 * units * H));  // [kBT, kKC]
  const int u0 = blockIdx.x * units;
  const int n_units = min(units, H - u0);
  for (int idx = threadIdx.x; idx < n_units * 3 * H; idx += blockDim.x) {
    const int row = idx / H, k = idx - row * H;  // row = unit * 3 + gate
    w_s[idx] = w_hh[static_cast<int64_t>((row % 3) * H + u0 + row / 3) * H + k];
  }
  __syncthreads();
  cg::grid_group grid = cg::this_grid();
  const int lane = threadIdx.x % 32;

  for (int t = 0; t < C; ++t) {
    const float* h_prev = h_buf + static_cast<int64_t>(t & 1) * B * H;
    float* h_next = h_buf + static_cast<int64_t>((t + 1) & 1) * B * H;
    block_product<3>(w_s, x_s, h_prev, B, H, n_units, [&](int u, int b0, const float (&acc)[3][kBT]) {
      const int j = u0 + u;
#pragma unroll
      for (int bb = 0; bb < kBT; ++bb) {
        const int b = b0 + bb;
        if (lane != bb || b >= B) continue;
        float hr = acc[0][bb], hz = acc[1][bb], hn = acc[2][bb];
        if (b_hh != nullptr) {
          hr += load<float>(b_hh + j);
          hz += load<float>(b_hh + H + j);
          hn += load<float>(b_hh + 2 * H + j);
        }
        const int64_t row = (static_cast<int64_t>(t) * B + b) * 3 * H + j;
        if (gh_out != nullptr) {
          store(gh_out + row, hr);
          store(gh_out + row + H, hz);
          store(gh_out + row + 2 * H, hn);
        }
        const float r = sigmoid(load<float>(gi + row) + hr);
        const float z = sigmoid(load<float>(gi + row + H) + hz);
        const float n = tanh_(load<float>(gi + row + 2 * H) + r * hn);
        const float hp = __ldcg(h_prev + static_cast<int64_t>(b) * H + j);
        const float h_new = (1.f - z) * n + z * hp;
        const bool v = valid == nullptr || valid[static_cast<int64_t>(t) * B + b];
        __stcg(h_next + static_cast<int64_t>(b) * H + j, v ? h_new : hp);
        store(out + (static_cast<int64_t>(t) * B + b) * H + j, v ? h_new : 0.f);
      }
    });
    grid.sync();  // h_t is complete; h_buf[t & 1] is free to be overwritten at step t + 1
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
persistent_gru_backward_kernel(const T* __restrict__ gi, const T* __restrict__ gh, const T* __restrict__ h_prev,
                               const T* __restrict__ w_hh, const T* __restrict__ grad_out,
                               const bool* __restrict__ valid, T* __restrict__ grad_gi, T* __restrict__ grad_gh,
                               float* __restrict__ dh, float* __restrict__ dgh_buf, int C, int B, int H, int units) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* w_s = reinterpret_cast<T*>(smem);                                                 // [units, 3H]
  float* x_s = reinterpret_cast<float*>(smem + align16(sizeof(T) * 3 * units * H));  // [kBT, kKC]
  const int u0 = blockIdx.x * units;
  const int n_units = min(units, H - u0);
  const int K = 3 * H;
  for (int idx = threadIdx.x; idx < n_units * K; idx += blockDim.x) {
    const int r = idx / n_units, u = idx - r * n_units;  // consecutive threads read consecutive columns
    w_s[static_cast<int64_t>(u) * K + r] = w_hh[static_cast<int64_t>(r) * H + u0 + u];
  }
  __syncthreads();
  cg::grid_group grid = cg::this_grid();
  const int lane = threadIdx.x % 32;

  for (int t = C - 1; t >= 0; --t) {
    float* pub = dgh_buf + static_cast<int64_t>(t & 1) * B * K;
    // Phase A: gate gradients of the owned units; dh := direct term (kept where invalid).
    for (int idx = threadIdx.x; idx < B * n_units; idx += blockDim.x) {
      const int b = idx / n_units, j = u0 + (idx - b * n_units);
      const int64_t row = (static_cast<int64_t>(t) * B + b) * K + j;
      const int64_t hidx = static_cast<int64_t>(b) * H + j;
      float d_r = 0.f, d_z = 0.f, d_n = 0.f, d_hn = 0.f;
      if (valid == nullptr || valid[static_cast<int64_t>(t) * B + b]) {
        const float hr = load<float>(gh + row), hz = load<float>(gh + row + H), hn = load<float>(gh + row + 2 * H);
        const float r = sigmoid(load<float>(gi + row) + hr);
        const float z = sigmoid(load<float>(gi + row + H) + hz);
        const float n = tanh_(load<float>(gi + row + 2 * H) + r * hn);
        const float g = dh[hidx] + load<float>(grad_out + static_cast<int64_t>(t) * B * H + hidx);
        d_n = g * (1.f - z) * (1.f - n * n);
        d_z = g * (load<float>(h_prev + static_cast<int64_t>(t) * B * H + hidx) - n) * z * (1.f - z);
        d_r = d_n * hn * r * (1.f - r);
        d_hn = d_n * r;
        dh[hidx] = g * z;
      }
      store(grad_gi + row, d_r);
      store(grad_gi + row + H, d_z);
      store(grad_gi + row + 2 * H, d_n);
      store(grad_gh + row, d_r);
      store(grad_gh + row + H, d_z);
      store(grad_gh + row + 2 * H, d_hn);
      const int64_t prow = static_cast<int64_t>(b) * K + j;
      __stcg(pub + prow, d_r);
      __stcg(pub + prow + H, d_z);
      __stcg(pub + prow + 2 * H, d_hn);
    }
    grid.sync();
    // Phase B: dh[b, j] += d_gh_t[b, :] . W_hh[:, j] for the owned units.
    block_product<1>(w_s, x_s, pub, B, K, n_units, [&](int u, int b0, const float (&acc)[1][kBT]) {
#pragma unroll
      for (int bb = 0; bb < kBT; ++bb) {
        if (lane == bb && b0 + bb < B) dh[static_cast<int64_t>(b0 + bb) * H + u0 + u] += acc[0][bb];
      }
    });
    __syncthreads();  // phase A of the next step reads dh written by other threads of this block
  }
}

template <typename T> const void* forward_kernel() { return reinterpret_cast<const void*>(&persistent_gru_forward_kernel<T>); }
template <typename T> const void* backward_kernel() { return reinterpret_cast<const void*>(&persistent_gru_backward_kernel<T>); }

template <typename T> Plan forward_plan(int64_t B, int64_t H) { return make_plan(B, H, 3, H, sizeof(T), 0, forward_kernel<T>()); }
template <typename T> Plan backward_plan(int64_t B, int64_t H) { return make_plan(B, H, 1, 3 * H, sizeof(T), 0, backward_kernel<T>()); }

}  // namespace

std::string persistent_gru_decline(Dtype dt, int64_t B, int64_t H) {
  return FASTBPTT_DISPATCH_PERSISTENT(dt, [&] {
    std::string why = forward_plan<scalar_t>(B, H).why;
    return why.empty() ? backward_plan<scalar_t>(B, H).why : why;
  });
}

std::string persistent_gru_forward(Dtype dt, const void* gi, const void* w_hh, const void* b_hh, const bool* valid,
                                   void* out, void* gh_out, float* h_buf, int64_t C, int64_t B, int64_t H,
                                   cudaStream_t stream) {
  return FASTBPTT_DISPATCH_PERSISTENT(dt, [&] {
    const Plan plan = forward_plan<scalar_t>(B, H);
    if (!plan.why.empty()) return plan.why;
    const scalar_t* a_gi = static_cast<const scalar_t*>(gi);
    const scalar_t* a_w = static_cast<const scalar_t*>(w_hh);
    const scalar_t* a_b = static_cast<const scalar_t*>(b_hh);
    const bool* a_valid = valid;
    scalar_t* a_out = static_cast<scalar_t*>(out);
    scalar_t* a_gh_out = static_cast<scalar_t*>(gh_out);
    float* a_h = h_buf;
    int a_C = static_cast<int>(C), a_B = static_cast<int>(B), a_H = static_cast<int>(H), a_units = plan.units;
    void* args[] = {&a_gi, &a_w, &a_b, &a_valid, &a_out, &a_gh_out, &a_h, &a_C, &a_B, &a_H, &a_units};
    return launch(forward_kernel<scalar_t>(), plan, args, stream);
  });
}

std::string persistent_gru_backward(Dtype dt, const void* gi, const void* gh, const void* h_prev, const void* w_hh,
                                    const void* grad_out, const bool* valid, void* grad_gi, void* grad_gh, float* dh,
                                    float* dgh_buf, int64_t C, int64_t B, int64_t H, cudaStream_t stream) {
  return FASTBPTT_DISPATCH_PERSISTENT(dt, [&] {
    const Plan plan = backward_plan<scalar_t>(B, H);
    if (!plan.why.empty()) return plan.why;
    const scalar_t* a_gi = static_cast<const scalar_t*>(gi);
    const scalar_t* a_gh = static_cast<const scalar_t*>(gh);
    const scalar_t* a_hp = static_cast<const scalar_t*>(h_prev);
    const scalar_t* a_w = static_cast<const scalar_t*>(w_hh);
    const scalar_t* a_go = static_cast<const scalar_t*>(grad_out);
    const bool* a_valid = valid;
    scalar_t* a_ggi = static_cast<scalar_t*>(grad_gi);
    scalar_t* a_ggh = static_cast<scalar_t*>(grad_gh);
    float* a_dh = dh;
    float* a_pub = dgh_buf;
    int a_C = static_cast<int>(C), a_B = static_cast<int>(B), a_H = static_cast<int>(H), a_units = plan.units;
    void* args[] = {&a_gi, &a_gh, &a_hp, &a_w, &a_go, &a_valid, &a_ggi, &a_ggh, &a_dh, &a_pub,
                    &a_C,  &a_B,  &a_H,  &a_units};
    return launch(backward_kernel<scalar_t>(), plan, args, stream);
  });
}

}  // namespace cuda
}  // namespace fastbptt
