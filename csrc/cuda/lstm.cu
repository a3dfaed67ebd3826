// Standard-path kernels of the LSTM (gate rows i, f, g, o; optional projection W_hr: [P,H]).
// One thread per (batch row, hidden unit) computes all four gates of that unit.
#include "common.cuh"

namespace fastbptt {
namespace cuda {
namespace {

template <typename A> struct Gates { A i, f, g, o; };

template <typename A>
__device__ __forceinline__ Gates<A> activate(A i, A f, A g, A o) {
  return {sigmoid(i), sigmoid(f), tanh_(g), sigmoid(o)};
}

template <typename T>
__global__ void lstm_forward_step_kernel(const T* __restrict__ gates_in_t, const acc_t<T>* __restrict__ gsum,
                                         acc_t<T>* __restrict__ c, acc_t<T>* __restrict__ h, T* __restrict__ out_t,
                                         T* __restrict__ gates_out_t, acc_t<T>* __restrict__ m_out,
                                         const bool* __restrict__ valid_t, int64_t B, int64_t H) {
  using A = acc_t<T>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, j = idx - b * H;
  const int64_t row = b * 4 * H + j;
  A pre[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    pre[k] = load<A>(gates_in_t + row + k * H) + gsum[row + k * H];
    if (gates_out_t != nullptr) store(gates_out_t + row + k * H, pre[k]);
  }
  const Gates<A> a = activate(pre[0], pre[1], pre[2], pre[3]);
  const A c_new = a.f * c[idx] + a.i * a.g;
  const A m = a.o * tanh_(c_new);
  const bool v = row_valid(valid_t, b);
  if (v) c[idx] = c_new;
  if (m_out != nullptr) {
    m_out[idx] = m;  // projected and masked by the caller
  } else {
    if (v) h[idx] = m;
    store(out_t + idx, v ? m : A(0));
  }
}

template <typename T>
__global__ void lstm_cell_scan_kernel(const T* __restrict__ gates, const T* __restrict__ c0,
                                      acc_t<T>* __restrict__ c_states, acc_t<T>* __restrict__ m,
                                      const bool* __restrict__ valid, int64_t C, int64_t B, int64_t H) {
  using A = acc_t<T>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, j = idx - b * H;
  A c = load<A>(c0 + idx);
  c_states[idx] = c;
  for (int64_t t = 0; t < C; ++t) {
    const T* g_t = gates + (t * B + b) * 4 * H + j;
    const Gates<A> a = activate(load<A>(g_t), load<A>(g_t + H), load<A>(g_t + 2 * H), load<A>(g_t + 3 * H));
    if (valid == nullptr || valid[t * B + b]) c = a.f * c + a.i * a.g;
    c_states[(t + 1) * B * H + idx] = c;
    if (m != nullptr) m[t * B * H + idx] = a.o * tanh_(c);
  }
}

template <typename T>
__global__ void lstm_output_grad_kernel(const T* __restrict__ grad_out_t, acc_t<T>* __restrict__ dh,
                                        acc_t<T>* __restrict__ dh_t, const bool* __restrict__ valid_t, int64_t B,
                                        int64_t P) {
  using A = acc_t<T>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * P) return;
  A d = A(0);
  if (row_valid(valid_t, idx / P)) {
    d = dh[idx] + load<A>(grad_out_t + idx);
    dh[idx] = A(0);  // the caller adds d_gates W_hh; invalid rows keep dh
  }
  dh_t[idx] = d;
}

template <typename T>
__global__ void lstm_backward_step_kernel(const T* __restrict__ gates_t, const acc_t<T>* __restrict__ c_prev,
                                          const acc_t<T>* __restrict__ c, const acc_t<T>* __restrict__ dm_in,
                                          acc_t<T>* __restrict__ dh, const T* __restrict__ grad_out_t,
                                          acc_t<T>* __restrict__ dc, T* __restrict__ grad_gates_t,
                                          acc_t<T>* __restrict__ d_gates, const bool* __restrict__ valid_t,
                                          int64_t B, int64_t H) {
  using A = acc_t<T>;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, j = idx - b * H;
  const int64_t row = b * 4 * H + j;
  A d[4] = {A(0), A(0), A(0), A(0)};
  if (row_valid(valid_t, b)) {
    A dm;
    if (dm_in != nullptr) {
      dm = dm_in[idx];
    } else {
      dm = dh[idx] + load<A>(grad_out_t + idx);
      dh[idx] = A(0);
    }
    const Gates<A> a = activate(load<A>(gates_t + row), load<A>(gates_t + row + H), load<A>(gates_t + row + 2 * H),
                                load<A>(gates_t + row + 3 * H));
    const A tanh_c = tanh_(c[idx]);
    const A dc_total = dc[idx] + dm * a.o * (A(1) - tanh_c * tanh_c);
    d[0] = dc_total * a.g * a.i * (A(1) - a.i);
    d[1] = dc_total * c_prev[idx] * a.f * (A(1) - a.f);
    d[2] = dc_total * a.i * (A(1) - a.g * a.g);
    d[3] = dm * tanh_c * a.o * (A(1) - a.o);
    dc[idx] = dc_total * a.f;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    store(grad_gates_t + row + k * H, d[k]);
    d_gates[row + k * H] = d[k];
  }
}

}  // namespace

void lstm_forward_step(Dtype dt, const void* gates_in_t, const void* gsum, void* c, void* h, void* out_t,
                       void* gates_out_t, void* m_out, const bool* valid_t, int64_t B, int64_t H,
                       cudaStream_t stream) {
  if (B * H == 0) return;
  FASTBPTT_DISPATCH(dt, [&] {
    using A = acc_t<scalar_t>;
    lstm_forward_step_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(gates_in_t), static_cast<const A*>(gsum), static_cast<A*>(c),
        static_cast<A*>(h), static_cast<scalar_t*>(out_t), static_cast<scalar_t*>(gates_out_t),
        static_cast<A*>(m_out), valid_t, B, H);
  });
  check_launch("lstm_forward_step");
}

