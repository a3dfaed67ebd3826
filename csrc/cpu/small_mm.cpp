// Recurrent products for small batches (csrc/cpu/common.h: recurrent_mm, recurrent_mm_acc).
//
// With one or two batch rows the per-step product is a matrix-vector product whose time is
// reading W_hh. MKL's sgemm runs it on one thread at these shapes; here each thread streams a
// contiguous part of W_hh instead: the forward splits the rows of W_hh (dot products with h),
// the backward its columns (each thread adds sum_n d[n] W[n, j0:j1] into its slice of dh).
#include "common.h"

namespace fastbptt {
namespace cpu {
namespace {

// out[b, n] = base[b * base_ld + n] + sum_k a[b, k] w[n, k] for n in [n0, n1); base may be null
FASTBPTT_CLONES void mm_nt_rows_f32(float* out, const float* base, int64_t base_ld, const float* a,
                                    const float* w, int64_t B, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const int64_t K8 = K & ~int64_t(7);
  int64_t n = n0;
  for (; n + 8 <= n1; n += 8) {  // eight rows of W at a time: eight independent load streams
    const float* wn = w + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float* x = a + b * K;
      v8f s[8] = {};
      for (int64_t k = 0; k < K8; k += 8) {
        const v8f xv = load8(x + k);
        for (int r = 0; r < 8; ++r) s[r] += xv * load8(wn + r * K + k);
      }
      float* o = out + b * N + n;
      for (int r = 0; r < 8; ++r) {
        float v = hsum(s[r]);
        for (int64_t k = K8; k < K; ++k) v += x[k] * wn[r * K + k];
        o[r] = v + (base != nullptr ? base[b * base_ld + n + r] : 0.0f);
      }
    }
  }
  for (; n < n1; ++n) {
    const float* wn = w + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float* x = a + b * K;
      v8f s = {};
      for (int64_t k = 0; k < K8; k += 8) s += load8(x + k) * load8(wn + k);
      float r = hsum(s);
      for (int64_t k = K8; k < K; ++k) r += x[k] * wn[k];
      out[b * N + n] = r + (base != nullptr ? base[b * base_ld + n] : 0.0f);
    }
  }
}

// dh[b, j] += sum_n d[b, n] w[n, j] for j in [j0, j1); d: [B, N], w: [N, K], dh: [B, K]
FASTBPTT_CLONES void mm_nn_acc_cols_f32(float* __restrict__ dh, const float* __restrict__ d,
                                        const float* __restrict__ w, int64_t B, int64_t N, int64_t K, int64_t j0,
                                        int64_t j1) {
  for (int64_t n = 0; n < N; ++n) {
    const float* __restrict__ wn = w + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float s = d[b * N + n];
      if (s == 0.0f) continue;  // padded rows and saturated gates
      float* __restrict__ db = dh + b * K;
      for (int64_t j = j0; j < j1; ++j) db[j] += s * wn[j];
    }
  }
}

bool use_small_path(bool small_batch, const Tensor& a, const Tensor& w) {
  return small_batch && a.scalar_type() == at::kFloat && a.is_contiguous() && w.is_contiguous();
}

}  // namespace

void recurrent_mm(const Tensor& out, const std::optional<Tensor>& base, const Tensor& a, const Tensor& w,
                  bool small_batch) {
  if (!use_small_path(small_batch, a, w) || !out.is_contiguous() || (base.has_value() && !base->is_contiguous())) {
    if (base.has_value()) {
      at::addmm_out(const_cast<Tensor&>(out), *base, a, w.t());
    } else {
      at::mm_out(const_cast<Tensor&>(out), a, w.t());
    }
    return;
  }
  const int64_t B = a.size(0), K = a.size(1), N = w.size(0);
  float* p_out = out.data_ptr<float>();
  const float* p_base = base.has_value() ? base->data_ptr<float>() : nullptr;
  const int64_t base_ld = base.has_value() && base->dim() == 2 ? N : 0;  // [N] bias: every row the same
  const float* p_a = a.data_ptr<float>();
  const float* p_w = w.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(8, kTaskWork / std::max<int64_t>(1, K * B));
  at::parallel_for(0, (N + 7) / 8, (grain + 7) / 8, [&](int64_t q0, int64_t q1) {
    mm_nt_rows_f32(p_out, p_base, base_ld, p_a, p_w, B, N, K, q0 * 8, std::min(q1 * 8, N));
  });
}

void recurrent_mm_acc(const Tensor& dh, const Tensor& d, const Tensor& w, bool small_batch) {
  if (!use_small_path(small_batch, d, w) || !dh.is_contiguous()) {
    const_cast<Tensor&>(dh).addmm_(d, w);
    return;
  }
  const int64_t B = d.size(0), N = w.size(0), K = w.size(1);
  float* p_dh = dh.data_ptr<float>();
  const float* p_d = d.data_ptr<float>();
  const float* p_w = w.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(8, kTaskWork / std::max<int64_t>(1, N * B));
  at::parallel_for(0, (K + 7) / 8, (grain + 7) / 8, [&](int64_t q0, int64_t q1) {
    mm_nn_acc_cols_f32(p_dh, p_d, p_w, B, N, K, q0 * 8, std::min(q1 * 8, K));
  });
}

}  // namespace cpu
}  // namespace fastbptt
