// Chains of cell steps: a cell loop (fastbptt.RNNCell, GRUCell, LSTMCell) in eager training.
//
// A loop runs T steps on the same weights. Formed step by step, each weight gradient is a product
// over B rows that reads and writes the whole weight, and autograd then adds T such tensors: for
// small batches that traffic is most of a training step. Instead, the steps of a chain (each one's
// hx the previous one's output, on the same weights, not updated since) read their weights through
// one node, ChainWeights, whose outputs are views of them. A step's backward (CellStep) returns
// the input and state gradients and gives the weights none: it leaves its gate gradients, with the
// input and hx they multiply, on the chain's tape. Autograd runs ChainWeights after every step of
// the backward pass that reaches it (it is an input of all of them), and by then the tape has
// summed each weight gradient in a few products over many steps' rows.
//
// The tape is kept per backward pass (autograd's graph task), so separate passes (retain_graph,
// torch.autograd.grad of part of the graph) never mix, and a pass that does not reach the weights
// drops what its steps left when it ends. Second derivatives (a backward with create_graph) take
// the differentiable formula, which is Python (fastbptt/ops/cell.py, registered below).
//
// The nodes are C++ because a Python loop over a cell pays every Python frame of a step, forward
// and backward, at every step: at one batch row that was more time than the kernels.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/extension.h>

#include "op_handle.h"

#include <array>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace fastbptt {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Path = c10::string_view;

// The cell ops (schemas in csrc/ops.cpp, csrc/cell_ops.cpp), called through the dispatcher so that
// dispatch modes and tensor subclasses see them as on any other path.
using Tensors7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensors8 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Tensor rnn_cell(const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                const OptTensor& b_hh, bool relu, Path path) {
  static const auto op = op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                        const OptTensor&, bool, Path)>("fastbptt::rnn_cell");
  return op.call(input, hx, w_ih, w_hh, b_ih, b_hh, relu, path);
}
Tensors7 rnn_cell_backward(const Tensor& grad_hy, const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                           const Tensor& w_hh, const Tensor& hy, bool relu, std::array<bool, 6> mask, Path path) {
  static const auto op = op_handle<Tensors7(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, bool, std::array<bool, 6>, Path)>(
      "fastbptt::rnn_cell_backward");
  return op.call(grad_hy, input, hx, w_ih, w_hh, hy, relu, mask, path);
}
std::tuple<Tensor, Tensor, Tensor> gru_cell(const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                                            const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                            Path path) {
  static const auto op = op_handle<std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, Path)>(
      "fastbptt::gru_cell");
  return op.call(input, hx, w_ih, w_hh, b_ih, b_hh, path);
}
Tensors8 gru_cell_backward(const Tensor& grad_hy, const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                           const Tensor& w_hh, const Tensor& gi, const Tensor& gh, std::array<bool, 6> mask,
                           Path path) {
  static const auto op = op_handle<Tensors8(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, const Tensor&, std::array<bool, 6>, Path)>(
      "fastbptt::gru_cell_backward");
  return op.call(grad_hy, input, hx, w_ih, w_hh, gi, gh, mask, path);
}
std::tuple<Tensor, Tensor, Tensor> lstm_cell(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                             const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                             const OptTensor& b_hh, Path path) {
  static const auto op = op_handle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                    const Tensor&, const Tensor&, const OptTensor&,
                                                                    const OptTensor&, Path)>("fastbptt::lstm_cell");
  return op.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh, path);
}
Tensors8 lstm_cell_backward(const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& input, const Tensor& hx,
                            const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates,
                            std::array<bool, 7> mask, Path path) {
  static const auto op = op_handle<Tensors8(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, const Tensor&, const Tensor&, std::array<bool, 7>, Path)>(
      "fastbptt::lstm_cell_backward");
  return op.call(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, gates, mask, path);
}

// Gate gradients are kept until they span this many rows (all steps of a small batch, a few of a
// large one), then go into the sums in one product each: fewer, larger products than one per step,
// with the kept rows still in cache.
constexpr int64_t kTapeRows = 128;

// The differentiable arguments of a step, in the order of CellStep's forward; cx only for the LSTM,
// the biases only with bias=True (an absent one is an undefined tensor).
enum Arg { kInput, kHx, kCx, kWIh, kWHh, kBIh, kBHh, kNumArgs };

// A weight's or bias's gradient summed over one backward pass, in place: float32/64 in their own
// dtype (exact sums), float16/bfloat16 in float32, rounded once in result(). The same rule as the
// layers' sums over chunks (fastbptt/ops/recurrence.py, _GradAccumulator).
struct GradSum {
  Tensor like;
  bool wanted = false;
  Tensor total;

