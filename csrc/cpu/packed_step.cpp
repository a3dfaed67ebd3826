// The packed path: fused per-step forward and backward for float32 RNN, GRU and LSTM (no projection)
// (csrc/cpu/common.h: *_forward_packed_f32, *_backward_packed_f32).
//
// Once per chunk W_hh is packed into one block per thread: the hidden units are split into one
// contiguous slice per thread. Forward: the rows of all G gates of a slice's units, stored K-major
// in 16-column panels ([K][16], zero-padded, K = H). A slice's panels (LSTM H=256, 2 threads:
// 512 KiB) stay in that thread's L2 for the whole chunk. Per step there is a single parallel region
// (run_slices) with one task per slice: the task forms the gate pre-activations of its units for all
// B rows with a register-blocked FMA micro-kernel (panel-outer, so a panel group is read from L1 by
// every row block), then applies the gate math and writes h, c and out for its units. h is
// double-buffered because every task reads all of the previous h. Backward: the W_hh columns of a
// slice's units (K = G*H), for dh[:, slice] += dG W_hh[:, slice], then the gate gradients of its units
// (backward slice steps below).
//
// The micro-kernel exists per vector ISA (AVX-512: 8 rows x 2 panels, AVX2: 6 rows x 1 panel),
// chosen once per process (packed_isa()). Each output column is one sequential sum over K whatever
// the number of slices or the ISA, so the results do not depend on the thread count.
#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"
#include "common.h"

#include <ATen/Version.h>

#include <vector>

