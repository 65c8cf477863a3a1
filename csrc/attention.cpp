// Fused decoupled attention on CPU: the algorithm of the Triton kernels
// (fastattn/ops/attention/triton_fwd.py and triton_bwd.py) on blocks of queries × keys.
//
// Work items are (batch·head, query block) in the forward and the dQ pass and (batch·head,
// key block) in the dK/dV pass, spread over threads with at::parallel_for; each item owns the
// rows it writes, so there are no atomics and the result does not depend on the thread count.
// Block products go to BLAS (the sgemm_/dgemm_ that torch links, on the raw arrays); the softmax,
// masking, dropout and a_cd work is done in plain loops over contiguous rows that the compiler vectorizes.
// Scores are kept in base 2 (as in Triton): s = scale·log2(e)·q·k, P = 2^(s − lse).
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "ops.h"

namespace fastattn {
namespace {

constexpr double kLog2e = 1.4426950408889634;
// 64 query rows × 256 keys: a score block of 64 KiB (fp32) stays in L2 while the per-row
// loops run over it, and the BLAS calls are large enough to amortize their dispatch.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 256;

// ------------------------------------------------------------------ dropout RNG
// As `dropout_keep` in triton_fwd.py, so both backends draw identical masks for a seed:
// Philox-4x32-10 exactly as triton.language.random.philox_impl with key (k0, k1) = the call's
// 64-bit seed split in halves; element (R, j) of flat row R = (b·H + h)·Lq + i takes output word
// j % 4 of the 64-bit counter R·⌈Lk/4⌉ + j/4, given as counter words (low, high, 0, 0).

inline uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

inline void philox4x32(uint32_t k0, uint32_t k1, uint64_t counter, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// tl.rand's uint_to_uniform_float for 32 bits, in fp32 as on the GPU.
inline float uniform_from_bits(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// keep[r·bn + c] = 1 iff the probability (flat row row0 + r, key n0 + c) survives dropout; bn <= kBlockN.
void dropout_keep_block(int64_t seed, int64_t row0, int64_t lk, float p, int64_t bm, int64_t n0, int64_t bn,
                        uint8_t* keep) {
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  const int64_t groups = (lk + 3) / 4, g0 = n0 / 4, g1 = (n0 + bn + 3) / 4;
  uint32_t bits[kBlockN + 8];  // the words of counters g0..g1-1: the block plus <= 3 on each side
  for (int64_t r = 0; r < bm; ++r) {
    const uint64_t base = static_cast<uint64_t>(row0 + r) * static_cast<uint64_t>(groups);
    for (int64_t g = g0; g < g1; ++g) philox4x32(k0, k1, base + static_cast<uint64_t>(g), bits + 4 * (g - g0));
    const uint32_t* first = bits + (n0 - 4 * g0);
    uint8_t* row = keep + r * bn;
#pragma omp simd
    for (int64_t c = 0; c < bn; ++c) row[c] = uniform_from_bits(first[c]) >= p;
  }
}

// ------------------------------------------------------------------ math helpers

// 2^x with x = n + f, |f| <= 1/2: 2^f by a degree-7 Taylor series of e^(f·ln2) (error below
// fp32 rounding), 2^n through the exponent bits. Plain arithmetic so the loops vectorize
// (std::exp2 is a library call); 0 below the normal range, hence exactly 0 at -inf.
inline float exp2_fast(float x) {
  const float xc = std::min(std::max(x, -126.0f), 127.0f);
  const float n = (xc + 12582912.0f) - 12582912.0f;  // round to nearest via the 1.5·2^23 trick
  const float y = (xc - n) * 0.69314718055994531f;
  float e = 1.0f / 5040.0f;
  e = e * y + 1.0f / 720.0f;
  e = e * y + 1.0f / 120.0f;
  e = e * y + 1.0f / 24.0f;
  e = e * y + 1.0f / 6.0f;
  e = e * y + 0.5f;
  e = e * y + 1.0f;
  e = e * y + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -126.0f ? 0.0f : e * scale;
}

inline float exp2_of(float x) { return exp2_fast(x); }
inline double exp2_of(double x) { return std::exp2(x); }  // float64: gradcheck needs full accuracy

// Keys [0, len) of a block are at or before the query under the causal mask.
inline int64_t causal_len(bool causal, int64_t i, int64_t n0, int64_t bn) {
  return causal ? std::clamp<int64_t>(i - n0 + 1, 0, bn) : bn;
}

// ------------------------------------------------------------------ block products

// The BLAS that torch links (exported by libtorch_cpu), called directly: at::mm_out on from_blob
// views costs three tensor constructions and a dispatch per block product, which at short
// sequences (one 50×50 block per head) took as long as the product itself.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                         const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                         const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                         const double* a, const int* lda, const double* b, const int* ldb, const double* beta,
                         double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major, densely packed matrices: C (M×N) = op(A)·op(B) + beta·C with op(A) M×K, op(B) K×N;
// A is stored M×K (K×M when trans_a), B is stored K×N (N×K when trans_b). BLAS is column-major,
// so this computes Cᵀ = op(B)ᵀ·op(A)ᵀ on the same memory.
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, const T* b, T beta, T* c) {
  if (m == 0 || n == 0) return;
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int lda = static_cast<int>(trans_b ? k : n);  // B's row length
  const int ldb = static_cast<int>(trans_a ? m : k);  // A's row length
  const int ldc = static_cast<int>(n);
  const T one = T(1);
  const char* tb_blas = trans_b ? "T" : "N";
  const char* ta_blas = trans_a ? "T" : "N";
  if (k == 0) {  // BLAS would leave C untouched only for beta = 1
    for (int64_t i = 0; i < m * n; ++i) c[i] = beta == T(0) ? T(0) : c[i] * beta;
    return;
  }
  fortran_gemm(tb_blas, ta_blas, &im, &in, &ik, &one, b, &lda, a, &ldb, &beta, c, &ldc);
}

template <typename T>
void scale_rows(T* x, int64_t count, T factor) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) x[i] *= factor;
}

// ------------------------------------------------------------------ one call's problem

template <typename T>
struct Problem {
  const T* q;  // (B,H,Lq,DQK) contiguous
  const T* k;  // (B,H,Lk,DQK)
  const T* v;  // (B,H,Lk,DV)
  const bool* pad;  // (B,Lk) or null
  const int64_t* dom_q;  // (B,Lq) or null
  const int64_t* dom_k;  // (B,Lk) or null
  int64_t heads, lq, lk, dqk, dv;
  T qk_scale;  // scale·log2(e)
  bool causal;
  float dropout_p;
  int64_t seed;
};

// Scratch of one thread: a score block and, in the backward, dP, dropout(P) and the keep-mask.
template <typename T>
struct Scratch {
  std::vector<T> s, dp, pd;
  std::vector<uint8_t> keep;
  explicit Scratch(bool backward)
      : s(kBlockM * kBlockN), dp(backward ? kBlockM * kBlockN : 0), pd(backward ? kBlockM * kBlockN : 0),
        keep(kBlockM * kBlockN) {}
};

// s (bm × bn) = base-2 scores of queries [m0, m0+bm) and keys [n0, n0+bn) of head bh, -inf
// where the key is padding or (causal) after the query. Shared by every pass.
template <typename T>
void block_scores(const Problem<T>& pb, int64_t bh, int64_t m0, int64_t bm, int64_t n0, int64_t bn, T* s) {
  const int64_t b = bh / pb.heads;
  gemm_rm<T>(false, true, bm, bn, pb.dqk, pb.q + (bh * pb.lq + m0) * pb.dqk, pb.k + (bh * pb.lk + n0) * pb.dqk,
             T(0), s);
  const bool* pad = pb.pad != nullptr ? pb.pad + b * pb.lk + n0 : nullptr;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < bm; ++r) {
    T* row = s + r * bn;
    const int64_t len = causal_len(pb.causal, m0 + r, n0, bn);
    if (pad != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < bn; ++c) row[c] = (c < len && !pad[c]) ? row[c] * pb.qk_scale : neg_inf;
    } else {
#pragma omp simd
      for (int64_t c = 0; c < bn; ++c) row[c] = c < len ? row[c] * pb.qk_scale : neg_inf;
    }
  }
}

