// One cell step for small batches, float32 (csrc/cpu/common.h: *_cell_forward_f32, *_cell_backward_f32):
// the small-batch path of the cell ops (fastbptt::{rnn,gru,lstm}_cell, csrc/cell_ops.cpp).
//
// With a few batch rows a cell step is two matrix-vector products whose time is reading W_ih and
// W_hh, plus the gate math. Through ATen it is an MKL call per product (each a fresh output
// tensor), a bias addition and the chunk kernel's row pass; here it is one parallel pass over the
// weights' rows:
//
// - forward: each task takes a slice of hidden units and forms every gate pre-activation of those
//   units from dot products along the rows of W_ih and W_hh (as stored: no transposed copy), into
//   the buffer the backward keeps (LSTM: the summed gates; GRU: gi and gh), then applies the cell's
//   math (csrc/cpu/cells/*.h) to those units. A task reads the same rows at every step, so with
//   several threads each keeps its part of the weights in its own L2 across a loop of steps.
// - backward: the gate gradients (one pass over the units), then dx = d_gi W_ih and
//   dh = direct part + d_gh W_hh, each task a block of columns of both weights.
//
// Every output value is one sequential sum in a fixed order, whatever the thread count.
#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"
#include "common.h"

namespace fastbptt {
namespace cpu {
namespace {

constexpr int64_t kUnits = 8;  // hidden units per block: the rows of a gate read together
constexpr int64_t kCols = 64;  // columns per block of the backward products

// ----------------------------------------------------------------------------- products

// out[b * ldo + r] += sum_k a[b * lda + k] w[r * K + k] for RB rows of a and NR rows of w (K floats
// apart): NR * RB accumulators, each row of w loaded once for the RB rows of a.
template <int NR, int RB>
FASTBPTT_INLINE void dot_block(const float* __restrict__ a, int64_t lda, const float* __restrict__ w, int64_t K,
                               float* __restrict__ out, int64_t ldo) {
  const int64_t K8 = K & ~int64_t(7);
  v8f s[RB][NR] = {};
  for (int64_t k = 0; k < K8; k += 8) {
    v8f x[RB];
    for (int b = 0; b < RB; ++b) x[b] = load8(a + b * lda + k);
    for (int r = 0; r < NR; ++r) {
      const v8f wv = load8(w + r * K + k);
      for (int b = 0; b < RB; ++b) s[b][r] += x[b] * wv;
    }
  }
  for (int b = 0; b < RB; ++b)
    for (int r = 0; r < NR; ++r) {
      float v = hsum(s[b][r]);
      for (int64_t k = K8; k < K; ++k) v += a[b * lda + k] * w[r * K + k];
      out[b * ldo + r] += v;
    }
}

// out[b * kUnits + r] += sum_k a[b, k] w[r, k] for all B rows of a (lda = K) and the nr <= kUnits
// rows of w: pairs of rows of a against four rows of w at a time (12 of the 16 AVX2 registers).
FASTBPTT_INLINE void dot_rows(const float* a, int64_t B, const float* w, int64_t K, int64_t nr, float* out) {
  int64_t b = 0;
  for (; b + 2 <= B; b += 2) {
    int64_t r = 0;
    for (; r + 4 <= nr; r += 4) dot_block<4, 2>(a + b * K, K, w + r * K, K, out + b * kUnits + r, kUnits);
    for (; r < nr; ++r) dot_block<1, 2>(a + b * K, K, w + r * K, K, out + b * kUnits + r, kUnits);
  }
  if (b < B) {
    int64_t r = 0;
    if (nr == kUnits) {
      dot_block<kUnits, 1>(a + b * K, K, w, K, out + b * kUnits, kUnits);
      r = nr;
    }
    for (; r < nr; ++r) dot_block<1, 1>(a + b * K, K, w + r * K, K, out + b * kUnits + r, kUnits);
  }
}

// The gate pre-activations of units [u0, u1) for all B rows: pre_i[b, g*H + u] = x_b . W_ih[g*H + u]
// + b_ih, and either the same sum plus h_b . W_hh[g*H + u] + b_hh (pre_h null: RNN, LSTM) or
// pre_h[b, g*H + u] = h_b . W_hh[g*H + u] + b_hh apart (GRU). Biases may be null.
FASTBPTT_INLINE void gate_preacts(const float* __restrict__ x, const float* __restrict__ h,
                                  const float* __restrict__ w_ih, const float* __restrict__ w_hh,
                                  const float* b_ih, const float* b_hh, float* pre_i, float* pre_h,
                                  int64_t B, int64_t I, int64_t H, int64_t G, int64_t u0, int64_t u1) {
  const int64_t N = G * H;
  std::vector<float> si(B * kUnits), sh(pre_h != nullptr ? B * kUnits : 0);
  for (int64_t u = u0; u < u1; u += kUnits) {
    const int64_t nr = std::min(kUnits, u1 - u);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = g * H + u;
      std::fill(si.begin(), si.end(), 0.0f);
      std::fill(sh.begin(), sh.end(), 0.0f);
      float* acc_h = pre_h == nullptr ? si.data() : sh.data();
      dot_rows(x, B, w_ih + n * I, I, nr, si.data());
      dot_rows(h, B, w_hh + n * H, H, nr, acc_h);
      for (int64_t b = 0; b < B; ++b) {
        float* ai = si.data() + b * kUnits;
        float* ah = acc_h + b * kUnits;
        if (b_ih != nullptr)
          for (int64_t r = 0; r < nr; ++r) ai[r] += b_ih[n + r];
        if (b_hh != nullptr)
          for (int64_t r = 0; r < nr; ++r) ah[r] += b_hh[n + r];
        for (int64_t r = 0; r < nr; ++r) pre_i[b * N + n + r] = ai[r];
        if (pre_h != nullptr)
          for (int64_t r = 0; r < nr; ++r) pre_h[b * N + n + r] = ah[r];
      }
    }
  }
}

// out[b, j0:j0 + 8*NV] = base (or 0) + sum_n d[b, n] w[n, j0:j0 + 8*NV] for RB rows b of d from b0:
// RB * NV accumulators (8 independent FMA chains), each row piece of w loaded once for the RB rows.
template <int RB, int NV>
FASTBPTT_INLINE void nn_block(const float* __restrict__ d, const float* __restrict__ w, const float* base,
                              float* out, int64_t N, int64_t K, int64_t b0, int64_t j0) {
  v8f acc[RB][NV] = {};
  for (int64_t n = 0; n < N; ++n) {
    v8f wv[NV];
    for (int i = 0; i < NV; ++i) wv[i] = load8(w + n * K + j0 + 8 * i);
    for (int r = 0; r < RB; ++r) {
      const float s = d[(b0 + r) * N + n];
      for (int i = 0; i < NV; ++i) acc[r][i] += s * wv[i];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < NV; ++i) {
      const int64_t at = (b0 + r) * K + j0 + 8 * i;
      store8(out + at, base != nullptr ? load8(base + at) + acc[r][i] : acc[r][i]);
    }
}

// out[b, j0:j0+nj] = base[b, ...] (or 0) + sum_n d[b, n] w[n, j0:j0+nj] for all B rows, nj <= kCols;
// d: [B, N], w: [N, K], out and base: [B, K] (base may be out: each value is read before it is written).
FASTBPTT_INLINE void mm_nn_block(const float* __restrict__ d, const float* __restrict__ w, const float* base,
                                 float* out, int64_t B, int64_t N, int64_t K, int64_t j0, int64_t nj) {
  if (nj < kCols) {  // the last columns of a ragged width: 8 at a time, then one by one
    const int64_t j8 = j0 + (nj & ~int64_t(7));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = j0; j < j8; j += 8) nn_block<1, 1>(d, w, base, out, N, K, b, j);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = j8; j < j0 + nj; ++j) {
        float s = base != nullptr ? base[b * K + j] : 0.0f;
        for (int64_t n = 0; n < N; ++n) s += d[b * N + n] * w[n * K + j];
        out[b * K + j] = s;
      }
    return;
  }
  int64_t b = 0;
  for (; b + 4 <= B; b += 4)
    for (int64_t j = j0; j < j0 + kCols; j += 16) nn_block<4, 2>(d, w, base, out, N, K, b, j);
  for (; b + 2 <= B; b += 2)
    for (int64_t j = j0; j < j0 + kCols; j += 32) nn_block<2, 4>(d, w, base, out, N, K, b, j);
  for (; b < B; ++b) nn_block<1, 8>(d, w, base, out, N, K, b, j0);
}

// ----------------------------------------------------------------------------- forward per task

FASTBPTT_CLONES void rnn_forward_units(const float* x, const float* h, const float* w_ih, const float* w_hh,
                                       const float* b_ih, const float* b_hh, bool relu, float* hy, int64_t B,
                                       int64_t I, int64_t H, int64_t u0, int64_t u1) {
  gate_preacts(x, h, w_ih, w_hh, b_ih, b_hh, hy, nullptr, B, I, H, 1, u0, u1);
  for (int64_t b = 0; b < B; ++b) {
    float* __restrict__ o = hy + b * H;
    if (relu) {
      for (int64_t j = u0; j < u1; ++j) o[j] = rnn::activate<true>(o[j]);
    } else {
      for (int64_t j = u0; j < u1; ++j) o[j] = rnn::activate<false>(o[j]);
    }
  }
}

FASTBPTT_CLONES void gru_forward_units(const float* x, const float* h, const float* w_ih, const float* w_hh,
                                       const float* b_ih, const float* b_hh, float* hy, float* gi, float* gh,
                                       int64_t B, int64_t I, int64_t H, int64_t u0, int64_t u1) {
  gate_preacts(x, h, w_ih, w_hh, b_ih, b_hh, gi, gh, B, I, H, 3, u0, u1);
  for (int64_t b = 0; b < B; ++b) {
    const float* __restrict__ i = gi + b * 3 * H;
    const float* __restrict__ r = gh + b * 3 * H;
    const float* __restrict__ hp = h + b * H;
    float* __restrict__ o = hy + b * H;
    for (int64_t j = u0; j < u1; ++j)
      o[j] = gru::next_state(gru::gates(i[j], i[H + j], i[2 * H + j], r[j], r[H + j], r[2 * H + j]), hp[j]);
  }
}

FASTBPTT_CLONES void lstm_forward_units(const float* x, const float* h, const float* c, const float* w_ih,
                                        const float* w_hh, const float* b_ih, const float* b_hh, float* hy,
                                        float* cy, float* gates, int64_t B, int64_t I, int64_t H, int64_t u0,
                                        int64_t u1) {
  gate_preacts(x, h, w_ih, w_hh, b_ih, b_hh, gates, nullptr, B, I, H, 4, u0, u1);
  for (int64_t b = 0; b < B; ++b) {
    const float* __restrict__ g = gates + b * 4 * H;
    const float* __restrict__ cp = c + b * H;
    float* __restrict__ cn = cy + b * H;
    float* __restrict__ o = hy + b * H;
    for (int64_t j = u0; j < u1; ++j) {
      const auto q = lstm::gates(g[j], g[H + j], g[2 * H + j], g[3 * H + j]);
      cn[j] = lstm::next_cell(q, cp[j]);
      o[j] = lstm::hidden(q, cn[j]);
    }
  }
}

// ----------------------------------------------------------------------------- backward per task

FASTBPTT_CLONES void rnn_grads_units(const float* grad_hy, const float* hy, bool relu, float* d, int64_t B,
                                     int64_t H) {
  for (int64_t v = 0; v < B * H; ++v)
    d[v] = relu ? rnn::pre_grad<true>(hy[v], grad_hy[v]) : rnn::pre_grad<false>(hy[v], grad_hy[v]);
}

FASTBPTT_CLONES void gru_grads_units(const float* grad_hy, const float* h, const float* gi, const float* gh,
                                     float* d_gi, float* d_gh, float* direct, int64_t B, int64_t H) {
  for (int64_t b = 0; b < B; ++b) {
    float* __restrict__ dd = direct + b * H;
    for (int64_t j = 0; j < H; ++j) dd[j] = 0.0f;
    gru::backward_units(gi + b * 3 * H, gh + b * 3 * H, h + b * H, grad_hy + b * H, dd, d_gi + b * 3 * H,
                        d_gh + b * 3 * H, H, H);
  }
}

FASTBPTT_CLONES void lstm_grads_units(const float* grad_hy, const float* grad_cy, const float* c,
                                      const float* gates, float* d_gates, float* grad_cx, int64_t B, int64_t H) {
  for (int64_t b = 0; b < B; ++b) {
    const float* __restrict__ g = gates + b * 4 * H;
    const float* __restrict__ cp = c + b * H;
    const float* __restrict__ dm = grad_hy + b * H;
    const float* __restrict__ dc = grad_cy + b * H;
    float* __restrict__ dg = d_gates + b * 4 * H;
    float* __restrict__ dcx = grad_cx + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const auto q = lstm::gates(g[j], g[H + j], g[2 * H + j], g[3 * H + j]);
      const auto r = lstm::grads(q, cp[j], lstm::next_cell(q, cp[j]), dm[j], dc[j]);
      dg[j] = r.i;
      dg[H + j] = r.f;
      dg[2 * H + j] = r.g;
      dg[3 * H + j] = r.o;
      dcx[j] = r.c;
    }
  }
}

