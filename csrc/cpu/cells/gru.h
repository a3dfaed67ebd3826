// GRU pointwise math of one hidden unit: the one place the CPU kernels write it (the row passes
// of csrc/cpu/gru.cpp and the packed path's csrc/cpu/packed_step.cpp).
//
// Gates [r, z, n] (fastbptt/cells.py); gi = x W_ih^T + b_ih, gh = h W_hh^T + b_hh:
//   r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  n = tanh(gi_n + r * gh_n)
//   h' = (1 - z) * n + z * h
#pragma once

#include "activation.h"

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

}  // namespace gru
}  // namespace cpu
}  // namespace fastbptt
