// Fused decoupled attention on CPU: the algorithm of the Triton kernels
// (fastattn/ops/attention/triton_fwd.py and triton_bwd.py), on two paths:
//
// - up to Lq·Lk = kShortMaxScores ("short sequences", below): a work item is a whole
//   (batch·head), its score matrix built by one GEMM per score stream straight from the
//   (possibly strided) inputs, an exact softmax, and one backward pass for dQ, dK and dV;
// - above it, blocks of queries × keys: work items are (batch·head, query block) in the forward
//   and the dQ pass and (batch·head, key block) in the dK/dV pass, on the concatenated streams.
//
// Items are spread over threads with at::parallel_for; each owns the rows it writes, so there
// are no atomics and the result does not depend on the thread count. Products go to BLAS (the
// sgemm_/dgemm_ that torch links, on the raw arrays); the softmax, masking, dropout and a_cd
// work is done in plain loops over contiguous rows that the compiler vectorizes.
// Scores are kept in base 2 (as in Triton): s = scale·log2(e)·q·k, P = 2^(s − lse).
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

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

// tl.rand's uint_to_uniform_float for 32 bits, in fp32 as on the GPU.
inline float uniform_from_bits(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// bits[4·i + w] = word w of Philox(key, counter c0 + i) for i in [0, n), computed for whole
// blocks of kPhiloxLanes counters: bits must hold 4·(n rounded up to kPhiloxLanes) words. One
// counter at a time costs ~10 dependent multiplies per 4 words, which made the RNG the largest part
// of a short-sequence call with dropout; the compiler's own vectorization of the loop below does
// full 64×64-bit products (~6 ns per counter here), so AVX-512 and AVX2 have intrinsics versions
// (32×32→64 even/odd products, ~2.4 and ~4 ns), picked at run time. All give the same bits.
constexpr int64_t kPhiloxLanes = 16;

void philox_words_generic(uint32_t k0, uint32_t k1, uint64_t c0, int64_t n, uint32_t* bits) {
  for (int64_t i0 = 0; i0 < n; i0 += kPhiloxLanes) {
    uint32_t x0[kPhiloxLanes], x1[kPhiloxLanes], x2[kPhiloxLanes], x3[kPhiloxLanes];
    for (int64_t i = 0; i < kPhiloxLanes; ++i) {
      const uint64_t c = c0 + static_cast<uint64_t>(i0 + i);
      x0[i] = static_cast<uint32_t>(c); x1[i] = static_cast<uint32_t>(c >> 32); x2[i] = 0; x3[i] = 0;
    }
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      for (int64_t i = 0; i < kPhiloxLanes; ++i) {
        const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * x0[i];
        const uint64_t p2 = static_cast<uint64_t>(0xCD9E8D57u) * x2[i];
        const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ x1[i] ^ key0;
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ x3[i] ^ key1;
        x1[i] = static_cast<uint32_t>(p2); x3[i] = static_cast<uint32_t>(p0); x0[i] = n0; x2[i] = n2;
      }
      key0 += 0x9E3779B9u; key1 += 0xBB67AE85u;
    }
    for (int64_t i = 0; i < kPhiloxLanes; ++i) {
      uint32_t* o = bits + 4 * (i0 + i);
      o[0] = x0[i]; o[1] = x1[i]; o[2] = x2[i]; o[3] = x3[i];
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTATTN_X86_DISPATCH 1
__attribute__((target("avx512f"), noinline)) void philox_words_avx512(uint32_t k0, uint32_t k1, uint64_t c0,
                                                                     int64_t n, uint32_t* bits) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m2 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i step_lo = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i step_hi = _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15);
  const __mmask16 odd = 0xAAAA;
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const __m512i base = _mm512_set1_epi64(static_cast<long long>(c0 + static_cast<uint64_t>(i0)));
    const __m512i ca = _mm512_add_epi64(base, step_lo), cb = _mm512_add_epi64(base, step_hi);
    __m512i x0 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(ca)), _mm512_cvtepi64_epi32(cb), 1);
    __m512i x1 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_srli_epi64(ca, 32))),
                                    _mm512_cvtepi64_epi32(_mm512_srli_epi64(cb, 32)), 1);
    __m512i x2 = _mm512_setzero_si512(), x3 = _mm512_setzero_si512();
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      const __m512i e0 = _mm512_mul_epu32(x0, m0), o0 = _mm512_mul_epu32(_mm512_srli_epi64(x0, 32), m0);
      const __m512i e2 = _mm512_mul_epu32(x2, m2), o2 = _mm512_mul_epu32(_mm512_srli_epi64(x2, 32), m2);
      const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(e0, 32), o0);
      const __m512i lo0 = _mm512_mask_blend_epi32(odd, e0, _mm512_slli_epi64(o0, 32));
      const __m512i hi2 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(e2, 32), o2);
      const __m512i lo2 = _mm512_mask_blend_epi32(odd, e2, _mm512_slli_epi64(o2, 32));
      const __m512i n0 = _mm512_ternarylogic_epi32(hi2, x1, _mm512_set1_epi32(static_cast<int>(key0)), 0x96);
      const __m512i n2 = _mm512_ternarylogic_epi32(hi0, x3, _mm512_set1_epi32(static_cast<int>(key1)), 0x96);
      x1 = lo2; x3 = lo0; x0 = n0; x2 = n2;
      key0 += 0x9E3779B9u; key1 += 0xBB67AE85u;
    }
    // x0..x3 (word w of counters 0..15) → 16 counters of 4 consecutive words
    const __m512i a = _mm512_unpacklo_epi32(x0, x1), b = _mm512_unpacklo_epi32(x2, x3);
    const __m512i c = _mm512_unpackhi_epi32(x0, x1), d = _mm512_unpackhi_epi32(x2, x3);
    const __m512i r0 = _mm512_unpacklo_epi64(a, b), r1 = _mm512_unpackhi_epi64(a, b);
    const __m512i r2 = _mm512_unpacklo_epi64(c, d), r3 = _mm512_unpackhi_epi64(c, d);
    const __m512i t0 = _mm512_shuffle_i32x4(r0, r1, 0x44), t1 = _mm512_shuffle_i32x4(r2, r3, 0x44);
    const __m512i t2 = _mm512_shuffle_i32x4(r0, r1, 0xEE), t3 = _mm512_shuffle_i32x4(r2, r3, 0xEE);
    uint32_t* o = bits + 4 * i0;
    _mm512_storeu_si512(o, _mm512_shuffle_i32x4(t0, t1, 0x88));
    _mm512_storeu_si512(o + 16, _mm512_shuffle_i32x4(t0, t1, 0xDD));
    _mm512_storeu_si512(o + 32, _mm512_shuffle_i32x4(t2, t3, 0x88));
    _mm512_storeu_si512(o + 48, _mm512_shuffle_i32x4(t2, t3, 0xDD));
  }
}

