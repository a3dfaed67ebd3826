// CUDA implementations of the fastbptt::*_chunk ops (schemas in csrc/ops.cpp; contract and oracle
// in fastbptt/reference.py).
//
// Standard path, per time step: one recurrent product through ATen (cuBLAS, on the current
// stream, into a buffer allocated once per chunk) and one fused elementwise kernel (launch.h).
// State, carried gradients and GEMM operands are kept in the accumulation type (float32 for
// float16/bfloat16), so low precision is computed in float32 and rounded once on the way out,
// as the reference does. No per-step allocation and no atomics: results are bitwise
// reproducible run to run.
//
// Persistent path (GRU, LSTM without projection): one cooperative launch per chunk. Each op runs the
// path named by its `path` argument (standard | persistent), chosen by the backend registry in
// Python (fastbptt/dispatch.py). See docs/cuda.md.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "../checks.h"
#include "launch.h"

namespace fastbptt {
namespace cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ----------------------------------------------------------------------------- checks and helpers

Dtype dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kDouble: return Dtype::f64;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default:
      TORCH_CHECK(false, "fastbptt CUDA kernels take float32, float64, float16 or bfloat16 tensors, got ",
                  t.scalar_type());
  }
}

at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// What the CUDA ops take (their checks: csrc/checks.h, shared with the CPU ops).
const Kernels kCudaKernels{at::kCUDA, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}};

// Address of step s of a contiguous [C, ...] tensor (or nullptr for an absent tensor).
void* at_step(const Tensor& t, int64_t s) {
  return static_cast<char*>(t.data_ptr()) + s * t.stride(0) * t.element_size();
}
void* at_step(const OptTensor& t, int64_t s) { return t.has_value() ? at_step(*t, s) : nullptr; }
const bool* valid_at(const bool* valid, int64_t s, int64_t B) { return valid == nullptr ? nullptr : valid + s * B; }

