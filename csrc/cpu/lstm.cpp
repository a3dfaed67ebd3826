// Fused LSTM chunk kernels (CPU): fastbptt::lstm_forward_chunk, fastbptt::lstm_backward_chunk.
//
// Gate layout [i, f, g, o] in blocks of H columns; the gate math is csrc/cpu/cells/lstm.h.
// h' = m, or h' = m W_hr^T with a projection (h has P columns).
#include "cells/lstm.h"
#include "common.h"

namespace fastbptt {
namespace cpu {
namespace {

// ----------------------------------------------------------------------------- row passes

// gates: [B, 4H] full pre-activations; c: [B, H] carried (updated in place);
// m: [B, H] o * tanh(c') of the valid rows (the new h without projection); out: [B, H] or null
// (projection: the product is applied afterwards)
template <typename T>
FASTBPTT_INLINE void lstm_forward_rows(const T* __restrict__ gates, T* __restrict__ c, T* __restrict__ m,
                                       T* __restrict__ out, const bool* valid, int64_t H, int64_t b0,
                                       int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    if (valid != nullptr && !valid[b]) {
      if (out != nullptr)
        for (int64_t j = 0; j < H; ++j) out[b * H + j] = T(0);
      continue;
    }
    const T* __restrict__ g = gates + b * 4 * H;
    T* __restrict__ cb = c + b * H;
    T* __restrict__ mb = m + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const auto q = lstm::gates(g[j], g[H + j], g[2 * H + j], g[3 * H + j]);
      const T cn = lstm::next_cell(q, cb[j]);
      cb[j] = cn;
      mb[j] = lstm::hidden(q, cn);
    }
    if (out != nullptr)
      for (int64_t j = 0; j < H; ++j) out[b * H + j] = mb[j];
  }
}

// Cell-state scan of a chunk for one block of rows: c_states[t + 1] from c_states[t] and the
// gates ([C, B, 4H]); act[t] = the activated gates [i, f, g, o] of the valid rows, which the backward
// steps read (from d_gates, in place of their gradients) instead of evaluating them a second time;
// m_all[t] = o_t * tanh(c_{t+1}) when wanted (projection).
template <typename T>
FASTBPTT_INLINE void lstm_scan_rows(const T* __restrict__ gates, T* __restrict__ c_states, T* __restrict__ act,
                                    T* __restrict__ m_all, const bool* valid, int64_t steps, int64_t batch, int64_t H,
                                    int64_t b0, int64_t b1) {
  for (int64_t t = 0; t < steps; ++t) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* __restrict__ cp = c_states + (t * batch + b) * H;
      T* __restrict__ cn = c_states + ((t + 1) * batch + b) * H;
      const T* __restrict__ g = gates + (t * batch + b) * 4 * H;
      T* __restrict__ a = act + (t * batch + b) * 4 * H;
      if (valid != nullptr && !valid[t * batch + b]) {
        for (int64_t j = 0; j < H; ++j) cn[j] = cp[j];
        if (m_all != nullptr)
          for (int64_t j = 0; j < H; ++j) m_all[(t * batch + b) * H + j] = T(0);
        continue;
      }
      for (int64_t j = 0; j < H; ++j) {
        const auto q = lstm::gates(g[j], g[H + j], g[2 * H + j], g[3 * H + j]);
        lstm::store(q, a, H, j);
        cn[j] = lstm::next_cell(q, cp[j]);
      }
      if (m_all != nullptr) {  // a loop of its own, so that the scan's loop above stays branch-free
        T* __restrict__ mb = m_all + (t * batch + b) * H;
        for (int64_t j = 0; j < H; ++j) mb[j] = lstm::hidden(lstm::load(a, H, j), cn[j]);
      }
    }
  }
}

// One backward step for a block of rows. dm: [B, H] gradient of m; with a projection it holds
// dh_t W_hr already, without one (from_dh) it is formed here as dh + grad_out and the valid
// rows of dh: [B, H] are zeroed for the recurrent product that follows. dc: [B, H] carried,
// updated in place; d_gates: [B, 4H], the activated gates from the scan on entry (valid rows),
// their pre-activations' gradients on exit.
template <typename T>
FASTBPTT_INLINE void lstm_backward_rows(const T* __restrict__ c_prev, const T* __restrict__ c_new,
                                        T* __restrict__ dm, bool from_dh, const T* __restrict__ grad_out,
                                        T* __restrict__ dh, T* __restrict__ dc, T* __restrict__ d_gates,
                                        const bool* valid, int64_t H, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    T* __restrict__ dg = d_gates + b * 4 * H;
    if (valid != nullptr && !valid[b]) {  // padding: no gate gradient, dh and dc pass through
      for (int64_t j = 0; j < 4 * H; ++j) dg[j] = T(0);
      continue;
    }
    const T* __restrict__ cp = c_prev + b * H;
    const T* __restrict__ cb = c_new + b * H;
    T* __restrict__ dcb = dc + b * H;
    T* __restrict__ dmb = dm + b * H;
    if (from_dh) {
      const T* __restrict__ go = grad_out + b * H;
      T* __restrict__ dhb = dh + b * H;
      for (int64_t j = 0; j < H; ++j) {
        dmb[j] = dhb[j] + go[j];
        dhb[j] = T(0);
      }
    }
    for (int64_t j = 0; j < H; ++j) {
      const auto d = lstm::grads(lstm::load(dg, H, j), cp[j], cb[j], dmb[j], dcb[j]);
      dg[j] = d.i;
      dg[H + j] = d.f;
      dg[2 * H + j] = d.g;
      dg[3 * H + j] = d.o;
      dcb[j] = d.c;
    }
  }
}

