// Full-catalog cross-entropy (LSE forward, backward) and top-k on CPU.
//
// Items are processed in blocks of (rows × items), each by one thread: a single-threaded BLAS
// GEMM computes the block of logits, one fused vectorized pass does all elementwise work on it
// while it is in that core's cache, and the backward's two GEMMs consume it. Extra memory is
// one block per thread plus per-thread row accumulators (O(T·N·D)) and the results, never N×V.
// Compute type: float64 for float64 inputs (gradcheck), float32 otherwise (float16/bfloat16
// are widened per chunk); LSE and gradients are returned in the compute type.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops.h"

namespace fastattn {
namespace {

// A thread's block of logits holds about this many elements (2 MiB in fp32, its core's L2 here):
// the elementwise pass and the backward's two GEMMs then re-read it from cache, not DRAM.
constexpr int64_t kBlockElements = int64_t(1) << 19;
constexpr int64_t kMinChunkItems = 64;
constexpr int64_t kMaxChunkItems = 2048;
constexpr int64_t kMinBlockRows = 256;

// Tests override the blocking (FASTATTN_CE_CHUNK_ROWS / FASTATTN_CE_CHUNK_ITEMS) to make a
// small case span many blocks; read per call, so a test can set it after the build.
int64_t env_size(const char* name) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return 0;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  TORCH_CHECK(*end == '\0' && value > 0, name, " must be a positive integer, got '", text, "'");
  return value;
}

struct Blocking {
  int64_t rows;
  int64_t items;
};

// ------------------------------------------------------------------ vectorizable row kernels

// exp for x <= ~88: 2^n·p(r) with n = round(x/ln2) and a degree-6 polynomial on |r| <= ln2/2
// (Cephes expf, ~1 ulp). Branch-free so the row loops vectorize; std::expf calls would not.
inline float exp_approx(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  const float below = x < -87.0f ? 0.0f : 1.0f;  // exp underflows to 0 there
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = x - n * kLn2Hi - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n * below;
}

inline double exp_approx(double x) { return std::exp(x); }  // float64 is the exactness path

// z += shift (if given); returns max(z).
template <typename T>
inline T add_max_impl(T* __restrict z, const T* __restrict shift, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  if (shift != nullptr) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) {
      z[j] += shift[j];
      m = std::max(m, z[j]);
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = std::max(m, z[j]);
  }
  return m;
}

// Σ_j exp(z_j − m).
template <typename T>
inline T sum_exp_impl(const T* __restrict z, T m, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += exp_approx(z[j] - m);
  return s;
}

// z_j ← a·exp(z_j + shift_j − lse) − b: the dense part of dz (a = scale·coef_p, b = scale·coef_base).
template <typename T>
inline void dz_impl(T* __restrict z, const T* __restrict shift, T lse, T a, T b, int64_t n) {
  if (shift != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = a * exp_approx(z[j] + shift[j] - lse) - b;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = a * exp_approx(z[j] - lse) - b;
  }
}

// float32 versions cloned for AVX-512 / AVX2 and picked at load time, so one binary (built by
// setup.py for any x86-64) still runs the wide vector code where the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTATTN_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), noinline))
#else
#define FASTATTN_CLONES
#endif

FASTATTN_CLONES float add_max(float* z, const float* shift, int64_t n) { return add_max_impl(z, shift, n); }
FASTATTN_CLONES float sum_exp(const float* z, float m, int64_t n) { return sum_exp_impl(z, m, n); }
FASTATTN_CLONES void fused_dz(float* z, const float* shift, float lse, float a, float b, int64_t n) {
  dz_impl(z, shift, lse, a, b, n);
}
double add_max(double* z, const double* shift, int64_t n) { return add_max_impl(z, shift, n); }
double sum_exp(const double* z, double m, int64_t n) { return sum_exp_impl(z, m, n); }
void fused_dz(double* z, const double* shift, double lse, double a, double b, int64_t n) {
  dz_impl(z, shift, lse, a, b, n);
}