namespace fastbptt {
namespace cpu {
namespace {

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

// One slice of units [u0, u0 + nu) of a model with G gates of H units.
struct Slice {
  int64_t u0, nu, npan;
  float* pack;  // npan panels of [K][16]
  float* acc;   // [B][npan * 16]
};

// How W_hh: [G*H, K] is packed. by_gate_rows (forward, K = H): a slice's columns are the W_hh rows
// of all G gates of its units, for h W_hh^T. by_units (backward, K = G*H): its columns are the W_hh
// columns of its units, for dG W_hh.
enum class PackLayout { by_gate_rows, by_units };

// In place: column j of the 8 x 8 block r[0..7] (r[i] = row i) becomes r[j] (the AVX unpack/shuffle/
// permute network; GCC emits the target's own shuffles for each clone).
FASTBPTT_INLINE void transpose8(v8f r[8]) {
  v8f t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[j + 4] = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// Packing is a copy of W_hh per chunk, so it must run near memory speed: whole 64-byte panel rows
// (by_units) and 8 x 8 register transposes (by_gate_rows) instead of one scalar store per value.
FASTBPTT_CLONES void pack_slice(const Slice& s, const float* w, PackLayout layout, int64_t G, int64_t H,
                                int64_t K) {
  if (layout == PackLayout::by_units) {  // pack[p][k][q] = W_hh[k, u0 + 16p + q]: row k of W_hh in turn
    for (int64_t k = 0; k < K; ++k) {
      const float* row = w + k * H + s.u0;
      for (int64_t p = 0; p < s.npan; ++p) {
        float* __restrict__ dst = s.pack + (p * K + k) * kPanel;
        const int64_t q1 = std::min<int64_t>(kPanel, s.nu - p * kPanel);
        if (q1 == kPanel) {
          store8(dst, load8(row + p * kPanel));
          store8(dst + 8, load8(row + p * kPanel + 8));
        } else {
          for (int64_t q = 0; q < kPanel; ++q) dst[q] = q < q1 ? row[p * kPanel + q] : 0.0f;
        }
      }
    }
    return;
  }
  // by_gate_rows: pack[p][k][q] = W_hh[r(16p + q), k], column col = g * nu + j being W_hh row
  // r(col) = g * H + u0 + j (zero past the slice's G * nu columns)
  const int64_t ncols = G * s.nu;
  const int64_t k8 = K - K % 8;
  for (int64_t p = 0; p < s.npan; ++p) {
    float* __restrict__ dst = s.pack + p * K * kPanel;
    const float* rows[kPanel];
    for (int64_t q = 0; q < kPanel; ++q) {
      const int64_t col = p * kPanel + q;
      rows[q] = col < ncols ? w + ((col / s.nu) * H + s.u0 + col % s.nu) * K : nullptr;
    }
    for (int64_t k = 0; k < k8; k += 8) {
      for (int64_t half = 0; half < 2; ++half) {
        v8f r[8];
        for (int i = 0; i < 8; ++i) {
          const float* row = rows[half * 8 + i];
          r[i] = row != nullptr ? load8(row + k) : v8f{};
        }
        transpose8(r);
        for (int i = 0; i < 8; ++i) store8(dst + (k + i) * kPanel + half * 8, r[i]);
      }
    }
    for (int64_t k = k8; k < K; ++k)
      for (int64_t q = 0; q < kPanel; ++q) dst[k * kPanel + q] = rows[q] != nullptr ? rows[q][k] : 0.0f;
  }
}

// Splits H units into one slice per thread and packs W_hh (in parallel: each thread packs the
// slice it will use, so the panels start out in its cache).
struct Packed {
  Tensor storage;
  std::vector<Slice> slices;
  Packed(const float* w, PackLayout layout, int64_t G, int64_t H, int64_t B) {
    const int64_t K = layout == PackLayout::by_units ? G * H : H;
    const int64_t n = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), H));
    int64_t total = 0;
    std::vector<int64_t> offs;
    for (int64_t s = 0; s < n; ++s) {
      const int64_t u0 = H * s / n, u1 = H * (s + 1) / n;
      const int64_t cols = layout == PackLayout::by_units ? u1 - u0 : G * (u1 - u0);
      const int64_t npan = (cols + kPanel - 1) / kPanel;
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
    run_slices(n, [&](int64_t s) { pack_slice(slices[s], w, layout, G, H, K); });
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

template <bool Relu>
FASTBPTT_INLINE void rnn_units(const float* __restrict__ g, const float* __restrict__ a, float* __restrict__ hb,
                               float* __restrict__ ob, int64_t nu) {
  for (int64_t j = 0; j < nu; ++j) {
    const float v = rnn::activate<Relu>(g[j] + a[j]);
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

// Elman RNN, one step, one slice. pre: [B, H] this step's input pre-activations (both biases in);
// hp/hn: [B, H] previous/next h; out: [B, H]
template <class Blocking, bool Relu>
FASTBPTT_INLINE void rnn_slice_step(const Slice& s, const float* pre, const float* hp, float* hn, float* out,
                                    const bool* valid, int64_t B, int64_t H) {
  const int64_t ld = s.npan * kPanel, nu = s.nu, u0 = s.u0;
  packed_mm<Blocking>(s.pack, s.npan, hp, B, H, s.acc, ld);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = b * H + u0;
    if (valid != nullptr && !valid[b]) {
      keep_rows(hp + o, hn + o, out + o, nu);
      continue;
    }
    rnn_units<Relu>(pre + o, s.acc + b * ld, hn + o, out + o, nu);
  }
}

// ----------------------------------------------------------------------------- backward slice steps
//
// One region per step t, walking back: a slice first adds the recurrent term of its units,
// dh[:, slice] += dG_{t+1} W_hh[:, slice] (dG_{t+1}: the whole row of the later step's gradients,
// finished in the previous region; null at the chunk's last step), then writes the gate gradients
// of its units at step t and leaves in dh the part of dL/dh_{t-1} that does not go through W_hh
// (LSTM: zero; GRU: z * dL/dh_t; padded rows: dh unchanged, zero gate gradients). A last region
// with t = -1 adds dG_0 W_hh: dh is then the gradient of h0.

// dh[b, u0:u0+nu] += (dg_next[b] W_hh)[u0:u0+nu] for all B rows; dg_next: [B, K]
template <class Blocking>
FASTBPTT_INLINE void add_recurrent_grad(const Slice& s, const float* dg_next, int64_t K, float* dh, int64_t B,
                                        int64_t H) {
  const int64_t ld = s.npan * kPanel;
  packed_mm<Blocking>(s.pack, s.npan, dg_next, B, K, s.acc, ld);
  for (int64_t b = 0; b < B; ++b) {
    float* __restrict__ d = dh + b * H + s.u0;
    const float* __restrict__ a = s.acc + b * ld;
    for (int64_t j = 0; j < s.nu; ++j) d[j] += a[j];
  }
}

FASTBPTT_INLINE void zero_gates(float* __restrict__ dg, int64_t H, int64_t G, int64_t nu) {
  for (int64_t q = 0; q < G; ++q)
    for (int64_t j = 0; j < nu; ++j) dg[q * H + j] = 0.0f;
}

// Gate gradients of one row over a slice's nu units (gates H apart), written as functions with restrict
// parameters so that GCC vectorizes them (the GRU's is gru::backward_units). dh enters as dL/dh_t less
// grad_out and leaves as the part of dL/dh_{t-1} that does not go through W_hh.
FASTBPTT_INLINE void lstm_back_units(const float* __restrict__ cp, const float* __restrict__ cn,
                                     const float* __restrict__ go, float* __restrict__ dh, float* __restrict__ dc,
                                     float* __restrict__ dg, int64_t H, int64_t nu) {
  for (int64_t j = 0; j < nu; ++j) {
    const auto d = lstm::grads(lstm::load(dg, H, j), cp[j], cn[j], dh[j] + go[j], dc[j]);
    dg[j] = d.i;
    dg[H + j] = d.f;
    dg[2 * H + j] = d.g;
    dg[3 * H + j] = d.o;
    dc[j] = d.c;
    dh[j] = 0.0f;
  }
}

template <bool Relu>
FASTBPTT_INLINE void rnn_back_units(const float* __restrict__ out, const float* __restrict__ go,
                                    float* __restrict__ dh, float* __restrict__ dp, int64_t nu) {
  for (int64_t j = 0; j < nu; ++j) {
    dp[j] = rnn::pre_grad<Relu>(out[j], dh[j] + go[j]);
    dh[j] = 0.0f;
  }
}

// LSTM (no projection), step t of a slice. dg_next: [B, 4H] or null; dg: [B, 4H] this step's activated
// gates on entry (the cell-state scan leaves them there), their pre-activations' gradients on exit (null at
// t = -1); cp, cn: [B, H] cell states before and after; go: [B, H] grad_out; dh, dc: [B, H] carried.
template <class Blocking>
FASTBPTT_INLINE void lstm_slice_back_step(const Slice& s, const float* dg_next, const float* cp, const float* cn,
                                          const float* go, float* dh, float* dc, float* dg, const bool* valid,
                                          int64_t B, int64_t H) {
  if (dg_next != nullptr) add_recurrent_grad<Blocking>(s, dg_next, 4 * H, dh, B, H);
  if (dg == nullptr) return;
  const int64_t nu = s.nu, u0 = s.u0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o4 = b * 4 * H + u0, o = b * H + u0;
    if (valid != nullptr && !valid[b]) {
      zero_gates(dg + o4, H, 4, nu);
      continue;
    }
    lstm_back_units(cp + o, cn + o, go + o, dh + o, dc + o, dg + o4, H, nu);
  }
}

// GRU, step t of a slice. dgh_next: [B, 3H] or null; gi, gh, dgi, dgh: [B, 3H] (null at t = -1);
// hp, go: [B, H] previous state and grad_out; dh: [B, H] carried.
template <class Blocking>
FASTBPTT_INLINE void gru_slice_back_step(const Slice& s, const float* dgh_next, const float* gi, const float* gh,
                                         const float* hp, const float* go, float* dh, float* dgi, float* dgh,
                                         const bool* valid, int64_t B, int64_t H) {
  if (dgh_next != nullptr) add_recurrent_grad<Blocking>(s, dgh_next, 3 * H, dh, B, H);
  if (gi == nullptr) return;
  const int64_t nu = s.nu, u0 = s.u0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o3 = b * 3 * H + u0, o = b * H + u0;
    if (valid != nullptr && !valid[b]) {
      zero_gates(dgi + o3, H, 3, nu);
      zero_gates(dgh + o3, H, 3, nu);
      continue;
    }
    gru::backward_units(gi + o3, gh + o3, hp + o, go + o, dh + o, dgi + o3, dgh + o3, H, nu);
  }
}

// Elman RNN, step t of a slice. dp_next: [B, H] or null; out, go, dp: [B, H] this step's output, grad_out
// and pre-activation gradients (null at t = -1); dh: [B, H] carried.
template <class Blocking, bool Relu>
FASTBPTT_INLINE void rnn_slice_back_step(const Slice& s, const float* dp_next, const float* out, const float* go,
                                         float* dh, float* dp, const bool* valid, int64_t B, int64_t H) {
  if (dp_next != nullptr) add_recurrent_grad<Blocking>(s, dp_next, H, dh, B, H);
  if (out == nullptr) return;
  const int64_t nu = s.nu, u0 = s.u0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = b * H + u0;
    if (valid != nullptr && !valid[b]) {
      zero_gates(dp + o, H, 1, nu);
      continue;
    }
    rnn_back_units<Relu>(out + o, go + o, dh + o, dp + o, nu);
  }
}

// ----------------------------------------------------------------------------- per-ISA entry points
//
// The slice steps compiled once per vector ISA; slice_kernels() picks one set per process
// (packed_isa(), common.h).

struct SliceKernels {
  void (*lstm_step)(const Slice&, const float*, const float*, float*, float*, float*, float*, const bool*, int64_t,
                    int64_t);
  void (*gru_step)(const Slice&, const float*, const float*, const float*, float*, float*, float*, const bool*,
                   int64_t, int64_t);
  void (*lstm_back_step)(const Slice&, const float*, const float*, const float*, const float*, float*, float*, float*,
                         const bool*, int64_t, int64_t);
  void (*gru_back_step)(const Slice&, const float*, const float*, const float*, const float*, const float*, float*,
                        float*, float*, const bool*, int64_t, int64_t);
  void (*rnn_step)(const Slice&, const float*, const float*, float*, float*, const bool*, bool, int64_t, int64_t);
  void (*rnn_back_step)(const Slice&, const float*, const float*, const float*, float*, float*, const bool*, bool,
                        int64_t, int64_t);
};

// The entry points of one ISA: ATTR its target attribute, BLOCKING its register blocking.
#define FASTBPTT_SLICE_KERNELS(NAME, ATTR, BLOCKING)                                                          \
  ATTR void NAME##_lstm_step(const Slice& s, const float* gi, const float* hp, float* hn, float* c, float* out, \
                             float* gout, const bool* valid, int64_t B, int64_t H) {                            \
    lstm_slice_step<BLOCKING>(s, gi, hp, hn, c, out, gout, valid, B, H);                                       \
  }                                                                                                             \
  ATTR void NAME##_gru_step(const Slice& s, const float* gi, const float* bh, const float* hp, float* hn,        \
                            float* out, float* ghout, const bool* valid, int64_t B, int64_t H) {               \
    gru_slice_step<BLOCKING>(s, gi, bh, hp, hn, out, ghout, valid, B, H);                                      \
  }                                                                                                             \
  ATTR void NAME##_lstm_back_step(const Slice& s, const float* dg_next, const float* cp, const float* cn,       \
                                  const float* go, float* dh, float* dc, float* dg, const bool* valid,          \
                                  int64_t B, int64_t H) {                                                       \
    lstm_slice_back_step<BLOCKING>(s, dg_next, cp, cn, go, dh, dc, dg, valid, B, H);                           \
  }                                                                                                             \
  ATTR void NAME##_gru_back_step(const Slice& s, const float* dgh_next, const float* gi, const float* gh,       \
                                 const float* hp, const float* go, float* dh, float* dgi, float* dgh,           \
                                 const bool* valid, int64_t B, int64_t H) {                                     \
    gru_slice_back_step<BLOCKING>(s, dgh_next, gi, gh, hp, go, dh, dgi, dgh, valid, B, H);                     \
  }                                                                                                             \
  ATTR void NAME##_rnn_step(const Slice& s, const float* pre, const float* hp, float* hn, float* out,          \
                            const bool* valid, bool relu, int64_t B, int64_t H) {                               \
    if (relu) {                                                                                                 \
      rnn_slice_step<BLOCKING, true>(s, pre, hp, hn, out, valid, B, H);                                        \
    } else {                                                                                                    \
      rnn_slice_step<BLOCKING, false>(s, pre, hp, hn, out, valid, B, H);                                       \
    }                                                                                                           \
  }                                                                                                             \
  ATTR void NAME##_rnn_back_step(const Slice& s, const float* dp_next, const float* out, const float* go,       \
                                 float* dh, float* dp, const bool* valid, bool relu, int64_t B, int64_t H) {    \
    if (relu) {                                                                                                 \
      rnn_slice_back_step<BLOCKING, true>(s, dp_next, out, go, dh, dp, valid, B, H);                           \
    } else {                                                                                                    \
      rnn_slice_back_step<BLOCKING, false>(s, dp_next, out, go, dh, dp, valid, B, H);                          \
    }                                                                                                           \
  }                                                                                                             \
  const SliceKernels NAME##_kernels{NAME##_lstm_step,      NAME##_gru_step, NAME##_lstm_back_step,             \
                                    NAME##_gru_back_step,  NAME##_rnn_step, NAME##_rnn_back_step};