__attribute__((target("avx2"), noinline)) void philox_words_avx2(uint32_t k0, uint32_t k1, uint64_t c0, int64_t n,
                                                                 uint32_t* bits) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m2 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    alignas(32) uint32_t lo[8], hi[8];
    for (int i = 0; i < 8; ++i) {
      const uint64_t c = c0 + static_cast<uint64_t>(i0 + i);
      lo[i] = static_cast<uint32_t>(c);
      hi[i] = static_cast<uint32_t>(c >> 32);
    }
    __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    __m256i x2 = _mm256_setzero_si256(), x3 = _mm256_setzero_si256();
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      const __m256i e0 = _mm256_mul_epu32(x0, m0), o0 = _mm256_mul_epu32(_mm256_srli_epi64(x0, 32), m0);
      const __m256i e2 = _mm256_mul_epu32(x2, m2), o2 = _mm256_mul_epu32(_mm256_srli_epi64(x2, 32), m2);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
      const __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
      const __m256i hi2 = _mm256_blend_epi32(_mm256_srli_epi64(e2, 32), o2, 0xAA);
      const __m256i lo2 = _mm256_blend_epi32(e2, _mm256_slli_epi64(o2, 32), 0xAA);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi2, x1), _mm256_set1_epi32(static_cast<int>(key0)));
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(static_cast<int>(key1)));
      x1 = lo2; x3 = lo0; x0 = n0; x2 = n2;
      key0 += 0x9E3779B9u; key1 += 0xBB67AE85u;
    }
    const __m256i a = _mm256_unpacklo_epi32(x0, x1), b = _mm256_unpacklo_epi32(x2, x3);
    const __m256i c = _mm256_unpackhi_epi32(x0, x1), d = _mm256_unpackhi_epi32(x2, x3);
    const __m256i r0 = _mm256_unpacklo_epi64(a, b), r1 = _mm256_unpackhi_epi64(a, b);
    const __m256i r2 = _mm256_unpacklo_epi64(c, d), r3 = _mm256_unpackhi_epi64(c, d);
    // 128-bit lane 0 of r_g = group g, lane 1 = group 4 + g
    uint32_t* o = bits + 4 * i0;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permute2x128_si256(r0, r1, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), _mm256_permute2x128_si256(r2, r3, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), _mm256_permute2x128_si256(r0, r1, 0x31));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 24), _mm256_permute2x128_si256(r2, r3, 0x31));
  }
}
#endif

inline void philox_words(uint32_t k0, uint32_t k1, uint64_t c0, int64_t n, uint32_t* bits) {
#ifdef FASTATTN_X86_DISPATCH
  static const int isa = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
  if (isa == 2) {  // a tail of <= 8 counters (most rows of a short causal call) in 8 lanes, not 16
    const int64_t head = n % 16 != 0 && n % 16 <= 8 ? n - n % 16 : n;
    if (head > 0) philox_words_avx512(k0, k1, c0, head, bits);
    if (head < n) philox_words_avx2(k0, k1, c0 + static_cast<uint64_t>(head), n - head, bits + 4 * head);
    return;
  }
  if (isa == 1) return philox_words_avx2(k0, k1, c0, n, bits);
#endif
  philox_words_generic(k0, k1, c0, n, bits);
}

// The random words of keys [n0, n0 + bn) of flat row `row`: the returned pointer's [c] is key
// n0 + c's (bits: scratch of philox_scratch_words(bn) words).
inline const uint32_t* dropout_row_bits(uint32_t k0, uint32_t k1, int64_t row, int64_t lk, int64_t n0, int64_t bn,
                                        uint32_t* bits) {
  const int64_t groups = (lk + 3) / 4, g0 = n0 / 4, g1 = (n0 + bn + 3) / 4;
  philox_words(k0, k1, static_cast<uint64_t>(row) * static_cast<uint64_t>(groups) + static_cast<uint64_t>(g0),
               g1 - g0, bits);
  return bits + (n0 - 4 * g0);
}

// Whether the probability whose random word is `bits` survives dropout with probability p.
inline bool kept(uint32_t bits, float p) { return uniform_from_bits(bits) >= p; }

// keep[c] for keys c in [n0, n0 + bn) of flat row `row`.
inline void dropout_keep_row(uint32_t k0, uint32_t k1, int64_t row, int64_t lk, float p, int64_t n0, int64_t bn,
                             uint32_t* bits, uint8_t* keep) {
  const uint32_t* first = dropout_row_bits(k0, k1, row, lk, n0, bn, bits);
#pragma omp simd
  for (int64_t c = 0; c < bn; ++c) keep[c] = kept(first[c], p);
}