// ------------------------------------------------------------------ forward

// Rows [m0, m0+bm) of head bh: online softmax over key blocks (running max m, sum l and, with
// domains, cross-domain sum c); writes out (acc dtype), lse (base 2, +inf on empty rows), acd.
template <typename T>
void forward_rows(const Problem<T>& pb, int64_t bh, int64_t m0, int64_t bm, T* out, T* lse, T* acd,
                  Scratch<T>& ws) {
  const int64_t b = bh / pb.heads;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<T> m(bm, neg_inf), l(bm, T(0)), c(bm, T(0));
  T* acc = out + (bh * pb.lq + m0) * pb.dv;
  std::fill(acc, acc + bm * pb.dv, T(0));
  const bool dropout = pb.dropout_p > 0.0f;
  // Key blocks entirely after the block's last query are never visible.
  const int64_t hi = pb.causal ? std::min(pb.lk, m0 + bm) : pb.lk;
  for (int64_t n0 = 0; n0 < hi; n0 += kBlockN) {
    const int64_t bn = std::min(kBlockN, hi - n0);
    T* s = ws.s.data();
    block_scores(pb, bh, m0, bm, n0, bn, s);
    if (dropout) dropout_keep_block(pb.seed, bh * pb.lq + m0, pb.lk, pb.dropout_p, bm, n0, bn, ws.keep.data());
    const int64_t* dk = pb.dom_k != nullptr ? pb.dom_k + b * pb.lk + n0 : nullptr;
    for (int64_t r = 0; r < bm; ++r) {
      T* row = s + r * bn;
      T mx = neg_inf;
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < bn; ++j) mx = std::max(mx, row[j]);
      const T m_new = std::max(m[r], mx);
      // A row that has seen no visible key yet keeps m = -inf; shift by 0 so 2^(s-shift) is 0, not NaN.
      const T shift = m_new == neg_inf ? T(0) : m_new;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < bn; ++j) {
        row[j] = exp2_of(row[j] - shift);
        sum += row[j];
      }
      const T alpha = exp2_of(m[r] - shift);
      l[r] = l[r] * alpha + sum;
      if (dk != nullptr) {
        const int64_t dq = pb.dom_q[b * pb.lq + m0 + r];
        T cross = 0;
#pragma omp simd reduction(+ : cross)
        for (int64_t j = 0; j < bn; ++j) cross += dk[j] != dq ? row[j] : T(0);
        c[r] = c[r] * alpha + cross;
      }
      if (dropout) {
        const uint8_t* keep = ws.keep.data() + r * bn;
#pragma omp simd
        for (int64_t j = 0; j < bn; ++j) row[j] = keep[j] ? row[j] : T(0);
      }
      T* acc_row = acc + r * pb.dv;
#pragma omp simd
      for (int64_t d = 0; d < pb.dv; ++d) acc_row[d] *= alpha;
      m[r] = m_new;
    }
    gemm_rm<T>(false, false, bm, pb.dv, bn, s, pb.v + (bh * pb.lk + n0) * pb.dv, T(1), acc);
  }
  const T keep_scale = dropout ? T(1) / (T(1) - T(pb.dropout_p)) : T(1);
  for (int64_t r = 0; r < bm; ++r) {
    const bool empty = l[r] == T(0);
    const T inv_l = T(1) / (empty ? T(1) : l[r]);
    const T f = inv_l * keep_scale;
    T* acc_row = acc + r * pb.dv;
#pragma omp simd
    for (int64_t d = 0; d < pb.dv; ++d) acc_row[d] *= f;
    // +inf on empty rows makes every recomputed probability of the backward exactly 0.
    lse[bh * pb.lq + m0 + r] = empty ? std::numeric_limits<T>::infinity() : m[r] + std::log2(l[r]);
    if (acd != nullptr) acd[bh * pb.lq + m0 + r] = c[r] * inv_l;
  }
}