void lstm_cell_scan(Dtype dt, const void* gates, const void* c0, void* c_states, void* m, const bool* valid,
                    int64_t C, int64_t B, int64_t H, cudaStream_t stream) {
  if (B * H == 0) return;
  FASTBPTT_DISPATCH(dt, [&] {
    using A = acc_t<scalar_t>;
    lstm_cell_scan_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(gates), static_cast<const scalar_t*>(c0), static_cast<A*>(c_states),
        static_cast<A*>(m), valid, C, B, H);
  });
  check_launch("lstm_cell_scan");
}

void lstm_output_grad(Dtype dt, const void* grad_out_t, void* dh, void* dh_t, const bool* valid_t, int64_t B,
                      int64_t P, cudaStream_t stream) {
  if (B * P == 0) return;
  FASTBPTT_DISPATCH(dt, [&] {
    using A = acc_t<scalar_t>;
    lstm_output_grad_kernel<scalar_t><<<blocks_for(B * P), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad_out_t), static_cast<A*>(dh), static_cast<A*>(dh_t), valid_t, B, P);
  });
  check_launch("lstm_output_grad");
}

void lstm_backward_step(Dtype dt, const void* gates_t, const void* c_prev, const void* c, const void* dm, void* dh,
                        const void* grad_out_t, void* dc, void* grad_gates_t, void* d_gates, const bool* valid_t,
                        int64_t B, int64_t H, cudaStream_t stream) {
  if (B * H == 0) return;
  FASTBPTT_DISPATCH(dt, [&] {
    using A = acc_t<scalar_t>;
    lstm_backward_step_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(gates_t), static_cast<const A*>(c_prev), static_cast<const A*>(c),
        static_cast<const A*>(dm), static_cast<A*>(dh), static_cast<const scalar_t*>(grad_out_t),
        static_cast<A*>(dc), static_cast<scalar_t*>(grad_gates_t), static_cast<A*>(d_gates), valid_t, B, H);
  });
  check_launch("lstm_backward_step");
}

}  // namespace cuda
}  // namespace fastbptt