  bool low_precision() const {
    return like.scalar_type() == at::kHalf || like.scalar_type() == at::kBFloat16;
  }
  Tensor widened(const Tensor& t) const { return low_precision() ? t.to(at::kFloat) : t; }

  void add_product(const Tensor& a, const Tensor& b) {  // a: [R, N], b: [R, K] -> total += a^T b: [N, K]
    if (!wanted) return;
    const Tensor a_t = widened(a).t(), b_w = widened(b);
    if (total.defined()) {
      total.addmm_(a_t, b_w);
    } else {
      total = at::mm(a_t, b_w);
    }
  }
  Tensor row_sum(const Tensor& a) const {  // a: [R, N] -> [N], in the accumulation dtype
    return low_precision() ? a.sum(0, false, at::kFloat) : a.sum(0);
  }
  void add(const Tensor& t) {
    if (!wanted || !t.defined()) return;
    if (total.defined()) {
      total.add_(t);
    } else {
      total = widened(t);
    }
  }
  Tensor result() const { return wanted && total.defined() ? total.to(like.scalar_type()) : Tensor(); }
};

// One backward pass's weight and bias gradients of a chain, and the steps not yet summed.
struct PassSums {
  std::vector<GradSum> sums;                 // w_ih, w_hh (, b_ih, b_hh)
  std::vector<std::array<Tensor, 4>> steps;  // (input-side gate gradient, hidden-side one, input, hx)
  int64_t rows = 0;
  bool shared_gates = true;                  // one gate gradient for both products (RNN, LSTM)

  void add(std::array<Tensor, 4> step) {
    rows += step[2].size(0);
    steps.push_back(std::move(step));
    if (rows >= kTapeRows) flush();
  }

  Tensor rows_of(int i) const {
    if (steps.size() == 1) return steps[0][i];
    std::vector<Tensor> parts;
    parts.reserve(steps.size());
    for (const auto& step : steps) parts.push_back(step[i]);
    return at::cat(parts);
  }

  void flush() {
    if (steps.empty()) return;
    const Tensor d_in = rows_of(0), x = rows_of(2), h = rows_of(3);
    const Tensor d_hid = shared_gates ? d_in : rows_of(1);
    sums[0].add_product(d_in, x);
    sums[1].add_product(d_hid, h);
    if (sums.size() > 2 && (sums[2].wanted || sums[3].wanted)) {
      const Tensor sum_in = sums[2].row_sum(d_in);
      sums[2].add(sum_in);
      // a copy: the first tensor a sum gets becomes its running total, summed into in place
      sums[3].add(shared_gates ? sum_in.clone() : sums[3].row_sum(d_hid));
    }
    steps.clear();
    rows = 0;
  }
};

// The weight gradients of a chain's steps, per backward pass.
struct Tape : torch::CustomClassHolder {
  std::vector<Tensor> weights;  // the weights present, as the module holds them
  std::vector<bool> wanted;     // whether each requires a gradient
  bool shared_gates = true;
  std::mutex mutex;             // passes may run on other threads (a GPU's backward runs on its own)
  std::unordered_map<int, std::shared_ptr<PassSums>> pending;  // by graph task

  void push(std::array<Tensor, 4> step) {
    const int task = torch::autograd::get_current_graph_task_id();
    std::shared_ptr<PassSums> sums;
    {
      std::lock_guard<std::mutex> lock(mutex);
      auto& slot = pending[task];
      if (!slot) {
        slot = std::make_shared<PassSums>();
        slot->shared_gates = shared_gates;
        for (size_t i = 0; i < weights.size(); ++i) slot->sums.push_back(GradSum{weights[i], wanted[i], Tensor()});
        // a pass that never reaches the weights (autograd.grad of part of the graph) drops its own
        torch::autograd::Engine::get_default_engine().queue_callback(
            [tape = c10::intrusive_ptr<Tape>::reclaim_copy(this), task] {
              std::lock_guard<std::mutex> lock(tape->mutex);
              tape->pending.erase(task);
            });
      }
      sums = slot;
    }
    sums->add(std::move(step));
  }

  std::shared_ptr<PassSums> take() {
    const int task = torch::autograd::get_current_graph_task_id();
    std::lock_guard<std::mutex> lock(mutex);
    auto it = pending.find(task);
    if (it == pending.end()) return nullptr;
    auto sums = std::move(it->second);
    pending.erase(it);
    return sums;
  }
};

enum class Kernel { rnn, gru, lstm };

