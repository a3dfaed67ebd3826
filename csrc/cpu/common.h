// Shared pieces of the fused CPU chunk kernels (csrc/cpu/{rnn,gru,lstm}.cpp).
//
// Every kernel follows the same shape: per step one recurrent matrix product through ATen
// (MKL) into a buffer allocated once per chunk, then one fused elementwise pass over the batch
// rows (parallel with at::parallel_for) that applies all gate activations and the state update,
// or all gate gradients. The row passes are plain loops over the hidden units that the compiler
// vectorizes; on x86-64 with GCC each is also compiled for AVX2+FMA and picked at load time
// (target_clones), so the default build stays portable.
//
// The ops check their arguments with the check_*_chunk functions (csrc/checks.h, shared with the
// CUDA ops) and run bfloat16 through the float32 kernels with Float32Compute (below).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "cells/activation.h"

#include <cstdint>
#include <algorithm>
#include <optional>
#include <type_traits>
#include <string>
#include <utility>
#include <vector>

namespace fastbptt {
namespace cpu {

using at::Tensor;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTBPTT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
// Kernels with their own AVX-512 variant (register blocking that differs from the AVX2 one), called
// only when packed_isa() says so.
#define FASTBPTT_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define FASTBPTT_CLONES
#endif

// The vector ISA of the packed path's micro-kernel (csrc/cpu/packed_step.cpp), fixed per process:
// avx512 where the build has that variant, the CPU has AVX-512 (F, BW, CD, DQ, VL) and ATen's own
// CPU capability is AVX512, so ATEN_CPU_CAPABILITY=avx2 (or default) also caps these kernels; else
// avx2 (the AVX2+FMA target_clones, or portable code on CPUs without AVX2).
enum class VectorIsa { avx2, avx512 };
VectorIsa packed_isa();
std::string packed_isa_name();  // "avx512" | "avx2"

// ----------------------------------------------------------------------------- helpers

// Rows per parallel task: enough elementwise work (~16k values) to pay for a fork.
inline int64_t row_grain(int64_t values_per_row) {
  const int64_t grain = 16384 / (values_per_row > 0 ? values_per_row : 1);
  return grain < 1 ? 1 : grain;
}

// Multiply-adds per parallel task of the matrix-vector kernels (small_mm.cpp, cell_step.cpp):
// enough to pay for a fork.
constexpr int64_t kTaskWork = 1 << 16;

// 8 floats, for the hand-blocked kernels (GCC vector extensions): unaligned loads and stores, and
// the sum of the lanes in a fixed order.
typedef float v8f __attribute__((vector_size(32), aligned(4)));
FASTBPTT_INLINE v8f load8(const float* p) { return *reinterpret_cast<const v8f*>(p); }
FASTBPTT_INLINE void store8(float* p, v8f v) { *reinterpret_cast<v8f*>(p) = v; }
FASTBPTT_INLINE float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// valid: [C, B] bool or none -> pointer to step t's row flags (nullptr: every row valid)
inline const bool* valid_row(const bool* valid, int64_t t, int64_t batch) {
  return valid == nullptr ? nullptr : valid + t * batch;
}

// ----------------------------------------------------------------------------- kernel paths
//
// Every chunk op runs one of three kernel paths, named by its `path` argument. Which path a call
// takes is decided in Python, in one place (fastbptt/dispatch.py: the registry and its rule;
// fastbptt/native.py: what each path declines); the kernels run the path they are given.
//   small-batch: per-step products as matrix-vector kernels parallel over W_hh (small_mm.cpp)
//   packed:      RNN / GRU / LSTM (no projection) with W_hh packed per thread, forward and backward,
//                one parallel region per step (packed_step.cpp)
//   blas:        per-step products through ATen (MKL), then one fused row pass
// small-batch and packed compute in float32 (bfloat16 is widened to it).
enum class StepPath { small_batch, packed, blas };

inline StepPath step_path(c10::string_view path, at::ScalarType dtype, const char* op) {
  StepPath p;
  if (path == "blas") return StepPath::blas;
  if (path == "small-batch") {
    p = StepPath::small_batch;
  } else if (path == "packed") {
    p = StepPath::packed;
  } else {
    TORCH_CHECK(false, op, ": path must be small-batch, packed or blas, got '", std::string(path), "'");
  }
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op, ": the ", std::string(path),
              " kernels take float32 and bfloat16, got ", c10::toString(dtype));
  return p;
}

// ----------------------------------------------------------------------------- recurrent products
//
// The per-step products of the chunk loops (csrc/cpu/small_mm.cpp): with `small_batch`, float32
// products run a matrix-vector kernel parallel over W_hh; everything else is ATen (MKL).

// out = base + a w^T: a [B, K], w [N, K], out [B, N]; base: [B, N], [N] (broadcast) or none
void recurrent_mm(const Tensor& out, const std::optional<Tensor>& base, const Tensor& a, const Tensor& w,
                  bool small_batch);
// dh += d w: d [B, N], w [N, K], dh [B, K]
void recurrent_mm_acc(const Tensor& dh, const Tensor& d, const Tensor& w, bool small_batch);

// ----------------------------------------------------------------------------- fused per-step kernels
//
// float32 RNN / GRU / LSTM (no projection) forward and backward with W_hh packed per thread once per
// chunk and one parallel region per step (csrc/cpu/packed_step.cpp): the packed path.
// h, c: carried state (h0/c0 copies, contiguous); h is replaced by the final state, c updated in place
void lstm_forward_packed_f32(const Tensor& gates_in, const Tensor& w_hh, const bool* valid, Tensor& h,
                             const Tensor& c, const Tensor& out, const std::optional<Tensor>& gates_out);
void gru_forward_packed_f32(const Tensor& gi, const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                            const bool* valid, Tensor& h, const Tensor& out, const std::optional<Tensor>& gh_out);
void rnn_forward_packed_f32(const Tensor& pre_in, const Tensor& w_hh, const bool* valid, bool relu, Tensor& h,
                            const Tensor& out);
// The backward of a chunk, W_hh packed by columns: dh, dc (carried gradients, in place) enter as those of
// the chunk's last state and leave as those of its first; d_gates, d_gi, d_gh: [C, B, G*H] written.
// c_states: [C + 1, B, H] the LSTM's cell states; h_prev: [C, B, H] the GRU's previous states.
void lstm_backward_packed_f32(const Tensor& c_states, const Tensor& w_hh, const Tensor& grad_out,
                              const bool* valid, const Tensor& dh, const Tensor& dc, const Tensor& d_gates);
void rnn_backward_packed_f32(const Tensor& out, const Tensor& w_hh, const Tensor& grad_out, const bool* valid,
                             bool relu, const Tensor& dh, const Tensor& d_pre);
void gru_backward_packed_f32(const Tensor& gi, const Tensor& gh, const Tensor& h_prev, const Tensor& w_hh,
                             const Tensor& grad_out, const bool* valid, const Tensor& dh, const Tensor& d_gi,
                             const Tensor& d_gh);

// ----------------------------------------------------------------------------- cell steps
//
// One float32 cell step for small batches, the small-batch path of the cell ops (csrc/cell_ops.cpp;
// kernels in csrc/cpu/cell_step.cpp): x [B, I], h, c [B, H], weights as torch.nn stores them, biases
// optional. The forward writes hy (cy) and what the backward reads (GRU: gi, gh [B, 3H]; LSTM: the
// summed gates [B, 4H]); the backward writes the gate gradients, grad_x (when given) and grad_hx (cx).

// Whether these kernels take the step: float32 on the CPU, `input` and every tensor given contiguous.
bool cell_step_small_f32(const Tensor& input, const std::vector<std::optional<Tensor>>& others);
void rnn_cell_forward_f32(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                          const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, bool relu,
                          const Tensor& hy);
void gru_cell_forward_f32(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                          const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, const Tensor& hy,
                          const Tensor& gi, const Tensor& gh);
void lstm_cell_forward_f32(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih, const Tensor& w_hh,
                           const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, const Tensor& hy,
                           const Tensor& cy, const Tensor& gates);
void rnn_cell_backward_f32(const Tensor& grad_hy, const Tensor& hy, const Tensor& w_ih, const Tensor& w_hh,
                           bool relu, const Tensor& d_pre, const std::optional<Tensor>& grad_x,
                           const Tensor& grad_hx);
void gru_cell_backward_f32(const Tensor& grad_hy, const Tensor& h, const Tensor& gi, const Tensor& gh,
                           const Tensor& w_ih, const Tensor& w_hh, const Tensor& d_gi, const Tensor& d_gh,
                           const std::optional<Tensor>& grad_x, const Tensor& grad_hx);
void lstm_cell_backward_f32(const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& c, const Tensor& gates,
                            const Tensor& w_ih, const Tensor& w_hh, const Tensor& d_gates,
                            const std::optional<Tensor>& grad_x, const Tensor& grad_hx, const Tensor& grad_cx);

// ----------------------------------------------------------------------------- op wrappers

// What the CPU ops take (their checks: csrc/checks.h).
inline const Kernels kCpuKernels{at::kCPU, {at::kFloat, at::kDouble, at::kBFloat16}};

// The kernels compute in float64 or float32. A bfloat16 call runs the float32 kernel on widened
// copies of its inputs (carried state and gradients stay float32 for the whole chunk) and rounds
// once on the way out, exactly as the reference backend does:
//
//   Float32Compute fc(dtype);
//   fc.run([&](auto zero) {
//     using T = decltype(zero);  // double for float64, float for float32 and bfloat16
//     h = impl<T>(fc.in(gi), ..., fc.out(out));
//   });                          // float32 outputs are rounded into `out` here
//   return fc.result(h);
class Float32Compute {
 public:
  explicit Float32Compute(at::ScalarType dtype) : dtype_(dtype), widen_(dtype == at::kBFloat16) {}

