"""Decoupled (DIF-SR) attention with the cross-domain mass a_cd: math, reference, kernels, operators.

Math (the public contract is `fastattn.dif_attention`'s docstring). For keys j visible to query i
(j <= i when causal, not padding), streams concatenated as q̂ = [q | qa_1 | …], k̂ = [k | ka_1 | …]:

    S_ij   = scale · q̂_i·k̂_j                 P_i = softmax_j(S_i)   (no visible key: P_i = 0)
    out_i  = Σ_j dropout(P)_ij v_j           acd_i = Σ_j P_ij M_ij,   M_ij = [dom_q(i) ≠ dom_k(j)]

The kernels keep LSE_i = log2 Σ_j exp2(S_ij·log2e) per row and recompute P tile by tile. With the
incoming gradients dO (of out) and g (of acd), and D_i = dO_i·out_i + g_i·acd_i:

    dP = dropout(dO vᵀ)      dS_ij = P_ij · (dP_ij + g_i M_ij − D_i)
    dv = dropout(P)ᵀ dO      dq̂ = scale · dS k̂      dk̂ = scale · dSᵀ q̂

split back into the streams' gradients. Dropout keeps P_ij / (1 − p) where the Philox-4x32-10
draw for (row (b·H + h)·Lq + i, key j) passes, keyed by the call's 64-bit seed (triton_fwd.py
`dropout_keep` gives the counter layout; csrc/attention.cpp draws the same bits).

Files: reference.py (plain torch, materializes the scores: the tests' truth and backend "torch"),
options.py (validated options), triton_fwd.py / triton_bwd.py (kernels and launchers),
triton_backend.py, cpp.py (the C++ operators' binding and fakes), function.py (the operators
`fastattn::dif_attention` / `dif_attention_backward` on the C++ kernels and
`dif_attention_triton` / `dif_attention_triton_backward` on the Triton ones, with one autograd
formula), op.py (backend table).
"""