Tensor to_acc(const Tensor& t) { return t.to(acc_type(t.scalar_type())); }
Tensor fresh_acc(const Tensor& t) { return t.to(acc_type(t.scalar_type()), false, /*copy=*/true); }
// A fresh tensor of dtype `like`; `acc` is already fresh and owned here, so no copy when equal.
Tensor from_acc(const Tensor& acc, const Tensor& like) {
  return acc.scalar_type() == like.scalar_type() ? acc : acc.to(like.scalar_type());
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// out [B,N] = a [B,K] @ w_t, where w_t = W^T is a view of W [N,K] made once per chunk.
void mm_into(Tensor& out, const Tensor& a, const Tensor& w_t) { at::mm_out(out, a, w_t); }

// ----------------------------------------------------------------------------- kernel path

// Why the persistent kernel of `cell` cannot take this case, or "" if it can.
std::string persistent_decline(const char* cell, Dtype dt, int64_t B, int64_t H) {
  const std::string name(cell);
  if (name == "gru") return persistent_gru_decline(dt, B, H);
  if (name == "lstm") return persistent_lstm_decline(dt, B, H);
  if (name == "lstm_proj") return "the persistent LSTM kernel does not support a projection (proj_size > 0)";
  return "there is no persistent kernel for the RNN cell yet";
}

// True when the op was asked for the persistent path (`path` is chosen in Python: the backend
// registry's rule, fastbptt/dispatch.py). One that cannot take the case raises with the reason
// before anything is launched; the registry asks persistent_decline_for first, so this only
// catches a direct call.
bool runs_persistent(const char* op, c10::string_view path, const char* cell, Dtype dt, int64_t B, int64_t H) {
  if (path == "standard") return false;
  TORCH_CHECK(path == "persistent", op, ": path must be standard or persistent, got '", std::string(path), "'");
  const std::string why = persistent_decline(cell, dt, B, H);
  TORCH_CHECK(why.empty(), op, ": the persistent ", cell, " kernel declines B=", B, ", H=", H, ": ", why);
  return true;
}

// ----------------------------------------------------------------------------- RNN

Tensor rnn_forward_chunk_cuda(const Tensor& pre_in, const Tensor& h0, const Tensor& w_hh, const OptTensor& valid,
                              Tensor& out, bool relu, c10::string_view path) {
  const ChunkArgs a = check_rnn_forward_chunk(kCudaKernels, pre_in, h0, w_hh, valid, out);
  const char* op = a.op;
  const int64_t C = a.steps, B = a.batch, H = a.hidden;
  const bool* v = a.valid;
  const c10::cuda::CUDAGuard guard(pre_in.device());
  const cudaStream_t stream = current_stream();
  const Dtype dt = dtype_of(pre_in);
  runs_persistent(op, path, "rnn", dt, B, H);  // no persistent RNN kernel: raises for "persistent"

  const Tensor w_t = to_acc(w_hh).t();
  Tensor h = fresh_acc(h0);
  Tensor gh = at::empty({B, H}, h.options());
  for (int64_t t = 0; t < C; ++t) {
    mm_into(gh, h, w_t);
    rnn_forward_step(dt, at_step(pre_in, t), gh.data_ptr(), h.data_ptr(), at_step(out, t), valid_at(v, t, B), B, H,
                     relu, stream);
  }
  return from_acc(h, pre_in);
}

std::tuple<Tensor, Tensor> rnn_backward_chunk_cuda(const Tensor& out, const Tensor& w_hh, const Tensor& grad_out,
                                                   const Tensor& grad_h_n, const OptTensor& valid, bool relu,
                                                   c10::string_view path) {
  const ChunkArgs a = check_rnn_backward_chunk(kCudaKernels, out, w_hh, grad_out, grad_h_n, valid);
  const char* op = a.op;
  const int64_t C = a.steps, B = a.batch, H = a.hidden;
  const bool* v = a.valid;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = current_stream();
  const Dtype dt = dtype_of(out);
  runs_persistent(op, path, "rnn", dt, B, H);  // no persistent RNN kernel: raises for "persistent"

  const Tensor w = to_acc(w_hh);
  Tensor dh = fresh_acc(grad_h_n);
  Tensor d_acc = at::empty({B, H}, dh.options());
  Tensor grad_pre = at::empty_like(out);
  for (int64_t t = C - 1; t >= 0; --t) {
    rnn_backward_step(dt, at_step(out, t), at_step(grad_out, t), dh.data_ptr(), at_step(grad_pre, t),
                      d_acc.data_ptr(), valid_at(v, t, B), B, H, relu, stream);
    dh.addmm_(d_acc, w);  // dh [B,H] += d [B,H] @ W_hh [H,H]
  }
  return {grad_pre, from_acc(dh, out)};
}

// ----------------------------------------------------------------------------- GRU

Tensor gru_forward_chunk_cuda(const Tensor& gi, const Tensor& h0, const Tensor& w_hh, const OptTensor& b_hh,
                              const OptTensor& valid, Tensor& out, const OptTensor& gh_out, c10::string_view path) {
  const ChunkArgs a = check_gru_forward_chunk(kCudaKernels, gi, h0, w_hh, b_hh, valid, out, gh_out);
  const char* op = a.op;
  const int64_t C = a.steps, B = a.batch, H = a.hidden;
  const bool* v = a.valid;
  const c10::cuda::CUDAGuard guard(gi.device());
  const cudaStream_t stream = current_stream();
  const Dtype dt = dtype_of(gi);
  const void* bias = b_hh.has_value() ? b_hh->data_ptr() : nullptr;

  if (runs_persistent(op, path, "gru", dt, B, H) && C > 0) {
    Tensor h_buf = at::empty({2, B, H}, gi.options().dtype(at::kFloat));
    h_buf.select(0, 0).copy_(h0);
    const std::string err = persistent_gru_forward(dt, gi.data_ptr(), w_hh.data_ptr(), bias, v, out.data_ptr(),
                                                   at_step(gh_out, 0), h_buf.data_ptr<float>(), C, B, H, stream);
    TORCH_CHECK(err.empty(), op, ": persistent kernel failed: ", err);
    return h_buf.select(0, C % 2).to(gi.scalar_type(), false, /*copy=*/true);
  }

  const Tensor w_t = to_acc(w_hh).t();
  Tensor h = fresh_acc(h0);
  Tensor gh = at::empty({B, 3 * H}, h.options());
  for (int64_t t = 0; t < C; ++t) {
    mm_into(gh, h, w_t);
    gru_forward_step(dt, at_step(gi, t), gh.data_ptr(), bias, h.data_ptr(), at_step(out, t), at_step(gh_out, t),
                     valid_at(v, t, B), B, H, stream);
  }
  return from_acc(h, gi);
}

std::tuple<Tensor, Tensor, Tensor> gru_backward_chunk_cuda(const Tensor& gi, const Tensor& gh, const Tensor& h_prev,
                                                           const Tensor& w_hh, const Tensor& grad_out,
                                                           const Tensor& grad_h_n, const OptTensor& valid,
                                                           c10::string_view path) {
  const ChunkArgs a = check_gru_backward_chunk(kCudaKernels, gi, gh, h_prev, w_hh, grad_out, grad_h_n, valid);
  const char* op = a.op;
  const int64_t C = a.steps, B = a.batch, H = a.hidden;
  const bool* v = a.valid;
  const c10::cuda::CUDAGuard guard(gi.device());
  const cudaStream_t stream = current_stream();
  const Dtype dt = dtype_of(gi);
  Tensor grad_gi = at::empty_like(gi), grad_gh = at::empty_like(gh);

  if (runs_persistent(op, path, "gru", dt, B, H) && C > 0) {
    Tensor dh = grad_h_n.to(at::kFloat, false, /*copy=*/true);
    Tensor dgh_buf = at::empty({2, B, 3 * H}, dh.options());
    const std::string err =
        persistent_gru_backward(dt, gi.data_ptr(), gh.data_ptr(), h_prev.data_ptr(), w_hh.data_ptr(),
                                grad_out.data_ptr(), v, grad_gi.data_ptr(), grad_gh.data_ptr(), dh.data_ptr<float>(),
                                dgh_buf.data_ptr<float>(), C, B, H, stream);
    TORCH_CHECK(err.empty(), op, ": persistent kernel failed: ", err);
    return {grad_gi, grad_gh, from_acc(dh, gi)};
  }

  const Tensor w = to_acc(w_hh);
  Tensor dh = fresh_acc(grad_h_n);
  Tensor d_gh = at::empty({B, 3 * H}, dh.options());
  for (int64_t t = C - 1; t >= 0; --t) {
    gru_backward_step(dt, at_step(gi, t), at_step(gh, t), at_step(h_prev, t), at_step(grad_out, t), dh.data_ptr(),
                      at_step(grad_gi, t), at_step(grad_gh, t), d_gh.data_ptr(), valid_at(v, t, B), B, H, stream);
    dh.addmm_(d_gh, w);  // dh [B,H] += d_gh [B,3H] @ W_hh [3H,H]
  }
  return {grad_gi, grad_gh, from_acc(dh, gi)};
}

// ----------------------------------------------------------------------------- LSTM

std::tuple<Tensor, Tensor> lstm_forward_chunk_cuda(const Tensor& gates_in, const Tensor& h0, const Tensor& c0,
                                                   const Tensor& w_hh, const OptTensor& w_hr, const OptTensor& valid,
                                                   Tensor& out, const OptTensor& gates_out, c10::string_view path) {
  const ChunkArgs a = check_lstm_forward_chunk(kCudaKernels, gates_in, h0, c0, w_hh, w_hr, valid, out, gates_out);
  const char* op = a.op;
  const int64_t C = a.steps, B = a.batch, H = a.hidden, P = a.proj;
  const bool* v = a.valid;
  const c10::cuda::CUDAGuard guard(gates_in.device());
  const cudaStream_t stream = current_stream();
  const Dtype dt = dtype_of(gates_in);

  if (runs_persistent(op, path, w_hr.has_value() ? "lstm_proj" : "lstm", dt, B, H) && C > 0) {
    Tensor h_buf = at::empty({2, B, H}, gates_in.options().dtype(at::kFloat));
    h_buf.select(0, 0).copy_(h0);
    Tensor c = c0.to(at::kFloat, false, /*copy=*/true);
    const std::string err =
        persistent_lstm_forward(dt, gates_in.data_ptr(), w_hh.data_ptr(), v, out.data_ptr(), at_step(gates_out, 0),
                                h_buf.data_ptr<float>(), c.data_ptr<float>(), C, B, H, stream);
    TORCH_CHECK(err.empty(), op, ": persistent kernel failed: ", err);
    return {h_buf.select(0, C % 2).to(gates_in.scalar_type(), false, /*copy=*/true), from_acc(c, gates_in)};
  }

  const Tensor w_t = to_acc(w_hh).t();
  Tensor h = fresh_acc(h0), c = fresh_acc(c0);
  Tensor gsum = at::empty({B, 4 * H}, h.options());
  if (!w_hr.has_value()) {
    for (int64_t t = 0; t < C; ++t) {
      mm_into(gsum, h, w_t);
      lstm_forward_step(dt, at_step(gates_in, t), gsum.data_ptr(), c.data_ptr(), h.data_ptr(), at_step(out, t),
                        at_step(gates_out, t), nullptr, valid_at(v, t, B), B, H, stream);
    }
  } else {
    const Tensor w_hr_t = to_acc(*w_hr).t();
    Tensor m = at::empty({B, H}, h.options()), hp = at::empty({B, P}, h.options());
    for (int64_t t = 0; t < C; ++t) {
      mm_into(gsum, h, w_t);
      lstm_forward_step(dt, at_step(gates_in, t), gsum.data_ptr(), c.data_ptr(), nullptr, nullptr,
                        at_step(gates_out, t), m.data_ptr(), valid_at(v, t, B), B, H, stream);
      mm_into(hp, m, w_hr_t);  // h' [B,P] = m [B,H] @ W_hr^T
      masked_state_update(dt, hp.data_ptr(), h.data_ptr(), at_step(out, t), valid_at(v, t, B), B, P, stream);
    }
  }
  return {from_acc(h, gates_in), from_acc(c, gates_in)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_backward_chunk_cuda(const Tensor& gates, const Tensor& c0,
                                                                    const Tensor& w_hh, const OptTensor& w_hr,
                                                                    const Tensor& grad_out, const Tensor& grad_h_n,
                                                                    const Tensor& grad_c_n, const OptTensor& valid,
                                                                    c10::string_view path) {
  const ChunkArgs a = check_lstm_backward_chunk(kCudaKernels, gates, c0, w_hh, w_hr, grad_out, grad_h_n, grad_c_n,
                                                 valid);
  const char* op = a.op;
  const int64_t C = a.steps, B = a.batch, H = a.hidden, P = a.proj;
  const bool* v = a.valid;
  const c10::cuda::CUDAGuard guard(gates.device());
  const cudaStream_t stream = current_stream();
  const Dtype dt = dtype_of(gates);
  const bool proj = w_hr.has_value();

  if (runs_persistent(op, path, proj ? "lstm_proj" : "lstm", dt, B, H) && C > 0) {
    Tensor dh = grad_h_n.to(at::kFloat, false, /*copy=*/true), dc = grad_c_n.to(at::kFloat, false, /*copy=*/true);
    Tensor c_states = at::empty({C + 1, B, H}, dh.options()), d_buf = at::empty({2, B, 4 * H}, dh.options());
    Tensor grad_gates = at::empty_like(gates);
    const std::string err = persistent_lstm_backward(
        dt, gates.data_ptr(), c0.data_ptr(), w_hh.data_ptr(), grad_out.data_ptr(), v, grad_gates.data_ptr(),
        dh.data_ptr<float>(), dc.data_ptr<float>(), c_states.data_ptr<float>(), d_buf.data_ptr<float>(), C, B, H,
        stream);
    TORCH_CHECK(err.empty(), op, ": persistent kernel failed: ", err);
    return {grad_gates, from_acc(dh, gates), from_acc(dc, gates), at::empty({0}, gates.options())};
  }

  const Tensor w = to_acc(w_hh);
  Tensor dh = fresh_acc(grad_h_n), dc = fresh_acc(grad_c_n);
  const auto acc_opts = dh.options();
  // One launch recomputes every cell state of the chunk (and m = o * tanh(c) for W_hr's gradient).
  Tensor c_states = at::empty({C + 1, B, H}, acc_opts);
  Tensor m_all = proj ? at::empty({C, B, H}, acc_opts) : Tensor();
  lstm_cell_scan(dt, gates.data_ptr(), c0.data_ptr(), c_states.data_ptr(), proj ? m_all.data_ptr() : nullptr, v, C,
                 B, H, stream);
  Tensor grad_gates = at::empty_like(gates);
  Tensor d_gates = at::empty({B, 4 * H}, acc_opts);
  Tensor dh_all, dm, w_hr_acc;
  if (proj) {
    dh_all = at::empty({C, B, P}, acc_opts);  // masked dh_t of every step, for W_hr's gradient
    dm = at::empty({B, H}, acc_opts);
    w_hr_acc = to_acc(*w_hr);
  }
  for (int64_t t = C - 1; t >= 0; --t) {
    const bool* v_t = valid_at(v, t, B);
    if (proj) {
      lstm_output_grad(dt, at_step(grad_out, t), dh.data_ptr(), at_step(dh_all, t), v_t, B, P, stream);
      at::mm_out(dm, dh_all.select(0, t), w_hr_acc);  // dm [B,H] = dh_t [B,P] @ W_hr [P,H]
    }
    lstm_backward_step(dt, at_step(gates, t), at_step(c_states, t), at_step(c_states, t + 1),
                       proj ? dm.data_ptr() : nullptr, dh.data_ptr(), at_step(grad_out, t), dc.data_ptr(),
                       at_step(grad_gates, t), d_gates.data_ptr(), v_t, B, H, stream);
    dh.addmm_(d_gates, w);  // dh [B,P] += d_gates [B,4H] @ W_hh [4H,P]
  }
  // grad W_hr [P,H] = sum_t dh_t^T m_t, one product over the chunk (no atomics).
  Tensor grad_w_hr = proj ? from_acc(at::mm(dh_all.view({C * B, P}).t(), m_all.view({C * B, H})), gates)
                          : at::empty({0}, gates.options());
  return {grad_gates, from_acc(dh, gates), from_acc(dc, gates), grad_w_hr};
}

}  // namespace

// Bound in csrc/ops.cpp as fastbptt._C.persistent_decline, for the backend registry.
std::string persistent_decline_for(const std::string& cell, const std::string& dtype, int64_t batch,
                                   int64_t hidden) {
  Dtype dt;
  if (dtype == "float32") {
    dt = Dtype::f32;
  } else if (dtype == "float16") {
    dt = Dtype::f16;
  } else if (dtype == "bfloat16") {
    dt = Dtype::bf16;
  } else if (dtype == "float64") {
    dt = Dtype::f64;
  } else {
    TORCH_CHECK(false, "persistent_decline: dtype must be float32, float16, bfloat16 or float64, got '", dtype, "'");
  }
  TORCH_CHECK(batch >= 1 && hidden >= 1, "persistent_decline: batch and hidden must be positive, got ", batch, " and ",
              hidden);
  return persistent_decline(cell.c_str(), dt, batch, hidden);
}

}  // namespace cuda
}  // namespace fastbptt

TORCH_LIBRARY_IMPL(fastbptt, CUDA, m) {
  m.impl("rnn_forward_chunk", &fastbptt::cuda::rnn_forward_chunk_cuda);
  m.impl("rnn_backward_chunk", &fastbptt::cuda::rnn_backward_chunk_cuda);
  m.impl("gru_forward_chunk", &fastbptt::cuda::gru_forward_chunk_cuda);
  m.impl("gru_backward_chunk", &fastbptt::cuda::gru_backward_chunk_cuda);
  m.impl("lstm_forward_chunk", &fastbptt::cuda::lstm_forward_chunk_cuda);
  m.impl("lstm_backward_chunk", &fastbptt::cuda::lstm_backward_chunk_cuda);
}
