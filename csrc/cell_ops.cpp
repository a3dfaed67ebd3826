// Cell steps, the ops behind fastbptt.RNNCell / GRUCell / LSTMCell: fastbptt::*_cell and
// fastbptt::*_cell_backward (schemas in csrc/ops.cpp).
//
// A cell step is a layer's chunk of one step. Each op runs its device's fused chunk kernel on a
// one-step chunk (called through the dispatcher, so one implementation serves the CPU and CUDA
// kernels) and does the products around it that a layer does once per chunk: the input
// projection, and the input and weight gradients. All of it in C++, because a Python loop over a
// cell pays the per-call overhead at every step.
//
// What the forward keeps for the backward: the gate pre-activations the chunk kernels read
// (GRU: gi and gh, LSTM: the summed gates; the RNN's backward needs only its output).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/common.h"
#include "op_handle.h"

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace fastbptt {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Path = c10::string_view;

// The chunk ops (csrc/ops.cpp), looked up once.
Tensor rnn_forward_chunk(const Tensor& pre_in, const Tensor& h0, const Tensor& w_hh, const Tensor& out, bool relu,
                         Path path) {
  static const auto op = op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                         const Tensor&, bool, Path)>("fastbptt::rnn_forward_chunk");
  return op.call(pre_in, h0, w_hh, std::nullopt, out, relu, path);
}
std::tuple<Tensor, Tensor> rnn_backward_chunk(const Tensor& out, const Tensor& w_hh, const Tensor& grad_out,
                                              const Tensor& grad_h_n, bool relu, Path path) {
  static const auto op = op_handle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                             const Tensor&, const OptTensor&, bool, Path)>(
      "fastbptt::rnn_backward_chunk");
  return op.call(out, w_hh, grad_out, grad_h_n, std::nullopt, relu, path);
}
Tensor gru_forward_chunk(const Tensor& gi, const Tensor& h0, const Tensor& w_hh, const OptTensor& b_hh,
                         const Tensor& out, const Tensor& gh_out, Path path) {
  static const auto op = op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                         const OptTensor&, const Tensor&, const OptTensor&, Path)>(
      "fastbptt::gru_forward_chunk");
  return op.call(gi, h0, w_hh, b_hh, std::nullopt, out, gh_out, path);
}
std::tuple<Tensor, Tensor, Tensor> gru_backward_chunk(const Tensor& gi, const Tensor& gh, const Tensor& h_prev,
                                                      const Tensor& w_hh, const Tensor& grad_out,
                                                      const Tensor& grad_h_n, Path path) {
  static const auto op = op_handle<std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
      Path)>("fastbptt::gru_backward_chunk");
  return op.call(gi, gh, h_prev, w_hh, grad_out, grad_h_n, std::nullopt, path);
}
std::tuple<Tensor, Tensor> lstm_forward_chunk(const Tensor& gates_in, const Tensor& h0, const Tensor& c0,
                                              const Tensor& w_hh, const Tensor& out, const Tensor& gates_out,
                                              Path path) {
  static const auto op = op_handle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                             const Tensor&, const OptTensor&, const OptTensor&,
                                                             const Tensor&, const OptTensor&, Path)>(
      "fastbptt::lstm_forward_chunk");
  return op.call(gates_in, h0, c0, w_hh, std::nullopt, std::nullopt, out, gates_out, path);
}
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_backward_chunk(const Tensor& gates, const Tensor& c0,
                                                               const Tensor& w_hh, const Tensor& grad_out,
                                                               const Tensor& grad_h_n, const Tensor& grad_c_n,
                                                               Path path) {
  static const auto op = op_handle<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
      const OptTensor&, Path)>("fastbptt::lstm_backward_chunk");
  return op.call(gates, c0, w_hh, std::nullopt, grad_out, grad_h_n, grad_c_n, std::nullopt, path);
}

// ----------------------------------------------------------------------------- shared pieces

// x W_ih^T + bias: [B, G*H] (contiguous, as the chunk kernels read it)
Tensor input_projection(const Tensor& input, const Tensor& w_ih, const OptTensor& bias) {
  return bias.has_value() ? at::addmm(*bias, input, w_ih.t()) : at::mm(input, w_ih.t());
}

// The bias the RNN and LSTM kernels add once: b_ih + b_hh (b_hh cannot be folded into the GRU's gi).
OptTensor folded_bias(const OptTensor& b_ih, const OptTensor& b_hh) {
  if (!b_ih.has_value()) return std::nullopt;
  return b_hh.has_value() ? *b_ih + *b_hh : *b_ih;
}

Tensor step(const Tensor& t) { return t.contiguous().unsqueeze(0); }  // [B, N] -> a one-step chunk [1, B, N]
Tensor unwanted(const Tensor& like) { return like.new_empty({0}); }

// Whether the CPU's fused cell-step kernels run this step (csrc/cpu/cell_step.cpp): the small-batch
// path on float32 tensors they can read as they are; every other step runs the chunk kernels.
bool fused_cpu_step(Path path, const Tensor& input, std::vector<std::optional<Tensor>> others) {
  return path == "small-batch" && cpu::cell_step_small_f32(input, others);
}