Kernel kernel_of(const std::string& cell) {
  if (cell == "rnn_tanh" || cell == "rnn_relu") return Kernel::rnn;
  if (cell == "gru") return Kernel::gru;
  TORCH_CHECK(cell == "lstm", "cell must be rnn_tanh, rnn_relu, gru or lstm, got ", cell);
  return Kernel::lstm;
}

// The steps of one cell loop on the same weights, and the ChainWeights views they read them through.
struct Chain : torch::CustomClassHolder {
  std::string cell;                     // rnn_tanh, rnn_relu, gru, lstm
  Kernel kernel;
  std::string path;                     // the kernel path every step runs
  std::array<Tensor, 4> sources;        // w_ih, w_hh, b_ih, b_hh as the module holds them (undefined: no bias)
  std::array<int64_t, 4> versions{};    // their versions when the chain began
  std::array<bool, 4> requires_grad{};
  c10::intrusive_ptr<Tape> tape;
  std::array<Tensor, 4> weights;        // the views the steps read

  bool lstm() const { return kernel == Kernel::lstm; }

  // Whether a step can join: the same cell and path, the same weights, none updated since.
  bool continues(const std::string& step_cell, const std::string& step_path,
                 const std::array<Tensor, 4>& step_sources) const {
    if (step_cell != cell || step_path != path) return false;
    for (size_t i = 0; i < 4; ++i) {
      const Tensor& w = step_sources[i];
      if (w.defined() != sources[i].defined()) return false;
      if (w.defined() && (w.unsafeGetTensorImpl() != sources[i].unsafeGetTensorImpl() ||
                          w._version() != versions[i] || w.requires_grad() != requires_grad[i])) {
        return false;
      }
    }
    return true;
  }
};

// A step's op, below autograd (the op's own autograd is for torch.compile): the states (hy (, cy))
// and what the backward reads (RNN: hy; GRU: gi and gh; LSTM: the gates).
std::pair<variable_list, variable_list> forward_op(Kernel kernel, bool relu, Path path, const Tensor& input,
                                                   const Tensor& hx, const OptTensor& cx, const Tensor& w_ih,
                                                   const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  at::AutoDispatchBelowAutograd below_autograd;
  switch (kernel) {
    case Kernel::rnn: {
      Tensor hy = rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, relu, path);
      return {{hy}, {hy}};
    }
    case Kernel::gru: {
      auto [hy, gi, gh] = gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh, path);
      return {{hy}, {gi, gh}};
    }
    case Kernel::lstm:
    default: {
      auto [hy, cy, gates] = lstm_cell(input, hx, *cx, w_ih, w_hh, b_ih, b_hh, path);
      return {{hy, cy}, {gates}};
    }
  }
}

// The weights of a chain (views of them, identity forward); the backward returns the gradients the
// steps summed on the tape, plus any a step gave directly (double backward).
struct ChainWeights : torch::autograd::Function<ChainWeights> {
  static variable_list forward(AutogradContext* ctx, const c10::intrusive_ptr<Tape>& tape, at::TensorList weights) {
    ctx->saved_data["tape"] = at::IValue::make_capsule(tape);
    ctx->set_materialize_grads(false);
    variable_list views;
    views.reserve(weights.size());
    for (const Tensor& w : weights) views.push_back(w.view_as(w));
    return views;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto tape = c10::static_intrusive_pointer_cast<Tape>(ctx->saved_data["tape"].toCapsule());
    variable_list result{Tensor()};  // the tape's slot
    const auto sums = tape->take();
    if (!sums) {
      result.insert(result.end(), grads.begin(), grads.end());
      return result;
    }
    sums->flush();
    for (size_t i = 0; i < grads.size(); ++i) {
      sums->sums[i].add(grads[i]);
      result.push_back(sums->sums[i].result());
    }
    return result;
  }
};

// The differentiable backward of a step (fastbptt/ops/cell.py), for passes with create_graph.
pybind11::object& double_backward_fn() {
  static auto* fn = new pybind11::object();  // never destroyed: interpreter shutdown must not run it
  return *fn;
}

