// Fused Elman RNN chunk kernels (CPU): fastbptt::rnn_forward_chunk, fastbptt::rnn_backward_chunk.
//
//   h' = act(pre_in + h W_hh^T),  act = tanh or relu (csrc/cpu/cells/rnn.h); pre_in already
//   holds both biases.
#include "cells/rnn.h"
#include "common.h"

namespace fastbptt {
namespace cpu {
namespace {

// ----------------------------------------------------------------------------- row passes

// pre: [B, H] pre-activation of this step (pre_in + h W_hh^T); h: [B, H] carried; out: [B, H]
template <bool Relu, typename T>
FASTBPTT_INLINE void rnn_forward_act_rows(const T* __restrict__ pre, T* __restrict__ h, T* __restrict__ out,
                                          const bool* valid, int64_t H, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    T* __restrict__ ob = out + b * H;
    if (valid != nullptr && !valid[b]) {
      for (int64_t j = 0; j < H; ++j) ob[j] = T(0);
      continue;
    }
    const T* __restrict__ pb = pre + b * H;
    T* __restrict__ hb = h + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const T v = rnn::activate<Relu>(pb[j]);
      hb[j] = v;
      ob[j] = v;
    }
  }
}

// out, grad_out: [B, H] this step; dh: [B, H] carried (valid rows zeroed for the product that
// follows); d_pre: [B, H]
template <bool Relu, typename T>
FASTBPTT_INLINE void rnn_backward_act_rows(const T* __restrict__ out, const T* __restrict__ grad_out,
                                           T* __restrict__ dh, T* __restrict__ d_pre, const bool* valid, int64_t H,
                                           int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    T* __restrict__ dp = d_pre + b * H;
    if (valid != nullptr && !valid[b]) {
      for (int64_t j = 0; j < H; ++j) dp[j] = T(0);
      continue;
    }
    const T* __restrict__ ob = out + b * H;
    const T* __restrict__ go = grad_out + b * H;
    T* __restrict__ db = dh + b * H;
    for (int64_t j = 0; j < H; ++j) {
      dp[j] = rnn::pre_grad<Relu>(ob[j], db[j] + go[j]);
      db[j] = T(0);
    }
  }
}

template <typename T>
FASTBPTT_INLINE void rnn_forward_rows(const T* pre, T* h, T* out, const bool* valid, bool relu, int64_t H,
                                      int64_t b0, int64_t b1) {
  if (relu) {
    rnn_forward_act_rows<true>(pre, h, out, valid, H, b0, b1);
  } else {
    rnn_forward_act_rows<false>(pre, h, out, valid, H, b0, b1);
  }
}

template <typename T>
FASTBPTT_INLINE void rnn_backward_rows(const T* out, const T* grad_out, T* dh, T* d_pre, const bool* valid, bool relu,
                                       int64_t H, int64_t b0, int64_t b1) {
  if (relu) {
    rnn_backward_act_rows<true>(out, grad_out, dh, d_pre, valid, H, b0, b1);
  } else {
    rnn_backward_act_rows<false>(out, grad_out, dh, d_pre, valid, H, b0, b1);
  }
}

FASTBPTT_CLONES void rnn_forward_rows_f32(const float* pre, float* h, float* out, const bool* valid, bool relu,
                                          int64_t H, int64_t b0, int64_t b1) {
  rnn_forward_rows<float>(pre, h, out, valid, relu, H, b0, b1);
}
FASTBPTT_CLONES void rnn_backward_rows_f32(const float* out, const float* grad_out, float* dh, float* d_pre,
                                           const bool* valid, bool relu, int64_t H, int64_t b0, int64_t b1) {
  rnn_backward_rows<float>(out, grad_out, dh, d_pre, valid, relu, H, b0, b1);
}
void forward_rows(const float* pre, float* h, float* out, const bool* valid, bool relu, int64_t H, int64_t b0,
                  int64_t b1) {
  rnn_forward_rows_f32(pre, h, out, valid, relu, H, b0, b1);
}
void forward_rows(const double* pre, double* h, double* out, const bool* valid, bool relu, int64_t H, int64_t b0,
                  int64_t b1) {
  rnn_forward_rows<double>(pre, h, out, valid, relu, H, b0, b1);
}
void backward_rows(const float* out, const float* grad_out, float* dh, float* d_pre, const bool* valid, bool relu,
                   int64_t H, int64_t b0, int64_t b1) {
  rnn_backward_rows_f32(out, grad_out, dh, d_pre, valid, relu, H, b0, b1);
}
void backward_rows(const double* out, const double* grad_out, double* dh, double* d_pre, const bool* valid,
                   bool relu, int64_t H, int64_t b0, int64_t b1) {
  rnn_backward_rows<double>(out, grad_out, dh, d_pre, valid, relu, H, b0, b1);
}

