// The packed path: fused per-step forward for float32 GRU and LSTM (no projection)
// (csrc/cpu/common.h: gru_forward_packed_f32, lstm_forward_packed_f32).
//
// Once per chunk W_hh is packed into one block per thread: the hidden units are split into one
// contiguous slice per thread, and the rows of all G gates of a slice's units are stored
// K-major in 16-column panels ([K][16], zero-padded). A slice's panels (LSTM H=256: 512 KiB)
// stay in that thread's L2 for the whole chunk. Per step there is a single parallel region
// (run_slices) with one task per slice: the task forms the gate pre-activations of its units for all B rows
// with a 6x16 register-blocked FMA micro-kernel (panel-outer, so each 16 KiB panel is read
// from L1 by every row block), then applies the gate math and writes h, c and out for its
// units. h is double-buffered because every task reads all of the previous h.
//
// Each output column is one sequential sum over K whatever the number of slices, so the
// results do not depend on the thread count.
#include "cells/gru.h"
#include "cells/lstm.h"
#include "common.h"

#include <ATen/Version.h>

#include <vector>

namespace fastbptt {
namespace cpu {
namespace {

typedef float v8f __attribute__((vector_size(32), aligned(4)));   // unaligned 8-float loads/stores
typedef float v16f __attribute__((vector_size(64), aligned(4)));  // unaligned 16-float loads/stores

template <typename V>
FASTBPTT_INLINE V loadv(const float* p) {
  return *reinterpret_cast<const V*>(p);
}
template <typename V>
FASTBPTT_INLINE void storev(float* p, V v) {
  *reinterpret_cast<V*>(p) = v;
}

constexpr int64_t kPanel = 16;  // columns per panel

// Register blocking of the micro-kernel per vector ISA: V the vector type, NR rows x NP panels per
// call. AVX2 (16 ymm registers): 6 rows x 1 panel = 12 ymm accumulators. AVX-512 (32 zmm): 8 rows
// x 2 panels = 16 zmm accumulators, enough independent FMA chains to keep both FMA ports busy.
struct Avx2Blocking {
  using V = v8f;
  static constexpr int NR = 6, NP = 1;
};
struct Avx512Blocking {
  using V = v16f;
  static constexpr int NR = 8, NP = 2;
};

// acc[r, 0:NP*16] = sum_k h[r, k] wp[p][k, 0:16] for NR rows and the NP panels from wp (panels
// K*16 floats apart)
template <typename V, int NR, int NP>
FASTBPTT_INLINE void micro_kernel(const float* __restrict__ wp, const float* __restrict__ h, int64_t K,
                                  float* __restrict__ acc, int64_t ld) {
  constexpr int W = sizeof(V) / sizeof(float), NV = NP * kPanel / W;
  V c[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NV; ++i) c[r][i] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V w[NV];
    for (int i = 0; i < NV; ++i) w[i] = loadv<V>(wp + (i * W / kPanel) * K * kPanel + k * kPanel + i * W % kPanel);
    for (int r = 0; r < NR; ++r) {
      const float x = h[r * K + k];
      for (int i = 0; i < NV; ++i) c[r][i] += x * w[i];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NV; ++i) storev<V>(acc + r * ld + i * W, c[r][i]);
}

// The last B % NR rows of a panel group, N <= NR - 1 rows at a time.
template <typename V, int N, int NP>
FASTBPTT_INLINE void row_tail(int64_t rows, const float* wp, const float* h, int64_t K, float* acc, int64_t ld) {
  if constexpr (N > 0) {
    if (rows == N) {
      micro_kernel<V, N, NP>(wp, h, K, acc, ld);
    } else {
      row_tail<V, N - 1, NP>(rows, wp, h, K, acc, ld);
    }
  }
}

// acc[b, p*16:(p+1)*16] = h[b] . panel p for all B rows and npan panels; ld = npan * 16.
// NP panels at a time (the last npan % NP one by one), all row blocks per panel group, so the group
// is read from L1 by every row block.
template <class Blocking>
FASTBPTT_INLINE void packed_mm(const float* __restrict__ pack, int64_t npan, const float* __restrict__ h,
                               int64_t B, int64_t K, float* __restrict__ acc, int64_t ld) {
  using V = typename Blocking::V;
  constexpr int NR = Blocking::NR, NP = Blocking::NP;
  int64_t p = 0;
  for (; p + NP <= npan; p += NP) {
    const float* wp = pack + p * K * kPanel;
    float* ap = acc + p * kPanel;
    int64_t b = 0;
    for (; b + NR <= B; b += NR) micro_kernel<V, NR, NP>(wp, h + b * K, K, ap + b * ld, ld);
    row_tail<V, NR - 1, NP>(B - b, wp, h + b * K, K, ap + b * ld, ld);
  }
  for (; p < npan; ++p) {
    const float* wp = pack + p * K * kPanel;
    float* ap = acc + p * kPanel;
    int64_t b = 0;
    for (; b + NR <= B; b += NR) micro_kernel<V, NR, 1>(wp, h + b * K, K, ap + b * ld, ld);
    row_tail<V, NR - 1, 1>(B - b, wp, h + b * K, K, ap + b * ld, ld);
  }
}

// ----------------------------------------------------------------------------- one task per thread
//
// run_slices(n, f) calls f(s) for s in [0, n) with one slice per thread. at::parallel_for's OpenMP
// backend splits the range by thread id, so slice s stays on the same thread (and its panels in that
// core's L2) from step to step.
template <typename F>
void run_slices(int64_t n, const F& f) {
  at::parallel_for(0, n, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) f(s);
  });
}

// One slice of units [u0, u0 + nu) of a model with G gates of H units, W_hh: [G*H, K].
struct Slice {
  int64_t u0, nu, npan;
  float* pack;  // npan panels of [K][16]
  float* acc;   // [B][npan * 16]
};

void pack_slice(const Slice& s, const float* w, int64_t G, int64_t H, int64_t K) {
  const int64_t ncols = G * s.nu;
  for (int64_t p = 0; p < s.npan; ++p) {
    float* dst = s.pack + p * K * kPanel;
    for (int64_t q = 0; q < kPanel; ++q) {
      const int64_t col = p * kPanel + q;
      if (col >= ncols) {
        for (int64_t k = 0; k < K; ++k) dst[k * kPanel + q] = 0.0f;
        continue;
      }
      const float* row = w + ((col / s.nu) * H + s.u0 + col % s.nu) * K;
      for (int64_t k = 0; k < K; ++k) dst[k * kPanel + q] = row[k];
    }
  }
}

// Splits H units into one slice per thread and packs W_hh (in parallel: each thread packs the
// slice it will use, so the panels start out in its cache).
struct Packed {
  Tensor storage;
  std::vector<Slice> slices;
  Packed(const float* w, int64_t G, int64_t H, int64_t K, int64_t B) {
    const int64_t n = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), H));
    int64_t total = 0;
    std::vector<int64_t> offs;
    for (int64_t s = 0; s < n; ++s) {
      const int64_t u0 = H * s / n, u1 = H * (s + 1) / n;
      const int64_t npan = (G * (u1 - u0) + kPanel - 1) / kPanel;
      slices.push_back({u0, u1 - u0, npan, nullptr, nullptr});
      offs.push_back(total);
      total += npan * kPanel * K + B * npan * kPanel + 64;  // pack + acc, 256-byte gap
    }
    storage = at::empty({total}, at::TensorOptions().dtype(at::kFloat));
    float* base = storage.data_ptr<float>();
    for (int64_t s = 0; s < n; ++s) {
      slices[s].pack = base + offs[s];
      slices[s].acc = slices[s].pack + slices[s].npan * kPanel * K;
    }
    run_slices(n, [&](int64_t s) { pack_slice(slices[s], w, G, H, K); });
  }
  int64_t count() const { return static_cast<int64_t>(slices.size()); }
};