// ------------------------------------------------------------------ input checks

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_catalog(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(hidden.defined() && hidden.dim() == 2, op, ": hidden must have shape (N, D), got ",
              hidden.defined() ? hidden.sizes() : at::IntArrayRef{});
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": hidden must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(hidden.device().is_cpu(), op, ": hidden must be a CPU tensor, got ", hidden.device());
  TORCH_CHECK(weight.defined() && weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.size(0) >= 1, op,
              ": weight must have shape (V >= 1, D=", hidden.size(1), "), got ",
              weight.defined() ? weight.sizes() : at::IntArrayRef{});
  TORCH_CHECK(weight.scalar_type() == dtype, op, ": weight has dtype ", weight.scalar_type(), " but hidden has ",
              dtype);
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be a CPU tensor, got ", weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (V=",
                weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dtype, op, ": bias has dtype ", bias->scalar_type(), " but hidden has ",
                dtype);
    TORCH_CHECK(bias->device().is_cpu(), op, ": bias must be a CPU tensor, got ", bias->device());
  }
}

// A per-row (N,) CPU tensor, returned contiguous in the compute type.
at::Tensor row_vector(const char* op, const char* name, const at::Tensor& t, int64_t n, at::ScalarType acc) {
  TORCH_CHECK(t.defined() && t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (N=", n, ",), got ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a float tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  return t.to(acc).contiguous();
}

// ------------------------------------------------------------------ the block loop

int num_threads() {
#ifdef _OPENMP
  return std::max(1, at::get_num_threads());
#else
  return 1;
#endif
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// For each row block (in order), calls body(tid, r0, r1, c0, c1, z, w) once per item chunk, with
// z (r1−r0, c1−c0) = hidden[r0:r1]·weight[c0:c1]ᵀ (thread tid's contiguous buffer) and w the
// chunk of weight in hidden's dtype. All chunks of a row block run in one OpenMP region, each by
// one thread with a single-threaded GEMM, so the block stays in that core's cache and there is
// one fork/join per call rather than several per chunk (which, with spinning OpenMP threads,
// collapses when other processes share the cores). Chunk c goes to thread c mod T: a fixed
// assignment, so per-thread partial sums (dH, LSE) and hence the results are deterministic.
// A thread sees its chunks in increasing order; body must only write its thread's or its
// chunk's state. finish_rows(r0, r1) runs after each row block.
template <typename Body, typename Finish>
void for_each_block(const at::Tensor& hidden, const at::Tensor& weight, const Blocking& blk, Body&& body,
                    Finish&& finish_rows) {
  const int64_t n = hidden.size(0), v = weight.size(0);
  const int64_t chunks = (v + blk.items - 1) / blk.items;
  const int threads = static_cast<int>(std::min<int64_t>(num_threads(), chunks));
  std::vector<at::Tensor> buffers(threads);
  for (auto& b : buffers) b = at::empty({blk.rows * blk.items}, hidden.options());
  for (int64_t r0 = 0; r0 < n; r0 += blk.rows) {
    const int64_t r1 = std::min(n, r0 + blk.rows);
    const at::Tensor h = hidden.narrow(0, r0, r1 - r0);
    std::exception_ptr error;
    std::atomic<bool> failed{false};
    // OpenMP threads start with default thread-local state (grad mode on, …): give them ours,
    // as at::parallel_for does.
    const at::ThreadLocalState state;
#pragma omp parallel num_threads(threads)
    {
      at::ThreadLocalStateGuard guard(state);
#pragma omp for schedule(static, 1)
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        if (failed.load()) continue;  // exceptions must not leave an OpenMP region
        try {
          const int tid = thread_id();
          const int64_t c0 = chunk * blk.items, c1 = std::min(v, c0 + blk.items);
          const at::Tensor w = weight.narrow(0, c0, c1 - c0).to(hidden.scalar_type());  // a view unless fp16/bf16
          at::Tensor z = buffers[tid].narrow(0, 0, (r1 - r0) * (c1 - c0)).view({r1 - r0, c1 - c0});
          at::mm_out(z, h, w.t());  // single-threaded inside the region
          body(tid, r0, r1, c0, c1, z, w);
        } catch (...) {
#pragma omp critical(fastattn_ce_error)
          if (!failed.exchange(true)) error = std::current_exception();
        }
      }
    }
    if (error) std::rethrow_exception(error);
    finish_rows(r0, r1);
  }
}

// Chunks small enough that every thread gets several (balance) and a thread's block
// (rows × items) stays near its L2 cache, large enough for efficient GEMMs.
Blocking blocking(int64_t n, int64_t v) {
  int64_t items = env_size("FASTATTN_CE_CHUNK_ITEMS");
  if (items == 0) {
    items = std::clamp(kBlockElements / std::max<int64_t>(n, 1), kMinChunkItems, kMaxChunkItems);
    items = std::min(items, (v + 4 * num_threads() - 1) / (4 * num_threads()));
  }
  items = std::max<int64_t>(1, std::min(items, v));
  int64_t rows = env_size("FASTATTN_CE_CHUNK_ROWS");
  // Only very tall inputs are split by rows: a few blocks' worth keeps the GEMMs' M dimension large.
  if (rows == 0) rows = std::max<int64_t>(kMinBlockRows, 4 * kBlockElements / items);
  return {std::max<int64_t>(1, std::min(rows, n)), items};
}

template <typename T>
at::Tensor lse_impl(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    double scale) {
  const auto acc = compute_type(hidden);
  const int64_t n = hidden.size(0);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  // Scaling hidden (N·D) and bias (V) once is cheaper than scaling every logit.
  const at::Tensor hs = hidden.to(acc).mul(scale).contiguous();
  const at::Tensor sb = bias.has_value() ? bias->to(acc).mul(scale).contiguous() : at::Tensor();
  const Blocking blk = blocking(n, weight.size(0));
  const int threads = num_threads();
  // Online LSE per thread (running max and sum of exp), merged once at the end.
  std::vector<T> row_max(static_cast<size_t>(threads) * n, neg_inf), row_sum(static_cast<size_t>(threads) * n, T(0));
  auto body = [&](int tid, int64_t r0, int64_t r1, int64_t c0, int64_t c1, at::Tensor& z, const at::Tensor&) {
    T* zp = z.data_ptr<T>();
    const T* shift = sb.defined() ? sb.data_ptr<T>() + c0 : nullptr;
    const int64_t width = c1 - c0;
    T* mx = row_max.data() + static_cast<size_t>(tid) * n;
    T* sm = row_sum.data() + static_cast<size_t>(tid) * n;
    for (int64_t i = r0; i < r1; ++i) {
      T* row = zp + (i - r0) * width;
      const T m = std::max(mx[i], add_max(row, shift, width));
      const T rescale = mx[i] == neg_inf ? T(0) : std::exp(mx[i] - m);  // 0 on this thread's first chunk
      sm[i] = sm[i] * rescale + sum_exp(row, m, width);
      mx[i] = m;
    }
  };
  for_each_block(hs, weight, blk, body, [](int64_t, int64_t) {});
  at::Tensor lse = at::empty({n}, hidden.options().dtype(acc));
  T* out = lse.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    T m = neg_inf, s = 0;
    for (int t = 0; t < threads; ++t) m = std::max(m, row_max[static_cast<size_t>(t) * n + i]);
    for (int t = 0; t < threads; ++t) {
      const T mt = row_max[static_cast<size_t>(t) * n + i];
      if (mt != neg_inf) s += row_sum[static_cast<size_t>(t) * n + i] * std::exp(mt - m);
    }
    out[i] = m + std::log(s);
  }
  return lse;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_impl(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, double scale,
    const at::Tensor& lse, const at::Tensor& coef_p, const at::Tensor& coef_base, const at::Tensor& target,
    const at::Tensor& coef_t) {
  const auto acc = compute_type(hidden);
  const int64_t n = hidden.size(0), v = weight.size(0), d = hidden.size(1);
  const at::Tensor h = hidden.to(acc).contiguous();
  const at::Tensor hs = h.mul(scale);
  const at::Tensor sb = bias.has_value() ? bias->to(acc).mul(scale).contiguous() : at::Tensor();
  // dz = scale·(coef_p·softmax − coef_base − coef_t·onehot): fold scale into the coefficients.
  const at::Tensor a = coef_p.mul(scale), b = coef_base.mul(scale), t = coef_t.mul(scale);
  const T *ap = a.data_ptr<T>(), *bp = b.data_ptr<T>(), *tp = t.data_ptr<T>(), *lp = lse.data_ptr<T>();
  const int64_t* yp = target.data_ptr<int64_t>();
  const Blocking blk = blocking(n, v);
  at::Tensor dh = at::empty({n, d}, h.options());
  at::Tensor de = at::empty({v, d}, h.options());
  at::Tensor db = at::empty({sb.defined() ? v : 0}, h.options());
  if (n == 0) {  // no rows: no block runs, and dE/db must still be defined (zero)
    return {dh, de.zero_(), db.zero_()};
  }
  const at::Tensor ones = at::ones({blk.rows}, h.options());
  // dH of the current row block, one accumulator per thread (rows are shared by all chunks).
  const at::Tensor dh_parts = at::empty({num_threads(), blk.rows, d}, h.options());
  std::vector<char> touched(num_threads());
  auto body = [&](int tid, int64_t r0, int64_t r1, int64_t c0, int64_t c1, at::Tensor& z, const at::Tensor& w) {
    T* zp = z.data_ptr<T>();
    const T* shift = sb.defined() ? sb.data_ptr<T>() + c0 : nullptr;
    const int64_t width = c1 - c0, rows = r1 - r0;
    for (int64_t i = r0; i < r1; ++i) {
      T* row = zp + (i - r0) * width;
      fused_dz(row, shift, lp[i], ap[i], bp[i], width);
      if (yp[i] >= c0 && yp[i] < c1) row[yp[i] - c0] -= tp[i];
    }
    at::Tensor part = dh_parts[tid].narrow(0, 0, rows);
    if (touched[tid]) {
      part.addmm_(z, w);
    } else {
      at::mm_out(part, z, w);
      touched[tid] = 1;
    }
    // The first row block writes the chunk's dE and db; later ones (very tall inputs) accumulate.
    at::Tensor de_c = de.narrow(0, c0, width);
    const at::Tensor h_r = h.narrow(0, r0, rows);
    if (r0 == 0) {
      at::mm_out(de_c, z.t(), h_r);
    } else {
      de_c.addmm_(z.t(), h_r);
    }
    if (sb.defined()) {
      at::Tensor db_c = db.narrow(0, c0, width);
      if (r0 == 0) {
        at::mv_out(db_c, z.t(), ones.narrow(0, 0, rows));
      } else {
        db_c.addmv_(z.t(), ones.narrow(0, 0, rows));
      }
    }
  };
  auto finish = [&](int64_t r0, int64_t r1) {
    at::Tensor out = dh.narrow(0, r0, r1 - r0);
    out.zero_();
    for (size_t t = 0; t < touched.size(); ++t) {
      if (touched[t]) out.add_(dh_parts[t].narrow(0, 0, r1 - r0));
      touched[t] = 0;
    }
  };
  for_each_block(hs, weight, blk, body, finish);
  return {dh, de, db};
}

// Entry of a running top-k min-heap: the heap's root is the worst of the k best so far.
template <typename T>
struct Candidate {
  T score;
  int64_t index;
};

// a ranks before b: higher score; on equal scores the lower item id (a deterministic order).
template <typename T>
bool ranks_before(const Candidate<T>& a, const Candidate<T>& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> topk_impl(const at::Tensor& hidden, const at::Tensor& weight, int64_t k,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& exclude) {
  const auto acc = compute_type(hidden);
  const int64_t n = hidden.size(0);
  const int threads = num_threads();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const at::Tensor h = hidden.to(acc).contiguous();
  const at::Tensor bs = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  // One heap per row and thread (threads see disjoint chunks of a row), merged at the end.
  std::vector<Candidate<T>> heaps(static_cast<size_t>(threads) * n * k, Candidate<T>{neg_inf, -1});
  // Each row's exclusions sorted once; a chunk finds its own by binary search.
  const int64_t m = exclude.defined() ? exclude.size(1) : 0;
  std::vector<int64_t> excluded(static_cast<size_t>(n * m));
  if (m > 0) {
    const at::Tensor ex = exclude.contiguous();
    const int64_t* ep = ex.data_ptr<int64_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        std::copy(ep + i * m, ep + (i + 1) * m, excluded.data() + i * m);
        std::sort(excluded.data() + i * m, excluded.data() + (i + 1) * m);
      }
    });
  }
  auto body = [&](int tid, int64_t r0, int64_t r1, int64_t c0, int64_t c1, at::Tensor& z, const at::Tensor&) {
    T* zp = z.data_ptr<T>();
    const int64_t width = c1 - c0;
    const T* shift = bs.defined() ? bs.data_ptr<T>() + c0 : nullptr;
    for (int64_t i = r0; i < r1; ++i) {
      T* row = zp + (i - r0) * width;
      Candidate<T>* heap = heaps.data() + (static_cast<size_t>(tid) * n + i) * k;
      T worst = heap[0].score;
      // Once the heap fills, most chunks hold nothing better than its root: a vectorized max
      // (which also adds the bias) rules them out before the scalar scan and the exclusions.
      if (add_max(row, shift, width) <= worst) continue;
      const int64_t *ex = excluded.data() + i * m, *ex_end = ex + m;
      for (const int64_t* e = std::lower_bound(ex, ex_end, c0); e != ex_end && *e < c1; ++e) row[*e - c0] = neg_inf;
      // A thread sees item ids in increasing order, so a later equal score never ranks before the root.
      for (int64_t j = 0; j < width; ++j) {
        if (row[j] > worst) {
          std::pop_heap(heap, heap + k, ranks_before<T>);
          heap[k - 1] = {row[j], c0 + j};
          std::push_heap(heap, heap + k, ranks_before<T>);
          worst = heap[0].score;
        }
      }
    }
  };
  for_each_block(h, weight, blocking(n, weight.size(0)), body, [](int64_t, int64_t) {});
  at::Tensor scores = at::empty({n, k}, hidden.options().dtype(at::kFloat));
  at::Tensor index = at::empty({n, k}, hidden.options().dtype(at::kLong));
  float* sp = scores.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<Candidate<T>> merged(static_cast<size_t>(threads) * k);
    for (int64_t i = begin; i < end; ++i) {
      for (int t = 0; t < threads; ++t) {
        const Candidate<T>* heap = heaps.data() + (static_cast<size_t>(t) * n + i) * k;
        std::copy(heap, heap + k, merged.begin() + static_cast<size_t>(t) * k);
      }
      std::partial_sort(merged.begin(), merged.begin() + k, merged.end(), ranks_before<T>);  // best first
      for (int64_t j = 0; j < k; ++j) {
        sp[i * k + j] = static_cast<float>(merged[j].score);
        ip[i * k + j] = merged[j].score == neg_inf ? -1 : merged[j].index;
      }
    }
  });
  return {scores, index};
}

}  // namespace

