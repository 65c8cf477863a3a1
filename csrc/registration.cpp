// Operator schemas and CPU registrations. Fake (meta) implementations live beside the Python
// wrappers (fastattn/ops/*/cpp.py) so torch.compile and torch.library.opcheck can trace them.
#include <torch/extension.h>

#include "ops.h"

TORCH_LIBRARY(fastattn, m) {
  m.def("attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? dom_q, Tensor? dom_k, "
        "float scale, bool causal, float dropout_p, int seed) -> (Tensor, Tensor, Tensor)");
  m.def("attn_bwd(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor lse, Tensor delta, Tensor? grad_acd, "
        "Tensor? key_padding_mask, Tensor? dom_q, Tensor? dom_k, float scale, bool causal, float dropout_p, "
        "int seed) -> (Tensor, Tensor, Tensor)");
  m.def("attn_fwd_streams(Tensor[] q, Tensor[] k, Tensor v, Tensor? key_padding_mask, Tensor? dom_q, "
        "Tensor? dom_k, float scale, bool causal, float dropout_p, int seed) -> (Tensor, Tensor, Tensor)");
  m.def("attn_bwd_streams(Tensor[] q, Tensor[] k, Tensor v, Tensor out, Tensor dout, Tensor lse, Tensor? acd, "
        "Tensor? grad_acd, Tensor? key_padding_mask, Tensor? dom_q, Tensor? dom_k, float scale, bool causal, "
        "float dropout_p, int seed) -> (Tensor[], Tensor[], Tensor)");
  m.def("attn_dropout_rows(int seed, float dropout_p, int lk, int first_row, int num_rows) -> Tensor");
  m.def("ce_lse(Tensor hidden, Tensor weight, Tensor? bias, float scale) -> Tensor");
  m.def("ce_bwd(Tensor hidden, Tensor weight, Tensor? bias, float scale, Tensor lse, Tensor coef_p, "
        "Tensor coef_base, Tensor target, Tensor coef_t) -> (Tensor, Tensor, Tensor)");
  m.def("ce_sparse_gather(Tensor indptr, Tensor indices, Tensor values, Tensor table) -> Tensor");
  m.def("ce_sparse_scatter(Tensor indptr, Tensor indices, Tensor values, Tensor x, int num_items) -> Tensor");
  m.def("topk_items(Tensor hidden, Tensor weight, int k, Tensor? bias, Tensor? exclude) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attn_fwd", &fastattn::attn_fwd);
  m.impl("attn_bwd", &fastattn::attn_bwd);
  m.impl("attn_fwd_streams", &fastattn::attn_fwd_streams);
  m.impl("attn_bwd_streams", &fastattn::attn_bwd_streams);
  m.impl("ce_lse", &fastattn::ce_lse);
  m.impl("ce_bwd", &fastattn::ce_bwd);
  m.impl("ce_sparse_gather", &fastattn::ce_sparse_gather);
  m.impl("ce_sparse_scatter", &fastattn::ce_sparse_scatter);
  m.impl("topk_items", &fastattn::topk_items);
}

// attn_dropout_rows takes no tensor, so it needs a backend-less (CompositeExplicitAutograd) kernel.
TORCH_LIBRARY_IMPL(fastattn, CompositeExplicitAutograd, m) {
  m.impl("attn_dropout_rows", &fastattn::attn_dropout_rows);
}

// Importable as fastattn._C when built by setup.py; loading it registers the operators.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