  // An input as the kernel reads it.
  Tensor in(const Tensor& t) const { return widen_ ? t.to(at::kFloat) : t; }
  std::optional<Tensor> in(const std::optional<Tensor>& t) const {
    return t.has_value() ? std::optional<Tensor>(in(*t)) : std::nullopt;
  }

  // An output the kernel writes: `t` itself, or a float32 buffer that run() rounds into `t`.
  Tensor out(const Tensor& t) {
    if (!widen_) return t;
    Tensor buffer = at::empty(t.sizes(), t.options().dtype(at::kFloat));
    outputs_.emplace_back(t, buffer);
    return buffer;
  }
  std::optional<Tensor> out(const std::optional<Tensor>& t) {
    return t.has_value() ? std::optional<Tensor>(out(*t)) : std::nullopt;
  }

  template <typename Kernel>
  void run(const Kernel& kernel) {
    if (dtype_ == at::kDouble) {
      kernel(double{});
    } else {
      kernel(float{});
    }
    for (auto& [dst, buffer] : outputs_) dst.copy_(buffer);
    outputs_.clear();
  }

  // A result of the kernel in the caller's dtype.
  Tensor result(const Tensor& t) const { return t.scalar_type() == dtype_ ? t : t.to(dtype_); }

 private:
  at::ScalarType dtype_;
  bool widen_;
  std::vector<std::pair<Tensor, Tensor>> outputs_;
};

}  // namespace cpu
}  // namespace fastbptt