// Words of `bits` for dropout_keep_row over bn keys: the groups it spans, rounded up to whole blocks.
inline int64_t philox_scratch_words(int64_t bn) { return 4 * ((bn + 3) / 4 + 1 + kPhiloxLanes); }

// keep[r·bn + c] = 1 iff the probability (flat row row0 + r, key n0 + c) survives dropout; bn <= kBlockN.
void dropout_keep_block(int64_t seed, int64_t row0, int64_t lk, float p, int64_t bm, int64_t n0, int64_t bn,
                        uint8_t* keep) {
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  uint32_t bits[4 * ((kBlockN + 3) / 4 + 1 + kPhiloxLanes)];
  for (int64_t r = 0; r < bm; ++r) dropout_keep_row(k0, k1, row0 + r, lk, p, n0, bn, bits, keep + r * bn);
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

// Row-major matrices: C (M×N) = alpha·op(A)·op(B) + beta·C with op(A) M×K, op(B) K×N; A is stored
// M×K (K×M when trans_a) with rows lda apart, B is stored K×N (N×K when trans_b) with rows ldb
// apart, C's rows are ldc apart. BLAS is column-major, so this computes Cᵀ = op(B)ᵀ·op(A)ᵀ on the
// same memory. Leading dims let the short path read strided (B, H, L, D) views without a copy.
template <typename T>
void gemm_ld(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
             const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS would leave C untouched only for beta = 1
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : c[i * ldc + j] * beta;
    return;
  }
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  // BLAS requires a leading dim >= the stored row length (and >= 1) even where one row is read.
  const int ila = static_cast<int>(std::max<int64_t>(ldb, trans_b ? k : n));
  const int ilb = static_cast<int>(std::max<int64_t>(lda, trans_a ? m : k));
  const int ilc = static_cast<int>(std::max<int64_t>(ldc, n));
  fortran_gemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &im, &in, &ik, &alpha, b, &ila, a, &ilb, &beta, c, &ilc);
}

// Densely packed operands (row length = their column count).
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, const T* b, T beta, T* c) {
  gemm_ld<T>(trans_a, trans_b, m, n, k, T(1), a, trans_a ? m : k, b, trans_b ? k : n, beta, c, n);
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

// ------------------------------------------------------------------ short sequences
// Up to kShortMaxScores scores per (batch, head), a work item is a whole (batch, head) and a
// task several of them: the Lq×Lk score matrix stays in cache, the softmax is exact (one pass, no
// online rescaling), each score stream adds its own GEMM into the same scores (no concatenated
// copy of the streams), operands are read through their strides (no copy of the (B, L, 3, H, D)
// projections' views), and the backward computes P, dP and dS once for dQ, dK and dV together
// (the blocked path recomputes them in each of its two passes) with whole-matrix GEMMs.
// Crossover against the blocked path, fwd+bwd fp32 on the 2-core Xeon (docs/benchmarks.md): the
// whole-matrix path is 1.75× faster at L = 512 and 1.3× at L = 1024 (1 thread; 1.45× and 1.17× on
// 2), so it takes every self attention up to L = 1024. Its scratch is one (forward) or two
// (backward) Lq×Lk matrices per thread: at most 4 and 8 MiB in fp32, not torch allocations.
constexpr int64_t kShortMaxScores = 1024 * 1024;

// A (B, H, L, D) operand with a contiguous last dim; rows sl elements apart.
template <typename T>
struct View {
  const T* p = nullptr;
  int64_t sb = 0, sh = 0, sl = 0, d = 0;
  const T* at(int64_t b, int64_t h) const { return p + b * sb + h * sh; }
};

template <typename T>
View<T> view_of(const at::Tensor& t) {
  return View<T>{t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.size(3)};
}

template <typename T>
struct ShortProblem {
  std::vector<View<T>> qs, ks;  // the score streams, one GEMM each
  View<T> v;
  const bool* pad;       // (B,Lk) or null
  const int64_t* dom_q;  // (B,Lq) or null
  const int64_t* dom_k;  // (B,Lk) or null
  int64_t heads, lq, lk, dv;
  T qk_scale;  // scale·log2(e)
  T scale;
  bool causal;
  float dropout_p;
  uint32_t k0, k1;  // the Philox key: the seed's halves
};

template <typename T>
struct ShortScratch {
  // 64-byte aligned: BLAS may take another summation order for another alignment of an operand,
  // and the scratch of a task must not make the result depend on which thread ran it.
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  template <typename U>
  static std::unique_ptr<U[], Free> aligned(int64_t n) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(U) + 63) / 64 * 64;
    U* p = static_cast<U*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(p != nullptr, "attn: cannot allocate ", bytes, " bytes of scratch");
    return std::unique_ptr<U[], Free>(p);
  }
  std::unique_ptr<T[], Free> s_, dp_;
  std::unique_ptr<uint32_t[], Free> bits_;  // one row's dropout words
  ShortScratch(int64_t lq, int64_t lk, bool backward)
      : s_(aligned<T>(lq * lk)), dp_(backward ? aligned<T>(lq * lk) : nullptr),
        bits_(aligned<uint32_t>(philox_scratch_words(lk))) {}
  T* s() { return s_.get(); }
  T* dp() { return dp_.get(); }
  uint32_t* bits() { return bits_.get(); }
};

// s (Lq × Lk, dense) = Σ_f Q_f K_fᵀ of pair (b, h): raw dot products, one GEMM per stream.
template <typename T>
void short_scores(const ShortProblem<T>& pb, int64_t b, int64_t h, T* s) {
  for (size_t f = 0; f < pb.qs.size(); ++f) {
    const View<T>& q = pb.qs[f];
    const View<T>& k = pb.ks[f];
    gemm_ld<T>(false, true, pb.lq, pb.lk, q.d, T(1), q.at(b, h), q.sl, k.at(b, h), k.sl, f == 0 ? T(0) : T(1), s,
               pb.lk);
  }
}

