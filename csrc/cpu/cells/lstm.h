// LSTM pointwise math of one hidden unit: the one place the CPU kernels write it (the row passes
// of csrc/cpu/lstm.cpp and the packed path's csrc/cpu/packed_step.cpp).
//
// Gates [i, f, g, o] (fastbptt/cells.py) of the pre-activations x W_ih^T + b_ih + b_hh + h W_hh^T:
//   i, f, o = sigmoid(.),  g = tanh(.)
//   c' = f * c + i * g,  m = o * tanh(c')   (h' = m, or m W_hr^T with a projection)
#pragma once

#include "activation.h"

#include <cstdint>

namespace fastbptt {
namespace cpu {
namespace lstm {

template <typename T>
struct Gates {
  T i, f, g, o;
};

template <typename T>
FASTBPTT_INLINE Gates<T> gates(T pre_i, T pre_f, T pre_g, T pre_o) {
  return {sigmoid_act(pre_i), sigmoid_act(pre_f), tanh_act(pre_g), sigmoid_act(pre_o)};
}

// Activated gates kept in a row of 4H values, [i, f, g, o] H apart (the backward's d_gates, filled by
// the cell-state scan and read by every backward step): unit j's written and read back
template <typename T>
FASTBPTT_INLINE void store(const Gates<T>& a, T* row, int64_t H, int64_t j) {
  row[j] = a.i;
  row[H + j] = a.f;
  row[2 * H + j] = a.g;
  row[3 * H + j] = a.o;
}

template <typename T>
FASTBPTT_INLINE Gates<T> load(const T* row, int64_t H, int64_t j) {
  return {row[j], row[H + j], row[2 * H + j], row[3 * H + j]};
}

template <typename T>
FASTBPTT_INLINE T next_cell(const Gates<T>& a, T c) {
  return a.f * c + a.i * a.g;
}

template <typename T>
FASTBPTT_INLINE T hidden(const Gates<T>& a, T c_new) {
  return a.o * tanh_act(c_new);
}

// Gradients of one unit, from its recomputed gates, the cell state before and after the step,
// dm = dL/dm and dc = dL/dc' carried from the later step. i, f, g, o: w.r.t. the gates'
// pre-activations; c: dL/dc, carried to the earlier step.
template <typename T>
struct Grads {
  T i, f, g, o, c;
};

template <typename T>
FASTBPTT_INLINE Grads<T> grads(const Gates<T>& a, T c_prev, T c_new, T dm, T dc) {
  const T tc = tanh_act(c_new);
  const T dct = dc + dm * a.o * (T(1) - tc * tc);
  return {dct * a.g * a.i * (T(1) - a.i), dct * c_prev * a.f * (T(1) - a.f), dct * a.i * (T(1) - a.g * a.g),
          dm * tc * a.o * (T(1) - a.o), dct * a.f};
}

}  // namespace lstm
}  // namespace cpu
}  // namespace fastbptt