at::Tensor ce_lse(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  double scale) {
  check_catalog("ce_lse", hidden, weight, bias);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "ce_lse: scale must be a positive finite float, got ", scale);
  if (compute_type(hidden) == at::kDouble) return lse_impl<double>(hidden, weight, bias, scale);
  return lse_impl<float>(hidden, weight, bias, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, double scale,
    const at::Tensor& lse, const at::Tensor& coef_p, const at::Tensor& coef_base, const at::Tensor& target,
    const at::Tensor& coef_t) {
  check_catalog("ce_bwd", hidden, weight, bias);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "ce_bwd: scale must be a positive finite float, got ", scale);
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto acc = compute_type(hidden);
  const at::Tensor lse_c = row_vector("ce_bwd", "lse", lse, n, acc);
  const at::Tensor p = row_vector("ce_bwd", "coef_p", coef_p, n, acc);
  const at::Tensor base = row_vector("ce_bwd", "coef_base", coef_base, n, acc);
  const at::Tensor t = row_vector("ce_bwd", "coef_t", coef_t, n, acc);
  TORCH_CHECK(target.defined() && target.dim() == 1 && target.size(0) == n && target.scalar_type() == at::kLong,
              "ce_bwd: target must be an int64 tensor of shape (N=", n, ",), got ",
              target.defined() ? target.sizes() : at::IntArrayRef{}, " ",
              target.defined() ? target.scalar_type() : at::kLong);
  TORCH_CHECK(target.device().is_cpu(), "ce_bwd: target must be a CPU tensor, got ", target.device());
  const at::Tensor y = target.contiguous();
  if (n > 0) {
    const auto [lo, hi] = at::aminmax(y);
    TORCH_CHECK(lo.item<int64_t>() >= -1 && hi.item<int64_t>() < v, "ce_bwd: target must hold item ids in [0, ", v,
                ") or -1 (no target), got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
  // Rows whose three coefficients are all zero (no target: ignore_index, the padding of short
  // sequences) add nothing to dH, dE or db: the blocks run on the other rows only, and their dH
  // rows are zero. A NaN coefficient counts as nonzero, so it still propagates.
  const at::Tensor active = p.ne(0).logical_or_(base.ne(0)).logical_or_(t.ne(0));
  const int64_t used = active.sum().item<int64_t>();
  if (used < n) {
    const at::Tensor rows = active.nonzero().squeeze(1);
    auto pick = [&](const at::Tensor& x) { return x.index_select(0, rows); };
    auto [dh_used, de, db] = acc == at::kDouble
        ? bwd_impl<double>(pick(hidden), weight, bias, scale, pick(lse_c), pick(p), pick(base), pick(y), pick(t))
        : bwd_impl<float>(pick(hidden), weight, bias, scale, pick(lse_c), pick(p), pick(base), pick(y), pick(t));
    at::Tensor dh = at::zeros({n, hidden.size(1)}, dh_used.options());
    dh.index_copy_(0, rows, dh_used);
    return {dh, de, db};
  }
  if (acc == at::kDouble) return bwd_impl<double>(hidden, weight, bias, scale, lse_c, p, base, y, t);
  return bwd_impl<float>(hidden, weight, bias, scale, lse_c, p, base, y, t);
}

// out (N, C) with out[i] = Σ over the CSR entries e of row i of values[e]·table[indices[e]]: the
// sparse targets' row sums (their logits' share of the loss, and of dH). Row-parallel.
template <typename T>
void sparse_gather_impl(const int64_t* indptr, const int64_t* indices, const T* values, const T* table, T* out,
                        int64_t n, int64_t c) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* oi = out + i * c;
      for (int64_t e = indptr[i]; e < indptr[i + 1]; ++e) {
        const T w = values[e];
        const T* tj = table + indices[e] * c;
        for (int64_t col = 0; col < c; ++col) oi[col] += w * tj[col];
      }
    }
  });
}