// A step of a chain: the cell op's forward; the backward gives the input and state gradients and
// leaves the gate gradients on the chain's tape for the weights.
struct CellStep : torch::autograd::Function<CellStep> {
  static variable_list forward(AutogradContext* ctx, const c10::intrusive_ptr<Chain>& chain, const Tensor& input,
                               const Tensor& hx, const OptTensor& cx, const Tensor& w_ih, const Tensor& w_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh) {
    auto [states, kept] = forward_op(chain->kernel, chain->cell == "rnn_relu", chain->path, input, hx, cx, w_ih, w_hh,
                                     b_ih, b_hh);
    variable_list saved{input, hx, cx.value_or(Tensor()), w_ih, w_hh, b_ih.value_or(Tensor()),
                        b_hh.value_or(Tensor())};
    saved.insert(saved.end(), kept.begin(), kept.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["chain"] = at::IValue::make_capsule(chain);
    ctx->set_materialize_grads(false);
    return states;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto chain = c10::static_intrusive_pointer_cast<Chain>(ctx->saved_data["chain"].toCapsule());
    const variable_list saved = ctx->get_saved_variables();
    variable_list result(1 + kNumArgs);  // the chain's slot, then the arguments'
    // which arguments need a gradient: autograd numbers only those present (an absent cx or bias
    // has no edge)
    std::array<bool, kNumArgs> needs{};
    bool any_needed = false;
    for (int i = 0, edge = 0; i < kNumArgs; ++i) {
      if (!saved[i].defined()) continue;
      needs[i] = ctx->needs_input_grad(edge++);
      any_needed |= needs[i];
    }
    const size_t n_states = chain->lstm() ? 2 : 1;
    bool any_grad = false;
    for (size_t i = 0; i < n_states; ++i) any_grad |= grads[i].defined();
    if (!any_needed || !any_grad) return result;
    if (at::GradMode::is_enabled()) {  // a graph of the gradients is wanted: every gradient now, differentiably
      const auto grads_of_args = differentiable_grads(*chain, saved, grads, needs);
      for (int i = 0; i < kNumArgs; ++i) {
        if (needs[i]) result[1 + i] = grads_of_args[i];
      }
      return result;
    }
    const Tensor &input = saved[kInput], &hx = saved[kHx];
    auto state_grad = [&](size_t i) { return grads[i].defined() ? grads[i] : at::zeros_like(hx); };
    const bool weights_needed = needs[kWIh] || needs[kWHh] || needs[kBIh] || needs[kBHh];
    const c10::string_view path = chain->path;
    Tensor d_in, d_hid;
    switch (chain->kernel) {
      case Kernel::rnn: {  // -> grads of (input, hx, w_ih, w_hh, b_ih, b_hh), the gate gradient
        auto g = rnn_cell_backward(state_grad(0), input, hx, saved[kWIh], saved[kWHh], saved[kNumArgs],
                                         chain->cell == "rnn_relu", {needs[kInput], needs[kHx]}, path);
        result[1 + kInput] = std::get<0>(g);
        result[1 + kHx] = std::get<1>(g);
        d_in = d_hid = std::get<6>(g);
        break;
      }
      case Kernel::gru: {  // -> grads of (input, hx, w_ih, w_hh, b_ih, b_hh), those of gi and gh
        auto g = gru_cell_backward(state_grad(0), input, hx, saved[kWIh], saved[kWHh], saved[kNumArgs],
                                         saved[kNumArgs + 1], {needs[kInput], needs[kHx]}, path);
        result[1 + kInput] = std::get<0>(g);
        result[1 + kHx] = std::get<1>(g);
        d_in = std::get<6>(g);
        d_hid = std::get<7>(g);
        break;
      }
      case Kernel::lstm: {  // -> grads of (input, hx, cx, w_ih, w_hh, b_ih, b_hh), the gates' gradient
        auto g = lstm_cell_backward(state_grad(0), state_grad(1), input, hx, saved[kCx], saved[kWIh],
                                          saved[kWHh], saved[kNumArgs], {needs[kInput], needs[kHx], needs[kCx]},
                                          path);
        result[1 + kInput] = std::get<0>(g);
        result[1 + kHx] = std::get<1>(g);
        result[1 + kCx] = std::get<2>(g);
        d_in = d_hid = std::get<7>(g);
        break;
      }
    }
    for (int i : {kInput, kHx, kCx}) {
      if (!needs[i]) result[1 + i] = Tensor();
    }
    if (weights_needed) chain->tape->push({d_in, d_hid, input, hx});
    return result;
  }

  // Every needed gradient as differentiable ops (the Python formula), by argument.
  static variable_list differentiable_grads(const Chain& chain, const variable_list& saved, const variable_list& grads,
                                            const std::array<bool, kNumArgs>& needs) {
    pybind11::gil_scoped_acquire gil;
    const auto& fn = double_backward_fn();
    TORCH_CHECK(fn, "fastbptt: the differentiable cell backward is not registered (import fastbptt)");
    // the Python formula's arguments: input, hx (, cx), w_ih, w_hh, b_ih, b_hh
    pybind11::list diff, state_grads, mask;
    for (int i = 0; i < kNumArgs; ++i) {
      if (i == kCx && !chain.lstm()) continue;
      diff.append(saved[i].defined() ? pybind11::cast(saved[i]) : pybind11::none());
      mask.append(needs[i]);
    }
    for (size_t i = 0; i < (chain.lstm() ? 2u : 1u); ++i) {
      state_grads.append(grads[i].defined() ? pybind11::cast(grads[i]) : pybind11::none());
    }
    const auto out = fn(chain.cell, pybind11::tuple(diff), pybind11::tuple(state_grads), mask)
                         .cast<std::vector<OptTensor>>();
    variable_list by_arg(kNumArgs);
    for (int i = 0, j = 0; i < kNumArgs; ++i) {
      if (i == kCx && !chain.lstm()) continue;
      by_arg[i] = out.at(j++).value_or(Tensor());
    }
    return by_arg;
  }
};

// The chain a step's state came from, or null: the chain of the CellStep node that produced it.
c10::intrusive_ptr<Chain> chain_of(const Tensor& state) {
  const at::TensorBase& base = state.is_view() ? state._base() : static_cast<const at::TensorBase&>(state);
  const auto producer = base.grad_fn();
  const auto* node = dynamic_cast<const torch::autograd::CppNode<CellStep>*>(producer.get());
  if (node == nullptr) return {};
  const auto it = node->ctx_.saved_data.find("chain");
  if (it == node->ctx_.saved_data.end()) return {};
  return c10::static_intrusive_pointer_cast<Chain>(it->second.toCapsule());
}

c10::intrusive_ptr<Chain> new_chain(const std::string& cell, const std::string& path,
                                    const std::array<Tensor, 4>& sources) {
  auto chain = c10::make_intrusive<Chain>();
  chain->cell = cell;
  chain->kernel = kernel_of(cell);
  chain->path = path;
  chain->sources = sources;
  chain->tape = c10::make_intrusive<Tape>();
  chain->tape->shared_gates = chain->kernel != Kernel::gru;  // the GRU has gi's and gh's gradients
  for (size_t i = 0; i < 4; ++i) {
    const Tensor& w = sources[i];
    if (!w.defined()) continue;
    chain->versions[i] = w._version();
    chain->requires_grad[i] = w.requires_grad();
    chain->tape->weights.push_back(w);
    chain->tape->wanted.push_back(w.requires_grad());
  }
  const variable_list views = ChainWeights::apply(chain->tape, at::TensorList(chain->tape->weights));
  for (size_t i = 0, j = 0; i < 4; ++i) {
    if (sources[i].defined()) chain->weights[i] = views[j++];
  }
  return chain;
}

}  // namespace