// ----------------------------------------------------------------------------- slice steps
//
// Gate math (csrc/cpu/cells) of one row over a slice's nu units (restrict parameters so that GCC
// vectorizes).
// g: the row's gi at unit u0 (gates H apart); a: the row's products (gates nu apart)

FASTBPTT_INLINE void lstm_units(const float* __restrict__ g, const float* __restrict__ a, float* __restrict__ cb,
                                float* __restrict__ hb, float* __restrict__ ob, int64_t H, int64_t nu) {
  for (int64_t j = 0; j < nu; ++j) {
    const auto q = lstm::gates(g[j] + a[j], g[H + j] + a[nu + j], g[2 * H + j] + a[2 * nu + j],
                               g[3 * H + j] + a[3 * nu + j]);
    const float cn = lstm::next_cell(q, cb[j]);
    cb[j] = cn;
    const float m = lstm::hidden(q, cn);
    hb[j] = m;
    ob[j] = m;
  }
}

FASTBPTT_INLINE void gru_units(const float* __restrict__ g, const float* __restrict__ a,
                               const float* __restrict__ hpb, float* __restrict__ hb, float* __restrict__ ob,
                               int64_t H, int64_t nu) {
  for (int64_t j = 0; j < nu; ++j) {
    const auto q = gru::gates(g[j], g[H + j], g[2 * H + j], a[j], a[nu + j], a[2 * nu + j]);
    const float v = gru::next_state(q, hpb[j]);
    hb[j] = v;
    ob[j] = v;
  }
}

