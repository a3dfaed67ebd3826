// Persistent LSTM kernels (no projection): one cooperative launch per chunk (see docs/cuda.md).
//
//   forward  block k: W_hh rows {g*H + j : g in i,f,g,o; j owned} -> smem [units*4, H]; the
//            cell state of its units stays in shared memory for the whole chunk [B, units];
//            only h_t is published (float32 ping-pong buffer, one grid barrier per step).
//   backward block k: W_hh columns {j owned} -> smem [units, 4H]. It first recomputes the cell
//            states of its own units over the chunk (no other block needs them), then per step
//            phase A: gate gradients of owned units, publish d_gates_t[b, :, j]
//            barrier
//            phase B: dh_{t-1}[b, j] = d_gates_t[b, :] . W_hh[:, j] (kept where invalid)
#include "persistent.cuh"

namespace fastbptt {
namespace cuda {
namespace {

using namespace persistent;

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
persistent_lstm_forward_kernel(const T* __restrict__ gates_in, const T* __restrict__ w_hh,
                               const bool* __restrict__ valid, T* __restrict__ out, T* __restrict__ gates_out,
                               float* __restrict__ h_buf, float* __restrict__ c, int C, int B, int H, int units) {
  extern __shared__ __align__(16) unsigned char smem[];
  const size_t w_bytes = align16(sizeof(T) * 4 * units * H);
  T* w_s = reinterpret_cast<T*>(smem);                                 // [units*4, H]
  float* x_s = reinterpret_cast<float*>(smem + w_bytes);              // [kBT, kKC]
  float* c_s = reinterpret_cast<float*>(smem + w_bytes + kTileBytes);  // [B, units]
  const int u0 = blockIdx.x * units;
  const int n_units = min(units, H - u0);
  for (int idx = threadIdx.x; idx < n_units * 4 * H; idx += blockDim.x) {
    const int row = idx / H, k = idx - row * H;  // row = unit * 4 + gate
    w_s[idx] = w_hh[static_cast<int64_t>((row % 4) * H + u0 + row / 4) * H + k];
  }
  for (int idx = threadIdx.x; idx < B * n_units; idx += blockDim.x) {
    const int b = idx / n_units, u = idx - b * n_units;
    c_s[b * units + u] = c[static_cast<int64_t>(b) * H + u0 + u];
  }
  __syncthreads();
  cg::grid_group grid = cg::this_grid();
  const int lane = threadIdx.x % 32;

  for (int t = 0; t < C; ++t) {
    const float* h_prev = h_buf + static_cast<int64_t>(t & 1) * B * H;
    float* h_next = h_buf + static_cast<int64_t>((t + 1) & 1) * B * H;
    block_product<4>(w_s, x_s, h_prev, B, H, n_units, [&](int u, int b0, const float (&acc)[4][kBT]) {
      const int j = u0 + u;
#pragma unroll
      for (int bb = 0; bb < kBT; ++bb) {
        const int b = b0 + bb;
        if (lane != bb || b >= B) continue;
        const int64_t row = (static_cast<int64_t>(t) * B + b) * 4 * H + j;
        float pre[4];
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          pre[g] = load<float>(gates_in + row + g * H) + acc[g][bb];
          if (gates_out != nullptr) store(gates_out + row + g * H, pre[g]);
        }
        const float c_new = sigmoid(pre[1]) * c_s[b * units + u] + sigmoid(pre[0]) * tanh_(pre[2]);
        const float m = sigmoid(pre[3]) * tanh_(c_new);
        const bool v = valid == nullptr || valid[static_cast<int64_t>(t) * B + b];
        const float hp = __ldcg(h_prev + static_cast<int64_t>(b) * H + j);
        if (v) c_s[b * units + u] = c_new;  // only this lane of this warp ever touches (b, u)
        __stcg(h_next + static_cast<int64_t>(b) * H + j, v ? m : hp);
        store(out + (static_cast<int64_t>(t) * B + b) * H + j, v ? m : 0.f);
      }
    });
    grid.sync();
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < B * n_units; idx += blockDim.x) {
    const int b = idx / n_units, u = idx - b * n_units;
    c[static_cast<int64_t>(b) * H + u0 + u] = c_s[b * units + u];
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
persistent_lstm_backward_kernel(const T* __restrict__ gates, const T* __restrict__ c0, const T* __restrict__ w_hh,
                                const T* __restrict__ grad_out, const bool* __restrict__ valid,
                                T* __restrict__ grad_gates, float* __restrict__ dh, float* __restrict__ dc,
                                float* __restrict__ c_states, float* __restrict__ d_buf, int C, int B, int H,
                                int units) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* w_s = reinterpret_cast<T*>(smem);                                                 // [units, 4H]
  float* x_s = reinterpret_cast<float*>(smem + align16(sizeof(T) * 4 * units * H));  // [kBT, kKC]
  const int u0 = blockIdx.x * units;
  const int n_units = min(units, H - u0);
  const int K = 4 * H;
  for (int idx = threadIdx.x; idx < n_units * K; idx += blockDim.x) {
    const int r = idx / n_units, u = idx - r * n_units;
    w_s[static_cast<int64_t>(u) * K + r] = w_hh[static_cast<int64_t>(r) * H + u0 + u];
  }
  // The cell states of the owned units over the chunk: c_states[t] is the state step t started from.
  const int64_t BH = static_cast<int64_t>(B) * H;
  for (int idx = threadIdx.x; idx < B * n_units; idx += blockDim.x) {
    const int b = idx / n_units, j = u0 + (idx - b * n_units);
    const int64_t hidx = static_cast<int64_t>(b) * H + j;
    float cv = load<float>(c0 + hidx);
    c_states[hidx] = cv;
    for (int t = 0; t < C; ++t) {
      const T* g_t = gates + (static_cast<int64_t>(t) * B + b) * K + j;
      if (valid == nullptr || valid[static_cast<int64_t>(t) * B + b])
        cv = sigmoid(load<float>(g_t + H)) * cv + sigmoid(load<float>(g_t)) * tanh_(load<float>(g_t + 2 * H));
      c_states[(t + 1) * BH + hidx] = cv;
    }
  }
  __syncthreads();
  cg::grid_group grid = cg::this_grid();
  const int lane = threadIdx.x % 32;

  for (int t = C - 1; t >= 0; --t) {
    float* pub = d_buf + static_cast<int64_t>(t & 1) * B * K;
    // Phase A: gate gradients of the owned units; dh := 0 where valid (the product adds the rest).
    for (int idx = threadIdx.x; idx < B * n_units; idx += blockDim.x) {
      const int b = idx / n_units, j = u0 + (idx - b * n_units);
      const int64_t row = (static_cast<int64_t>(t) * B + b) * K + j;
      const int64_t hidx = static_cast<int64_t>(b) * H + j;
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      if (valid == nullptr || valid[static_cast<int64_t>(t) * B + b]) {
        const float i = sigmoid(load<float>(gates + row)), f = sigmoid(load<float>(gates + row + H));
        const float g = tanh_(load<float>(gates + row + 2 * H)), o = sigmoid(load<float>(gates + row + 3 * H));
        const float dm = dh[hidx] + load<float>(grad_out + t * BH + hidx);
        const float tanh_c = tanh_(c_states[(t + 1) * BH + hidx]);
        const float dct = dc[hidx] + dm * o * (1.f - tanh_c * tanh_c);
        d[0] = dct * g * i * (1.f - i);
        d[1] = dct * c_states[t * BH + hidx] * f * (1.f - f);
        d[2] = dct * i * (1.f - g * g);
        d[3] = dm * tanh_c * o * (1.f - o);
        dc[hidx] = dct * f;
        dh[hidx] = 0.f;
      }
      const int64_t prow = static_cast<int64_t>(b) * K + j;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        store(grad_gates + row + k * H, d[k]);
        __stcg(pub + prow + k * H, d[k]);
      }
    }
    grid.sync();
    // Phase B: dh[b, j] += d_gates_t[b, :] . W_hh[:, j] (zero rows where invalid keep dh).
    block_product<1>(w_s, x_s, pub, B, K, n_units, [&](int u, int b0, const float (&acc)[1][kBT]) {
#pragma unroll
      for (int bb = 0; bb < kBT; ++bb) {
        if (lane == bb && b0 + bb < B) dh[static_cast<int64_t>(b0 + bb) * H + u0 + u] += acc[0][bb];
      }
    });
    __syncthreads();
  }
}

template <typename T> const void* forward_kernel() { return reinterpret_cast<const void*>(&persistent_lstm_forward_kernel<T>); }
template <typename T> const void* backward_kernel() { return reinterpret_cast<const void*>(&persistent_lstm_backward_kernel<T>); }

template <typename T> Plan forward_plan(int64_t B, int64_t H) {
  return make_plan(B, H, 4, H, sizeof(T), sizeof(float) * B, forward_kernel<T>());
}
template <typename T> Plan backward_plan(int64_t B, int64_t H) {
  return make_plan(B, H, 1, 4 * H, sizeof(T), 0, backward_kernel<T>());
}

}  // namespace

std::string persistent_lstm_decline(Dtype dt, int64_t B, int64_t H) {
  return FASTBPTT_DISPATCH_PERSISTENT(dt, [&] {
    std::string why = forward_plan<scalar_t>(B, H).why;
    return why.empty() ? backward_plan<scalar_t>(B, H).why : why;
  });
}

std::string persistent_lstm_forward(Dtype dt, const void* gates_in, const void* w_hh, const bool* valid, void* out,
                                    void* gates_out, float* h_buf, float* c, int64_t C, int64_t B, int64_t H,
                                    cudaStream_t stream) {
  return FASTBPTT_DISPATCH_PERSISTENT(dt, [&] {
    const Plan plan = forward_plan<scalar_t>(B, H);
    if (!plan.why.empty()) return plan.why;
    const scalar_t* a_in = static_cast<const scalar_t*>(gates_in);
    const scalar_t* a_w = static_cast<const scalar_t*>(w_hh);
    const bool* a_valid = valid;
    scalar_t* a_out = static_cast<scalar_t*>(out);
    scalar_t* a_gates_out = static_cast<scalar_t*>(gates_out);
    float* a_h = h_buf;
    float* a_c = c;
    int a_C = static_cast<int>(C), a_B = static_cast<int>(B), a_H = static_cast<int>(H), a_units = plan.units;
    void* args[] = {&a_in, &a_w, &a_valid, &a_out, &a_gates_out, &a_h, &a_c, &a_C, &a_B, &a_H, &a_units};
    return launch(forward_kernel<scalar_t>(), plan, args, stream);
  });
}

std::string persistent_lstm_backward(Dtype dt, const void* gates, const void* c0, const void* w_hh,
                                     const void* grad_out, const bool* valid, void* grad_gates, float* dh, float* dc,
                                     float* c_states, float* d_buf, int64_t C, int64_t B, int64_t H,
                                     cudaStream_t stream) {
  return FASTBPTT_DISPATCH_PERSISTENT(dt, [&] {
    const Plan plan = backward_plan<scalar_t>(B, H);
    if (!plan.why.empty()) return plan.why;
    const scalar_t* a_gates = static_cast<const scalar_t*>(gates);
    const scalar_t* a_c0 = static_cast<const scalar_t*>(c0);
    const scalar_t* a_w = static_cast<const scalar_t*>(w_hh);
    const scalar_t* a_go = static_cast<const scalar_t*>(grad_out);
    const bool* a_valid = valid;
    scalar_t* a_gg = static_cast<scalar_t*>(grad_gates);
    float* a_dh = dh;
    float* a_dc = dc;
    float* a_cs = c_states;
    float* a_pub = d_buf;
    int a_C = static_cast<int>(C), a_B = static_cast<int>(B), a_H = static_cast<int>(H), a_units = plan.units;
    void* args[] = {&a_gates, &a_c0, &a_w, &a_go, &a_valid, &a_gg, &a_dh, &a_dc, &a_cs, &a_pub,
                    &a_C,     &a_B,  &a_H, &a_units};
    return launch(backward_kernel<scalar_t>(), plan, args, stream);
  });
}

}  // namespace cuda
}  // namespace fastbptt