FASTBPTT_SLICE_KERNELS(avx2, FASTBPTT_CLONES, Avx2Blocking)
#ifdef FASTBPTT_AVX512
FASTBPTT_SLICE_KERNELS(avx512, FASTBPTT_AVX512, Avx512Blocking)
#endif
#undef FASTBPTT_SLICE_KERNELS

const SliceKernels& slice_kernels() {
#ifdef FASTBPTT_AVX512
  if (packed_isa() == VectorIsa::avx512) return avx512_kernels;
#endif
  return avx2_kernels;
}

// The forward of a chunk over packed W_hh: one region per step, f(slice, t, h_prev, h_next) per slice.
// h is double-buffered (every task reads all of the previous h) and replaced by the final state.
template <typename F>
void run_forward(const Packed& pk, int64_t steps, Tensor& h, const F& f) {
  Tensor h2 = at::empty_like(h);
  float* hp = h.data_ptr<float>();
  float* hn = h2.data_ptr<float>();
  for (int64_t t = 0; t < steps; ++t) {
    run_slices(pk.count(), [&](int64_t s) { f(pk.slices[s], t, hp, hn); });
    std::swap(hp, hn);
  }
  if (hp != h.data_ptr<float>()) h = h2;
}

// The backward of a chunk over packed W_hh: one region per step t = steps - 1 .. 0, then one with
// t = -1 that only adds dG_0 W_hh (the gradient of h0); f(slice, t, dG_{t+1} or null) per slice.
// d_rows: [steps, B, row] the gradients whose product with W_hh carries back.
template <typename F>
void run_backward(const Packed& pk, int64_t steps, const float* d_rows, int64_t row, const F& f) {
  for (int64_t t = steps - 1; t >= -1; --t) {
    const float* next = t + 1 < steps ? d_rows + (t + 1) * row : nullptr;
    run_slices(pk.count(), [&](int64_t s) { f(pk.slices[s], t, next); });
  }
}

