// Shared pieces of the fused CPU chunk kernels (csrc/cpu/{rnn,gru,lstm}.cpp).
//
// Every kernel follows the same shape: per step one recurrent matrix product through ATen
// (MKL) into a buffer allocated once per chunk, then one fused elementwise pass over the batch
// rows (parallel with at::parallel_for) that applies all gate activations and the state update,
// or all gate gradients. The row passes are plain loops over the hidden units that the compiler
// vectorizes; on x86-64 with GCC each is also compiled for AVX2+FMA and picked at load time
// (target_clones), so the default build stays portable.
//
// bfloat16: the kernels compute in float32. The op converts its inputs once, runs the float32
// kernel (carried state and gradients stay float32 for the whole chunk) and rounds the results
// once on the way out, exactly as the reference backend does.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cells/activation.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <optional>
#include <type_traits>
#include <string>

namespace fastbptt {
namespace cpu {

using at::Tensor;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTBPTT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTBPTT_CLONES
#endif

// ----------------------------------------------------------------------------- helpers

// Rows per parallel task: enough elementwise work (~16k values) to pay for a fork.
inline int64_t row_grain(int64_t values_per_row) {
  const int64_t grain = 16384 / (values_per_row > 0 ? values_per_row : 1);
  return grain < 1 ? 1 : grain;
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
//   packed:      GRU / LSTM (no projection) forward with W_hh packed per thread (packed_step.cpp);
//                its backward runs as blas
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

// ----------------------------------------------------------------------------- fused per-step forward
//
// float32 GRU / LSTM (no projection) forward with W_hh packed per thread once per chunk and one
// parallel region per step (csrc/cpu/packed_step.cpp): the packed path.
// h, c: carried state (h0/c0 copies, contiguous); h is replaced by the final state, c updated in place
void lstm_forward_packed_f32(const Tensor& gates_in, const Tensor& w_hh, const bool* valid, Tensor& h,
                             const Tensor& c, const Tensor& out, const std::optional<Tensor>& gates_out);
void gru_forward_packed_f32(const Tensor& gi, const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                            const bool* valid, Tensor& h, const Tensor& out, const std::optional<Tensor>& gh_out);

inline const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

inline void check_cpu_tensor(const Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                             int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": expected ", name, " to have dtype ", dtype_name(dtype),
              " like the first input, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.dim() == dims, op, ": expected ", name, " to have ", dims, " dimensions, got ", t.dim(),
              " (shape ", t.sizes(), ")");
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

inline void check_shape(const Tensor& t, at::IntArrayRef want, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == want, op, ": expected ", name, " of shape ", want, ", got ", t.sizes());
}

inline void check_first(const Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, op, ": ", name,
              " must be float32, float64 or bfloat16, got ", dtype_name(dtype));
  TORCH_CHECK(t.dim() == 3, op, ": expected ", name, " to have 3 dimensions [C, B, *], got ", t.dim(),
              " (shape ", t.sizes(), ")");
}

inline void check_valid(const std::optional<Tensor>& valid, int64_t steps, int64_t batch, const char* op) {
  if (!valid.has_value()) return;
  const Tensor& v = *valid;
  TORCH_CHECK(v.device().is_cpu(), op, ": expected valid on the CPU, got ", v.device());
  TORCH_CHECK(v.scalar_type() == at::kBool, op, ": expected valid to be a bool mask, got ",
              dtype_name(v.scalar_type()));
  TORCH_CHECK(v.sizes() == at::IntArrayRef({steps, batch}), op, ": expected valid of shape [", steps, ", ",
              batch, "], got ", v.sizes());
  TORCH_CHECK(v.is_contiguous(), op, ": expected valid to be contiguous");
}

inline const bool* valid_ptr(const std::optional<Tensor>& valid) {
  return valid.has_value() ? valid->data_ptr<bool>() : nullptr;
}

// Low precision runs on float32 copies; these move tensors across.
inline Tensor up(const Tensor& t) { return t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t; }
inline std::optional<Tensor> up(const std::optional<Tensor>& t) {
  return t.has_value() ? std::optional<Tensor>(up(*t)) : std::nullopt;
}
inline Tensor down(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

}  // namespace cpu
}  // namespace fastbptt
