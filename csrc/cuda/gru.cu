// Standard-path step kernels of the GRU (gate rows r, z, n; see fastbptt/cells.py). One thread per
// (batch row, hidden unit) computes all three gates of that unit.
#include "common.cuh"

namespace fastbptt {
namespace cuda {
namespace {

template <typename T>
__global__ void gru_forward_step_kernel(const T* __restrict__ gi_t, const acc_t<T>* __restrict__ gh,
                                        const T* __restrict__ b_hh, acc_t<T>* __restrict__ h, T* __restrict__ out_t,
                                        T* __restrict__ gh_out_t, const bool* __restrict__ valid_t, int64_t B,
                                        int64_t H) {
  using A = acc_t<T>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, j = idx - b * H;
  const int64_t row = b * 3 * H;
  A hr = gh[row + j], hz = gh[row + H + j], hn = gh[row + 2 * H + j];
  if (b_hh != nullptr) {
    hr += load<A>(b_hh + j);
    hz += load<A>(b_hh + H + j);
    hn += load<A>(b_hh + 2 * H + j);
  }
  if (gh_out_t != nullptr) {
    store(gh_out_t + row + j, hr);
    store(gh_out_t + row + H + j, hz);
    store(gh_out_t + row + 2 * H + j, hn);
  }
  const A r = sigmoid(load<A>(gi_t + row + j) + hr);
  const A z = sigmoid(load<A>(gi_t + row + H + j) + hz);
  const A n = tanh_(load<A>(gi_t + row + 2 * H + j) + r * hn);
  const A h_prev = h[idx];
  const A h_new = (A(1) - z) * n + z * h_prev;
  const bool v = row_valid(valid_t, b);
  if (v) h[idx] = h_new;
  store(out_t + idx, v ? h_new : A(0));
}

template <typename T>
__global__ void gru_backward_step_kernel(const T* __restrict__ gi_t, const T* __restrict__ gh_t,
                                         const T* __restrict__ h_prev_t, const T* __restrict__ grad_out_t,
                                         acc_t<T>* __restrict__ dh, T* __restrict__ grad_gi_t,
                                         T* __restrict__ grad_gh_t, acc_t<T>* __restrict__ d_gh,
                                         const bool* __restrict__ valid_t, int64_t B, int64_t H) {
  using A = acc_t<T>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, j = idx - b * H;
  const int64_t row = b * 3 * H;
  A d_r = A(0), d_z = A(0), d_n = A(0), d_hn = A(0);
  if (row_valid(valid_t, b)) {
    const A hr = load<A>(gh_t + row + j), hz = load<A>(gh_t + row + H + j), hn = load<A>(gh_t + row + 2 * H + j);
    const A r = sigmoid(load<A>(gi_t + row + j) + hr);
    const A z = sigmoid(load<A>(gi_t + row + H + j) + hz);
    const A n = tanh_(load<A>(gi_t + row + 2 * H + j) + r * hn);
    const A g = dh[idx] + load<A>(grad_out_t + idx);
    d_n = g * (A(1) - z) * (A(1) - n * n);
    d_z = g * (load<A>(h_prev_t + idx) - n) * z * (A(1) - z);
    d_r = d_n * hn * r * (A(1) - r);
    d_hn = d_n * r;
    dh[idx] = g * z;  // the direct term; the caller adds d_gh W_hh (zero rows where invalid)
  }
  store(grad_gi_t + row + j, d_r);
  store(grad_gi_t + row + H + j, d_z);
  store(grad_gi_t + row + 2 * H + j, d_n);
  store(grad_gh_t + row + j, d_r);
  store(grad_gh_t + row + H + j, d_z);
  store(grad_gh_t + row + 2 * H + j, d_hn);
  d_gh[row + j] = d_r;
  d_gh[row + H + j] = d_z;
  d_gh[row + 2 * H + j] = d_hn;
}

}  // namespace

void gru_forward_step(Dtype dt, const void* gi_t, const void* gh, const void* b_hh, void* h, void* out_t,
                      void* gh_out_t, const bool* valid_t, int64_t B, int64_t H, cudaStream_t stream) {
  if (B * H == 0) return;
  FASTBPTT_DISPATCH(dt, [&] {
    using A = acc_t<scalar_t>;
    gru_forward_step_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(gi_t), static_cast<const A*>(gh), static_cast<const scalar_t*>(b_hh),
        static_cast<A*>(h), static_cast<scalar_t*>(out_t), static_cast<scalar_t*>(gh_out_t), valid_t, B, H);
  });
  check_launch("gru_forward_step");
}

void gru_backward_step(Dtype dt, const void* gi_t, const void* gh_t, const void* h_prev_t, const void* grad_out_t,
                       void* dh, void* grad_gi_t, void* grad_gh_t, void* d_gh, const bool* valid_t, int64_t B,
                       int64_t H, cudaStream_t stream) {
  if (B * H == 0) return;
  FASTBPTT_DISPATCH(dt, [&] {
    using A = acc_t<scalar_t>;
    gru_backward_step_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(gi_t), static_cast<const scalar_t*>(gh_t),
        static_cast<const scalar_t*>(h_prev_t), static_cast<const scalar_t*>(grad_out_t), static_cast<A*>(dh),
        static_cast<scalar_t*>(grad_gi_t), static_cast<scalar_t*>(grad_gh_t), static_cast<A*>(d_gh), valid_t, B, H);
  });
  check_launch("gru_backward_step");
}

}  // namespace cuda
}  // namespace fastbptt