// Step t's block of a [steps, n] buffer, null for t = -1.
template <typename P>
P* at_step(P* p, int64_t t, int64_t n) {
  return t >= 0 ? p + t * n : nullptr;
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
  const auto step = slice_kernels().lstm_step;
  const float* p_gi = gates_in.data_ptr<float>();
  float* p_c = c.data_ptr<float>();
  float* p_out = out.data_ptr<float>();
  float* p_go = gates_out.has_value() ? gates_out->data_ptr<float>() : nullptr;
  const int64_t g4 = B * 4 * H, g1 = B * H;
  run_forward(Packed(w_hh.data_ptr<float>(), PackLayout::by_gate_rows, 4, H, B), steps, h,
              [&](const Slice& s, int64_t t, const float* hp, float* hn) {
                step(s, p_gi + t * g4, hp, hn, p_c, p_out + t * g1, p_go != nullptr ? p_go + t * g4 : nullptr,
                     valid_row(valid, t, B), B, H);
              });
}

void gru_forward_packed_f32(const Tensor& gi, const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                            const bool* valid, Tensor& h, const Tensor& out, const std::optional<Tensor>& gh_out) {
  const int64_t steps = gi.size(0), B = gi.size(1), H = h.size(1);
  const auto step = slice_kernels().gru_step;
  const float* p_gi = gi.data_ptr<float>();
  const float* p_bh = b_hh.has_value() ? b_hh->data_ptr<float>() : nullptr;
  float* p_out = out.data_ptr<float>();
  float* p_gh = gh_out.has_value() ? gh_out->data_ptr<float>() : nullptr;
  const int64_t g3 = B * 3 * H, g1 = B * H;
  run_forward(Packed(w_hh.data_ptr<float>(), PackLayout::by_gate_rows, 3, H, B), steps, h,
              [&](const Slice& s, int64_t t, const float* hp, float* hn) {
                step(s, p_gi + t * g3, p_bh, hp, hn, p_out + t * g1, p_gh != nullptr ? p_gh + t * g3 : nullptr,
                     valid_row(valid, t, B), B, H);
              });
}