// dst[q * ld_dst + j] = x[q * ld_x + j] (+ y[q * ld_y + j]) for q < G, j < nu
FASTBPTT_INLINE void add_gates(float* __restrict__ dst, int64_t ld_dst, const float* __restrict__ x, int64_t ld_x,
                               const float* __restrict__ y, int64_t ld_y, int64_t G, int64_t nu) {
  for (int64_t q = 0; q < G; ++q)
    for (int64_t j = 0; j < nu; ++j) dst[q * ld_dst + j] = x[q * ld_x + j] + y[q * ld_y + j];
}

// a[q * nu + j] += bias[q * H + j]; dst[q * ld_dst + j] = x[q * ld_x + j]
FASTBPTT_INLINE void add_bias(float* __restrict__ a, const float* __restrict__ bias, int64_t H, int64_t G,
                              int64_t nu) {
  for (int64_t q = 0; q < G; ++q)
    for (int64_t j = 0; j < nu; ++j) a[q * nu + j] += bias[q * H + j];
}
FASTBPTT_INLINE void copy_gates(float* __restrict__ dst, int64_t ld_dst, const float* __restrict__ x, int64_t ld_x,
                                int64_t G, int64_t nu) {
  for (int64_t q = 0; q < G; ++q)
    for (int64_t j = 0; j < nu; ++j) dst[q * ld_dst + j] = x[q * ld_x + j];
}

FASTBPTT_INLINE void keep_rows(const float* __restrict__ hp, float* __restrict__ hn, float* __restrict__ out,
                               int64_t nu) {
  for (int64_t j = 0; j < nu; ++j) {
    hn[j] = hp[j];
    out[j] = 0.0f;
  }
}

// LSTM, one step, one slice. gi: [B, 4H] this step's input pre-activations; hp/hn: [B, H]
// previous/next h; c: [B, H] in place; out: [B, H]; gout: [B, 4H] or null
template <class Blocking>
FASTBPTT_INLINE void lstm_slice_step(const Slice& s, const float* gi, const float* hp, float* hn, float* c,
                                     float* out, float* gout, const bool* valid, int64_t B, int64_t H) {
  const int64_t ld = s.npan * kPanel, nu = s.nu, u0 = s.u0;
  packed_mm<Blocking>(s.pack, s.npan, hp, B, H, s.acc, ld);
  for (int64_t b = 0; b < B; ++b) {
    const float* g = gi + b * 4 * H + u0;
    const float* a = s.acc + b * ld;
    if (gout != nullptr) add_gates(gout + b * 4 * H + u0, H, g, H, a, nu, 4, nu);
    const int64_t o = b * H + u0;
    if (valid != nullptr && !valid[b]) {
      keep_rows(hp + o, hn + o, out + o, nu);
      continue;
    }
    lstm_units(g, a, c + o, hn + o, out + o, H, nu);
  }
}

// GRU, one step, one slice. gi: [B, 3H]; bh: [3H] or null; hp/hn: [B, H]; out: [B, H];
// ghout: [B, 3H] or null
template <class Blocking>
FASTBPTT_INLINE void gru_slice_step(const Slice& s, const float* gi, const float* bh, const float* hp, float* hn,
                                    float* out, float* ghout, const bool* valid, int64_t B, int64_t H) {
  const int64_t ld = s.npan * kPanel, nu = s.nu, u0 = s.u0;
  packed_mm<Blocking>(s.pack, s.npan, hp, B, H, s.acc, ld);
  for (int64_t b = 0; b < B; ++b) {
    float* a = s.acc + b * ld;
    if (bh != nullptr) add_bias(a, bh + u0, H, 3, nu);
    if (ghout != nullptr) copy_gates(ghout + b * 3 * H + u0, H, a, nu, 3, nu);
    const int64_t o = b * H + u0;
    if (valid != nullptr && !valid[b]) {
      keep_rows(hp + o, hn + o, out + o, nu);
      continue;
    }
    gru_units(gi + b * 3 * H + u0, a, hp + o, hn + o, out + o, H, nu);
  }
}

// ----------------------------------------------------------------------------- per-ISA entry points
//
// The slice steps compiled once per vector ISA; packed_isa() (common.h) picks one per process.

using LstmSliceStep = void (*)(const Slice&, const float*, const float*, float*, float*, float*, float*,
                               const bool*, int64_t, int64_t);
using GruSliceStep = void (*)(const Slice&, const float*, const float*, const float*, float*, float*, float*,
                              const bool*, int64_t, int64_t);

FASTBPTT_CLONES void lstm_slice_step_avx2(const Slice& s, const float* gi, const float* hp, float* hn, float* c,
                                          float* out, float* gout, const bool* valid, int64_t B, int64_t H) {
  lstm_slice_step<Avx2Blocking>(s, gi, hp, hn, c, out, gout, valid, B, H);
}
FASTBPTT_CLONES void gru_slice_step_avx2(const Slice& s, const float* gi, const float* bh, const float* hp,
                                         float* hn, float* out, float* ghout, const bool* valid, int64_t B,
                                         int64_t H) {
  gru_slice_step<Avx2Blocking>(s, gi, bh, hp, hn, out, ghout, valid, B, H);
}