// Column blocks [q0, q1) of dx (the first ceil(I / kCols) blocks) and dh (the rest).
FASTBPTT_CLONES void input_state_grads(const float* d_gi, const float* d_gh, const float* w_ih, const float* w_hh,
                                       const float* direct, float* grad_x, float* grad_hx, int64_t B, int64_t N,
                                       int64_t I, int64_t H, int64_t q0, int64_t q1) {
  const int64_t x_blocks = grad_x != nullptr ? (I + kCols - 1) / kCols : 0;
  for (int64_t q = q0; q < q1; ++q) {
    if (q < x_blocks) {
      const int64_t j0 = q * kCols;
      mm_nn_block(d_gi, w_ih, nullptr, grad_x, B, N, I, j0, std::min(kCols, I - j0));
    } else {
      const int64_t j0 = (q - x_blocks) * kCols;
      mm_nn_block(d_gh, w_hh, direct, grad_hx, B, N, H, j0, std::min(kCols, H - j0));
    }
  }
}

// ----------------------------------------------------------------------------- parallel drivers

const float* ptr(const std::optional<Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// Runs f(u0, u1) over the hidden units in blocks of kUnits, `work` multiply-adds per unit.
template <typename F>
void over_units(int64_t H, int64_t work, const F& f) {
  const int64_t blocks = (H + kUnits - 1) / kUnits;
  const int64_t grain = std::max<int64_t>(1, kTaskWork / std::max<int64_t>(1, work * kUnits));
  at::parallel_for(0, blocks, grain, [&](int64_t q0, int64_t q1) { f(q0 * kUnits, std::min(q1 * kUnits, H)); });
}

void input_state_products(const Tensor& d_gi, const Tensor& d_gh, const Tensor& w_ih, const Tensor& w_hh,
                          const float* direct, const std::optional<Tensor>& grad_x, const Tensor& grad_hx) {
  const int64_t B = d_gi.size(0), N = d_gi.size(1), I = w_ih.size(1), H = w_hh.size(1);
  const int64_t blocks = (grad_x.has_value() ? (I + kCols - 1) / kCols : 0) + (H + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, kTaskWork / std::max<int64_t>(1, B * N * kCols));
  const float *p_gi = d_gi.data_ptr<float>(), *p_gh = d_gh.data_ptr<float>();
  const float *p_wi = w_ih.data_ptr<float>(), *p_wh = w_hh.data_ptr<float>();
  float* p_x = grad_x.has_value() ? grad_x->data_ptr<float>() : nullptr;
  float* p_h = grad_hx.data_ptr<float>();
  at::parallel_for(0, blocks, grain, [&](int64_t q0, int64_t q1) {
    input_state_grads(p_gi, p_gh, p_wi, p_wh, direct, p_x, p_h, B, N, I, H, q0, q1);
  });
}

}  // namespace