// Pair (b, h): out (contiguous (B,H,Lq,Dv)), lse (base 2, +inf on empty rows), acd.
template <typename T>
void short_forward_pair(const ShortProblem<T>& pb, int64_t b, int64_t h, T* out, T* lse, T* acd,
                        ShortScratch<T>& ws) {
  const int64_t lq = pb.lq, lk = pb.lk, bh = b * pb.heads + h;
  T* s = ws.s();
  short_scores(pb, b, h, s);
  const bool* pad = pb.pad != nullptr ? pb.pad + b * lk : nullptr;
  const int64_t* dk = pb.dom_k != nullptr ? pb.dom_k + b * lk : nullptr;
  const bool dropout = pb.dropout_p > 0.0f;
  const T keep_scale = dropout ? T(1) / (T(1) - T(pb.dropout_p)) : T(1);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const T qs = pb.qk_scale;
  for (int64_t r = 0; r < lq; ++r) {
    T* row = s + r * lk;
    const int64_t len = causal_len(pb.causal, r, 0, lk), row_id = bh * lq + r;
    T mx = neg_inf;
    if (pad != nullptr) {
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < len; ++j) {
        const T x = pad[j] ? neg_inf : row[j] * qs;
        row[j] = x;
        mx = std::max(mx, x);
      }
    } else {
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < len; ++j) {
        const T x = row[j] * qs;
        row[j] = x;
        mx = std::max(mx, x);
      }
    }
    std::fill(row + len, row + lk, T(0));
    // No visible key: shift by 0 so every 2^(s - shift) is 0 (not NaN) and the sum is 0. A NaN
    // score is not a maximum but makes the sum NaN, so it still reaches its row's output.
    const T shift = mx == neg_inf ? T(0) : mx;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; ++j) {
      row[j] = exp2_of(row[j] - shift);
      sum += row[j];
    }
    if (sum == T(0)) {  // P = 0, and +inf makes the backward's P exactly 0
      lse[row_id] = std::numeric_limits<T>::infinity();
      if (acd != nullptr) acd[row_id] = T(0);
      continue;
    }
    lse[row_id] = shift + std::log2(sum);
    const T inv_l = T(1) / sum;
    if (acd != nullptr) {
      const int64_t dq = pb.dom_q[b * lq + r];
      T cross = 0;
#pragma omp simd reduction(+ : cross)
      for (int64_t j = 0; j < len; ++j) cross += dk[j] != dq ? row[j] : T(0);
      acd[row_id] = cross * inv_l;
    }
    const T f = inv_l * keep_scale;
    if (dropout) {
      const uint32_t* bits = dropout_row_bits(pb.k0, pb.k1, row_id, lk, 0, len, ws.bits());
      const float p = pb.dropout_p;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) row[j] = kept(bits[j], p) ? row[j] * f : T(0);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) row[j] *= f;
    }
  }
  gemm_ld<T>(false, false, lq, pb.dv, lk, T(1), s, lk, pb.v.at(b, h), pb.v.sl, T(0), out + bh * lq * pb.dv, pb.dv);
}

// What the short backward reads per row besides the problem.
template <typename T>
struct ShortGrads {
  View<T> dout, out;  // out: only read when delta is null
  const T* lse;
  const T* delta;  // (B,H,Lq) rowsum(dO·O) + g·acd, or null: computed here from dout, out, acd
  const T* acd;    // with gacd: the forward's acd
  const T* gacd;   // null without an acd term
};

// Pair (b, h): P, dP and dS once, then dV = dropout(P)ᵀ dO, dQ_f = scale·dS K_f, dK_f = scale·dSᵀ Q_f
// straight into the contiguous gradients.
template <typename T>
void short_backward_pair(const ShortProblem<T>& pb, const ShortGrads<T>& gr, int64_t b, int64_t h,
                         const std::vector<T*>& dqs, const std::vector<T*>& dks, T* dv, ShortScratch<T>& ws) {
  const int64_t lq = pb.lq, lk = pb.lk, bh = b * pb.heads + h;
  T* s = ws.s();
  T* dp = ws.dp();
  short_scores(pb, b, h, s);
  const T* dout = gr.dout.at(b, h);
  gemm_ld<T>(false, true, lq, lk, pb.dv, T(1), dout, gr.dout.sl, pb.v.at(b, h), pb.v.sl, T(0), dp, lk);
  const bool* pad = pb.pad != nullptr ? pb.pad + b * lk : nullptr;
  const int64_t* dk = (gr.gacd != nullptr && pb.dom_k != nullptr) ? pb.dom_k + b * lk : nullptr;
  const bool dropout = pb.dropout_p > 0.0f;
  const T inv_keep = dropout ? T(1) / (T(1) - T(pb.dropout_p)) : T(1);
  // dS carries the scale of dQ = scale·dS K and dK = scale·dSᵀ Q, so those GEMMs run with alpha = 1:
  // with alpha != 1, MKL's sgemm rounded dK differently inside and outside a parallel region, which
  // made the result depend on the thread count.
  const T qs = pb.qk_scale, sc = pb.scale;
  const T* out = gr.delta == nullptr ? gr.out.at(b, h) : nullptr;
  for (int64_t r = 0; r < lq; ++r) {
    T* srow = s + r * lk;
    T* dprow = dp + r * lk;
    const int64_t row_id = bh * lq + r;
    const T lse = gr.lse[row_id];
    const int64_t len = lse == std::numeric_limits<T>::infinity() ? 0 : causal_len(pb.causal, r, 0, lk);
    std::fill(srow + len, srow + lk, T(0));
    std::fill(dprow + len, dprow + lk, T(0));
    if (len == 0) continue;
    const T g = gr.gacd != nullptr ? gr.gacd[row_id] : T(0);
    T delta;
    if (gr.delta != nullptr) {
      delta = gr.delta[row_id];
    } else {
      const T* o = out + r * gr.out.sl;
      const T* d = dout + r * gr.dout.sl;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < pb.dv; ++c) dot += o[c] * d[c];
      delta = dot + (gr.gacd != nullptr && gr.acd != nullptr ? g * gr.acd[row_id] : T(0));
    }
    const int64_t dq = dk != nullptr ? pb.dom_q[b * lq + r] : 0;
    if (dropout) {
      const uint32_t* bits = dropout_row_bits(pb.k0, pb.k1, row_id, lk, 0, len, ws.bits());
      const float pd = pb.dropout_p;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const T f = kept(bits[j], pd) ? inv_keep : T(0);
        const T p = (pad == nullptr || !pad[j]) ? exp2_of(srow[j] * qs - lse) : T(0);
        const T dpj = dprow[j] * f + (dk != nullptr && dk[j] != dq ? g : T(0));
        srow[j] = p * (dpj - delta) * sc;
        dprow[j] = p * f;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const T p = (pad == nullptr || !pad[j]) ? exp2_of(srow[j] * qs - lse) : T(0);
        const T dpj = dprow[j] + (dk != nullptr && dk[j] != dq ? g : T(0));
        srow[j] = p * (dpj - delta) * sc;
        dprow[j] = p;
      }
    }
  }
  gemm_ld<T>(true, false, lk, pb.dv, lq, T(1), dp, lk, dout, gr.dout.sl, T(0), dv + bh * lk * pb.dv, pb.dv);
  for (size_t f = 0; f < pb.qs.size(); ++f) {
    const View<T>& q = pb.qs[f];
    const View<T>& k = pb.ks[f];
    gemm_ld<T>(false, false, lq, q.d, lk, T(1), s, lk, k.at(b, h), k.sl, T(0), dqs[f] + bh * lq * q.d, q.d);
    gemm_ld<T>(true, false, lk, q.d, lq, T(1), s, lk, q.at(b, h), q.sl, T(0), dks[f] + bh * lk * q.d, q.d);
  }
}