// Gradients of the input, the weights and the biases from the gate gradients of the step
// (d_gi: of x W_ih^T + b_ih; d_gh: of h W_hh^T + b_hh; the same tensor for RNN and LSTM), in
// the order input, w_ih, w_hh, b_ih, b_hh; empty where the mask says no. The two bias gradients
// are distinct tensors even when equal (autograd may keep each as its parameter's .grad).
std::vector<Tensor> parameter_grads(const Tensor& d_gi, const Tensor& d_gh, const Tensor& input, const Tensor& hx,
                                    const Tensor& w_ih, bool want_input, bool want_w_ih, bool want_w_hh,
                                    bool want_b_ih, bool want_b_hh) {
  return {want_input ? at::mm(d_gi, w_ih) : unwanted(input),
          want_w_ih ? at::mm(d_gi.t(), input) : unwanted(input),
          want_w_hh ? at::mm(d_gh.t(), hx) : unwanted(input),
          want_b_ih ? d_gi.sum(0) : unwanted(input),
          want_b_hh ? d_gh.sum(0) : unwanted(input)};
}

// ----------------------------------------------------------------------------- RNN

Tensor rnn_cell(const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                const OptTensor& b_hh, bool relu, Path path) {
  if (fused_cpu_step(path, input, {hx, w_ih, w_hh, b_ih, b_hh})) {
    Tensor hy = at::empty_like(hx);
    cpu::rnn_cell_forward_f32(input, hx, w_ih, w_hh, b_ih, b_hh, relu, hy);
    return hy;
  }
  const Tensor pre_in = input_projection(input, w_ih, folded_bias(b_ih, b_hh));
  const Tensor out = at::empty({1, input.size(0), hx.size(1)}, input.options());
  return rnn_forward_chunk(step(pre_in), hx.contiguous(), w_hh.contiguous(), out, relu, path);
}

// -> grads of (input, hx, w_ih, w_hh, b_ih, b_hh), output_mask in the same order; then the gate gradient
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rnn_cell_backward(
    const Tensor& grad_hy, const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
    const Tensor& hy, bool relu, std::array<bool, 6> output_mask, Path path) {
  if (fused_cpu_step(path, input, {hx, w_ih, w_hh, hy})) {
    const Tensor d = at::empty_like(hy), grad_hx = at::empty_like(hx);
    const OptTensor grad_x = output_mask[0] ? OptTensor(at::empty_like(input)) : std::nullopt;
    cpu::rnn_cell_backward_f32(grad_hy.contiguous(), hy, w_ih, w_hh, relu, d, grad_x, grad_hx);
    auto g = parameter_grads(d, d, input, hx, w_ih, false, output_mask[2], output_mask[3], output_mask[4],
                             output_mask[5]);
    return {grad_x.value_or(unwanted(input)), output_mask[1] ? grad_hx : unwanted(hx), g[1], g[2], g[3], g[4], d};
  }
  auto [d_pre, grad_hx] = rnn_backward_chunk(step(hy), w_hh.contiguous(), step(grad_hy), at::zeros_like(hx), relu,
                                             path);
  const Tensor d = d_pre.squeeze(0);
  auto g = parameter_grads(d, d, input, hx, w_ih, output_mask[0], output_mask[2],
                           output_mask[3], output_mask[4], output_mask[5]);
  return {g[0], output_mask[1] ? grad_hx : unwanted(hx), g[1], g[2], g[3], g[4], d};
}

// ----------------------------------------------------------------------------- GRU

// -> (hy [B, H], gi [B, 3H], gh [B, 3H])
std::tuple<Tensor, Tensor, Tensor> gru_cell(const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                                            const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                            Path path) {
  const int64_t batch = input.size(0), hidden = hx.size(1);
  if (fused_cpu_step(path, input, {hx, w_ih, w_hh, b_ih, b_hh})) {
    Tensor hy = at::empty_like(hx);
    Tensor gi = at::empty({batch, 3 * hidden}, input.options()), gh = at::empty_like(gi);
    cpu::gru_cell_forward_f32(input, hx, w_ih, w_hh, b_ih, b_hh, hy, gi, gh);
    return {hy, gi, gh};
  }
  const Tensor gi = input_projection(input, w_ih, b_ih);
  const Tensor gh = at::empty({1, batch, 3 * hidden}, input.options());
  const Tensor out = at::empty({1, batch, hidden}, input.options());
  Tensor hy = gru_forward_chunk(step(gi), hx.contiguous(), w_hh.contiguous(), b_hh, out, gh, path);
  return {hy, gi, gh.squeeze(0)};
}