// ------------------------------------------------------------------ backward

// Row statistics of the backward: lse, delta = rowsum(dO·O) (+ g·acd) and g = grad of acd.
template <typename T>
struct RowStats {
  const T* dout;  // (B,H,Lq,DV)
  const T* lse;
  const T* delta;
  const T* gacd;  // null without an acd term
};

// The block's dS (into ws.s) and, when `want_pd`, dropout(P) (into ws.pd), shared by both passes:
//   P = 2^(s − lse),  dP = dropout(dO Vᵀ),  dS = P · (dP + g·[dom_q ≠ dom_k] − delta).
template <typename T>
void block_grad_scores(const Problem<T>& pb, const RowStats<T>& rs, int64_t bh, int64_t m0, int64_t bm, int64_t n0,
                       int64_t bn, bool want_pd, Scratch<T>& ws) {
  const int64_t b = bh / pb.heads;
  T* s = ws.s.data();
  T* dp = ws.dp.data();
  T* pd = ws.pd.data();
  block_scores(pb, bh, m0, bm, n0, bn, s);
  gemm_rm<T>(false, true, bm, bn, pb.dv, rs.dout + (bh * pb.lq + m0) * pb.dv, pb.v + (bh * pb.lk + n0) * pb.dv,
             T(0), dp);
  const bool dropout = pb.dropout_p > 0.0f;
  if (dropout) dropout_keep_block(pb.seed, bh * pb.lq + m0, pb.lk, pb.dropout_p, bm, n0, bn, ws.keep.data());
  const T inv_keep = dropout ? T(1) / (T(1) - T(pb.dropout_p)) : T(1);
  const int64_t* dk = (rs.gacd != nullptr && pb.dom_k != nullptr) ? pb.dom_k + b * pb.lk + n0 : nullptr;
  for (int64_t r = 0; r < bm; ++r) {
    const int64_t row_id = bh * pb.lq + m0 + r;
    const T lse = rs.lse[row_id];
    const T delta = rs.delta[row_id];
    T* srow = s + r * bn;
    T* dprow = dp + r * bn;
    T* pdrow = pd + r * bn;
    if (dropout) {
      const uint8_t* keep = ws.keep.data() + r * bn;
#pragma omp simd
      for (int64_t j = 0; j < bn; ++j) {
        const T f = keep[j] ? inv_keep : T(0);
        dprow[j] *= f;
        srow[j] = exp2_of(srow[j] - lse);
        pdrow[j] = srow[j] * f;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < bn; ++j) srow[j] = exp2_of(srow[j] - lse);
      if (want_pd) std::copy(srow, srow + bn, pdrow);
    }
    if (dk != nullptr) {
      const T g = rs.gacd[row_id];
      const int64_t dq = pb.dom_q[b * pb.lq + m0 + r];
#pragma omp simd
      for (int64_t j = 0; j < bn; ++j) dprow[j] += dk[j] != dq ? g : T(0);
    }
#pragma omp simd
    for (int64_t j = 0; j < bn; ++j) srow[j] = srow[j] * (dprow[j] - delta);
  }
}