// Items [begin, end) (item = b·H + h) with one scratch.
template <typename T>
void short_forward_items(const ShortProblem<T>& pb, int64_t begin, int64_t end, T* out, T* lse, T* acd) {
  ShortScratch<T> ws(pb.lq, pb.lk, /*backward=*/false);
  for (int64_t item = begin; item < end; ++item)
    short_forward_pair(pb, item / pb.heads, item % pb.heads, out, lse, acd, ws);
}

template <typename T>
void short_backward_items(const ShortProblem<T>& pb, const ShortGrads<T>& gr, int64_t begin, int64_t end,
                          const std::vector<T*>& dqs, const std::vector<T*>& dks, T* dv) {
  ShortScratch<T> ws(pb.lq, pb.lk, /*backward=*/true);
  for (int64_t item = begin; item < end; ++item)
    short_backward_pair(pb, gr, item / pb.heads, item % pb.heads, dqs, dks, dv, ws);
}

// float32 items compiled for AVX-512, AVX2 and baseline x86-64, the best picked once at load time
// (an ifunc): the build flags (setup.py, -O3 only) target baseline x86-64, whose 4-lane SSE left the
// row loops (exp2, masks, the Philox lanes of dropout) a large part of a short-sequence call.
// `flatten` inlines the loops' helpers into each clone so they get its ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTATTN_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), flatten))
#else
#define FASTATTN_SIMD_CLONES
#endif

FASTATTN_SIMD_CLONES void short_forward_items_f32(const ShortProblem<float>& pb, int64_t begin, int64_t end,
                                                  float* out, float* lse, float* acd) {
  short_forward_items<float>(pb, begin, end, out, lse, acd);
}

FASTATTN_SIMD_CLONES void short_backward_items_f32(const ShortProblem<float>& pb, const ShortGrads<float>& gr,
                                                   int64_t begin, int64_t end, const std::vector<float*>& dqs,
                                                   const std::vector<float*>& dks, float* dv) {
  short_backward_items<float>(pb, gr, begin, end, dqs, dks, dv);
}

template <typename T>
void run_short_forward(const ShortProblem<T>& pb, int64_t begin, int64_t end, T* out, T* lse, T* acd) {
  if constexpr (std::is_same_v<T, float>) {
    short_forward_items_f32(pb, begin, end, out, lse, acd);
  } else {
    short_forward_items<T>(pb, begin, end, out, lse, acd);
  }
}

template <typename T>
void run_short_backward(const ShortProblem<T>& pb, const ShortGrads<T>& gr, int64_t begin, int64_t end,
                        const std::vector<T*>& dqs, const std::vector<T*>& dks, T* dv) {
  if constexpr (std::is_same_v<T, float>) {
    short_backward_items_f32(pb, gr, begin, end, dqs, dks, dv);
  } else {
    short_backward_items<T>(pb, gr, begin, end, dqs, dks, dv);
  }
}

// ------------------------------------------------------------------ argument checks

// The blocked path's inputs: one (concatenated) stream, contiguous, in the compute dtype.
struct Inputs {
  at::Tensor q, k, v, pad, dom_q, dom_k;
  at::ScalarType compute;
};

// The score streams and the tensors shared by forward and backward, validated, in the compute
// dtype (float32 for half/bfloat16/float32, float64 for float64). The streams keep their layout
// when it can be read as a View (see `operand`); the masks and domains are made contiguous.
struct StreamInputs {
  std::vector<at::Tensor> qs, ks;
  at::Tensor v, pad, dom_q, dom_k;
  at::ScalarType dtype, compute;
  int64_t b, h, lq, lk, dv;
};