void rnn_forward_packed_f32(const Tensor& pre_in, const Tensor& w_hh, const bool* valid, bool relu, Tensor& h,
                            const Tensor& out) {
  const int64_t steps = pre_in.size(0), B = pre_in.size(1), H = h.size(1);
  const auto step = slice_kernels().rnn_step;
  const float* p_pre = pre_in.data_ptr<float>();
  float* p_out = out.data_ptr<float>();
  const int64_t g1 = B * H;
  run_forward(Packed(w_hh.data_ptr<float>(), PackLayout::by_gate_rows, 1, H, B), steps, h,
              [&](const Slice& s, int64_t t, const float* hp, float* hn) {
                step(s, p_pre + t * g1, hp, hn, p_out + t * g1, valid_row(valid, t, B), relu, B, H);
              });
}

void lstm_backward_packed_f32(const Tensor& c_states, const Tensor& w_hh, const Tensor& grad_out, const bool* valid,
                              const Tensor& dh, const Tensor& dc, const Tensor& d_gates) {
  const int64_t steps = d_gates.size(0), B = d_gates.size(1), H = dc.size(1);
  const auto step = slice_kernels().lstm_back_step;
  const float* p_c = c_states.data_ptr<float>();
  const float* p_go = grad_out.data_ptr<float>();
  float* p_dh = dh.data_ptr<float>();
  float* p_dc = dc.data_ptr<float>();
  float* p_dg = d_gates.data_ptr<float>();
  const int64_t g4 = B * 4 * H, g1 = B * H;
  run_backward(Packed(w_hh.data_ptr<float>(), PackLayout::by_units, 4, H, B), steps, p_dg, g4,
               [&](const Slice& s, int64_t t, const float* next) {
                 step(s, next, at_step(p_c, t, g1), at_step(p_c, t + 1, g1), at_step(p_go, t, g1), p_dh, p_dc,
                      at_step(p_dg, t, g4), t >= 0 ? valid_row(valid, t, B) : nullptr, B, H);
               });
}