bool cell_step_small_f32(const Tensor& input, const std::vector<std::optional<Tensor>>& others) {
  if (!input.device().is_cpu() || input.scalar_type() != at::kFloat || !input.is_contiguous()) return false;
  for (const auto& t : others)
    if (t.has_value() && !t->is_contiguous()) return false;
  return true;
}

void rnn_cell_forward_f32(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                          const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, bool relu,
                          const Tensor& hy) {
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1);
  const float *p_x = x.data_ptr<float>(), *p_h = h.data_ptr<float>();
  const float *p_wi = w_ih.data_ptr<float>(), *p_wh = w_hh.data_ptr<float>();
  const float *p_bi = ptr(b_ih), *p_bh = ptr(b_hh);
  float* p_hy = hy.data_ptr<float>();
  over_units(H, B * (I + H), [&](int64_t u0, int64_t u1) {
    rnn_forward_units(p_x, p_h, p_wi, p_wh, p_bi, p_bh, relu, p_hy, B, I, H, u0, u1);
  });
}

void gru_cell_forward_f32(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                          const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, const Tensor& hy,
                          const Tensor& gi, const Tensor& gh) {
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1);
  const float *p_x = x.data_ptr<float>(), *p_h = h.data_ptr<float>();
  const float *p_wi = w_ih.data_ptr<float>(), *p_wh = w_hh.data_ptr<float>();
  const float *p_bi = ptr(b_ih), *p_bh = ptr(b_hh);
  float *p_hy = hy.data_ptr<float>(), *p_gi = gi.data_ptr<float>(), *p_gh = gh.data_ptr<float>();
  over_units(H, 3 * B * (I + H), [&](int64_t u0, int64_t u1) {
    gru_forward_units(p_x, p_h, p_wi, p_wh, p_bi, p_bh, p_hy, p_gi, p_gh, B, I, H, u0, u1);
  });
}