// dK, dV of keys [n0, n0+bn) of head bh, accumulated over every query block that sees them.
template <typename T>
void dkdv_rows(const Problem<T>& pb, const RowStats<T>& rs, int64_t bh, int64_t n0, int64_t bn, T* dk, T* dv,
               Scratch<T>& ws) {
  T* dk_rows = dk + (bh * pb.lk + n0) * pb.dqk;
  T* dv_rows = dv + (bh * pb.lk + n0) * pb.dv;
  std::fill(dk_rows, dk_rows + bn * pb.dqk, T(0));
  std::fill(dv_rows, dv_rows + bn * pb.dv, T(0));
  // Queries before this key block never see it.
  for (int64_t m0 = pb.causal ? n0 : 0; m0 < pb.lq; m0 += kBlockM) {
    const int64_t bm = std::min(kBlockM, pb.lq - m0);
    block_grad_scores(pb, rs, bh, m0, bm, n0, bn, /*want_pd=*/true, ws);
    gemm_rm<T>(true, false, bn, pb.dv, bm, ws.pd.data(), rs.dout + (bh * pb.lq + m0) * pb.dv, T(1), dv_rows);
    gemm_rm<T>(true, false, bn, pb.dqk, bm, ws.s.data(), pb.q + (bh * pb.lq + m0) * pb.dqk, T(1), dk_rows);
  }
  scale_rows(dk_rows, bn * pb.dqk, pb.qk_scale / T(kLog2e));
}