void gru_backward_packed_f32(const Tensor& gi, const Tensor& gh, const Tensor& h_prev, const Tensor& w_hh,
                             const Tensor& grad_out, const bool* valid, const Tensor& dh, const Tensor& d_gi,
                             const Tensor& d_gh) {
  const int64_t steps = gi.size(0), B = gi.size(1), H = dh.size(1);
  const auto step = slice_kernels().gru_back_step;
  const float* p_gi = gi.data_ptr<float>();
  const float* p_gh = gh.data_ptr<float>();
  const float* p_hp = h_prev.data_ptr<float>();
  const float* p_go = grad_out.data_ptr<float>();
  float* p_dh = dh.data_ptr<float>();
  float* p_dgi = d_gi.data_ptr<float>();
  float* p_dgh = d_gh.data_ptr<float>();
  const int64_t g3 = B * 3 * H, g1 = B * H;
  run_backward(Packed(w_hh.data_ptr<float>(), PackLayout::by_units, 3, H, B), steps, p_dgh, g3,
               [&](const Slice& s, int64_t t, const float* next) {
                 step(s, next, at_step(p_gi, t, g3), at_step(p_gh, t, g3), at_step(p_hp, t, g1), at_step(p_go, t, g1),
                      p_dh, at_step(p_dgi, t, g3), at_step(p_dgh, t, g3), t >= 0 ? valid_row(valid, t, B) : nullptr,
                      B, H);
               });
}

void rnn_backward_packed_f32(const Tensor& out, const Tensor& w_hh, const Tensor& grad_out, const bool* valid,
                             bool relu, const Tensor& dh, const Tensor& d_pre) {
  const int64_t steps = out.size(0), B = out.size(1), H = dh.size(1);
  const auto step = slice_kernels().rnn_back_step;
  const float* p_out = out.data_ptr<float>();
  const float* p_go = grad_out.data_ptr<float>();
  float* p_dh = dh.data_ptr<float>();
  float* p_dp = d_pre.data_ptr<float>();
  const int64_t g1 = B * H;
  run_backward(Packed(w_hh.data_ptr<float>(), PackLayout::by_units, 1, H, B), steps, p_dp, g1,
               [&](const Slice& s, int64_t t, const float* next) {
                 step(s, next, at_step(p_out, t, g1), at_step(p_go, t, g1), p_dh, at_step(p_dp, t, g1),
                      t >= 0 ? valid_row(valid, t, B) : nullptr, relu, B, H);
               });
}

}  // namespace cpu
}  // namespace fastbptt