void lstm_cell_forward_f32(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih, const Tensor& w_hh,
                           const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, const Tensor& hy,
                           const Tensor& cy, const Tensor& gates) {
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1);
  const float *p_x = x.data_ptr<float>(), *p_h = h.data_ptr<float>(), *p_c = c.data_ptr<float>();
  const float *p_wi = w_ih.data_ptr<float>(), *p_wh = w_hh.data_ptr<float>();
  const float *p_bi = ptr(b_ih), *p_bh = ptr(b_hh);
  float *p_hy = hy.data_ptr<float>(), *p_cy = cy.data_ptr<float>(), *p_g = gates.data_ptr<float>();
  over_units(H, 4 * B * (I + H), [&](int64_t u0, int64_t u1) {
    lstm_forward_units(p_x, p_h, p_c, p_wi, p_wh, p_bi, p_bh, p_hy, p_cy, p_g, B, I, H, u0, u1);
  });
}

void rnn_cell_backward_f32(const Tensor& grad_hy, const Tensor& hy, const Tensor& w_ih, const Tensor& w_hh,
                           bool relu, const Tensor& d_pre, const std::optional<Tensor>& grad_x,
                           const Tensor& grad_hx) {
  rnn_grads_units(grad_hy.data_ptr<float>(), hy.data_ptr<float>(), relu, d_pre.data_ptr<float>(), hy.size(0),
                  hy.size(1));
  input_state_products(d_pre, d_pre, w_ih, w_hh, nullptr, grad_x, grad_hx);
}