// Projection backward, first half of a step: dh_t = valid ? dh + grad_out : 0 into dh_all
// (kept for grad_w_hr); valid rows of dh are zeroed for the recurrent product.
template <typename T>
FASTBPTT_INLINE void lstm_proj_rows(const T* __restrict__ grad_out, T* __restrict__ dh, T* __restrict__ dh_all,
                                    const bool* valid, int64_t P, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    T* __restrict__ da = dh_all + b * P;
    if (valid != nullptr && !valid[b]) {
      for (int64_t j = 0; j < P; ++j) da[j] = T(0);
      continue;
    }
    T* __restrict__ db = dh + b * P;
    const T* __restrict__ go = grad_out + b * P;
    for (int64_t j = 0; j < P; ++j) {
      da[j] = db[j] + go[j];
      db[j] = T(0);
    }
  }
}

FASTBPTT_CLONES void lstm_forward_rows_f32(const float* gates, float* c, float* m, float* out, const bool* valid,
                                           int64_t H, int64_t b0, int64_t b1) {
  lstm_forward_rows<float>(gates, c, m, out, valid, H, b0, b1);
}
FASTBPTT_CLONES void lstm_scan_rows_f32(const float* gates, float* c_states, float* act, float* m_all,
                                        const bool* valid, int64_t steps, int64_t batch, int64_t H, int64_t b0,
                                        int64_t b1) {
  lstm_scan_rows<float>(gates, c_states, act, m_all, valid, steps, batch, H, b0, b1);
}
FASTBPTT_CLONES void lstm_backward_rows_f32(const float* c_prev, const float* c_new, float* dm, bool from_dh,
                                            const float* grad_out, float* dh, float* dc, float* d_gates,
                                            const bool* valid, int64_t H, int64_t b0, int64_t b1) {
  lstm_backward_rows<float>(c_prev, c_new, dm, from_dh, grad_out, dh, dc, d_gates, valid, H, b0, b1);
}

void forward_rows(const float* gates, float* c, float* m, float* out, const bool* valid, int64_t H, int64_t b0,
                  int64_t b1) {
  lstm_forward_rows_f32(gates, c, m, out, valid, H, b0, b1);
}
void forward_rows(const double* gates, double* c, double* m, double* out, const bool* valid, int64_t H, int64_t b0,
                  int64_t b1) {
  lstm_forward_rows<double>(gates, c, m, out, valid, H, b0, b1);
}
void scan_rows(const float* gates, float* c_states, float* act, float* m_all, const bool* valid, int64_t steps,
               int64_t batch, int64_t H, int64_t b0, int64_t b1) {
  lstm_scan_rows_f32(gates, c_states, act, m_all, valid, steps, batch, H, b0, b1);
}
void scan_rows(const double* gates, double* c_states, double* act, double* m_all, const bool* valid, int64_t steps,
               int64_t batch, int64_t H, int64_t b0, int64_t b1) {
  lstm_scan_rows<double>(gates, c_states, act, m_all, valid, steps, batch, H, b0, b1);
}
void backward_rows(const float* c_prev, const float* c_new, float* dm, bool from_dh, const float* grad_out, float* dh,
                   float* dc, float* d_gates, const bool* valid, int64_t H, int64_t b0, int64_t b1) {
  lstm_backward_rows_f32(c_prev, c_new, dm, from_dh, grad_out, dh, dc, d_gates, valid, H, b0, b1);
}
void backward_rows(const double* c_prev, const double* c_new, double* dm, bool from_dh, const double* grad_out,
                   double* dh, double* dc, double* d_gates, const bool* valid, int64_t H, int64_t b0, int64_t b1) {
  lstm_backward_rows<double>(c_prev, c_new, dm, from_dh, grad_out, dh, dc, d_gates, valid, H, b0, b1);
}