// out (V, C) with out[j] = Σ over the CSR entries e of row i with indices[e] = j of values[e]·x[i]:
// the sparse targets' part of dE (and db, as one more column of x). Each thread owns a slice of
// the C columns and walks every entry in order, so no two threads write the same value and the
// sums are deterministic without sorting the entries by item (a stable sort cost 10x this).
template <typename T>
void sparse_scatter_impl(const int64_t* indptr, const int64_t* indices, const T* values, const T* x, T* out,
                         int64_t n, int64_t c) {
  const int64_t slice = 16;
  at::parallel_for(0, (c + slice - 1) / slice, 1, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * slice, c1 = std::min(c, end * slice);
    for (int64_t i = 0; i < n; ++i) {
      const T* xi = x + i * c;
      for (int64_t e = indptr[i]; e < indptr[i + 1]; ++e) {
        const T w = values[e];
        T* oj = out + indices[e] * c;
        for (int64_t col = c0; col < c1; ++col) oj[col] += w * xi[col];
      }
    }
  });
}

namespace {
// The CSR entries checked (rows = N, items in [0, num_items)) and made contiguous, values in dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_entries(const char* op, const at::Tensor& indptr,
                                                           const at::Tensor& indices, const at::Tensor& values,
                                                           int64_t n, int64_t num_items, at::ScalarType dtype) {
  TORCH_CHECK(indptr.scalar_type() == at::kLong && indptr.dim() == 1 && indptr.size(0) == n + 1 &&
                  indptr.device().is_cpu(),
              op, ": indptr must be an int64 CPU tensor of shape (N+1=", n + 1, ",), got ", indptr.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 1 && indices.device().is_cpu(), op,
              ": indices must be a 1-D int64 CPU tensor");
  TORCH_CHECK(values.dim() == 1 && values.size(0) == indices.size(0) && values.device().is_cpu(), op,
              ": values must be a CPU tensor of shape (nnz=", indices.size(0), ",), got ", values.sizes());
  TORCH_CHECK(num_items >= 0, op, ": num_items must be >= 0, got ", num_items);
  const at::Tensor ptr = indptr.contiguous(), idx = indices.contiguous();
  const int64_t nnz = idx.size(0);
  const bool rising = n == 0 || ptr.diff().min().item<int64_t>() >= 0;
  TORCH_CHECK(ptr[0].item<int64_t>() == 0 && ptr[n].item<int64_t>() == nnz && rising, op,
              ": indptr must rise from 0 to nnz=", nnz);
  if (nnz > 0) {
    const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < num_items, op, ": indices must be in [0, ", num_items, "), got values in [", lo,
                ", ", hi, "]");
  }
  return {ptr, idx, values.to(dtype).contiguous()};
}

