// Fused GRU chunk kernels (CPU): fastbptt::gru_forward_chunk, fastbptt::gru_backward_chunk.
//
// Gate layout [r, z, n] in blocks of H columns; the gate math is csrc/cpu/cells/gru.h.
#include "cells/gru.h"
#include "common.h"

namespace fastbptt {
namespace cpu {
namespace {

// ----------------------------------------------------------------------------- row passes

// gi, gh: [B, 3H] this step; h: [B, H] carried state (updated in place); out: [B, H]
template <typename T>
FASTBPTT_INLINE void gru_forward_rows(const T* __restrict__ gi, const T* __restrict__ gh, T* __restrict__ h,
                                      T* __restrict__ out, const bool* valid, int64_t H, int64_t b0,
                                      int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    T* __restrict__ hb = h + b * H;
    T* __restrict__ ob = out + b * H;
    if (valid != nullptr && !valid[b]) {
      for (int64_t j = 0; j < H; ++j) ob[j] = T(0);
      continue;
    }
    const T* __restrict__ ib = gi + b * 3 * H;
    const T* __restrict__ hh = gh + b * 3 * H;
    for (int64_t j = 0; j < H; ++j) {
      const auto a = gru::gates(ib[j], ib[H + j], ib[2 * H + j], hh[j], hh[H + j], hh[2 * H + j]);
      const T hn = gru::next_state(a, hb[j]);
      hb[j] = hn;
      ob[j] = hn;
    }
  }
}

// gi, gh: [B, 3H]; h_prev, grad_out: [B, H]; dh: [B, H] carried gradient, replaced by its
// direct term z * dh_total (the recurrent product is added afterwards); d_gi, d_gh: [B, 3H]
template <typename T>
FASTBPTT_INLINE void gru_backward_rows(const T* __restrict__ gi, const T* __restrict__ gh,
                                       const T* __restrict__ h_prev, const T* __restrict__ grad_out,
                                       T* __restrict__ dh, T* __restrict__ d_gi, T* __restrict__ d_gh,
                                       const bool* valid, int64_t H, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    T* __restrict__ dgi = d_gi + b * 3 * H;
    T* __restrict__ dgh = d_gh + b * 3 * H;
    if (valid != nullptr && !valid[b]) {  // padding: no gate gradient, dh passes through
      for (int64_t j = 0; j < 3 * H; ++j) {
        dgi[j] = T(0);
        dgh[j] = T(0);
      }
      continue;
    }
    gru::backward_units(gi + b * 3 * H, gh + b * 3 * H, h_prev + b * H, grad_out + b * H, dh + b * H, dgi, dgh, H,
                        H);
  }
}

FASTBPTT_CLONES void gru_forward_rows_f32(const float* gi, const float* gh, float* h, float* out,
                                          const bool* valid, int64_t H, int64_t b0, int64_t b1) {
  gru_forward_rows<float>(gi, gh, h, out, valid, H, b0, b1);
}
FASTBPTT_CLONES void gru_backward_rows_f32(const float* gi, const float* gh, const float* h_prev,
                                           const float* grad_out, float* dh, float* d_gi, float* d_gh,
                                           const bool* valid, int64_t H, int64_t b0, int64_t b1) {
  gru_backward_rows<float>(gi, gh, h_prev, grad_out, dh, d_gi, d_gh, valid, H, b0, b1);
}
void gru_forward_rows_any(const float* gi, const float* gh, float* h, float* out, const bool* valid, int64_t H,
                          int64_t b0, int64_t b1) {
  gru_forward_rows_f32(gi, gh, h, out, valid, H, b0, b1);
}
void gru_forward_rows_any(const double* gi, const double* gh, double* h, double* out, const bool* valid,
                          int64_t H, int64_t b0, int64_t b1) {
  gru_forward_rows<double>(gi, gh, h, out, valid, H, b0, b1);
}
void gru_backward_rows_any(const float* gi, const float* gh, const float* h_prev, const float* grad_out, float* dh,
                           float* d_gi, float* d_gh, const bool* valid, int64_t H, int64_t b0, int64_t b1) {
  gru_backward_rows_f32(gi, gh, h_prev, grad_out, dh, d_gi, d_gh, valid, H, b0, b1);
}
void gru_backward_rows_any(const double* gi, const double* gh, const double* h_prev, const double* grad_out,
                           double* dh, double* d_gi, double* d_gh, const bool* valid, int64_t H, int64_t b0,
                           int64_t b1) {
  gru_backward_rows<double>(gi, gh, h_prev, grad_out, dh, d_gi, d_gh, valid, H, b0, b1);
}

// ----------------------------------------------------------------------------- chunk loops

// gi: [C, B, 3H]; h0: [B, H]; w_hh: [3H, H]; b_hh: [3H]; out: [C, B, H]; gh_out: [C, B, 3H]
template <typename T>
Tensor gru_forward_impl(const Tensor& gi, const Tensor& h0, const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                        const bool* valid, const Tensor& out, const std::optional<Tensor>& gh_out, StepPath path) {
  const int64_t steps = gi.size(0), batch = gi.size(1), H = h0.size(1);
  Tensor h = h0.clone();
  if constexpr (std::is_same_v<T, float>) {
    if (path == StepPath::packed) {
      gru_forward_packed_f32(gi, w_hh, b_hh, valid, h, out, gh_out);
      return h;
    }
  }
  Tensor gh_buf = gh_out.has_value() ? Tensor() : at::empty({batch, 3 * H}, gi.options());
  const int64_t grain = row_grain(3 * H);
  for (int64_t t = 0; t < steps; ++t) {
    Tensor gh = gh_out.has_value() ? gh_out->select(0, t) : gh_buf;
    recurrent_mm(gh, b_hh, h, w_hh, path == StepPath::small_batch);
    const T* p_gi = gi.data_ptr<T>() + t * batch * 3 * H;
    const T* p_gh = gh.data_ptr<T>();
    T* p_h = h.data_ptr<T>();
    T* p_out = out.data_ptr<T>() + t * batch * H;
    const bool* v = valid_row(valid, t, batch);
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
      gru_forward_rows_any(p_gi, p_gh, p_h, p_out, v, H, b0, b1);
    });
  }
  return h;
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> gru_backward_impl(const Tensor& gi, const Tensor& gh, const Tensor& h_prev,
                                                     const Tensor& w_hh, const Tensor& grad_out,
                                                     const Tensor& grad_h_n, const bool* valid, StepPath path) {
  const int64_t steps = gi.size(0), batch = gi.size(1), H = h_prev.size(2);
  Tensor d_gi = at::empty_like(gi), d_gh = at::empty_like(gh);
  Tensor dh = grad_h_n.clone();
  if constexpr (std::is_same_v<T, float>) {
    if (path == StepPath::packed) {
      gru_backward_packed_f32(gi, gh, h_prev, w_hh, grad_out, valid, dh, d_gi, d_gh);
      return {d_gi, d_gh, dh};
    }
  }
  const int64_t grain = row_grain(3 * H);
  for (int64_t t = steps - 1; t >= 0; --t) {
    const int64_t o3 = t * batch * 3 * H, o1 = t * batch * H;
    const T* p_gi = gi.data_ptr<T>() + o3;
    const T* p_gh = gh.data_ptr<T>() + o3;
    const T* p_hp = h_prev.data_ptr<T>() + o1;
    const T* p_go = grad_out.data_ptr<T>() + o1;
    T* p_dh = dh.data_ptr<T>();
    T* p_dgi = d_gi.data_ptr<T>() + o3;
    T* p_dgh = d_gh.data_ptr<T>() + o3;
    const bool* v = valid_row(valid, t, batch);
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
      gru_backward_rows_any(p_gi, p_gh, p_hp, p_go, p_dh, p_dgi, p_dgh, v, H, b0, b1);
    });
    // padded rows have d_gh = 0, so they keep dh unchanged
    recurrent_mm_acc(dh, d_gh.select(0, t), w_hh, path == StepPath::small_batch);
  }
  return {d_gi, d_gh, dh};
}

