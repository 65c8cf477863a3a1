// C++ CPU kernels of fastattn, registered as torch operators in registration.cpp.
#pragma once

#include <torch/torch.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastattn {

// Decoupled attention on concatenated score streams (see fastattn/ops/attention/function.py).
// q (B,H,Lq,DQK), k (B,H,Lk,DQK), v (B,H,Lk,DV); key_padding_mask (B,Lk) bool; dom_q (B,Lq),
// dom_k (B,Lk) int64. Returns out (B,H,Lq,DV) in q's dtype, lse (B,H,Lq) float32/float64
// (+inf on rows without a visible key) and acd (B,H,Lq) (empty when no domains).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dom_q,
    const std::optional<at::Tensor>& dom_k, double scale, bool causal, double dropout_p, int64_t seed);

// Gradients of the concatenated q, k and v; delta = rowsum(dout·out) (+ grad_acd·acd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
    const at::Tensor& lse, const at::Tensor& delta, const std::optional<at::Tensor>& grad_acd,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dom_q,
    const std::optional<at::Tensor>& dom_k, double scale, bool causal, double dropout_p, int64_t seed);

// The same on a list of score streams (q[f], k[f]) with their own head dims, summed inside one
// softmax without concatenating them; any layout with a contiguous last dim is read in place.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_fwd_streams(
    at::TensorList q, at::TensorList k, const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dom_q, const std::optional<at::Tensor>& dom_k, double scale, bool causal,
    double dropout_p, int64_t seed);

// Gradients of every q[f], k[f] and of v; D_i = rowsum(dout·out) (+ grad_acd·acd) is computed
// inside (acd is required with grad_acd and domains).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> attn_bwd_streams(
    at::TensorList q, at::TensorList k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& dout,
    const at::Tensor& lse, const std::optional<at::Tensor>& acd, const std::optional<at::Tensor>& grad_acd,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dom_q,
    const std::optional<at::Tensor>& dom_k, double scale, bool causal, double dropout_p, int64_t seed);

// Rows [first_row, first_row + num_rows) of the (B·H·Lq, Lk) bool keep-mask the attention kernels
// draw for `seed`, flat row (b·H + h)·Lq + i (it depends on Lk but not on B, H, Lq): tests, debugging.
at::Tensor attn_dropout_rows(int64_t seed, double dropout_p, int64_t lk, int64_t first_row, int64_t num_rows);

// Full-catalog cross-entropy (see fastattn/ops/cross_entropy/function.py).
at::Tensor ce_lse(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, double scale,
    const at::Tensor& lse, const at::Tensor& coef_p, const at::Tensor& coef_base, const at::Tensor& target,
    const at::Tensor& coef_t);
// out (N, C): out[i] = Σ_e values[e]·table[indices[e]] over row i's CSR entries (indptr, indices).
at::Tensor ce_sparse_gather(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                            const at::Tensor& table);
// out (V, C): out[j] = Σ_e values[e]·x[row(e)] over the CSR entries (indptr, indices) with indices[e] = j.
at::Tensor ce_sparse_scatter(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                             const at::Tensor& x, int64_t num_items);
std::tuple<at::Tensor, at::Tensor> topk_items(const at::Tensor& hidden, const at::Tensor& weight, int64_t k,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& exclude);

}  // namespace fastattn
