// Framework-free launch API of the CUDA kernels (no torch headers, so the .cu files compile fast).
//
// Every pointer is device memory, contiguous, row-major. `Dtype` is the tensors' storage type;
// `acc` buffers are float for f32/f16/bf16 and double for f64 (state and GEMM operands are kept
// in the accumulation type, as the reference computes low precision in float32). `valid_t` is
// the [B] bool row of the chunk's mask for one step, or nullptr when every row is valid.
// Shapes: B batch, H hidden, P LSTM output size (P = H without projection), G gates.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

namespace fastbptt {
namespace cuda {

enum class Dtype { f32, f64, f16, bf16 };

inline int dtype_size(Dtype d) { return d == Dtype::f64 ? 8 : (d == Dtype::f32 ? 4 : 2); }

// ------------------------------------------------------------------ standard path, one step each

// h := valid ? act(pre_in_t + gh) : h;  out_t := valid ? that : 0.
//   pre_in_t [B,H] dtype; gh [B,H] acc = h_{t-1} W_hh^T; h [B,H] acc (in place); out_t [B,H] dtype.
void rnn_forward_step(Dtype dt, const void* pre_in_t, const void* gh, void* h, void* out_t, const bool* valid_t,
                      int64_t B, int64_t H, bool relu, cudaStream_t stream);

// d = valid ? (dh + grad_out_t) * act'(out_t) : 0 -> grad_pre_t (dtype) and d_acc (acc);
// dh := valid ? 0 : dh, so that the following `dh += d_acc W_hh` leaves invalid rows unchanged.
void rnn_backward_step(Dtype dt, const void* out_t, const void* grad_out_t, void* dh, void* grad_pre_t, void* d_acc,
                       const bool* valid_t, int64_t B, int64_t H, bool relu, cudaStream_t stream);

// gi_t [B,3H] dtype; gh [B,3H] acc = h_{t-1} W_hh^T (no bias); b_hh [3H] dtype or nullptr;
// h [B,H] acc in place; out_t [B,H] dtype; gh_out_t [B,3H] dtype or nullptr (receives gh + b_hh).
void gru_forward_step(Dtype dt, const void* gi_t, const void* gh, const void* b_hh, void* h, void* out_t,
                      void* gh_out_t, const bool* valid_t, int64_t B, int64_t H, cudaStream_t stream);

// gi_t, gh_t [B,3H] dtype (gh with bias); h_prev_t, grad_out_t [B,H] dtype; dh [B,H] acc in place:
// dh := valid ? (dh + grad_out_t) * z : dh (the direct term; the caller then adds d_gh W_hh).
// Writes grad_gi_t, grad_gh_t [B,3H] dtype and d_gh [B,3H] acc (zero rows where invalid).
void gru_backward_step(Dtype dt, const void* gi_t, const void* gh_t, const void* h_prev_t, const void* grad_out_t,
                       void* dh, void* grad_gi_t, void* grad_gh_t, void* d_gh, const bool* valid_t, int64_t B,
                       int64_t H, cudaStream_t stream);

// gates_in_t [B,4H] dtype; gsum [B,4H] acc = h_{t-1} W_hh^T; c [B,H] acc in place;
// gates_out_t [B,4H] dtype or nullptr. Without projection (m_out == nullptr) updates h [B,H] acc
// and out_t like the RNN; with projection writes m = o * tanh(c') to m_out [B,H] acc and leaves
// h and out_t to `masked_state_update` after the projection product.
void lstm_forward_step(Dtype dt, const void* gates_in_t, const void* gsum, void* c, void* h, void* out_t,
                       void* gates_out_t, void* m_out, const bool* valid_t, int64_t B, int64_t H,
                       cudaStream_t stream);

// h := valid ? src : h; out_t := valid ? src : 0.  src, h [B,N] acc; out_t [B,N] dtype.
void masked_state_update(Dtype dt, const void* src, void* h, void* out_t, const bool* valid_t, int64_t B, int64_t N,
                         cudaStream_t stream);

// One launch for the whole chunk: recomputes the cell states from c0.
//   gates [C,B,4H] dtype; c0 [B,H] dtype; c_states [C+1,B,H] acc (c_states[t] = state step t
//   started from); m [C,B,H] acc or nullptr (receives sigmoid(o) * tanh(c_states[t+1])).
//   valid [C,B] bool or nullptr.
void lstm_cell_scan(Dtype dt, const void* gates, const void* c0, void* c_states, void* m, const bool* valid,
                    int64_t C, int64_t B, int64_t H, cudaStream_t stream);

// Projection only: dh_t := valid ? dh + grad_out_t : 0 (into dh_t [B,P] acc) and dh := valid ? 0 : dh.
void lstm_output_grad(Dtype dt, const void* grad_out_t, void* dh, void* dh_t, const bool* valid_t, int64_t B,
                      int64_t P, cudaStream_t stream);

// gates_t [B,4H] dtype; c_prev, c [B,H] acc (states before / after the step); dc [B,H] acc in place.
// dm [B,H] acc (projection) or nullptr, in which case dm = valid ? dh + grad_out_t : 0 and
// dh := valid ? 0 : dh (P == H). Writes grad_gates_t [B,4H] dtype and d_gates [B,4H] acc.
void lstm_backward_step(Dtype dt, const void* gates_t, const void* c_prev, const void* c, const void* dm, void* dh,
                        const void* grad_out_t, void* dc, void* grad_gates_t, void* d_gates, const bool* valid_t,
                        int64_t B, int64_t H, cudaStream_t stream);

// ------------------------------------------------------------------ persistent path (one launch per chunk)

// Why the persistent GRU kernels cannot take this case on the current device, or "" if they can.
std::string persistent_gru_decline(Dtype dt, int64_t B, int64_t H);

// GRU forward over a chunk. gi [C,B,3H], w_hh [3H,H], b_hh [3H] or nullptr, out [C,B,H],
// gh_out [C,B,3H] or nullptr: dtype. valid [C,B] or nullptr. h_buf [2,B,H] float scratch with
// h_buf[0] = h0; the final state is left in h_buf[C % 2]. Returns "" or the decline reason.
std::string persistent_gru_forward(Dtype dt, const void* gi, const void* w_hh, const void* b_hh, const bool* valid,
                                   void* out, void* gh_out, float* h_buf, int64_t C, int64_t B, int64_t H,
                                   cudaStream_t stream);

// GRU backward over a chunk. gi, gh, grad_gi, grad_gh [C,B,3H]; h_prev, grad_out [C,B,H]; w_hh [3H,H]:
// dtype. dh [B,H] float in/out (grad_h_n in, grad_h0 out); dgh_buf [2,B,3H] float scratch.
std::string persistent_gru_backward(Dtype dt, const void* gi, const void* gh, const void* h_prev, const void* w_hh,
                                    const void* grad_out, const bool* valid, void* grad_gi, void* grad_gh, float* dh,
                                    float* dgh_buf, int64_t C, int64_t B, int64_t H, cudaStream_t stream);

// Why the persistent LSTM kernels (no projection) cannot take this case, or "" if they can.
std::string persistent_lstm_decline(Dtype dt, int64_t B, int64_t H);

// LSTM forward over a chunk, P == H. gates_in, gates_out (or nullptr) [C,B,4H], w_hh [4H,H],
// out [C,B,H]: dtype. h_buf [2,B,H] float scratch with h_buf[0] = h0 (final state left in
// h_buf[C % 2]); c [B,H] float, c0 in and c_n out.
std::string persistent_lstm_forward(Dtype dt, const void* gates_in, const void* w_hh, const bool* valid, void* out,
                                    void* gates_out, float* h_buf, float* c, int64_t C, int64_t B, int64_t H,
                                    cudaStream_t stream);

// LSTM backward over a chunk, P == H. gates, grad_gates [C,B,4H]; c0 [B,H]; w_hh [4H,H];
// grad_out [C,B,H]: dtype. dh, dc [B,H] float in/out (final-state gradients in, initial out);
// c_states [C+1,B,H] and d_buf [2,B,4H] float scratch.
std::string persistent_lstm_backward(Dtype dt, const void* gates, const void* c0, const void* w_hh,
                                     const void* grad_out, const bool* valid, void* grad_gates, float* dh, float* dc,
                                     float* c_states, float* d_buf, int64_t C, int64_t B, int64_t H,
                                     cudaStream_t stream);

}  // namespace cuda
}  // namespace fastbptt
