// Input checks of the fastbptt::*_chunk ops (schemas in csrc/ops.cpp), shared by the CPU
// (csrc/cpu) and CUDA (csrc/cuda/chunk_ops.cpp) implementations: each op's argument shapes are
// written once (check_*_chunk below), so both devices reject bad input with the same messages.
//
//   const ChunkArgs a = check_gru_forward_chunk(kCpuKernels, gi, h0, w_hh, b_hh, valid, out, gh_out);
//   a.steps, a.batch, a.hidden, a.valid (the [C, B] mask's data or nullptr), a.dtype
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace fastbptt {

// What one device's kernels take: the device type and the dtypes.
struct Kernels {
  c10::DeviceType device;
  std::vector<at::ScalarType> dtypes;
};

// The tensors of one op call, checked against its first input: a [C, B, gates * H] tensor on the
// kernels' device with one of their dtypes, which fixes the device and dtype of all the others.
class OpArgs {
 public:
  OpArgs(const char* op, const Kernels& kernels, const at::Tensor& first, const char* name, int64_t gates)
      : op_(op), first_(first) {
    TORCH_CHECK(first.device().type() == kernels.device, op, ": expected ", name, " on ",
                c10::DeviceTypeName(kernels.device), ", got a tensor on ", first.device());
    bool known = false;
    for (const auto d : kernels.dtypes) known = known || first.scalar_type() == d;
    TORCH_CHECK(known, op, ": ", name, " must be ", dtype_list(kernels.dtypes), ", got ",
                c10::toString(first.scalar_type()));
    TORCH_CHECK(first.dim() == 3, op, ": expected ", name, " to have 3 dimensions [C, B, *], got ", first.dim(),
                " (shape ", first.sizes(), ")");
    TORCH_CHECK(first.size(2) % gates == 0, op, ": ", name, "'s last dimension must be ", gates,
                " * hidden_size, got ", first.size(2));
    hidden_ = first.size(2) / gates;
    TORCH_CHECK(first.is_contiguous(), op, ": expected ", name, " to be contiguous");
  }

  at::ScalarType dtype() const { return first_.scalar_type(); }
  int64_t steps() const { return first_.size(0); }
  int64_t batch() const { return first_.size(1); }

  int64_t hidden() const { return hidden_; }

  // t: on the first input's device, of its dtype, of `shape`, contiguous.
  void operator()(const at::Tensor& t, const char* name, at::IntArrayRef shape) const {
    same_device(t, name);
    TORCH_CHECK(t.scalar_type() == dtype(), op_, ": expected ", name, " to have dtype ", c10::toString(dtype()),
                " like the first input, got ", c10::toString(t.scalar_type()));
    TORCH_CHECK(t.sizes() == shape, op_, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op_, ": expected ", name, " to be contiguous");
  }

  void optional(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape) const {
    if (t.has_value()) (*this)(*t, name, shape);
  }

  // Size `dim` of a `rank`-dimensional tensor, read before its whole shape can be checked (an
  // LSTM's h0 gives the projection size P).
  int64_t size(const at::Tensor& t, const char* name, int64_t rank, int64_t dim) const {
    TORCH_CHECK(t.dim() == rank, op_, ": expected ", name, " to have ", rank, " dimensions, got ", t.dim(),
                " (shape ", t.sizes(), ")");
    return t.size(dim);
  }

  // valid: an optional [steps, batch] bool mask -> its data, or nullptr when absent.
  const bool* valid(const std::optional<at::Tensor>& valid, int64_t steps, int64_t batch) const {
    if (!valid.has_value()) return nullptr;
    const at::Tensor& v = *valid;
    same_device(v, "valid");
    TORCH_CHECK(v.scalar_type() == at::kBool, op_, ": expected valid to be a bool mask, got ",
                c10::toString(v.scalar_type()));
    TORCH_CHECK(v.sizes() == at::IntArrayRef({steps, batch}), op_, ": expected valid of shape [", steps, ", ", batch,
                "], got ", v.sizes());
    TORCH_CHECK(v.is_contiguous(), op_, ": expected valid to be contiguous");
    return v.data_ptr<bool>();
  }

 private:
  void same_device(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(t.device() == first_.device(), op_, ": expected ", name, " on ", first_.device(),
                " like the first input, got ", t.device());
  }

  static std::string dtype_list(const std::vector<at::ScalarType>& dtypes) {
    const auto name = [](at::ScalarType d) -> std::string {
      switch (d) {
        case at::kFloat: return "float32";
        case at::kDouble: return "float64";
        case at::kHalf: return "float16";
        case at::kBFloat16: return "bfloat16";
        default: return c10::toString(d);
      }
    };
    std::ostringstream out;
    size_t i = 0;
    for (const auto d : dtypes) {
      if (i > 0) out << (i + 1 == dtypes.size() ? " or " : ", ");
      out << name(d);
      ++i;
    }
    return out.str();
  }

  const char* op_;
  const at::Tensor& first_;
  int64_t hidden_;
};

// ----------------------------------------------------------------------------- the ops' arguments

// The sizes of one checked op call. P: the columns of h (LSTM with projection; else H).
struct ChunkArgs {
  const char* op;
  at::ScalarType dtype;
  int64_t steps, batch, hidden, proj;
  const bool* valid;  // the [steps, batch] mask's data, or nullptr
};

using OptTensor = std::optional<at::Tensor>;

inline ChunkArgs check_rnn_forward_chunk(const Kernels& k, const at::Tensor& pre_in, const at::Tensor& h0,
                                         const at::Tensor& w_hh, const OptTensor& valid, const at::Tensor& out) {
  const char* op = "fastbptt::rnn_forward_chunk";
  const OpArgs args(op, k, pre_in, "pre_in", 1);
  const int64_t C = args.steps(), B = args.batch(), H = args.hidden();
  args(h0, "h0", {B, H});
  args(w_hh, "w_hh", {H, H});
  args(out, "out", {C, B, H});
  return {op, args.dtype(), C, B, H, H, args.valid(valid, C, B)};
}

inline ChunkArgs check_rnn_backward_chunk(const Kernels& k, const at::Tensor& out, const at::Tensor& w_hh,
                                          const at::Tensor& grad_out, const at::Tensor& grad_h_n,
                                          const OptTensor& valid) {
  const char* op = "fastbptt::rnn_backward_chunk";
  const OpArgs args(op, k, out, "out", 1);
  const int64_t C = args.steps(), B = args.batch(), H = args.hidden();
  args(w_hh, "w_hh", {H, H});
  args(grad_out, "grad_out", {C, B, H});
  args(grad_h_n, "grad_h_n", {B, H});
  return {op, args.dtype(), C, B, H, H, args.valid(valid, C, B)};
}

inline ChunkArgs check_gru_forward_chunk(const Kernels& k, const at::Tensor& gi, const at::Tensor& h0,
                                         const at::Tensor& w_hh, const OptTensor& b_hh, const OptTensor& valid,
                                         const at::Tensor& out, const OptTensor& gh_out) {
  const char* op = "fastbptt::gru_forward_chunk";
  const OpArgs args(op, k, gi, "gi", 3);
  const int64_t C = args.steps(), B = args.batch(), H = args.hidden();
  args(h0, "h0", {B, H});
  args(w_hh, "w_hh", {3 * H, H});
  args.optional(b_hh, "b_hh", {3 * H});
  args(out, "out", {C, B, H});
  args.optional(gh_out, "gh_out", {C, B, 3 * H});
  return {op, args.dtype(), C, B, H, H, args.valid(valid, C, B)};
}

inline ChunkArgs check_gru_backward_chunk(const Kernels& k, const at::Tensor& gi, const at::Tensor& gh,
                                          const at::Tensor& h_prev, const at::Tensor& w_hh,
                                          const at::Tensor& grad_out, const at::Tensor& grad_h_n,
                                          const OptTensor& valid) {
  const char* op = "fastbptt::gru_backward_chunk";
  const OpArgs args(op, k, gi, "gi", 3);
  const int64_t C = args.steps(), B = args.batch(), H = args.hidden();
  args(gh, "gh", {C, B, 3 * H});
  args(h_prev, "h_prev", {C, B, H});
  args(w_hh, "w_hh", {3 * H, H});
  args(grad_out, "grad_out", {C, B, H});
  args(grad_h_n, "grad_h_n", {B, H});
  return {op, args.dtype(), C, B, H, H, args.valid(valid, C, B)};
}

// w_hr: [P, H] when given; without it h must have H columns.
inline void check_lstm_projection(const OpArgs& args, const char* op, const OptTensor& w_hr, int64_t P, int64_t H) {
  if (w_hr.has_value()) {
    args(*w_hr, "w_hr", {P, H});
  } else {
    TORCH_CHECK(P == H, op, ": without w_hr the state h must have hidden_size = ", H, " columns, got ", P);
  }
}

inline ChunkArgs check_lstm_forward_chunk(const Kernels& k, const at::Tensor& gates_in, const at::Tensor& h0,
                                          const at::Tensor& c0, const at::Tensor& w_hh, const OptTensor& w_hr,
                                          const OptTensor& valid, const at::Tensor& out,
                                          const OptTensor& gates_out) {
  const char* op = "fastbptt::lstm_forward_chunk";
  const OpArgs args(op, k, gates_in, "gates_in", 4);
  const int64_t C = args.steps(), B = args.batch(), H = args.hidden(), P = args.size(h0, "h0", 2, 1);
  args(h0, "h0", {B, P});
  args(c0, "c0", {B, H});
  args(w_hh, "w_hh", {4 * H, P});
  check_lstm_projection(args, op, w_hr, P, H);
  args(out, "out", {C, B, P});
  args.optional(gates_out, "gates_out", {C, B, 4 * H});
  return {op, args.dtype(), C, B, H, P, args.valid(valid, C, B)};
}

inline ChunkArgs check_lstm_backward_chunk(const Kernels& k, const at::Tensor& gates, const at::Tensor& c0,
                                           const at::Tensor& w_hh, const OptTensor& w_hr,
                                           const at::Tensor& grad_out, const at::Tensor& grad_h_n,
                                           const at::Tensor& grad_c_n, const OptTensor& valid) {
  const char* op = "fastbptt::lstm_backward_chunk";
  const OpArgs args(op, k, gates, "gates", 4);
  const int64_t C = args.steps(), B = args.batch(), H = args.hidden(), P = args.size(grad_h_n, "grad_h_n", 2, 1);
  args(c0, "c0", {B, H});
  args(w_hh, "w_hh", {4 * H, P});
  check_lstm_projection(args, op, w_hr, P, H);
  args(grad_out, "grad_out", {C, B, P});
  args(grad_h_n, "grad_h_n", {B, P});
  args(grad_c_n, "grad_c_n", {B, H});
  return {op, args.dtype(), C, B, H, P, args.valid(valid, C, B)};
}

}  // namespace fastbptt