// ----------------------------------------------------------------------------- chunk loops

// gates_in: [C, B, 4H]; h0: [B, P]; c0: [B, H]; w_hh: [4H, P]; w_hr: [P, H];
// out: [C, B, P]; gates_out: [C, B, 4H]
template <typename T>
std::tuple<Tensor, Tensor> lstm_forward_impl(const Tensor& gates_in, const Tensor& h0, const Tensor& c0,
                                             const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                                             const bool* valid, const Tensor& out,
                                             const std::optional<Tensor>& gates_out, StepPath path) {
  const int64_t steps = gates_in.size(0), batch = gates_in.size(1), H = c0.size(1), P = h0.size(1);
  const bool proj = w_hr.has_value(), small = path == StepPath::small_batch;
  Tensor h = h0.clone(), c = c0.clone();
  if constexpr (std::is_same_v<T, float>) {
    if (path == StepPath::packed) {  // never with a projection: the op checks
      lstm_forward_packed_f32(gates_in, w_hh, valid, h, c, out, gates_out);
      return {h, c};
    }
  }
  Tensor gates_buf = gates_out.has_value() ? Tensor() : at::empty({batch, 4 * H}, gates_in.options());
  // without projection and without padding, m is the new h itself
  Tensor m = at::empty({batch, H}, gates_in.options());
  Tensor h_proj = proj ? at::empty({batch, P}, gates_in.options()) : Tensor();
  const int64_t grain = row_grain(4 * H);
  for (int64_t t = 0; t < steps; ++t) {
    Tensor g = gates_out.has_value() ? gates_out->select(0, t) : gates_buf;
    recurrent_mm(g, gates_in.select(0, t), h, w_hh, small);
    Tensor out_t = out.select(0, t);
    const bool* v = valid_row(valid, t, batch);
    const T* p_g = g.data_ptr<T>();
    T* p_c = c.data_ptr<T>();
    // no projection: m goes straight to h (valid rows) and out
    T* p_m = proj ? m.data_ptr<T>() : h.data_ptr<T>();
    T* p_out = proj ? nullptr : out_t.data_ptr<T>();
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
      forward_rows(p_g, p_c, p_m, p_out, v, H, b0, b1);
    });
    if (proj) {
      if (v == nullptr) {
        recurrent_mm(out_t, std::nullopt, m, *w_hr, small);
        h.copy_(out_t);
      } else {
        recurrent_mm(h_proj, std::nullopt, m, *w_hr, small);
        const T* p_hp = h_proj.data_ptr<T>();
        T* p_h = h.data_ptr<T>();
        T* p_o = out_t.data_ptr<T>();
        for (int64_t b = 0; b < batch; ++b) {  // padded rows keep h and output zeros
          for (int64_t j = 0; j < P; ++j) {
            const T value = p_hp[b * P + j];
            p_h[b * P + j] = v[b] ? value : p_h[b * P + j];
            p_o[b * P + j] = v[b] ? value : T(0);
          }
        }
      }
    }
  }
  return {h, c};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_backward_impl(const Tensor& gates, const Tensor& c0,
                                                              const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                                                              const Tensor& grad_out, const Tensor& grad_h_n,
                                                              const Tensor& grad_c_n, const bool* valid,
                                                              StepPath path) {
  const int64_t steps = gates.size(0), batch = gates.size(1), H = c0.size(1), P = grad_h_n.size(1);
  const bool proj = w_hr.has_value();
  // c_states[t] is the cell state step t started from; m_all only with a projection; d_gates holds the
  // activated gates until each step's backward overwrites them with their gradients
  Tensor c_states = at::empty({steps + 1, batch, H}, gates.options());
  c_states.select(0, 0).copy_(c0);
  Tensor m_all = proj ? at::empty({steps, batch, H}, gates.options()) : Tensor();
  Tensor d_gates = at::empty_like(gates);
  {
    const T* p_g = gates.data_ptr<T>();
    T* p_c = c_states.data_ptr<T>();
    T* p_a = d_gates.data_ptr<T>();
    T* p_m = proj ? m_all.data_ptr<T>() : nullptr;
    at::parallel_for(0, batch, row_grain(4 * H * steps), [&](int64_t b0, int64_t b1) {
      scan_rows(p_g, p_c, p_a, p_m, valid, steps, batch, H, b0, b1);
    });
  }
  Tensor dh = grad_h_n.clone(), dc = grad_c_n.clone();
  if constexpr (std::is_same_v<T, float>) {
    if (path == StepPath::packed) {  // never with a projection: the op checks
      lstm_backward_packed_f32(c_states, w_hh, grad_out, valid, dh, dc, d_gates);
      return {d_gates, dh, dc, at::empty({0}, gates.options())};
    }
  }
  Tensor dh_all = proj ? at::empty({steps, batch, P}, gates.options()) : Tensor();
  Tensor dm = at::empty({batch, H}, gates.options());
  const int64_t grain = row_grain(4 * H);
  for (int64_t t = steps - 1; t >= 0; --t) {
    const bool* v = valid_row(valid, t, batch);
    const T* p_go = grad_out.data_ptr<T>() + t * batch * P;
    T* p_dh = dh.data_ptr<T>();
    if (proj) {
      T* p_da = dh_all.data_ptr<T>() + t * batch * P;
      at::parallel_for(0, batch, row_grain(P), [&](int64_t b0, int64_t b1) {
        lstm_proj_rows<T>(p_go, p_dh, p_da, v, P, b0, b1);
      });
      at::mm_out(dm, dh_all.select(0, t), *w_hr);
    }
    const T* p_cp = c_states.data_ptr<T>() + t * batch * H;
    const T* p_cn = p_cp + batch * H;
    T* p_dm = dm.data_ptr<T>();
    T* p_dc = dc.data_ptr<T>();
    T* p_dg = d_gates.data_ptr<T>() + t * batch * 4 * H;
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
      backward_rows(p_cp, p_cn, p_dm, !proj, p_go, p_dh, p_dc, p_dg, v, H, b0, b1);
    });
    // valid rows of dh were zeroed, padded rows have d_gates = 0 and keep dh
    recurrent_mm_acc(dh, d_gates.select(0, t), w_hh, path == StepPath::small_batch);
  }
  Tensor grad_w_hr = proj ? at::mm(dh_all.reshape({steps * batch, P}).t(), m_all.reshape({steps * batch, H}))
                          : at::empty({0}, gates.options());
  return {d_gates, dh, dc, grad_w_hr};
}

