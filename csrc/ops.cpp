// Schemas of the native chunk kernels: the one place they are declared.
//
// Each op runs the sequential part of one layer over one chunk, with the contract of
// fastbptt/reference.py (the oracle): tensors in processing order, contiguous, one dtype;
// `valid` is an optional [C, B] bool mask (invalid steps keep the state, write zero output and
// get no gate gradient). Implementations: csrc/cpu/ (CPU key), csrc/cuda/ (CUDA key).
//
//   rnn : pre_in [C,B,H] = x W_ih^T + b_ih + b_hh
//   gru : gi [C,B,3H] = x W_ih^T + b_ih, gh [C,B,3H] = h_prev W_hh^T + b_hh
//   lstm: gates_in [C,B,4H] = x W_ih^T + b_ih + b_hh; gates = gates_in + h_prev W_hh^T;
//         w_hr [P,H] optional projection, h has P columns (P = H without it)
//
// `path` is the kernel path to run, chosen in Python by the backend registry's rule
// (fastbptt/dispatch.py): CPU small-batch | packed | blas (csrc/cpu/common.h), CUDA standard |
// persistent (csrc/cuda/chunk_ops.cpp). A path that cannot take the case raises with the reason.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastbptt, m) {
  // -> h_n [B,H]; writes out [C,B,H]
  m.def("rnn_forward_chunk(Tensor pre_in, Tensor h0, Tensor w_hh, Tensor? valid, Tensor(a!) out, bool relu, "
        "str path) -> Tensor");
  // -> (grad_pre [C,B,H], grad_h0 [B,H])
  m.def("rnn_backward_chunk(Tensor out, Tensor w_hh, Tensor grad_out, Tensor grad_h_n, Tensor? valid, bool relu, "
        "str path) -> (Tensor, Tensor)");
  // -> h_n [B,H]; writes out [C,B,H] and, when given, gh_out [C,B,3H]
  m.def("gru_forward_chunk(Tensor gi, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? valid, Tensor(a!) out, "
        "Tensor(b!)? gh_out, str path) -> Tensor");
  // -> (grad_gi [C,B,3H], grad_gh [C,B,3H], grad_h0 [B,H])
  m.def("gru_backward_chunk(Tensor gi, Tensor gh, Tensor h_prev, Tensor w_hh, Tensor grad_out, Tensor grad_h_n, "
        "Tensor? valid, str path) -> (Tensor, Tensor, Tensor)");
  // -> (h_n [B,P], c_n [B,H]); writes out [C,B,P] and, when given, gates_out [C,B,4H]
  m.def("lstm_forward_chunk(Tensor gates_in, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? valid, "
        "Tensor(a!) out, Tensor(b!)? gates_out, str path) -> (Tensor, Tensor)");
  // -> (grad_gates [C,B,4H], grad_h0 [B,P], grad_c0 [B,H], grad_w_hr [P,H] or empty)
  m.def("lstm_backward_chunk(Tensor gates, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor grad_out, "
        "Tensor grad_h_n, Tensor grad_c_n, Tensor? valid, str path) -> (Tensor, Tensor, Tensor, Tensor)");

  // Cell steps (torch.nn's RNNCell, GRUCell, LSTMCell; csrc/cell_ops.cpp): input [B,I], hx, cx [B,H],
  // w_ih [G*H,I], w_hh [G*H,H], biases [G*H]. The forward returns the new state and what its backward
  // reads; the backward returns the gradients of the forward's tensor arguments in order (empty where
  // output_mask says no), then those of the gate pre-activations (RNN, LSTM: of x W_ih^T + h W_hh^T +
  // biases; GRU: of gi = x W_ih^T + b_ih and of gh = h W_hh^T + b_hh), from which the weight gradients
  // of many steps can be formed in one product. `path` as for the chunk ops.
  m.def("rnn_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool relu, "
        "str path) -> Tensor");
  m.def("rnn_cell_backward(Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor hy, bool relu, "
        "bool[6] output_mask, str path) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (hy, gi [B,3H], gh [B,3H])
  m.def("gru_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, str path) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("gru_cell_backward(Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor gi, Tensor gh, "
        "bool[6] output_mask, str path) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (hy, cy, gates [B,4H] pre-activations)
  m.def("lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "str path) -> (Tensor, Tensor, Tensor)");
  m.def("lstm_cell_backward(Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor hx, Tensor cx, Tensor w_ih, "
        "Tensor w_hh, Tensor gates, bool[7] output_mask, str path) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace fastbptt {
namespace cpu {
std::string packed_isa_name();
}  // namespace cpu

// csrc/cell_chain.cpp: a cell step in eager mode, the steps of a loop forming chains in training
torch::autograd::variable_list cell_step(const std::string& cell, const std::string& path,
                                         const at::Tensor& input, const at::Tensor& hx,
                                         const std::optional<at::Tensor>& cx, const at::Tensor& w_ih,
                                         const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                         const std::optional<at::Tensor>& b_hh);
std::optional<std::tuple<int64_t, int64_t>> cell_chain_info(const at::Tensor& state);
void set_cell_double_backward(pybind11::object fn);
int64_t cell_chain_rows();
}  // namespace fastbptt

#ifdef FASTBPTT_WITH_CUDA
namespace fastbptt {
namespace cuda {
// csrc/cuda/chunk_ops.cpp: why the persistent kernel cannot take the case on the current GPU, or "".
std::string persistent_decline_for(const std::string& cell, const std::string& dtype, int64_t batch,
                                   int64_t hidden);
}  // namespace cuda
}  // namespace fastbptt
#endif

// Importing fastbptt._C runs the registrations above and in csrc/cpu, csrc/cuda.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastbptt native kernels (registered as torch.ops.fastbptt.*_chunk)";
  m.def("cpu_packed_isa", &fastbptt::cpu::packed_isa_name,
        "The vector ISA of the CPU packed path's kernels in this process: 'avx512' or 'avx2' "
        "(capped by ATEN_CPU_CAPABILITY like ATen's own kernels).");
  m.def("cell_step", &fastbptt::cell_step, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "One eager step of a cell (rnn_tanh, rnn_relu, gru, lstm) on a kernel path, a step of a chain in training: "
        "(cell, path, input, hx, cx, w_ih, w_hh, b_ih, b_hh) -> [hy] or [hy, cy] (fastbptt/ops/cell.py).");
  m.def("cell_chain_info", &fastbptt::cell_chain_info,
        "(an id of the chain whose step produced the state, how many backward passes its tape holds), or None.");
  m.def("set_cell_double_backward", &fastbptt::set_cell_double_backward,
        "Registers the differentiable backward of a cell step, for backward passes with create_graph.");
  m.attr("cell_chain_rows") = fastbptt::cell_chain_rows();
#ifdef FASTBPTT_WITH_CUDA
  m.attr("with_cuda") = true;
  // Read by the backend registry (fastbptt/native.py) to decide and report the kernel path.
  m.def("persistent_decline", &fastbptt::cuda::persistent_decline_for, pybind11::arg("cell"),
        pybind11::arg("dtype"), pybind11::arg("batch"), pybind11::arg("hidden"),
        "Why the persistent CUDA kernel of `cell` (gru, lstm) cannot take [batch, hidden] in `dtype` "
        "(float32, float16, bfloat16, float64) on the current GPU, or ''.");
#else
  m.attr("with_cuda") = false;
#endif
}