// t in the compute dtype, as is when BLAS can read its rows in place (a contiguous last dim, rows
// at least a row apart, int-sized leading dims), else a contiguous copy: transposed, row-expanded
// (stride 0) or overlapping layouts.
at::Tensor operand(const at::Tensor& t, at::ScalarType compute) {
  at::Tensor x = t.scalar_type() == compute ? t : t.to(compute);
  const bool last_ok = x.size(3) <= 1 || x.stride(3) == 1;
  const bool rows_ok = x.size(2) <= 1 || (x.stride(2) >= std::max<int64_t>(1, x.size(3)) &&
                                          x.stride(2) <= std::numeric_limits<int>::max());
  return last_ok && rows_ok ? x : x.contiguous();
}

// `lists`: the stream-list operators name the streams q[f], k[f]; the single-stream ones q, k.
StreamInputs prepare_streams(at::TensorList qs, at::TensorList ks, const at::Tensor& v,
                             const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dom_q,
                             const std::optional<at::Tensor>& dom_k, double dropout_p, bool lists) {
  TORCH_CHECK(!qs.empty() && qs.size() == ks.size(), "attn: q and k must be equally long, non-empty lists of "
              "streams, got ", qs.size(), " and ", ks.size());
  auto name = [&](const char* base, size_t f) { return lists ? std::string(base) + "[" + std::to_string(f) + "]"
                                                             : std::string(base); };
  const at::Tensor& q0 = qs[0];
  TORCH_CHECK(q0.dim() == 4, "attn: ", name("q", 0), " must have shape (B, H, Lq, DQK), got ", q0.sizes());
  TORCH_CHECK(ks[0].dim() == 4, "attn: ", name("k", 0), " must have shape (B, H, Lk, DQK), got ", ks[0].sizes());
  TORCH_CHECK(v.dim() == 4, "attn: v must have shape (B, H, Lk, DV), got ", v.sizes());
  const auto dt = q0.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "attn: q must be float32, float64, float16 or bfloat16, got ", dt);
  StreamInputs in;
  in.dtype = dt;
  in.compute = dt == at::kDouble ? at::kDouble : at::kFloat;
  in.b = q0.size(0);
  in.h = q0.size(1);
  in.lq = q0.size(2);
  in.lk = ks[0].size(2);
  for (size_t f = 0; f < qs.size(); ++f) {
    const at::Tensor &q = qs[f], &k = ks[f];
    TORCH_CHECK(q.dim() == 4 && q.size(0) == in.b && q.size(1) == in.h && q.size(2) == in.lq, "attn: ",
                name("q", f), " must have shape (B=", in.b, ", H=", in.h, ", Lq=", in.lq, ", D), got ", q.sizes());
    TORCH_CHECK(k.dim() == 4 && k.size(0) == in.b && k.size(1) == in.h && k.size(2) == in.lk && k.size(3) == q.size(3),
                "attn: ", name("k", f), " must have shape (B=", in.b, ", H=", in.h, ", Lk, DQK=", q.size(3), "), got ",
                k.sizes());
    TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "attn: q, k and v must be CPU tensors");
    TORCH_CHECK(q.scalar_type() == dt && k.scalar_type() == dt, "attn: k and v must have q's dtype ", dt, ", got ",
                k.scalar_type(), " and ", v.scalar_type(), lists ? " (every stream alike)" : "");
  }
  TORCH_CHECK(v.device().is_cpu(), "attn: q, k and v must be CPU tensors");
  TORCH_CHECK(v.scalar_type() == dt, "attn: k and v must have q's dtype ", dt, ", got ", ks[0].scalar_type(),
              " and ", v.scalar_type());
  TORCH_CHECK(v.size(0) == in.b && v.size(1) == in.h && v.size(2) == in.lk, "attn: v must have shape (B=", in.b,
              ", H=", in.h, ", Lk=", in.lk, ", DV), got ", v.sizes());
  in.dv = v.size(3);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attn: dropout_p must be in [0, 1), got ", dropout_p);
  for (size_t f = 0; f < qs.size(); ++f) {
    in.qs.push_back(operand(qs[f], in.compute));
    in.ks.push_back(operand(ks[f], in.compute));
  }
  in.v = operand(v, in.compute);
  if (key_padding_mask.has_value()) {
    const auto& pad = *key_padding_mask;
    TORCH_CHECK(pad.scalar_type() == at::kBool, "attn: key_padding_mask must be bool, got ", pad.scalar_type());
    TORCH_CHECK(pad.dim() == 2 && pad.size(0) == in.b && pad.size(1) == in.lk,
                "attn: key_padding_mask must have shape (B=", in.b, ", Lk=", in.lk, "), got ", pad.sizes());
    TORCH_CHECK(pad.device().is_cpu(), "attn: key_padding_mask must be a CPU tensor");
    in.pad = pad.contiguous();
  }
  TORCH_CHECK(dom_q.has_value() == dom_k.has_value(), "attn: dom_q and dom_k must be given together");
  if (dom_q.has_value()) {
    for (const auto& [nm, t, len] :
         {std::make_tuple("dom_q", *dom_q, in.lq), std::make_tuple("dom_k", *dom_k, in.lk)}) {
      TORCH_CHECK(t.scalar_type() == at::kLong, "attn: ", nm, " must be int64, got ", t.scalar_type());
      TORCH_CHECK(t.dim() == 2 && t.size(0) == in.b && t.size(1) == len, "attn: ", nm, " must have shape (B=", in.b,
                  ", L=", len, "), got ", t.sizes());
      TORCH_CHECK(t.device().is_cpu(), "attn: ", nm, " must be a CPU tensor");
    }
    in.dom_q = dom_q->contiguous();
    in.dom_k = dom_k->contiguous();
  }
  return in;
}