// ----------------------------------------------------------------------------- chunk loops

// pre_in: [C, B, H]; h0: [B, H]; w_hh: [H, H]; out: [C, B, H]
template <typename T>
Tensor rnn_forward_impl(const Tensor& pre_in, const Tensor& h0, const Tensor& w_hh, const bool* valid,
                        const Tensor& out, bool relu, StepPath path) {
  const int64_t steps = pre_in.size(0), batch = pre_in.size(1), H = h0.size(1);
  const bool small_batch = path == StepPath::small_batch;
  Tensor h = h0.clone();
  if constexpr (std::is_same_v<T, float>) {
    if (path == StepPath::packed) {
      rnn_forward_packed_f32(pre_in, w_hh, valid, relu, h, out);
      return h;
    }
  }
  Tensor pre = at::empty({batch, H}, pre_in.options());
  const int64_t grain = row_grain(4 * H);  // one activation per unit: cheaper rows than GRU/LSTM
  for (int64_t t = 0; t < steps; ++t) {
    recurrent_mm(pre, pre_in.select(0, t), h, w_hh, small_batch);
    const T* p_pre = pre.data_ptr<T>();
    T* p_h = h.data_ptr<T>();
    T* p_out = out.data_ptr<T>() + t * batch * H;
    const bool* v = valid_row(valid, t, batch);
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
      forward_rows(p_pre, p_h, p_out, v, relu, H, b0, b1);
    });
  }
  return h;
}

template <typename T>
std::tuple<Tensor, Tensor> rnn_backward_impl(const Tensor& out, const Tensor& w_hh, const Tensor& grad_out,
                                             const Tensor& grad_h_n, const bool* valid, bool relu, StepPath path) {
  const int64_t steps = out.size(0), batch = out.size(1), H = out.size(2);
  const bool small_batch = path == StepPath::small_batch;
  Tensor d_pre = at::empty_like(out);
  Tensor dh = grad_h_n.clone();
  if constexpr (std::is_same_v<T, float>) {
    if (path == StepPath::packed) {
      rnn_backward_packed_f32(out, w_hh, grad_out, valid, relu, dh, d_pre);
      return {d_pre, dh};
    }
  }
  const int64_t grain = row_grain(4 * H);
  for (int64_t t = steps - 1; t >= 0; --t) {
    const T* p_out = out.data_ptr<T>() + t * batch * H;
    const T* p_go = grad_out.data_ptr<T>() + t * batch * H;
    T* p_dh = dh.data_ptr<T>();
    T* p_dp = d_pre.data_ptr<T>() + t * batch * H;
    const bool* v = valid_row(valid, t, batch);
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
      backward_rows(p_out, p_go, p_dh, p_dp, v, relu, H, b0, b1);
    });
    // valid rows of dh were zeroed; padded rows have d_pre = 0 and keep dh
    recurrent_mm_acc(dh, d_pre.select(0, t), w_hh, small_batch);
  }
  return {d_pre, dh};
}

// ----------------------------------------------------------------------------- ops

Tensor rnn_forward_chunk(const Tensor& pre_in, const Tensor& h0, const Tensor& w_hh,
                         const std::optional<Tensor>& valid, const Tensor& out, bool relu, c10::string_view path) {
  const ChunkArgs a = check_rnn_forward_chunk(kCpuKernels, pre_in, h0, w_hh, valid, out);
  const StepPath p = step_path(path, a.dtype, a.op);
  Float32Compute fc(a.dtype);
  Tensor h;
  fc.run([&](auto zero) {
    using T = decltype(zero);
    h = rnn_forward_impl<T>(fc.in(pre_in), fc.in(h0), fc.in(w_hh), a.valid, fc.out(out), relu, p);
  });
  return fc.result(h);
}

std::tuple<Tensor, Tensor> rnn_backward_chunk(const Tensor& out, const Tensor& w_hh, const Tensor& grad_out,
                                              const Tensor& grad_h_n, const std::optional<Tensor>& valid,
                                              bool relu, c10::string_view path) {
  const ChunkArgs a = check_rnn_backward_chunk(kCpuKernels, out, w_hh, grad_out, grad_h_n, valid);
  const StepPath p = step_path(path, a.dtype, a.op);
  Float32Compute fc(a.dtype);
  Tensor d_pre, dh;
  fc.run([&](auto zero) {
    using T = decltype(zero);
    std::tie(d_pre, dh) =
        rnn_backward_impl<T>(fc.in(out), fc.in(w_hh), fc.in(grad_out), fc.in(grad_h_n), a.valid, relu, p);
  });
  return {fc.result(d_pre), fc.result(dh)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbptt, CPU, m) {
  m.impl("rnn_forward_chunk", &rnn_forward_chunk);
  m.impl("rnn_backward_chunk", &rnn_backward_chunk);
}

}  // namespace cpu
}  // namespace fastbptt