#ifdef FASTBPTT_AVX512
FASTBPTT_AVX512 void lstm_slice_step_avx512(const Slice& s, const float* gi, const float* hp, float* hn, float* c,
                                            float* out, float* gout, const bool* valid, int64_t B, int64_t H) {
  lstm_slice_step<Avx512Blocking>(s, gi, hp, hn, c, out, gout, valid, B, H);
}
FASTBPTT_AVX512 void gru_slice_step_avx512(const Slice& s, const float* gi, const float* bh, const float* hp,
                                           float* hn, float* out, float* ghout, const bool* valid, int64_t B,
                                           int64_t H) {
  gru_slice_step<Avx512Blocking>(s, gi, bh, hp, hn, out, ghout, valid, B, H);
}
#endif

LstmSliceStep lstm_slice_step_for_isa() {
#ifdef FASTBPTT_AVX512
  if (packed_isa() == VectorIsa::avx512) return lstm_slice_step_avx512;
#endif
  return lstm_slice_step_avx2;
}
GruSliceStep gru_slice_step_for_isa() {
#ifdef FASTBPTT_AVX512
  if (packed_isa() == VectorIsa::avx512) return gru_slice_step_avx512;
#endif
  return gru_slice_step_avx2;
}

}  // namespace

VectorIsa packed_isa() {
  static const VectorIsa isa = [] {
#ifdef FASTBPTT_AVX512
    const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                     __builtin_cpu_supports("avx512vl");
    if (cpu && at::get_cpu_capability() == "AVX512") return VectorIsa::avx512;
#endif
    return VectorIsa::avx2;
  }();
  return isa;
}

std::string packed_isa_name() { return packed_isa() == VectorIsa::avx512 ? "avx512" : "avx2"; }

void lstm_forward_packed_f32(const Tensor& gates_in, const Tensor& w_hh, const bool* valid, Tensor& h,
                             const Tensor& c, const Tensor& out, const std::optional<Tensor>& gates_out) {
  const int64_t steps = gates_in.size(0), B = gates_in.size(1), H = c.size(1);
  Packed pk(w_hh.data_ptr<float>(), 4, H, H, B);
  const LstmSliceStep step = lstm_slice_step_for_isa();
  Tensor h2 = at::empty_like(h);
  float* hp = h.data_ptr<float>();
  float* hn = h2.data_ptr<float>();
  float* p_c = c.data_ptr<float>();
  const float* p_gi = gates_in.data_ptr<float>();
  float* p_out = out.data_ptr<float>();
  float* p_go = gates_out.has_value() ? gates_out->data_ptr<float>() : nullptr;
  for (int64_t t = 0; t < steps; ++t) {
    const bool* v = valid_row(valid, t, B);
    const float* gi = p_gi + t * B * 4 * H;
    float* ot = p_out + t * B * H;
    float* go = p_go != nullptr ? p_go + t * B * 4 * H : nullptr;
    run_slices(pk.count(), [&](int64_t s) { step(pk.slices[s], gi, hp, hn, p_c, ot, go, v, B, H); });
    std::swap(hp, hn);
  }
  if (hp != h.data_ptr<float>()) h = h2;
}

void gru_forward_packed_f32(const Tensor& gi, const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                            const bool* valid, Tensor& h, const Tensor& out, const std::optional<Tensor>& gh_out) {
  const int64_t steps = gi.size(0), B = gi.size(1), H = h.size(1);
  Packed pk(w_hh.data_ptr<float>(), 3, H, H, B);
  const GruSliceStep step = gru_slice_step_for_isa();
  Tensor h2 = at::empty_like(h);
  float* hp = h.data_ptr<float>();
  float* hn = h2.data_ptr<float>();
  const float* p_gi = gi.data_ptr<float>();
  const float* p_bh = b_hh.has_value() ? b_hh->data_ptr<float>() : nullptr;
  float* p_out = out.data_ptr<float>();
  float* p_gh = gh_out.has_value() ? gh_out->data_ptr<float>() : nullptr;
  for (int64_t t = 0; t < steps; ++t) {
    const bool* v = valid_row(valid, t, B);
    const float* g = p_gi + t * B * 3 * H;
    float* ot = p_out + t * B * H;
    float* gh = p_gh != nullptr ? p_gh + t * B * 3 * H : nullptr;
    run_slices(pk.count(), [&](int64_t s) { step(pk.slices[s], g, p_bh, hp, hn, ot, gh, v, B, H); });
    std::swap(hp, hn);
  }
  if (hp != h.data_ptr<float>()) h = h2;
}

}  // namespace cpu
}  // namespace fastbptt
