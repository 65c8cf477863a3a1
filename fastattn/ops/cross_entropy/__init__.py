"""Full-catalog cross-entropy with hard or soft targets, never materializing the N×V logits.

Math (the public contract is `fastattn.full_item_cross_entropy`'s docstring). Per row i, with
z_ij = scale·(h_i·E_j + b_j) and a target distribution t_ij = w_i·[j = y_i] + base_i + sparse_ij
(targets.py; hard targets, label smoothing and the TED teacher all have this form) of mass
m_i = Σ_j t_ij (0 for an ignored row):

    loss_i = m_i·LSE_i − Σ_j t_ij z_ij,      LSE_i = log Σ_j exp z_ij
    dz_ij  = scale · (m_i·softmax_ij − base_i − w_i·[j = y_i] − sparse_ij)   (times the row's grad)
    dH = dz E,   dE = dzᵀ H,   db = Σ_i dz_ij

The kernels compute LSE (forward) and the dense + hard-target part of dz (backward, recomputing
the logits tile by tile); the sparse part, cost ∝ its nonzeros, is gathered in function.py.

Files: reference.py (naive, materialized: the tests' truth), targets.py (SoftTarget;
the MQSA-TED teacher that builds one lives with the model), chunked.py (backend "torch": eager ops over item chunks), triton_fwd.py /
triton_bwd.py / triton_backend.py, cpp.py (the C++ operators' binding and fakes), function.py
(the operators `fastattn::full_item_cross_entropy` on the C++ and chunked kernels,
`full_item_cross_entropy_triton` / `_triton_backward` on the Triton ones, and their one autograd).
"""