// The blocked path's single-stream, contiguous inputs: the streams concatenated along the head dim.
Inputs blocked_inputs(const StreamInputs& in) {
  Inputs out;
  out.compute = in.compute;
  out.q = in.qs.size() == 1 ? in.qs[0].contiguous() : at::cat(in.qs, -1);
  out.k = in.ks.size() == 1 ? in.ks[0].contiguous() : at::cat(in.ks, -1);
  out.v = in.v.contiguous();
  out.pad = in.pad;
  out.dom_q = in.dom_q;
  out.dom_k = in.dom_k;
  return out;
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

template <typename T>
ShortProblem<T> make_short_problem(const StreamInputs& in, double scale, bool causal, double dropout_p, int64_t seed) {
  ShortProblem<T> pb;
  for (size_t f = 0; f < in.qs.size(); ++f) {
    pb.qs.push_back(view_of<T>(in.qs[f]));
    pb.ks.push_back(view_of<T>(in.ks[f]));
  }
  pb.v = view_of<T>(in.v);
  pb.pad = in.pad.defined() ? in.pad.data_ptr<bool>() : nullptr;
  pb.dom_q = in.dom_q.defined() ? in.dom_q.data_ptr<int64_t>() : nullptr;
  pb.dom_k = in.dom_k.defined() ? in.dom_k.data_ptr<int64_t>() : nullptr;
  pb.heads = in.h;
  pb.lq = in.lq;
  pb.lk = in.lk;
  pb.dv = in.dv;
  pb.qk_scale = static_cast<T>(scale * kLog2e);
  pb.scale = static_cast<T>(scale);
  pb.causal = causal;
  pb.dropout_p = static_cast<float>(dropout_p);
  const uint64_t key = static_cast<uint64_t>(seed);
  pb.k0 = static_cast<uint32_t>(key);
  pb.k1 = static_cast<uint32_t>(key >> 32);
  return pb;
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool use_short_path(const StreamInputs& in) { return in.lq * in.lk <= kShortMaxScores; }

// Multiply-adds of one (batch, head) of the short path's forward (its backward: twice that).
inline int64_t short_pair_work(const StreamInputs& in) {
  int64_t d = in.dv;
  for (const auto& q : in.qs) d += q.size(3);
  return std::max<int64_t>(1, in.lq * in.lk * d);
}

// A per-row (B,H,Lq) input of the backward in the compute dtype, contiguous.
at::Tensor row_input(const at::Tensor& t, const char* name, const StreamInputs& in) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == in.b && t.size(1) == in.h && t.size(2) == in.lq, "attn_bwd: ", name,
              " must have shape (B, H, Lq) = (", in.b, ", ", in.h, ", ", in.lq, "), got ", t.sizes());
  TORCH_CHECK(t.is_floating_point() && t.device().is_cpu(), "attn_bwd: ", name, " must be a floating CPU tensor");
  return t.to(in.compute).contiguous();
}

at::Tensor check_dout(const at::Tensor& dout, const StreamInputs& in, const char* name) {
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == in.b && dout.size(1) == in.h && dout.size(2) == in.lq &&
                  dout.size(3) == in.dv,
              "attn_bwd: ", name, " must have shape (B, H, Lq, DV) = (", in.b, ", ", in.h, ", ", in.lq, ", ", in.dv,
              "), got ", dout.sizes());
  TORCH_CHECK(dout.scalar_type() == in.dtype, "attn_bwd: ", name, " must have q's dtype ", in.dtype, ", got ",
              dout.scalar_type());
  TORCH_CHECK(dout.device().is_cpu(), "attn_bwd: ", name, " must be a CPU tensor");
  return operand(dout, in.compute);
}

// ------------------------------------------------------------------ the calls