// dQ of queries [m0, m0+bm) of head bh, accumulated over the key blocks they see.
template <typename T>
void dq_rows(const Problem<T>& pb, const RowStats<T>& rs, int64_t bh, int64_t m0, int64_t bm, T* dq, Scratch<T>& ws) {
  T* dq_rows_ptr = dq + (bh * pb.lq + m0) * pb.dqk;
  std::fill(dq_rows_ptr, dq_rows_ptr + bm * pb.dqk, T(0));
  const int64_t hi = pb.causal ? std::min(pb.lk, m0 + bm) : pb.lk;
  for (int64_t n0 = 0; n0 < hi; n0 += kBlockN) {
    const int64_t bn = std::min(kBlockN, hi - n0);
    block_grad_scores(pb, rs, bh, m0, bm, n0, bn, /*want_pd=*/false, ws);
    gemm_rm<T>(false, false, bm, pb.dqk, bn, ws.s.data(), pb.k + (bh * pb.lk + n0) * pb.dqk, T(1), dq_rows_ptr);
  }
  scale_rows(dq_rows_ptr, bm * pb.dqk, pb.qk_scale / T(kLog2e));
}

// Run fn(begin, end) over [0, n) on at::parallel_for's threads, with autograd off inside: the
// BLAS calls on raw views need no graph, and skipping its dispatch keys saves per-call time.
// item_work: multiply-adds of one item; small problems run on the calling thread, where a
// parallel region would cost more than the work (and much more when the cores are busy).
template <typename F>
void parallel_items(int64_t n, int64_t item_work, const F& fn) {
  constexpr int64_t kMinWorkPerThread = int64_t(1) << 18;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(item_work, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    fn(begin, end);
  });
}

// ------------------------------------------------------------------ argument checks

struct Inputs {
  at::Tensor q, k, v, pad, dom_q, dom_k;
  at::ScalarType compute;
};

// Validates the tensors shared by the forward and the backward and converts them to the compute
// dtype (float32 for half/bfloat16/float32, float64 for float64), contiguous.
Inputs prepare_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dom_q,
                      const std::optional<at::Tensor>& dom_k, double dropout_p) {
  TORCH_CHECK(q.dim() == 4, "attn: q must have shape (B, H, Lq, DQK), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "attn: k must have shape (B, H, Lk, DQK), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "attn: v must have shape (B, H, Lk, DV), got ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "attn: q, k and v must be CPU tensors");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "attn: q must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "attn: k and v must have q's dtype ", dt,
              ", got ", k.scalar_type(), " and ", v.scalar_type());
  const int64_t b = q.size(0), h = q.size(1), lq = q.size(2), dqk = q.size(3), lk = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(1) == h && k.size(3) == dqk, "attn: k must have shape (B=", b, ", H=", h,
              ", Lk, DQK=", dqk, "), got ", k.sizes());
  TORCH_CHECK(v.size(0) == b && v.size(1) == h && v.size(2) == lk, "attn: v must have shape (B=", b, ", H=", h,
              ", Lk=", lk, ", DV), got ", v.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attn: dropout_p must be in [0, 1), got ", dropout_p);
  Inputs in;
  in.compute = dt == at::kDouble ? at::kDouble : at::kFloat;
  in.q = q.to(in.compute).contiguous();
  in.k = k.to(in.compute).contiguous();
  in.v = v.to(in.compute).contiguous();
  if (key_padding_mask.has_value()) {
    const auto& pad = *key_padding_mask;
    TORCH_CHECK(pad.scalar_type() == at::kBool, "attn: key_padding_mask must be bool, got ", pad.scalar_type());
    TORCH_CHECK(pad.dim() == 2 && pad.size(0) == b && pad.size(1) == lk,
                "attn: key_padding_mask must have shape (B=", b, ", Lk=", lk, "), got ", pad.sizes());
    TORCH_CHECK(pad.device().is_cpu(), "attn: key_padding_mask must be a CPU tensor");
    in.pad = pad.contiguous();
  }
  TORCH_CHECK(dom_q.has_value() == dom_k.has_value(), "attn: dom_q and dom_k must be given together");
  if (dom_q.has_value()) {
    for (const auto& [name, t, len] : {std::make_tuple("dom_q", *dom_q, lq), std::make_tuple("dom_k", *dom_k, lk)}) {
      TORCH_CHECK(t.scalar_type() == at::kLong, "attn: ", name, " must be int64, got ", t.scalar_type());
      TORCH_CHECK(t.dim() == 2 && t.size(0) == b && t.size(1) == len, "attn: ", name, " must have shape (B=", b,
                  ", L=", len, "), got ", t.sizes());
      TORCH_CHECK(t.device().is_cpu(), "attn: ", name, " must be a CPU tensor");
    }
    in.dom_q = dom_q->contiguous();
    in.dom_k = dom_k->contiguous();
  }
  return in;
}