// -> grads of (input, hx, w_ih, w_hh, b_ih, b_hh), output_mask in the same order; then those of gi and gh
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_cell_backward(
    const Tensor& grad_hy, const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
    const Tensor& gi, const Tensor& gh, std::array<bool, 6> output_mask, Path path) {
  if (fused_cpu_step(path, input, {hx, w_ih, w_hh, gi, gh})) {
    const Tensor d_in = at::empty_like(gi), d_hid = at::empty_like(gh), grad_hx = at::empty_like(hx);
    const OptTensor grad_x = output_mask[0] ? OptTensor(at::empty_like(input)) : std::nullopt;
    cpu::gru_cell_backward_f32(grad_hy.contiguous(), hx, gi, gh, w_ih, w_hh, d_in, d_hid, grad_x, grad_hx);
    auto g = parameter_grads(d_in, d_hid, input, hx, w_ih, false, output_mask[2], output_mask[3], output_mask[4],
                             output_mask[5]);
    return {grad_x.value_or(unwanted(input)), output_mask[1] ? grad_hx : unwanted(hx), g[1], g[2], g[3], g[4],
            d_in, d_hid};
  }
  auto [d_gi, d_gh, grad_hx] = gru_backward_chunk(step(gi), step(gh), step(hx), w_hh.contiguous(), step(grad_hy),
                                                  at::zeros_like(hx), path);
  const Tensor d_in = d_gi.squeeze(0), d_hid = d_gh.squeeze(0);
  auto g = parameter_grads(d_in, d_hid, input, hx, w_ih, output_mask[0], output_mask[2], output_mask[3],
                           output_mask[4], output_mask[5]);
  return {g[0], output_mask[1] ? grad_hx : unwanted(hx), g[1], g[2], g[3], g[4], d_in, d_hid};
}

// ----------------------------------------------------------------------------- LSTM

// -> (hy [B, H], cy [B, H], gates [B, 4H] pre-activations)
std::tuple<Tensor, Tensor, Tensor> lstm_cell(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                             const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                             const OptTensor& b_hh, Path path) {
  const int64_t batch = input.size(0), hidden = cx.size(1);
  if (fused_cpu_step(path, input, {hx, cx, w_ih, w_hh, b_ih, b_hh})) {
    Tensor hy = at::empty_like(hx), cy = at::empty_like(cx);
    Tensor gates = at::empty({batch, 4 * hidden}, input.options());
    cpu::lstm_cell_forward_f32(input, hx, cx, w_ih, w_hh, b_ih, b_hh, hy, cy, gates);
    return {hy, cy, gates};
  }
  const Tensor gates_in = input_projection(input, w_ih, folded_bias(b_ih, b_hh));
  const Tensor gates = at::empty({1, batch, 4 * hidden}, input.options());
  const Tensor out = at::empty({1, batch, hidden}, input.options());
  auto [hy, cy] = lstm_forward_chunk(step(gates_in), hx.contiguous(), cx.contiguous(), w_hh.contiguous(), out, gates,
                                     path);
  return {hy, cy, gates.squeeze(0)};
}

// -> grads of (input, hx, cx, w_ih, w_hh, b_ih, b_hh), output_mask in the same order; then the gates' gradient
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward(
    const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& input, const Tensor& hx, const Tensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates, std::array<bool, 7> output_mask, Path path) {
  if (fused_cpu_step(path, input, {hx, cx, w_ih, w_hh, gates})) {
    const Tensor d = at::empty_like(gates), grad_hx = at::empty_like(hx), grad_cx = at::empty_like(cx);
    const OptTensor grad_x = output_mask[0] ? OptTensor(at::empty_like(input)) : std::nullopt;
    cpu::lstm_cell_backward_f32(grad_hy.contiguous(), grad_cy.contiguous(), cx, gates, w_ih, w_hh, d, grad_x, grad_hx,
                                grad_cx);
    auto g = parameter_grads(d, d, input, hx, w_ih, false, output_mask[3], output_mask[4], output_mask[5],
                             output_mask[6]);
    return {grad_x.value_or(unwanted(input)), output_mask[1] ? grad_hx : unwanted(hx),
            output_mask[2] ? grad_cx : unwanted(cx), g[1], g[2], g[3], g[4], d};
  }
  auto [d_gates, grad_hx, grad_cx, unused] = lstm_backward_chunk(
      step(gates), cx.contiguous(), w_hh.contiguous(), step(grad_hy), at::zeros_like(hx), grad_cy.contiguous(), path);
  const Tensor d = d_gates.squeeze(0);
  auto g = parameter_grads(d, d, input, hx, w_ih, output_mask[0], output_mask[3],
                           output_mask[4], output_mask[5], output_mask[6]);
  return {g[0], output_mask[1] ? grad_hx : unwanted(hx), output_mask[2] ? grad_cx : unwanted(cx),
          g[1], g[2], g[3], g[4], d};
}

}  // namespace

// Device-generic: the chunk kernels they call are dispatched by device. Autograd and the fake
// (shape-only) kernels are registered in Python (fastbptt/ops/cell.py).
TORCH_LIBRARY_IMPL(fastbptt, CompositeExplicitAutograd, m) {
  m.impl("rnn_cell", &rnn_cell);
  m.impl("rnn_cell_backward", &rnn_cell_backward);
  m.impl("gru_cell", &gru_cell);
  m.impl("gru_cell_backward", &gru_cell_backward);
  m.impl("lstm_cell", &lstm_cell);
  m.impl("lstm_cell_backward", &lstm_cell_backward);
}

}  // namespace fastbptt