// One step of `cell` (rnn_tanh, rnn_relu, gru, lstm) on kernel path `path`. In grad mode with a
// tensor that requires grad, a step of the chain its hx continues, or of a new one; else the op
// alone. -> [hy] or, for the LSTM, [hy, cy]
variable_list cell_step(const std::string& cell, const std::string& path, const Tensor& input, const Tensor& hx,
                        const OptTensor& cx, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                        const OptTensor& b_hh) {
  const auto requires_grad = [](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
  if (!at::GradMode::is_enabled() ||
      !(input.requires_grad() || hx.requires_grad() || requires_grad(cx) || w_ih.requires_grad() ||
        w_hh.requires_grad() || requires_grad(b_ih) || requires_grad(b_hh))) {
    return forward_op(kernel_of(cell), cell == "rnn_relu", path, input, hx, cx, w_ih, w_hh, b_ih, b_hh).first;
  }
  const std::array<Tensor, 4> sources{w_ih, w_hh, b_ih.value_or(Tensor()), b_hh.value_or(Tensor())};
  auto chain = chain_of(hx);
  if (!chain || !chain->continues(cell, path, sources)) chain = new_chain(cell, path, sources);
  const auto& w = chain->weights;
  auto optional = [](const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
  return CellStep::apply(chain, input, hx, cx, w[0], w[1], optional(w[2]), optional(w[3]));
}

// For tests: (an id of the chain `state` came from, how many backward passes its tape holds sums
// of), or None when no chain step produced it.
std::optional<std::tuple<int64_t, int64_t>> cell_chain_info(const Tensor& state) {
  const auto chain = chain_of(state);
  if (!chain) return std::nullopt;
  std::lock_guard<std::mutex> lock(chain->tape->mutex);
  return std::make_tuple(reinterpret_cast<int64_t>(chain.get()), static_cast<int64_t>(chain->tape->pending.size()));
}

void set_cell_double_backward(pybind11::object fn) { double_backward_fn() = std::move(fn); }

int64_t cell_chain_rows() { return kTapeRows; }

}  // namespace fastbptt