// out (input dtype), lse, acd (empty without domains).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const StreamInputs& in, double scale, bool causal,
                                                            double dropout_p, int64_t seed) {
  const int64_t b = in.b, h = in.h, lq = in.lq, dv = in.dv;
  auto opts = in.v.options().dtype(in.compute);
  at::Tensor out = at::empty({b, h, lq, dv}, opts);
  at::Tensor lse = at::empty({b, h, lq}, opts);
  const bool has_domains = in.dom_q.defined();
  at::Tensor acd = has_domains ? at::empty({b, h, lq}, opts) : at::empty({0}, opts);
  if (use_short_path(in)) {
    AT_DISPATCH_FLOATING_TYPES(in.compute, "attn_fwd", [&] {
      const ShortProblem<scalar_t> pb = make_short_problem<scalar_t>(in, scale, causal, dropout_p, seed);
      scalar_t* out_p = out.data_ptr<scalar_t>();
      scalar_t* lse_p = lse.data_ptr<scalar_t>();
      scalar_t* acd_p = has_domains ? acd.data_ptr<scalar_t>() : nullptr;
      parallel_items(b * h, short_pair_work(in), [&](int64_t begin, int64_t end) {
        run_short_forward(pb, begin, end, out_p, lse_p, acd_p);
      });
    });
  } else {
    const Inputs bi = blocked_inputs(in);
    AT_DISPATCH_FLOATING_TYPES(in.compute, "attn_fwd", [&] {
      const Problem<scalar_t> pb = make_problem<scalar_t>(bi, scale, causal, dropout_p, seed);
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
  }
  return {out.to(in.dtype), lse, acd};
}

// Gradients of every stream's q and k and of v, in the input dtype. delta: rowsum(dout·out) + g·acd
// (the single-stream operator's argument), or undefined: computed here from out (and acd).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> backward_impl(
    const StreamInputs& in, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& delta, const at::Tensor& acd, const std::optional<at::Tensor>& grad_acd, double scale,
    bool causal, double dropout_p, int64_t seed) {
  const int64_t b = in.b, h = in.h, lq = in.lq, lk = in.lk, dv = in.dv;
  at::Tensor lse_c = row_input(lse, "lse", in);
  // The acd term needs both its gradient and the domains; without either there is none.
  at::Tensor gacd_c, acd_c, delta_c;
  if (grad_acd.has_value() && in.dom_q.defined()) gacd_c = row_input(*grad_acd, "grad_acd", in);
  if (delta.defined()) delta_c = row_input(delta, "delta", in);
  if (!delta.defined() && gacd_c.defined()) acd_c = row_input(acd, "acd", in);
  auto opts = in.v.options().dtype(in.compute);
  std::vector<at::Tensor> dqs, dks;
  at::Tensor dvv = at::empty({b, h, lk, dv}, opts);
  if (use_short_path(in)) {
    for (size_t f = 0; f < in.qs.size(); ++f) {
      dqs.push_back(at::empty({b, h, lq, in.qs[f].size(3)}, opts));
      dks.push_back(at::empty({b, h, lk, in.qs[f].size(3)}, opts));
    }
    AT_DISPATCH_FLOATING_TYPES(in.compute, "attn_bwd", [&] {
      const ShortProblem<scalar_t> pb = make_short_problem<scalar_t>(in, scale, causal, dropout_p, seed);
      ShortGrads<scalar_t> gr;
      gr.dout = view_of<scalar_t>(dout);
      if (!delta_c.defined()) gr.out = view_of<scalar_t>(out);
      gr.lse = lse_c.data_ptr<scalar_t>();
      gr.delta = delta_c.defined() ? delta_c.data_ptr<scalar_t>() : nullptr;
      gr.acd = acd_c.defined() ? acd_c.data_ptr<scalar_t>() : nullptr;
      gr.gacd = gacd_c.defined() ? gacd_c.data_ptr<scalar_t>() : nullptr;
      std::vector<scalar_t*> dq_p, dk_p;
      for (size_t f = 0; f < dqs.size(); ++f) {
        dq_p.push_back(dqs[f].data_ptr<scalar_t>());
        dk_p.push_back(dks[f].data_ptr<scalar_t>());
      }
      scalar_t* dv_p = dvv.data_ptr<scalar_t>();
      parallel_items(b * h, 2 * short_pair_work(in), [&](int64_t begin, int64_t end) {
        run_short_backward(pb, gr, begin, end, dq_p, dk_p, dv_p);
      });
    });
  } else {
    const Inputs bi = blocked_inputs(in);
    at::Tensor dout_c = dout.contiguous();
    if (!delta_c.defined()) {
      delta_c = (dout_c * out.to(in.compute)).sum(-1);
      if (gacd_c.defined()) delta_c = delta_c + gacd_c * acd_c;
      delta_c = delta_c.contiguous();
    }
    at::Tensor dq = at::empty(bi.q.sizes(), opts);
    at::Tensor dk = at::empty(bi.k.sizes(), opts);
    AT_DISPATCH_FLOATING_TYPES(in.compute, "attn_bwd", [&] {
      const Problem<scalar_t> pb = make_problem<scalar_t>(bi, scale, causal, dropout_p, seed);
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
    if (in.qs.size() == 1) {
      dqs.push_back(dq);
      dks.push_back(dk);
    } else {
      int64_t d0 = 0;
      for (const auto& q : in.qs) {
        const int64_t d = q.size(3);
        dqs.push_back(dq.narrow(-1, d0, d).contiguous());
        dks.push_back(dk.narrow(-1, d0, d).contiguous());
        d0 += d;
      }
    }
  }
  for (auto& t : dqs) t = t.to(in.dtype);
  for (auto& t : dks) t = t.to(in.dtype);
  return {dqs, dks, dvv.to(in.dtype)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dom_q,
    const std::optional<at::Tensor>& dom_k, double scale, bool causal, double dropout_p, int64_t seed) {
  const StreamInputs in = prepare_streams({q}, {k}, v, key_padding_mask, dom_q, dom_k, dropout_p, false);
  return forward_impl(in, scale, causal, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_fwd_streams(
    at::TensorList q, at::TensorList k, const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& dom_q, const std::optional<at::Tensor>& dom_k, double scale, bool causal,
    double dropout_p, int64_t seed) {
  const StreamInputs in = prepare_streams(q, k, v, key_padding_mask, dom_q, dom_k, dropout_p, true);
  return forward_impl(in, scale, causal, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
    const at::Tensor& lse, const at::Tensor& delta, const std::optional<at::Tensor>& grad_acd,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dom_q,
    const std::optional<at::Tensor>& dom_k, double scale, bool causal, double dropout_p, int64_t seed) {
  const StreamInputs in = prepare_streams({q}, {k}, v, key_padding_mask, dom_q, dom_k, dropout_p, false);
  const at::Tensor dout_c = check_dout(dout, in, "dout");
  auto [dqs, dks, dv] =
      backward_impl(in, dout_c, at::Tensor(), lse, delta, at::Tensor(), grad_acd, scale, causal, dropout_p, seed);
  return {dqs[0], dks[0], dv};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> attn_bwd_streams(
    at::TensorList q, at::TensorList k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& dout,
    const at::Tensor& lse, const std::optional<at::Tensor>& acd, const std::optional<at::Tensor>& grad_acd,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& dom_q,
    const std::optional<at::Tensor>& dom_k, double scale, bool causal, double dropout_p, int64_t seed) {
  const StreamInputs in = prepare_streams(q, k, v, key_padding_mask, dom_q, dom_k, dropout_p, true);
  const at::Tensor dout_c = check_dout(dout, in, "dout");
  const at::Tensor out_c = check_dout(out, in, "out");
  const bool acd_term = grad_acd.has_value() && in.dom_q.defined();
  TORCH_CHECK(!acd_term || acd.has_value(), "attn_bwd: acd is required with grad_acd and domains");
  return backward_impl(in, dout_c, out_c, lse, at::Tensor(), acd_term ? *acd : at::Tensor(), grad_acd, scale,
                       causal, dropout_p, seed);
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