void check_dense(const char* op, const char* name, const at::Tensor& x) {
  const bool float_x = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  TORCH_CHECK(x.dim() == 2 && float_x && x.device().is_cpu(), op, ": ", name,
              " must be a 2-D float32 or float64 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
}
}  // namespace

at::Tensor ce_sparse_scatter(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                             const at::Tensor& x, int64_t num_items) {
  check_dense("ce_sparse_scatter", "x (N, C)", x);
  const int64_t n = x.size(0), c = x.size(1);
  auto [ptr, idx, val] = csr_entries("ce_sparse_scatter", indptr, indices, values, n, num_items, x.scalar_type());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::zeros({num_items, c}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ce_sparse_scatter", [&] {
    sparse_scatter_impl<scalar_t>(ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), val.data_ptr<scalar_t>(),
                                  xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, c);
  });
  return out;
}

at::Tensor ce_sparse_gather(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                            const at::Tensor& table) {
  check_dense("ce_sparse_gather", "table (V, C)", table);
  TORCH_CHECK(indptr.dim() == 1 && indptr.size(0) >= 1, "ce_sparse_gather: indptr must have shape (N+1,), got ",
              indptr.sizes());
  const int64_t n = indptr.size(0) - 1, c = table.size(1);
  auto [ptr, idx, val] =
      csr_entries("ce_sparse_gather", indptr, indices, values, n, table.size(0), table.scalar_type());
  const at::Tensor tc = table.contiguous();
  at::Tensor out = at::zeros({n, c}, tc.options());
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "ce_sparse_gather", [&] {
    sparse_gather_impl<scalar_t>(ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), val.data_ptr<scalar_t>(),
                                 tc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, c);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_items(const at::Tensor& hidden, const at::Tensor& weight, int64_t k,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& exclude) {
  check_catalog("topk_items", hidden, weight, bias);
  const int64_t n = hidden.size(0), v = weight.size(0);
  TORCH_CHECK(k >= 1 && k <= v, "topk_items: k must be in [1, ", v, "] (the number of items), got ", k);
  at::Tensor ex;
  if (exclude.has_value()) {
    ex = *exclude;
    TORCH_CHECK(ex.scalar_type() == at::kLong, "topk_items: exclude must be an int64 tensor, got ",
                ex.scalar_type());
    TORCH_CHECK(ex.dim() == 2 && ex.size(0) == n, "topk_items: exclude must have shape (N=", n, ", M), got ",
                ex.sizes());
    TORCH_CHECK(ex.device().is_cpu(), "topk_items: exclude must be a CPU tensor, got ", ex.device());
    if (ex.numel() > 0) {
      const int64_t hi = ex.max().item<int64_t>();
      TORCH_CHECK(hi < v, "topk_items: exclude holds item id ", hi, ", not below V=", v,
                  " (entries < 0 are ignored)");
    }
  }
  if (compute_type(hidden) == at::kDouble) return topk_impl<double>(hidden, weight, k, bias, ex);
  return topk_impl<float>(hidden, weight, k, bias, ex);
}

}  // namespace fastattn