template <typename T>
Problem<T> make_problem(const Inputs& in, double scale, bool causal, double dropout_p, int64_t seed) {
  Problem<T> pb;
  pb.q = in.q.data_ptr<T>();
  pb.k = in.k.data_ptr<T>();
  pb.v = in.v.data_ptr<T>();
  pb.pad = in.pad.defined() ? in.pad.data_ptr<bool>() : nullptr;
  pb.dom_q = in.dom_q.defined() ? in.dom_q.data_ptr<int64_t>() : nullptr;
  pb.dom_k = in.dom_k.defined() ? in.dom_k.data_ptr<int64_t>() : nullptr;
  pb.heads = in.q.size(1);
  pb.lq = in.q.size(2);
  pb.lk = in.k.size(2);
  pb.dqk = in.q.size(3);
  pb.dv = in.v.size(3);
  pb.qk_scale = static_cast<T>(scale * kLog2e);
  pb.causal = causal;
  pb.dropout_p = static_cast<float>(dropout_p);  // compared in fp32, as Triton's fp32 argument
  pb.seed = seed;
  return pb;
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A per-row (B,H,Lq) input of the backward in the compute dtype, contiguous.
at::Tensor row_input(const at::Tensor& t, const char* name, const at::Tensor& q, at::ScalarType compute) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == q.size(2),
              "attn_bwd: ", name, " must have shape (B, H, Lq) = ", q.sizes().slice(0, 3), ", got ", t.sizes());
  TORCH_CHECK(t.is_floating_point() && t.device().is_cpu(), "attn_bwd: ", name, " must be a floating CPU tensor");
  return t.to(compute).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dom_q,
    const std::optional<at::Tensor>& dom_k, double scale, bool causal, double dropout_p, int64_t seed) {
  const Inputs in = prepare_inputs(q, k, v, key_padding_mask, dom_q, dom_k, dropout_p);
  const int64_t b = q.size(0), h = q.size(1), lq = q.size(2), dv = v.size(3);
  auto opts = q.options().dtype(in.compute);
  at::Tensor out = at::empty({b, h, lq, dv}, opts);
  at::Tensor lse = at::empty({b, h, lq}, opts);
  const bool has_domains = in.dom_q.defined();
  at::Tensor acd = has_domains ? at::empty({b, h, lq}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.compute, "attn_fwd", [&] {
    const Problem<scalar_t> pb = make_problem<scalar_t>(in, scale, causal, dropout_p, seed);
    const int64_t n_mb = cdiv(lq, kBlockM);
    scalar_t* out_p = out.data_ptr<scalar_t>();
    scalar_t* lse_p = lse.data_ptr<scalar_t>();
    scalar_t* acd_p = has_domains ? acd.data_ptr<scalar_t>() : nullptr;
    const int64_t work = std::min(kBlockM, lq) * pb.lk * (pb.dqk + dv);
    parallel_items(b * h * n_mb, work, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> ws(/*backward=*/false);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / n_mb, m0 = (item % n_mb) * kBlockM;
        forward_rows(pb, bh, m0, std::min(kBlockM, lq - m0), out_p, lse_p, acd_p, ws);
      }
    });
  });
  return {out.to(q.scalar_type()), lse, acd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
    const at::Tensor& lse, const at::Tensor& delta, const std::optional<at::Tensor>& grad_acd,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dom_q,
    const std::optional<at::Tensor>& dom_k, double scale, bool causal, double dropout_p, int64_t seed) {
  Inputs in = prepare_inputs(q, k, v, key_padding_mask, dom_q, dom_k, dropout_p);
  const int64_t b = q.size(0), h = q.size(1), lq = q.size(2), lk = k.size(2), dv = v.size(3);
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == b && dout.size(1) == h && dout.size(2) == lq && dout.size(3) == dv,
              "attn_bwd: dout must have shape (B, H, Lq, DV) = (", b, ", ", h, ", ", lq, ", ", dv, "), got ",
              dout.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "attn_bwd: dout must have q's dtype ", q.scalar_type(),
              ", got ", dout.scalar_type());
  at::Tensor dout_c = dout.to(in.compute).contiguous();
  at::Tensor lse_c = row_input(lse, "lse", q, in.compute);
  at::Tensor delta_c = row_input(delta, "delta", q, in.compute);
  // The acd term needs both its gradient and the domains; without either there is none.
  at::Tensor gacd_c;
  if (grad_acd.has_value() && in.dom_q.defined()) gacd_c = row_input(*grad_acd, "grad_acd", q, in.compute);
  at::Tensor dq = at::empty(in.q.sizes(), in.q.options());
  at::Tensor dk = at::empty(in.k.sizes(), in.k.options());
  at::Tensor dvv = at::empty(in.v.sizes(), in.v.options());
  AT_DISPATCH_FLOATING_TYPES(in.compute, "attn_bwd", [&] {
    const Problem<scalar_t> pb = make_problem<scalar_t>(in, scale, causal, dropout_p, seed);
    const RowStats<scalar_t> rs{dout_c.data_ptr<scalar_t>(), lse_c.data_ptr<scalar_t>(), delta_c.data_ptr<scalar_t>(),
                                gacd_c.defined() ? gacd_c.data_ptr<scalar_t>() : nullptr};
    scalar_t* dq_p = dq.data_ptr<scalar_t>();
    scalar_t* dk_p = dk.data_ptr<scalar_t>();
    scalar_t* dv_p = dvv.data_ptr<scalar_t>();
    const int64_t n_nb = cdiv(lk, kBlockN), n_mb = cdiv(lq, kBlockM);
    // Per item, both passes: two block products to recompute P and dP, then two to accumulate.
    const int64_t work = 2 * (pb.dqk + dv);
    parallel_items(b * h * n_nb, work * std::min(kBlockN, lk) * lq, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> ws(/*backward=*/true);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / n_nb, n0 = (item % n_nb) * kBlockN;
        dkdv_rows(pb, rs, bh, n0, std::min(kBlockN, lk - n0), dk_p, dv_p, ws);
      }
    });
    parallel_items(b * h * n_mb, work * std::min(kBlockM, lq) * lk, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> ws(/*backward=*/true);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / n_mb, m0 = (item % n_mb) * kBlockM;
        dq_rows(pb, rs, bh, m0, std::min(kBlockM, lq - m0), dq_p, ws);
      }
    });
  });
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dvv.to(dt)};
}

at::Tensor attn_dropout_rows(int64_t seed, double dropout_p, int64_t lk, int64_t first_row, int64_t num_rows) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attn_dropout_rows: dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(lk >= 0 && first_row >= 0 && num_rows >= 0,
              "attn_dropout_rows: lk, first_row and num_rows must be >= 0, got ", lk, ", ", first_row, ", ", num_rows);
  at::Tensor keep = at::empty({num_rows, lk}, at::TensorOptions().dtype(at::kBool));
  uint8_t* keep_p = reinterpret_cast<uint8_t*>(keep.data_ptr<bool>());
  const float p = static_cast<float>(dropout_p);
  // One work item per row, in key blocks of kBlockN as the kernels draw them.
  at::parallel_for(0, num_rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(lk, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t n0 = 0; n0 < lk; n0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, lk - n0);
        dropout_keep_block(seed, first_row + r, lk, p, 1, n0, bn, keep_p + r * lk + n0);
      }
    }
  });
  return keep;
}

}  // namespace fastattn