void gru_cell_backward_f32(const Tensor& grad_hy, const Tensor& h, const Tensor& gi, const Tensor& gh,
                           const Tensor& w_ih, const Tensor& w_hh, const Tensor& d_gi, const Tensor& d_gh,
                           const std::optional<Tensor>& grad_x, const Tensor& grad_hx) {
  // grad_hx first takes dL/dh' * z, the part of dL/dh that skips W_hh; the product is added in place
  float* direct = grad_hx.data_ptr<float>();
  gru_grads_units(grad_hy.data_ptr<float>(), h.data_ptr<float>(), gi.data_ptr<float>(), gh.data_ptr<float>(),
                  d_gi.data_ptr<float>(), d_gh.data_ptr<float>(), direct, h.size(0), h.size(1));
  input_state_products(d_gi, d_gh, w_ih, w_hh, direct, grad_x, grad_hx);
}

void lstm_cell_backward_f32(const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& c, const Tensor& gates,
                            const Tensor& w_ih, const Tensor& w_hh, const Tensor& d_gates,
                            const std::optional<Tensor>& grad_x, const Tensor& grad_hx, const Tensor& grad_cx) {
  lstm_grads_units(grad_hy.data_ptr<float>(), grad_cy.data_ptr<float>(), c.data_ptr<float>(),
                   gates.data_ptr<float>(), d_gates.data_ptr<float>(), grad_cx.data_ptr<float>(), c.size(0),
                   c.size(1));
  input_state_products(d_gates, d_gates, w_ih, w_hh, nullptr, grad_x, grad_hx);
}

}  // namespace cpu
}  // namespace fastbptt