// ----------------------------------------------------------------------------- ops

// The kernel path of an LSTM chunk op: the packed kernels have no projection.
StepPath lstm_step_path(c10::string_view path, const ChunkArgs& a, const std::optional<Tensor>& w_hr) {
  const StepPath p = step_path(path, a.dtype, a.op);
  TORCH_CHECK(!(p == StepPath::packed && w_hr.has_value()), a.op,
              ": the packed kernels exist for LSTM without projection, but w_hr was given");
  return p;
}

std::tuple<Tensor, Tensor> lstm_forward_chunk(const Tensor& gates_in, const Tensor& h0, const Tensor& c0,
                                              const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                                              const std::optional<Tensor>& valid, const Tensor& out,
                                              const std::optional<Tensor>& gates_out, c10::string_view path) {
  const ChunkArgs a =
      check_lstm_forward_chunk(kCpuKernels, gates_in, h0, c0, w_hh, w_hr, valid, out, gates_out);
  const StepPath p = lstm_step_path(path, a, w_hr);
  Float32Compute fc(a.dtype);
  Tensor h, c;
  fc.run([&](auto zero) {
    using T = decltype(zero);
    std::tie(h, c) = lstm_forward_impl<T>(fc.in(gates_in), fc.in(h0), fc.in(c0), fc.in(w_hh), fc.in(w_hr),
                                          a.valid, fc.out(out), fc.out(gates_out), p);
  });
  return {fc.result(h), fc.result(c)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_backward_chunk(const Tensor& gates, const Tensor& c0,
                                                               const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                                                               const Tensor& grad_out, const Tensor& grad_h_n,
                                                               const Tensor& grad_c_n,
                                                               const std::optional<Tensor>& valid,
                                                               c10::string_view path) {
  const ChunkArgs a =
      check_lstm_backward_chunk(kCpuKernels, gates, c0, w_hh, w_hr, grad_out, grad_h_n, grad_c_n, valid);
  const StepPath p = lstm_step_path(path, a, w_hr);
  Float32Compute fc(a.dtype);
  Tensor d_gates, dh, dc, d_w_hr;
  fc.run([&](auto zero) {
    using T = decltype(zero);
    std::tie(d_gates, dh, dc, d_w_hr) = lstm_backward_impl<T>(fc.in(gates), fc.in(c0), fc.in(w_hh), fc.in(w_hr),
                                                               fc.in(grad_out), fc.in(grad_h_n), fc.in(grad_c_n),
                                                               a.valid, p);
  });
  return {fc.result(d_gates), fc.result(dh), fc.result(dc), fc.result(d_w_hr)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbptt, CPU, m) {
  m.impl("lstm_forward_chunk", &lstm_forward_chunk);
  m.impl("lstm_backward_chunk", &lstm_backward_chunk);
}

}  // namespace cpu
}  // namespace fastbptt
