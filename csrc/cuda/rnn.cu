// Standard-path step kernels of the tanh/relu RNN, plus the masked state update shared with
// the projected LSTM. One thread per (batch row, hidden unit); see launch.h for the contracts.
#include "common.cuh"

namespace fastbptt {
namespace cuda {
namespace {

template <typename T>
__global__ void rnn_forward_step_kernel(const T* __restrict__ pre_in_t, const acc_t<T>* __restrict__ gh,
                                        acc_t<T>* __restrict__ h, T* __restrict__ out_t,
                                        const bool* __restrict__ valid_t, int64_t B, int64_t H, bool relu) {
  using A = acc_t<T>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * H) return;
  const A pre = load<A>(pre_in_t + idx) + gh[idx];
  const A h_new = relu ? (pre > A(0) ? pre : A(0)) : tanh_(pre);
  const bool v = row_valid(valid_t, idx / H);
  if (v) h[idx] = h_new;
  store(out_t + idx, v ? h_new : A(0));
}

template <typename T>
__global__ void rnn_backward_step_kernel(const T* __restrict__ out_t, const T* __restrict__ grad_out_t,
                                         acc_t<T>* __restrict__ dh, T* __restrict__ grad_pre_t,
                                         acc_t<T>* __restrict__ d_acc, const bool* __restrict__ valid_t, int64_t B,
                                         int64_t H, bool relu) {
  using A = acc_t<T>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * H) return;
  const bool v = row_valid(valid_t, idx / H);
  A d = A(0);
  if (v) {
    const A y = load<A>(out_t + idx);
    const A g = dh[idx] + load<A>(grad_out_t + idx);
    d = relu ? (y > A(0) ? g : A(0)) : g * (A(1) - y * y);
    dh[idx] = A(0);  // the caller adds d W_hh; invalid rows keep dh
  }
  store(grad_pre_t + idx, d);
  d_acc[idx] = d;
}

template <typename T>
__global__ void masked_state_update_kernel(const acc_t<T>* __restrict__ src, acc_t<T>* __restrict__ h,
                                           T* __restrict__ out_t, const bool* __restrict__ valid_t, int64_t B,
                                           int64_t N) {
  using A = acc_t<T>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * N) return;
  const bool v = row_valid(valid_t, idx / N);
  const A s = src[idx];
  if (v) h[idx] = s;
  store(out_t + idx, v ? s : A(0));
}

}  // namespace

void rnn_forward_step(Dtype dt, const void* pre_in_t, const void* gh, void* h, void* out_t, const bool* valid_t,
                      int64_t B, int64_t H, bool relu, cudaStream_t stream) {
  if (B * H == 0) return;
  FASTBPTT_DISPATCH(dt, [&] {
    using A = acc_t<scalar_t>;
    rnn_forward_step_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(pre_in_t), static_cast<const A*>(gh), static_cast<A*>(h),
        static_cast<scalar_t*>(out_t), valid_t, B, H, relu);
  });
  check_launch("rnn_forward_step");
}

void rnn_backward_step(Dtype dt, const void* out_t, const void* grad_out_t, void* dh, void* grad_pre_t, void* d_acc,
                       const bool* valid_t, int64_t B, int64_t H, bool relu, cudaStream_t stream) {
  if (B * H == 0) return;
  FASTBPTT_DISPATCH(dt, [&] {
    using A = acc_t<scalar_t>;
    rnn_backward_step_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(out_t), static_cast<const scalar_t*>(grad_out_t), static_cast<A*>(dh),
        static_cast<scalar_t*>(grad_pre_t), static_cast<A*>(d_acc), valid_t, B, H, relu);
  });
  check_launch("rnn_backward_step");
}

void masked_state_update(Dtype dt, const void* src, void* h, void* out_t, const bool* valid_t, int64_t B, int64_t N,
                         cudaStream_t stream) {
  if (B * N == 0) return;
  FASTBPTT_DISPATCH(dt, [&] {
    using A = acc_t<scalar_t>;
    masked_state_update_kernel<scalar_t><<<blocks_for(B * N), kThreads, 0, stream>>>(
        static_cast<const A*>(src), static_cast<A*>(h), static_cast<scalar_t*>(out_t), valid_t, B, N);
  });
  check_launch("masked_state_update");
}

}  // namespace cuda
}  // namespace fastbptt
