// GRU pointwise math of one hidden unit: the one place the CPU kernels write it (the row passes
// of csrc/cpu/gru.cpp and the packed path's csrc/cpu/packed_step.cpp).
//
// Gates [r, z, n] (fastbptt/cells.py); gi = x W_ih^T + b_ih, gh = h W_hh^T + b_hh:
//   r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  n = tanh(gi_n + r * gh_n)
//   h' = (1 - z) * n + z * h
#pragma once

#include "activation.h"

#include <cstdint>

namespace fastbptt {
namespace cpu {
namespace gru {

template <typename T>
struct Gates {
  T r, z, n;
};

template <typename T>
FASTBPTT_INLINE Gates<T> gates(T gi_r, T gi_z, T gi_n, T gh_r, T gh_z, T gh_n) {
  const T r = sigmoid_act(gi_r + gh_r);
  const T z = sigmoid_act(gi_z + gh_z);
  const T n = tanh_act(gi_n + r * gh_n);
  return {r, z, n};
}

template <typename T>
FASTBPTT_INLINE T next_state(const Gates<T>& a, T h) {
  return (T(1) - a.z) * a.n + a.z * h;
}

// Gradients of one unit, from its recomputed gates, gh_n, the previous state and d = dL/dh'.
// r, z, n: w.r.t. the gates' summed pre-activations (= dL/dgi_*, and dL/dgh_r, dL/dgh_z);
// gh_n: dL/dgh_n (n sees gh_n through r); h: the direct part of dL/dh (the recurrent product
// d_gh W_hh is added by the caller).
template <typename T>
struct Grads {
  T r, z, n, gh_n, h;
};

template <typename T>
FASTBPTT_INLINE Grads<T> grads(const Gates<T>& a, T gh_n, T h_prev, T d) {
  const T d_n = d * (T(1) - a.z) * (T(1) - a.n * a.n);
  const T d_z = d * (h_prev - a.n) * a.z * (T(1) - a.z);
  const T d_r = d_n * gh_n * a.r * (T(1) - a.r);
  return {d_r, d_z, d_n, d_n * a.r, d * a.z};
}

// Gradients of one row over n consecutive units, gates H apart: gi, gh, dgi, dgh point at the row's
// first unit of the r block; dh enters as dL/dh' less grad_out (go) and leaves as its direct part
// z * dL/dh', for the caller to add the recurrent product to. Restrict parameters, so GCC vectorizes.
template <typename T>
FASTBPTT_INLINE void backward_units(const T* __restrict__ gi, const T* __restrict__ gh, const T* __restrict__ hp,
                                    const T* __restrict__ go, T* __restrict__ dh, T* __restrict__ dgi,
                                    T* __restrict__ dgh, int64_t H, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const auto a = gates(gi[j], gi[H + j], gi[2 * H + j], gh[j], gh[H + j], gh[2 * H + j]);
    const auto d = grads(a, gh[2 * H + j], hp[j], dh[j] + go[j]);
    dgi[j] = d.r;
    dgi[H + j] = d.z;
    dgi[2 * H + j] = d.n;
    dgh[j] = d.r;
    dgh[H + j] = d.z;
    dgh[2 * H + j] = d.gh_n;
    dh[j] = d.h;
  }
}

}  // namespace gru
}  // namespace cpu
}  // namespace fastbptt
