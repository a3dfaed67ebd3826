// Elman RNN pointwise math of one hidden unit: the one place the CPU kernels write it.
//
//   h' = act(pre),  pre = x W_ih^T + b_ih + b_hh + h W_hh^T,  act = tanh or relu
//   dL/dpre = dL/dh' * act'(pre), written in terms of h' (all the backward keeps)
#pragma once

#include "activation.h"

namespace fastbptt {
namespace cpu {
namespace rnn {

template <bool Relu, typename T>
FASTBPTT_INLINE T activate(T pre) {
  if constexpr (Relu) {
    return pre > T(0) ? pre : T(0);
  } else {
    return tanh_act(pre);
  }
}

// h_new = act(pre); d = dL/dh' -> dL/dpre
template <bool Relu, typename T>
FASTBPTT_INLINE T pre_grad(T h_new, T d) {
  if constexpr (Relu) {
    return h_new > T(0) ? d : T(0);
  } else {
    return d * (T(1) - h_new * h_new);
  }
}

}  // namespace rnn
}  // namespace cpu
}  // namespace fastbptt