// ----------------------------------------------------------------------------- ops

Tensor gru_forward_chunk(const Tensor& gi, const Tensor& h0, const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                         const std::optional<Tensor>& valid, const Tensor& out, const std::optional<Tensor>& gh_out,
                         c10::string_view path) {
  const ChunkArgs a = check_gru_forward_chunk(kCpuKernels, gi, h0, w_hh, b_hh, valid, out, gh_out);
  const StepPath p = step_path(path, a.dtype, a.op);
  Float32Compute fc(a.dtype);
  Tensor h;
  fc.run([&](auto zero) {
    using T = decltype(zero);
    h = gru_forward_impl<T>(fc.in(gi), fc.in(h0), fc.in(w_hh), fc.in(b_hh), a.valid, fc.out(out), fc.out(gh_out),
                            p);
  });
  return fc.result(h);
}

std::tuple<Tensor, Tensor, Tensor> gru_backward_chunk(const Tensor& gi, const Tensor& gh, const Tensor& h_prev,
                                                      const Tensor& w_hh, const Tensor& grad_out,
                                                      const Tensor& grad_h_n, const std::optional<Tensor>& valid,
                                                      c10::string_view path) {
  const ChunkArgs a = check_gru_backward_chunk(kCpuKernels, gi, gh, h_prev, w_hh, grad_out, grad_h_n, valid);
  const StepPath p = step_path(path, a.dtype, a.op);
  Float32Compute fc(a.dtype);
  Tensor d_gi, d_gh, dh;
  fc.run([&](auto zero) {
    using T = decltype(zero);
    std::tie(d_gi, d_gh, dh) = gru_backward_impl<T>(fc.in(gi), fc.in(gh), fc.in(h_prev), fc.in(w_hh),
                                                    fc.in(grad_out), fc.in(grad_h_n), a.valid, p);
  });
  return {fc.result(d_gi), fc.result(d_gh), fc.result(dh)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbptt, CPU, m) {
  m.impl("gru_forward_chunk", &gru_forward_chunk);
  m.impl("gru_backward_chunk", &gru_backward_chunk);
}

}  // namespace cpu
}  // namespace fastbptt
