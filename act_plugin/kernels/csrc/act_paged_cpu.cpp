// ACT calibration over a paged KV cache, fused, for CPUs (ACT_SPEC.md sections 1-2).
//
// One call per layer, step and profile group. Two entry points to the same function: the
// module function calibrate_paged (pybind11), which the engine calls -- ~4 us per call, against
// ~11 us through the dispatcher for these 18 arguments, paid per layer and step -- and
// torch.ops.act_kernels.calibrate_paged, the dispatcher op (tests, and the scratch counter).
// Work is split over (sequence, calibrated head) tasks with at::parallel_for (torch's own
// OpenMP pool, the one vLLM binds to cores). The K/V caches are read in place through the
// block table with their own strides (CPU_ATTN's transposed key tiles, FLASH_ATTN's
// interleaved K|V), never copied into padded tensors. Statistics are float32.
//
// Decode rows (query_len == 1), output-space form: scores of the row over its keys, softmax,
// sinks = {j != 0 : p_j > tau}, P_S, non-sink mass N summed directly, o_S from the sink
// columns of V only, o' = beta*o_S + (1 + (1-beta)*P_S/N) * (o - o_S) on the native o.
// o - o_S cancels when N is small (error ~ ulp(o)/N), so rows with N < recompute_below are
// recomputed from all V columns instead; rows with N <= FLT_EPSILON are left unchanged.
//
// Whole layer (layer_attention, module function only): in steps whose rows all run ACT arms the
// engine skips the native kernel in calibrated layers and this computes every head, prefill and
// decode rows, plain attention on heads outside the arm's and ACT on its heads, each calibrated
// head's scores computed once for its output and its statistics (see prefill_wave below).
//
// Prefill rows: pass 1 (blocked over rows, never the full q x k matrix) gives each row's
// log-sum-exp and the column sums; the sinks follow from the column means over the rows
// that see each key; pass 2 is the same output-space form per row over the sink columns
// only (P_S from the stored log-sum-exp; N = 1 - P_S there, whose relative error is at most
// eps/recompute_below), and rows below the cut are recomputed in full with N summed directly.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr float kNonSinkEps = FLT_EPSILON;  // core.NONSINK_EPS

// Scratch memory held by running tasks, its peak within the current call, and the peak
// per kind of call (0: decode-only, 1: with prefill rows) since the last reset (benchmarks).
std::atomic<int64_t> g_scratch{0}, g_scratch_peak{0};
std::atomic<int64_t> g_kind_peak[2] = {0, 0};
struct ScratchUse {
  int64_t bytes;
  explicit ScratchUse(int64_t b) : bytes(b) {
    const int64_t now = g_scratch.fetch_add(b) + b;
    int64_t peak = g_scratch_peak.load();
    while (now > peak && !g_scratch_peak.compare_exchange_weak(peak, now)) {
    }
  }
  ~ScratchUse() { g_scratch.fetch_sub(bytes); }
};

inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_f(c10::Half x) { return static_cast<float>(x); }

// exp for x <= 0 (Cephes expf: range reduction to [-ln2/2, ln2/2] and a degree-6
// polynomial, ~1 ulp). Written branch-free so that the loops calling it vectorize.
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// 8-float vectors (GCC/Clang vector extensions: AVX registers with -mavx2, SSE pairs
// otherwise). Explicit register tiles: the auto-vectorizer spills the tiles below.
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline v8f load8(const c10::BFloat16* p) {
  typedef uint16_t v8u16 __attribute__((vector_size(16)));
  typedef uint32_t v8u32 __attribute__((vector_size(32)));
  v8u16 h;
  std::memcpy(&h, p, sizeof(h));
  const v8u32 w = __builtin_convertvector(h, v8u32) << 16;
  v8f v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
inline v8f load8(const c10::Half* p) {
  float t[8];
  for (int i = 0; i < 8; ++i) t[i] = static_cast<float>(p[i]);
  return load8(t);
}
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// Read-only view of a small integer tensor (int32 or int64, any strides).
struct Index {
  const char* p;
  int64_t s0, s1;
  bool i32;
  explicit Index(const at::Tensor& t)
      : p(static_cast<const char*>(t.data_ptr())),
        s0(t.dim() > 0 ? t.stride(0) : 0),
        s1(t.dim() > 1 ? t.stride(1) : 0),
        i32(t.scalar_type() == at::kInt) {
    TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "index tensors must be int32 or int64");
  }
  int64_t operator()(int64_t i, int64_t j = 0) const {
    const int64_t off = i * s0 + j * s1;
    return i32 ? reinterpret_cast<const int32_t*>(p)[off] : reinterpret_cast<const int64_t*>(p)[off];
  }
};

// One KV head of the paged cache [blocks, kv_heads, block, D] with arbitrary strides.
template <typename T>
struct Paged {
  const T* base;
  int64_t s_blk, s_head, s_tok, s_dim, block;
  Paged(const at::Tensor& t)
      : base(t.data_ptr<T>()), s_blk(t.stride(0)), s_head(t.stride(1)), s_tok(t.stride(2)), s_dim(t.stride(3)),
        block(t.size(2)) {}
};

// out[j - lo] = q . k_j for keys j in [lo, hi) of sequence g, KV head kvh.
template <typename T>
void paged_scores(const Paged<T>& K, const Index& table, int64_t g, int64_t kvh, const float* q, int64_t D,
                  int64_t lo, int64_t hi, float* out) {
  for (int64_t j = lo; j < hi;) {
    const int64_t b = j / K.block, t0 = j % K.block;
    const int64_t n = std::min(K.block - t0, hi - j);
    const T* tile = K.base + table(g, b) * K.s_blk + kvh * K.s_head + t0 * K.s_tok;
    float* o = out + (j - lo);
    if (K.s_tok == 1) {  // transposed key tile [D, block]: stream each dimension across tokens
      int64_t t = 0;
      for (; t + 32 <= n; t += 32) {  // 32 accumulators stay in registers over the D loop
        v8f c0 = {}, c1 = {}, c2 = {}, c3 = {};
        for (int64_t d = 0; d < D; ++d) {
          const T* row = tile + d * K.s_dim + t;
          const float qd = q[d];
          c0 += qd * load8(row);
          c1 += qd * load8(row + 8);
          c2 += qd * load8(row + 16);
          c3 += qd * load8(row + 24);
        }
        store8(o + t, c0);
        store8(o + t + 8, c1);
        store8(o + t + 16, c2);
        store8(o + t + 24, c3);
      }
      if (t < n) {
        for (int64_t u = t; u < n; ++u) o[u] = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
          const T* row = tile + d * K.s_dim;
          const float qd = q[d];
#pragma omp simd
          for (int64_t u = t; u < n; ++u) o[u] += qd * to_f(row[u]);
        }
      }
    } else {
      for (int64_t t = 0; t < n; ++t) {
        const T* k = tile + t * K.s_tok;
        float acc = 0.0f;
        if (K.s_dim == 1) {
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < D; ++d) acc += q[d] * to_f(k[d]);
        } else {
          for (int64_t d = 0; d < D; ++d) acc += q[d] * to_f(k[d * K.s_dim]);
        }
        o[t] = acc;
      }
    }
    j += n;
  }
}

// acc += w * v_j
template <typename T>
inline void add_value(const Paged<T>& V, const Index& table, int64_t g, int64_t kvh, int64_t j, float w, int64_t D,
                      float* acc) {
  const T* v = V.base + table(g, j / V.block) * V.s_blk + kvh * V.s_head + (j % V.block) * V.s_tok;
  if (V.s_dim == 1) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += w * to_f(v[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) acc[d] += w * to_f(v[d * V.s_dim]);
  }
}

template <typename T>
struct Args {
  const T* q;
  int64_t q_s0, q_s1, q_s2;
  T* out;
  int64_t o_s0, o_s1, o_s2;
  Paged<T> K, V;
  Index table, seq_lens, query_start, query_lens, heads, kv_heads;
  int64_t D;
  float scale, beta, tau, cut;
  int64_t window;  // <= 0: none
};

// The arguments every task reads, from an entry point's tensors.
template <typename T>
Args<T> make_args(const at::Tensor& query, const at::Tensor& output, const at::Tensor& key_cache,
                  const at::Tensor& value_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                  const at::Tensor& query_start, const at::Tensor& query_lens, const at::Tensor& heads,
                  const at::Tensor& kv_heads, double scale, double beta, double threshold, double cut,
                  int64_t window) {
  return Args<T>{query.data_ptr<T>(), query.stride(0), query.stride(1), query.stride(2),
                 output.data_ptr<T>(), output.stride(0), output.stride(1), output.stride(2),
                 Paged<T>(key_cache), Paged<T>(value_cache),
                 Index(block_table), Index(seq_lens), Index(query_start), Index(query_lens), Index(heads),
                 Index(kv_heads), query.size(2), static_cast<float>(scale), static_cast<float>(beta),
                 static_cast<float>(threshold), static_cast<float>(cut), window};
}

template <typename T>
inline void load_row(const T* src, int64_t stride, int64_t D, float mul, float* dst) {
  for (int64_t d = 0; d < D; ++d) dst[d] = to_f(src[d * stride]) * mul;
}

template <typename T>
inline void store_row(const float* src, int64_t D, T* dst, int64_t stride) {
  for (int64_t d = 0; d < D; ++d) dst[d * stride] = static_cast<T>(src[d]);
}

// Calibrated output of one row from all its probabilities p[j - lo] (j in [lo, hi)), given
// the sink mask: sum_j p'_j v_j. Used where o - o_S would cancel.
template <typename T>
void full_row_output(const Args<T>& a, int64_t g, int64_t kvh, int64_t lo, int64_t hi, const float* p,
                     const uint8_t* is_sink, float factor, float* acc) {
  for (int64_t d = 0; d < a.D; ++d) acc[d] = 0.0f;
  for (int64_t j = lo; j < hi; ++j) {
    const float w = p[j - lo] * (is_sink[j - lo] ? a.beta : factor);
    if (w != 0.0f) add_value(a.V, a.table, g, kvh, j, w, a.D, acc);
  }
}

// o' = beta*o_S + factor*(o - o_S) on the native output row, in place.
template <typename T>
inline void output_form(const Args<T>& a, T* orow, const float* o_s, float factor) {
  for (int64_t d = 0; d < a.D; ++d) {
    const float o = to_f(orow[d * a.o_s2]);
    orow[d * a.o_s2] = static_cast<T>(a.beta * o_s[d] + factor * (o - o_s[d]));
  }
}

// max of p[0 .. n). Written on vectors: GCC leaves `omp simd reduction(max)` over std::max
// as one scalar max per key in series (3-4 cycles each), which cost a 2,048-token prefill
// pass as much as its exponentials; two 8-lane accumulators take ~0.1 cycle per key.
inline float row_max(const float* p, int64_t n) {
  v8f m0 = v8f{} - INFINITY, m1 = m0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v8f a = load8(p + j), b = load8(p + j + 8);
    m0 = m0 > a ? m0 : a;
    m1 = m1 > b ? m1 : b;
  }
  m0 = m0 > m1 ? m0 : m1;
  float m = -INFINITY;
  for (int t = 0; t < 8; ++t) m = std::max(m, static_cast<float>(m0[t]));
  for (; j < n; ++j) m = std::max(m, p[j]);
  return m;
}

// Scores of one decode row over its n keys -> its probabilities, in place.
inline void softmax_row(float* p, int64_t n) {
  const float m = row_max(p, n);
  float z = 0.0f;
#pragma omp simd reduction(+ : z)
  for (int64_t j = 0; j < n; ++j) {
    p[j] = exp_neg(p[j] - m);
    z += p[j];
  }
  const float inv = 1.0f / z;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) p[j] *= inv;
}

// The sinks of one decode row (keys lo .. lo + n - 1, probabilities p): for one row the
// column score is the probability itself (spec section 1); position 0 is never a sink.
struct RowSinks {
  int64_t count = 0;
  float sink_mass = 0.0f, nonsink_mass = 0.0f;
  // core leaves a row unchanged without sinks or when its non-sink mass vanishes
  bool calibrates() const { return count > 0 && sink_mass > 0.0f && nonsink_mass > kNonSinkEps; }
  float factor(float beta) const { return 1.0f + (1.0f - beta) * sink_mass / nonsink_mass; }
};

inline RowSinks row_sinks(const float* p, int64_t n, int64_t lo, float tau, uint8_t* is_sink) {
  RowSinks r;
  for (int64_t j = 0; j < n; ++j) {
    const bool s = (p[j] > tau) && (lo + j != 0);
    is_sink[j] = s;
    r.count += s;
    if (s) r.sink_mass += p[j]; else r.nonsink_mass += p[j];
  }
  return r;
}

// The peak scratch of the call that just ran, into the per-kind peak (0: decode-only, 1: prefill rows).
inline void record_call_peak(int kind) {
  std::atomic<int64_t>& peak = g_kind_peak[kind];
  const int64_t call_peak = g_scratch_peak.load();
  int64_t prev = peak.load();
  while (call_peak > prev && !peak.compare_exchange_weak(prev, call_peak)) {
  }
}

template <typename T>
void decode_task(const Args<T>& a, int64_t g, int64_t hs, std::vector<float>& buf) {
  const int64_t D = a.D, L = a.seq_lens(g), row = a.query_start(g);
  if (L <= 0) return;
  const int64_t h = a.heads(hs), kvh = a.kv_heads(hs);
  const int64_t lo = a.window > 0 ? std::max<int64_t>(0, L - a.window) : 0, n = L - lo;
  buf.resize(2 * D + 2 * n);
  ScratchUse use(static_cast<int64_t>(buf.capacity() * sizeof(float)));
  float* q = buf.data();
  float* acc = q + D;
  float* p = acc + D;
  uint8_t* is_sink = reinterpret_cast<uint8_t*>(p + n);
  load_row(a.q + row * a.q_s0 + h * a.q_s1, a.q_s2, D, a.scale, q);
  paged_scores(a.K, a.table, g, kvh, q, D, lo, L, p);
  softmax_row(p, n);
  const RowSinks rs = row_sinks(p, n, lo, a.tau, is_sink);
  if (!rs.calibrates()) return;
  const float factor = rs.factor(a.beta);
  T* orow = a.out + row * a.o_s0 + h * a.o_s1;
  if (rs.nonsink_mass >= a.cut) {
    for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
    for (int64_t j = 0; j < n; ++j)
      if (is_sink[j]) add_value(a.V, a.table, g, kvh, lo + j, p[j], D, acc);
    output_form(a, orow, acc, factor);
  } else {
    full_row_output(a, g, kvh, lo, L, p, is_sink, factor, acc);
    store_row(acc, D, orow, a.o_s2);
  }
}

// Keys of one (sequence, head) packed for the blocked product: panels of kPanel consecutive
// keys, each panel [D][kPanel] contiguous (zero-padded past the last key). The product then
// streams each panel's D rows in order: a plain [D, nk] matrix would put its D rows a
// multiple of 4 KiB apart for long prompts, all in one L1 set (conflict misses on every row).
constexpr int64_t kPanel = 16;

struct PackedKeys {
  std::vector<float> data;
  int64_t D = 0, nk = 0, panels = 0;
  float at(int64_t d, int64_t j) const { return data[(j / kPanel) * D * kPanel + d * kPanel + (j % kPanel)]; }
  const float* panel(int64_t p) const { return data.data() + p * D * kPanel; }
};

template <typename T>
void pack_keys(const Args<T>& a, int64_t g, int64_t kvh, int64_t klo, int64_t L, PackedKeys& K) {
  const int64_t D = a.D, nk = L - klo;
  K.D = D, K.nk = nk, K.panels = (nk + kPanel - 1) / kPanel;
  K.data.assign(K.panels * D * kPanel, 0.0f);
  for (int64_t j = klo; j < L;) {
    const int64_t b = j / a.K.block, t0 = j % a.K.block, n = std::min(a.K.block - t0, L - j);
    const T* tile = a.K.base + a.table(g, b) * a.K.s_blk + kvh * a.K.s_head + t0 * a.K.s_tok;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t jj = j - klo + t;
      float* dst = K.data.data() + (jj / kPanel) * D * kPanel + (jj % kPanel);
      const T* src = tile + t * a.K.s_tok;
      for (int64_t d = 0; d < D; ++d) dst[d * kPanel] = to_f(src[d * a.K.s_dim]);
    }
    j += n;
  }
}

// S[r, 16p + c] = sum_d Q[r, d] * key(16p + c)[d] for rows [0, R) and panels [p0, p1), into S
// (row stride lds, column 0 = panel p0's first key). Register tiles of 6 rows x 16 keys: 12
// accumulators (enough independent FMAs to cover their latency), each panel load feeding six.
// Causal rows: row r needs only S's first cols0 + r columns, so a tile stops at the panel of
// its last row's last key (entries past a row's keys are left unwritten: callers never read them).
inline void qk_panels(const float* Q, int64_t R, int64_t D, const PackedKeys& K, int64_t p0, int64_t p1, float* S,
                      int64_t lds, int64_t cols0) {
  constexpr int RB = 6;
  int64_t r = 0;
  for (; r + RB <= R; r += RB) {
    const float* q0 = Q + r * D;
    const int64_t pe = std::min(p1, p0 + (cols0 + r + RB + kPanel - 1) / kPanel);
    for (int64_t p = p0; p < pe; ++p) {
      const float* k = K.panel(p);
      v8f c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {}, c40 = {}, c41 = {},
          c50 = {}, c51 = {};
      for (int64_t d = 0; d < D; ++d) {
        const v8f k0 = load8(k + d * kPanel), k1 = load8(k + d * kPanel + 8);
        const float a0 = q0[d], a1 = q0[D + d], a2 = q0[2 * D + d], a3 = q0[3 * D + d], a4 = q0[4 * D + d],
                    a5 = q0[5 * D + d];
        c00 += a0 * k0;
        c01 += a0 * k1;
        c10 += a1 * k0;
        c11 += a1 * k1;
        c20 += a2 * k0;
        c21 += a2 * k1;
        c30 += a3 * k0;
        c31 += a3 * k1;
        c40 += a4 * k0;
        c41 += a4 * k1;
        c50 += a5 * k0;
        c51 += a5 * k1;
      }
      float* s0 = S + r * lds + (p - p0) * kPanel;
      store8(s0, c00);
      store8(s0 + 8, c01);
      store8(s0 + lds, c10);
      store8(s0 + lds + 8, c11);
      store8(s0 + 2 * lds, c20);
      store8(s0 + 2 * lds + 8, c21);
      store8(s0 + 3 * lds, c30);
      store8(s0 + 3 * lds + 8, c31);
      store8(s0 + 4 * lds, c40);
      store8(s0 + 4 * lds + 8, c41);
      store8(s0 + 5 * lds, c50);
      store8(s0 + 5 * lds + 8, c51);
    }
  }
  for (; r < R; ++r) {
    const float* q = Q + r * D;
    const int64_t pe = std::min(p1, p0 + (cols0 + r + 1 + kPanel - 1) / kPanel);
    for (int64_t p = p0; p < pe; ++p) {
      const float* k = K.panel(p);
      v8f c0 = {}, c1 = {};
      for (int64_t d = 0; d < D; ++d) {
        c0 += q[d] * load8(k + d * kPanel);
        c1 += q[d] * load8(k + d * kPanel + 8);
      }
      float* s0 = S + r * lds + (p - p0) * kPanel;
      store8(s0, c0);
      store8(s0 + 8, c1);
    }
  }
}

// out[j - lo] = q . key(j) for keys [lo, hi) of the packed keys (row recompute).
inline void row_scores_packed(const float* q, const PackedKeys& K, int64_t lo, int64_t hi, float* out) {
  for (int64_t j = lo; j < hi; ++j) out[j - lo] = 0.0f;
  for (int64_t j = lo; j < hi;) {
    const int64_t p = j / kPanel, c0 = j % kPanel, n = std::min(kPanel - c0, hi - j);
    const float* k = K.panel(p) + c0;
    float* o = out + (j - lo);
    for (int64_t d = 0; d < K.D; ++d) {
      const float qd = q[d];
      const float* kd = k + d * kPanel;
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) o[t] += qd * kd[t];
    }
    j += n;
  }
}

// Rows of one (sequence, head) in a prefill call: row i (0 .. ql-1) sits at position first + i
// and sees keys [lo(i), first + i] (the window's band, or from klo).
struct RowSpan {
  int64_t first, klo, W;  // W <= 0: no window
  int64_t lo(int64_t i) const { return W > 0 ? std::max<int64_t>(klo, first + i - W + 1) : klo; }
  int64_t hi(int64_t i) const { return first + i + 1; }  // one past the row's last key
};

inline RowSpan row_span(int64_t L, int64_t ql, int64_t W) {
  const int64_t first = L - ql;
  return RowSpan{first, W > 0 ? std::max<int64_t>(0, first - W + 1) : 0, W};
}

// O[r, :] = sum_c S[r, c] * V[c, :] for rows [0, R) and columns [c0, c1) of S (row stride lds;
// entries outside a row's keys are 0), V packed [keys][D] float32 from S's column 0. Tiles of
// 6 rows x 32 values: 24 accumulators (AVX-512 has 32 vector registers, AVX2 16: there the
// compiler spills, still correct), each V load feeding six rows.
inline void pv_rows(const float* S, int64_t lds, int64_t R, const float* V, int64_t D, int64_t c0, int64_t c1,
                    float* O) {
  constexpr int RB = 6;
  int64_t r = 0;
  for (; r + RB <= R; r += RB) {
    int64_t d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) {
      v8f c[RB][4] = {};
      for (int64_t j = c0; j < c1; ++j) {
        const float* v = V + j * D + d0;
        const v8f v0 = load8(v), v1 = load8(v + 8), v2 = load8(v + 16), v3 = load8(v + 24);
#pragma GCC unroll 6
        for (int t = 0; t < RB; ++t) {
          const float s = S[(r + t) * lds + j];
          c[t][0] += s * v0;
          c[t][1] += s * v1;
          c[t][2] += s * v2;
          c[t][3] += s * v3;
        }
      }
      for (int t = 0; t < RB; ++t)
        for (int u = 0; u < 4; ++u) store8(O + (r + t) * D + d0 + 8 * u, c[t][u]);
    }
    for (; d0 < D; ++d0) {  // head sizes not a multiple of 32
      for (int t = 0; t < RB; ++t) {
        float acc = 0.0f;
        for (int64_t j = c0; j < c1; ++j) acc += S[(r + t) * lds + j] * V[j * D + d0];
        O[(r + t) * D + d0] = acc;
      }
    }
  }
  for (; r < R; ++r) {
    float* o = O + r * D;
    for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
    for (int64_t j = c0; j < c1; ++j) {
      const float s = S[r * lds + j];
      const float* v = V + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] += s * v[d];
    }
  }
}

// Where pass 1 writes the plain attention output of its rows (whole-layer prefill): V packed
// [keys from klo][D] float32, and the output rows of head h.
template <typename T>
struct PlainOutput {
  const float* V;
  T* out;  // row i of the sequence at out + i * o_s0 (head offset included)
};

// Pass 1 over rows [i0, i1) of one (sequence, head), a block of rows at a time (never the full
// q x k matrix): each row's log-sum-exp into lse[i - i0], its probabilities added to the column
// sums col[j - klo] (null: not wanted) and, with `plain`, its attention output P V.
// Q: the rows' scaled queries [i1 - i0, D]. Blocks of at most 60 rows (a multiple of the
// product's 6-row tile): under the causal mask each block multiplies only the panels up to its
// last row, so small blocks skip most of the masked upper triangle.
template <typename T>
void rows_pass(const Args<T>& a, const RowSpan& rs, const PackedKeys& K, const float* Q, int64_t i0, int64_t i1,
               int64_t block_elems, float* lse, float* col, const PlainOutput<T>* plain) {
  const int64_t D = a.D, nrows = i1 - i0;
  const int64_t row_stride = K.panels * kPanel;
  const int64_t rows_per_block =
      std::max<int64_t>(6, std::min<int64_t>({nrows, int64_t{60}, block_elems / std::max<int64_t>(1, row_stride)}));
  std::vector<float> S(rows_per_block * row_stride), O(plain ? rows_per_block * D : 0), inv(rows_per_block);
  ScratchUse use(static_cast<int64_t>((S.size() + O.size() + inv.size()) * sizeof(float)));
  for (int64_t r0 = i0; r0 < i1; r0 += rows_per_block) {
    const int64_t r1 = std::min(i1, r0 + rows_per_block);
    const int64_t kb = rs.lo(r0), ke = rs.hi(r1 - 1);  // the block's band of keys
    const int64_t p0 = (kb - rs.klo) / kPanel, p1 = (ke - rs.klo + kPanel - 1) / kPanel;
    const int64_t kb0 = rs.klo + p0 * kPanel;  // key of S's column 0
    const int64_t lds = (p1 - p0) * kPanel;
    qk_panels(Q + (r0 - i0) * D, r1 - r0, D, K, p0, p1, S.data(), lds, rs.hi(r0) - kb0);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t lo = rs.lo(i), n = rs.hi(i) - lo;
      float* row = S.data() + (i - r0) * lds;
      float* s = row + (lo - kb0);
      const float m = row_max(s, n);
      float z = 0.0f;
#pragma omp simd reduction(+ : z)
      for (int64_t j = 0; j < n; ++j) {
        s[j] = exp_neg(s[j] - m);
        z += s[j];
      }
      lse[i - i0] = m + std::log(z);
      const float iv = 1.0f / z;
      inv[i - r0] = iv;
      if (col) {
        float* c = col + (lo - rs.klo);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) c[j] += s[j] * iv;
      }
      if (plain) {  // the keys the row does not see weigh nothing in P V
        for (int64_t j = 0; j < lo - kb0; ++j) row[j] = 0.0f;
        for (int64_t j = rs.hi(i) - kb0; j < lds; ++j) row[j] = 0.0f;
      }
    }
    if (!plain) continue;
    // P V over the block's band, 6 rows at a time over the band of those rows only
    for (int64_t r = r0; r < r1; r += 6) {
      const int64_t re = std::min(r1, r + 6);
      pv_rows(S.data() + (r - r0) * lds, lds, re - r, plain->V + (kb0 - rs.klo) * D, D, rs.lo(r) - kb0,
              rs.hi(re - 1) - kb0, O.data() + (r - r0) * D);
    }
    for (int64_t i = r0; i < r1; ++i) {
      float* o = O.data() + (i - r0) * D;
      const float iv = inv[i - r0];
      for (int64_t d = 0; d < D; ++d) o[d] *= iv;
      store_row(o, D, plain->out + i * a.o_s0, a.o_s2);
    }
  }
}

// The sinks of one (sequence, head) from its column sums: mean attention over the rows that see
// each key above tau (spec section 1); position 0 never.
inline void find_sinks(const RowSpan& rs, int64_t L, int64_t ql, float tau, const float* col,
                       std::vector<int64_t>& sinks, std::vector<uint8_t>& is_sink) {
  sinks.clear();
  is_sink.assign(L - rs.klo, 0);
  for (int64_t j = rs.klo; j < L; ++j) {
    // rows i in [0, ql) with first + i >= j and first + i <= j + W - 1
    const int64_t i_lo = std::max<int64_t>(0, j - rs.first);
    const int64_t i_hi = rs.W > 0 ? std::min<int64_t>(ql - 1, j + rs.W - 1 - rs.first) : ql - 1;
    const int64_t count = i_hi - i_lo + 1;
    if (j == 0 || count <= 0) continue;
    if (col[j - rs.klo] / static_cast<float>(count) > tau) {
      sinks.push_back(j);
      is_sink[j - rs.klo] = 1;
    }
  }
}

// Pass 2 of one (sequence g, head h): per row, P_S and o_S over the sink columns only (P_S from
// the stored log-sum-exp), the output-space form on the row's output; rows whose non-sink mass
// is below the cut are recomputed in full with N summed directly.
template <typename T>
void correct_rows(const Args<T>& a, int64_t g, int64_t h, int64_t kvh, int64_t ql, const RowSpan& rs,
                  const PackedKeys& K, const float* Q, const float* lse, const std::vector<int64_t>& sinks,
                  const std::vector<uint8_t>& is_sink) {
  const int64_t D = a.D, row0 = a.query_start(g), nk = K.nk;
  const int64_t ns = static_cast<int64_t>(sinks.size());
  std::vector<float> KS(ns * D), VS(ns * D, 0.0f), o_s(D), acc(D), p(nk);
  ScratchUse use(static_cast<int64_t>((KS.size() + VS.size() + o_s.size() + acc.size() + p.size() + ns * 2) * 4));
  for (int64_t k = 0; k < ns; ++k) {
    for (int64_t d = 0; d < D; ++d) KS[k * D + d] = K.at(d, sinks[k] - rs.klo);
    add_value(a.V, a.table, g, kvh, sinks[k], 1.0f, D, &VS[k * D]);
  }
  for (int64_t i = 0; i < ql; ++i) {
    const int64_t lo = rs.lo(i), pos = rs.first + i;
    const float* q = &Q[i * D];
    float sink_mass = 0.0f;
    for (int64_t d = 0; d < D; ++d) o_s[d] = 0.0f;
    for (int64_t k = 0; k < ns; ++k) {
      const int64_t s = sinks[k];
      if (s < lo || s > pos) continue;
      const float* ks = &KS[k * D];
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += q[d] * ks[d];
      const float ps = exp_neg(dot - lse[i]);
      sink_mass += ps;
      const float* v = &VS[k * D];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o_s[d] += ps * v[d];
    }
    if (!(sink_mass > 0.0f)) continue;
    T* orow = a.out + (row0 + i) * a.o_s0 + h * a.o_s1;
    const float nonsink_est = 1.0f - sink_mass;
    if (nonsink_est >= a.cut) {
      output_form(a, orow, o_s.data(), 1.0f + (1.0f - a.beta) * sink_mass / nonsink_est);
      continue;
    }
    // Non-sink mass too small for the output form: the whole row, N summed directly.
    const int64_t n = pos + 1 - lo;
    row_scores_packed(q, K, lo - rs.klo, pos + 1 - rs.klo, p.data());
    float pm = 0.0f, nm = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      p[j] = exp_neg(p[j] - lse[i]);
      if (is_sink[lo - rs.klo + j]) pm += p[j]; else nm += p[j];
    }
    if (nm <= kNonSinkEps) continue;
    full_row_output(a, g, kvh, lo, pos + 1, p.data(), &is_sink[lo - rs.klo], 1.0f + (1.0f - a.beta) * pm / nm,
                    acc.data());
    store_row(acc.data(), D, orow, a.o_s2);
  }
}

template <typename T>
void load_queries(const Args<T>& a, int64_t g, int64_t h, int64_t i0, int64_t i1, float* Q) {
  const int64_t row0 = a.query_start(g);
  for (int64_t i = i0; i < i1; ++i)
    load_row(a.q + (row0 + i) * a.q_s0 + h * a.q_s1, a.q_s2, a.D, a.scale, Q + (i - i0) * a.D);
}

// The separate calibration pass of one (sequence, calibrated head) after the native kernel.
template <typename T>
void prefill_task(const Args<T>& a, int64_t g, int64_t hs, int64_t ql, int64_t block_elems) {
  const int64_t D = a.D, L = a.seq_lens(g);
  const int64_t h = a.heads(hs), kvh = a.kv_heads(hs);
  if (L <= 0 || L - ql < 0) return;
  const RowSpan rs = row_span(L, ql, a.window);
  const int64_t nk = L - rs.klo;
  // Keys of this (sequence, head) packed in panels (float32); queries as [ql, D], scaled.
  PackedKeys K;
  pack_keys(a, g, kvh, rs.klo, L, K);
  std::vector<float> Q(ql * D), lse(ql), col(nk, 0.0f);
  ScratchUse use(static_cast<int64_t>((K.data.size() + Q.size() + lse.size() + col.size()) * sizeof(float)));
  load_queries(a, g, h, 0, ql, Q.data());
  rows_pass<T>(a, rs, K, Q.data(), 0, ql, block_elems, lse.data(), col.data(), nullptr);
  std::vector<int64_t> sinks;
  std::vector<uint8_t> is_sink;
  find_sinks(rs, L, ql, a.tau, col.data(), sinks, is_sink);
  if (!sinks.empty()) correct_rows(a, g, h, kvh, ql, rs, K, Q.data(), lse.data(), sinks, is_sink);
}

// Decode rows of a layer whose step is calibrated throughout: attention of every query head
// of one KV head in one pass over the cache (K read once for scores, V once for the outputs,
// for all the query heads that share them), the calibrated heads with ACT's weights
// p'_j = beta*p_j on sinks and p_j*(1 + (1-beta)*P_S/N) elsewhere (spec section 2, the
// whole-row form: no cancellation, so no recompute cut). The engine then skips the native
// kernel in that layer, so calibrating costs no second read of the cache.
template <typename T>
void decode_group_task(const Args<T>& a, int64_t g, int64_t kvh, int64_t qpg, const uint8_t* calibrated,
                       std::vector<float>& buf) {
  const int64_t D = a.D, L = a.seq_lens(g), row = a.query_start(g);
  if (L <= 0) return;
  const int64_t lo = a.window > 0 ? std::max<int64_t>(0, L - a.window) : 0, n = L - lo;
  buf.resize(2 * qpg * D + qpg * n + n / 4 + 1);
  ScratchUse use(static_cast<int64_t>(buf.capacity() * sizeof(float)));
  float* q = buf.data();
  float* acc = q + qpg * D;
  float* p = acc + qpg * D;
  uint8_t* is_sink = reinterpret_cast<uint8_t*>(p + qpg * n);  // one head's at a time
  const int64_t h0 = kvh * qpg;
  for (int64_t i = 0; i < qpg; ++i) load_row(a.q + row * a.q_s0 + (h0 + i) * a.q_s1, a.q_s2, D, a.scale, q + i * D);
  // Scores a cache block at a time for all the heads: the block's keys stay in cache across them.
  for (int64_t j = lo; j < L;) {
    const int64_t m = std::min(a.K.block - j % a.K.block, L - j);
    for (int64_t i = 0; i < qpg; ++i) paged_scores(a.K, a.table, g, kvh, q + i * D, D, j, j + m, p + i * n + (j - lo));
    j += m;
  }
  for (int64_t i = 0; i < qpg; ++i) {
    float* pi = p + i * n;
    softmax_row(pi, n);
    if (!calibrated[h0 + i]) continue;
    const RowSinks rs = row_sinks(pi, n, lo, a.tau, is_sink);
    if (!rs.calibrates()) continue;  // row unchanged
    const float factor = rs.factor(a.beta);
    for (int64_t j = 0; j < n; ++j) pi[j] *= is_sink[j] ? a.beta : factor;
  }
  for (int64_t k = 0; k < qpg * D; ++k) acc[k] = 0.0f;
  for (int64_t j = lo; j < L; ++j) {
    const T* v = a.V.base + a.table(g, j / a.V.block) * a.V.s_blk + kvh * a.V.s_head + (j % a.V.block) * a.V.s_tok;
    for (int64_t i = 0; i < qpg; ++i) {
      const float w = p[i * n + (j - lo)];
      float* ai = acc + i * D;
      if (a.V.s_dim == 1) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ai[d] += w * to_f(v[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) ai[d] += w * to_f(v[d * a.V.s_dim]);
      }
    }
  }
  for (int64_t i = 0; i < qpg; ++i) store_row(acc + i * D, D, a.out + row * a.o_s0 + (h0 + i) * a.o_s1, a.o_s2);
}

template <typename T>
void run_decode(const at::Tensor& query, const at::Tensor& output, const at::Tensor& key_cache,
                const at::Tensor& value_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                const at::Tensor& query_start, const at::Tensor& heads, double scale, double beta, double threshold,
                int64_t window, int64_t max_seq_len) {
  const Args<T> a = make_args<T>(query, output, key_cache, value_cache, block_table, seq_lens, query_start, seq_lens,
                                 heads, heads, scale, beta, threshold, 0.0f, window);
  const int64_t H = query.size(1), Hkv = key_cache.size(1), qpg = H / Hkv;
  std::vector<uint8_t> calibrated(H, 0);
  for (int64_t k = 0; k < heads.size(0); ++k) calibrated[a.heads(k)] = 1;
  const int64_t G = block_table.size(0), tasks = G * Hkv;
  const int64_t work = std::max<int64_t>(1, max_seq_len) * a.D * 2 * qpg;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / work);
  g_scratch_peak.store(0);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t t = begin; t < end; ++t) decode_group_task(a, t / Hkv, t % Hkv, qpg, calibrated.data(), buf);
  });
  record_call_peak(0);
}

template <typename T>
void run(const at::Tensor& query, const at::Tensor& output, const at::Tensor& key_cache,
         const at::Tensor& value_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
         const at::Tensor& query_start, const at::Tensor& query_lens, const at::Tensor& heads,
         const at::Tensor& kv_heads, double scale, double beta, double threshold, int64_t window,
         double recompute_below, int64_t max_query_len, int64_t max_seq_len, int64_t block_elems) {
  const Args<T> a = make_args<T>(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens,
                                 heads, kv_heads, scale, beta, threshold, recompute_below, window);
  const int64_t G = block_table.size(0), Hs = heads.size(0), tasks = G * Hs;
  // Small steps stay on the calling thread: a parallel region costs more than a few
  // decode rows, and waits for a descheduled thread on a loaded machine.
  const int64_t work = max_query_len * std::max<int64_t>(1, max_seq_len) * a.D;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, work));
  g_scratch_peak.store(0);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / Hs, hs = t % Hs;
      const int64_t ql = a.query_lens(g);
      if (ql == 1)
        decode_task(a, g, hs, buf);
      else if (ql > 1)
        prefill_task(a, g, hs, ql, block_elems);
    }
  });
  record_call_peak(max_query_len > 1 ? 1 : 0);
}

void calibrate_paged(const at::Tensor& query, const at::Tensor& output, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                     const at::Tensor& query_start, const at::Tensor& query_lens, const at::Tensor& heads,
                     const at::Tensor& kv_heads, double scale, double beta, double threshold, int64_t window,
                     double recompute_below, int64_t max_query_len, int64_t max_seq_len, int64_t block_elems) {
  const auto dt = query.scalar_type();
  TORCH_CHECK(output.scalar_type() == dt && key_cache.scalar_type() == dt && value_cache.scalar_type() == dt,
              "act_kernels.calibrate_paged: query, output and caches must share one dtype");
  TORCH_CHECK(query.dim() == 3 && output.dim() == 3 && key_cache.dim() == 4 && value_cache.dim() == 4,
              "act_kernels.calibrate_paged: query/output [T, H, D], caches [blocks, kv_heads, block, D]");
  TORCH_CHECK(query.device().is_cpu(), "act_kernels.calibrate_paged is the CPU kernel");
#define ACT_RUN(T)                                                                                             \
  run<T>(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, kv_heads, \
         scale, beta, threshold, window, recompute_below, max_query_len, max_seq_len, block_elems)
  if (dt == at::kFloat) ACT_RUN(float);
  else if (dt == at::kBFloat16) ACT_RUN(c10::BFloat16);
  else if (dt == at::kHalf) ACT_RUN(c10::Half);
  else TORCH_CHECK(false, "act_kernels.calibrate_paged: unsupported dtype ", dt);
#undef ACT_RUN
}

// The checks of the whole-layer entry points (op: their name in messages).
inline void check_whole_layer_args(const char* op, const at::Tensor& query, const at::Tensor& output,
                                   const at::Tensor& key_cache, const at::Tensor& value_cache) {
  const auto dt = query.scalar_type();
  TORCH_CHECK(output.scalar_type() == dt && key_cache.scalar_type() == dt && value_cache.scalar_type() == dt,
              "act_kernels.", op, ": query, output and caches must share one dtype");
  TORCH_CHECK(query.dim() == 3 && output.dim() == 3 && key_cache.dim() == 4 && value_cache.dim() == 4,
              "act_kernels.", op, ": query/output [T, H, D], caches [blocks, kv_heads, block, D]");
  TORCH_CHECK(query.size(1) % key_cache.size(1) == 0, "act_kernels.", op, ": heads not a multiple of KV heads");
  TORCH_CHECK(query.device().is_cpu(), "act_kernels.", op, " is a CPU kernel");
}

void decode_attention(const at::Tensor& query, const at::Tensor& output, const at::Tensor& key_cache,
                      const at::Tensor& value_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                      const at::Tensor& query_start, const at::Tensor& heads, double scale, double beta,
                      double threshold, int64_t window, int64_t max_seq_len) {
  check_whole_layer_args("decode_attention", query, output, key_cache, value_cache);
  const auto dt = query.scalar_type();
#define ACT_RUN(T)                                                                                                 \
  run_decode<T>(query, output, key_cache, value_cache, block_table, seq_lens, query_start, heads, scale, beta, threshold, \
                window, max_seq_len)
  if (dt == at::kFloat) ACT_RUN(float);
  else if (dt == at::kBFloat16) ACT_RUN(c10::BFloat16);
  else if (dt == at::kHalf) ACT_RUN(c10::Half);
  else TORCH_CHECK(false, "act_kernels.decode_attention: unsupported dtype ", dt);
#undef ACT_RUN
}

// Whole-layer prefill (steps whose every row runs an ACT arm, CPU_ATTN): every query head of
// the layer computed here in place of the native kernel, so the calibrated heads' scores are
// computed once, for their output and their column statistics together (a separate pass after
// the native kernel computes Q K^T a second time). Per wave of prefill sequences:
//   1. per (sequence, KV head): keys packed in panels and values as [keys][D], float32;
//   2. per (sequence, head, chunk of rows of equal causal area): pass 1 with the plain output
//      P V written, and for calibrated heads the rows' log-sum-exp and partial column sums;
//   3. per (sequence, calibrated head): the column sums, the sinks, pass 2 on those rows.
// Decode rows of the same call go through decode_group_task (all heads of a KV head at once).
constexpr int64_t kWaveBytes = int64_t{64} << 20;  // packed keys and values held at once (at least one sequence)
constexpr int64_t kRowsPerUnit = 256;  // a prompt's rows per unit of work, about (at most 16 units per head)

// Runs task(t) for t in [0, n) on torch's threads, each thread taking the next task when it
// is done with one (at::parallel_for splits a range evenly by count, whatever each task costs:
// calibrated heads' units cost more than plain ones).
template <typename F>
void for_each_dynamic(int64_t n, const F& task) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(n, std::max<int64_t>(1, at::get_num_threads()));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) task(t);
  });
}

struct PackedKV {
  PackedKeys K;
  std::vector<float> V;  // [keys from klo][D]
};

template <typename T>
void pack_values(const Args<T>& a, int64_t g, int64_t kvh, int64_t klo, int64_t L, std::vector<float>& V) {
  V.resize((L - klo) * a.D);
  for (int64_t j = klo; j < L; ++j) {
    const T* v = a.V.base + a.table(g, j / a.V.block) * a.V.s_blk + kvh * a.V.s_head + (j % a.V.block) * a.V.s_tok;
    float* dst = V.data() + (j - klo) * a.D;
    for (int64_t d = 0; d < a.D; ++d) dst[d] = to_f(v[d * a.V.s_dim]);
  }
}

// Row boundaries cutting rows [0, ql) into `chunks` pieces of about equal causal area.
inline std::vector<int64_t> area_chunks(const RowSpan& rs, int64_t ql, int64_t chunks) {
  std::vector<int64_t> cuts = {0};
  double total = 0.0;
  for (int64_t i = 0; i < ql; ++i) total += static_cast<double>(rs.hi(i) - rs.lo(i));
  double acc = 0.0;
  for (int64_t i = 0; i < ql && static_cast<int64_t>(cuts.size()) < chunks; ++i) {
    acc += static_cast<double>(rs.hi(i) - rs.lo(i));
    if (acc >= total * static_cast<double>(cuts.size()) / static_cast<double>(chunks) && i + 1 < ql) cuts.push_back(i + 1);
  }
  cuts.push_back(ql);
  return cuts;
}

template <typename T>
void prefill_wave(const Args<T>& a, const std::vector<int64_t>& seqs, int64_t H, int64_t Hkv,
                  const uint8_t* calibrated, int64_t block_elems) {
  const int64_t D = a.D, qpg = H / Hkv, NS = static_cast<int64_t>(seqs.size());
  std::vector<RowSpan> spans;
  int64_t packed = 0;
  for (const int64_t g : seqs) {
    spans.push_back(row_span(a.seq_lens(g), a.query_lens(g), a.window));
    packed += (a.seq_lens(g) - spans.back().klo + kPanel) * D * 2 * Hkv;
  }
  std::vector<PackedKV> kv(NS * Hkv);
  ScratchUse use(packed * static_cast<int64_t>(sizeof(float)));
  for_each_dynamic(NS * Hkv, [&](int64_t t) {
    const int64_t s = t / Hkv, kvh = t % Hkv, g = seqs[s], L = a.seq_lens(g);
    pack_keys(a, g, kvh, spans[s].klo, L, kv[t].K);
    pack_values(a, g, kvh, spans[s].klo, L, kv[t].V);
  });
  // Units of equal causal area, calibrated heads' first (the costlier ones start first: the
  // threads then finish together). A sequence's units depend on its own length only, never on
  // the batch or the thread count: its column sums are added up in the same groups whatever
  // else runs in the step, so a request's sinks (and result) do not depend on its batch.
  struct Unit {
    int64_t s, h, i0, i1;
  };
  std::vector<Unit> units;
  std::vector<int64_t> parts_of(NS * H, 0);  // (sequence, head) -> its number of units
  for (int64_t s = 0; s < NS; ++s) {
    const int64_t ql = a.query_lens(seqs[s]);
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(ql / kRowsPerUnit, 16));
    const std::vector<int64_t> cuts = area_chunks(spans[s], ql, chunks);
    for (int64_t h = 0; h < H; ++h) {
      for (size_t c = 0; c + 1 < cuts.size(); ++c) units.push_back(Unit{s, h, cuts[c], cuts[c + 1]});
      parts_of[s * H + h] = static_cast<int64_t>(cuts.size()) - 1;
    }
  }
  std::stable_partition(units.begin(), units.end(), [&](const Unit& w) { return calibrated[w.h] != 0; });
  // Calibrated heads: each row's log-sum-exp and each unit's column sums, kept for step 3.
  std::vector<std::vector<float>> lse(NS * H), cols(units.size());
  for (int64_t s = 0; s < NS; ++s)
    for (int64_t h = 0; h < H; ++h)
      if (calibrated[h]) lse[s * H + h].resize(a.query_lens(seqs[s]));
  for_each_dynamic(static_cast<int64_t>(units.size()), [&](int64_t u) {
    std::vector<float> Q, own_lse;
    const Unit& w = units[u];
    const int64_t g = seqs[w.s], kvh = w.h / qpg, n = w.i1 - w.i0;
    const RowSpan& rs = spans[w.s];
    const PackedKV& p = kv[w.s * Hkv + kvh];
    Q.resize(n * D);
    load_queries(a, g, w.h, w.i0, w.i1, Q.data());
    const PlainOutput<T> plain{p.V.data(), a.out + a.query_start(g) * a.o_s0 + w.h * a.o_s1};
    float* col = nullptr;
    float* rows_lse;
    if (calibrated[w.h]) {
      cols[u].assign(p.K.nk, 0.0f);
      col = cols[u].data();
      rows_lse = lse[w.s * H + w.h].data() + w.i0;
    } else {
      own_lse.resize(n);
      rows_lse = own_lse.data();
    }
    ScratchUse held(static_cast<int64_t>((Q.capacity() + own_lse.capacity() + (col ? p.K.nk : 0)) * sizeof(float)));
    rows_pass<T>(a, rs, p.K, Q.data(), w.i0, w.i1, block_elems, rows_lse, col, &plain);
  });
  std::vector<int64_t> pairs;  // (sequence, calibrated head) as s * H + h
  for (int64_t s = 0; s < NS; ++s)
    for (int64_t h = 0; h < H; ++h)
      if (calibrated[h]) pairs.push_back(s * H + h);
  std::vector<int64_t> first_unit(NS * H, 0);  // units of one (sequence, head) stay consecutive
  for (int64_t u = static_cast<int64_t>(units.size()) - 1; u >= 0; --u) first_unit[units[u].s * H + units[u].h] = u;
  for_each_dynamic(static_cast<int64_t>(pairs.size()), [&](int64_t t) {
    std::vector<float> Q;
    std::vector<int64_t> sinks;
    std::vector<uint8_t> is_sink;
    const int64_t sh = pairs[t], s = sh / H, h = sh % H, g = seqs[s], kvh = h / qpg;
    const int64_t L = a.seq_lens(g), ql = a.query_lens(g);
    const PackedKV& p = kv[s * Hkv + kvh];
    std::vector<float>& col = cols[first_unit[sh]];
    for (int64_t k = 1; k < parts_of[sh]; ++k) {
      const std::vector<float>& part = cols[first_unit[sh] + k];
#pragma omp simd
      for (int64_t j = 0; j < p.K.nk; ++j) col[j] += part[j];
    }
    find_sinks(spans[s], L, ql, a.tau, col.data(), sinks, is_sink);
    if (sinks.empty()) return;
    Q.resize(ql * D);
    ScratchUse held(static_cast<int64_t>(Q.capacity() * sizeof(float)));
    load_queries(a, g, h, 0, ql, Q.data());
    correct_rows(a, g, h, kvh, ql, spans[s], p.K, Q.data(), lse[sh].data(), sinks, is_sink);
  });
}

template <typename T>
void run_layer(const at::Tensor& query, const at::Tensor& output, const at::Tensor& key_cache,
               const at::Tensor& value_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
               const at::Tensor& query_start, const at::Tensor& query_lens, const at::Tensor& heads, double scale,
               double beta, double threshold, int64_t window, double recompute_below, int64_t max_seq_len,
               int64_t block_elems) {
  const Args<T> a = make_args<T>(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens,
                                 heads, heads, scale, beta, threshold, recompute_below, window);
  const int64_t H = query.size(1), Hkv = key_cache.size(1), qpg = H / Hkv, G = block_table.size(0);
  std::vector<uint8_t> calibrated(H, 0);
  for (int64_t k = 0; k < heads.size(0); ++k) calibrated[a.heads(k)] = 1;
  std::vector<int64_t> decode_seqs, prefill_seqs;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t ql = a.query_lens(g);
    if (ql == 1) decode_seqs.push_back(g);
    else if (ql > 1 && a.seq_lens(g) >= ql) prefill_seqs.push_back(g);
  }
  g_scratch_peak.store(0);
  if (!decode_seqs.empty()) {
    const int64_t tasks = static_cast<int64_t>(decode_seqs.size()) * Hkv;
    const int64_t work = std::max<int64_t>(1, max_seq_len) * a.D * 2 * qpg;
    at::parallel_for(0, tasks, std::max<int64_t>(1, (int64_t{1} << 17) / work), [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      for (int64_t t = begin; t < end; ++t)
        decode_group_task(a, decode_seqs[t / Hkv], t % Hkv, qpg, calibrated.data(), buf);
    });
  }
  for (size_t w0 = 0; w0 < prefill_seqs.size();) {
    std::vector<int64_t> wave;
    int64_t bytes = 0;
    for (; w0 < prefill_seqs.size(); ++w0) {
      const int64_t b = a.seq_lens(prefill_seqs[w0]) * a.D * 8 * Hkv;
      if (!wave.empty() && bytes + b > kWaveBytes) break;
      wave.push_back(prefill_seqs[w0]);
      bytes += b;
    }
    prefill_wave(a, wave, H, Hkv, calibrated.data(), block_elems);
  }
  record_call_peak(prefill_seqs.empty() ? 0 : 1);
}

void layer_attention(const at::Tensor& query, const at::Tensor& output, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                     const at::Tensor& query_start, const at::Tensor& query_lens, const at::Tensor& heads,
                     double scale, double beta, double threshold, int64_t window, double recompute_below,
                     int64_t max_seq_len, int64_t block_elems) {
  check_whole_layer_args("layer_attention", query, output, key_cache, value_cache);
  const auto dt = query.scalar_type();
#define ACT_RUN(T)                                                                                                 \
  run_layer<T>(query, output, key_cache, value_cache, block_table, seq_lens, query_start, query_lens, heads, scale, \
               beta, threshold, window, recompute_below, max_seq_len, block_elems)
  if (dt == at::kFloat) ACT_RUN(float);
  else if (dt == at::kBFloat16) ACT_RUN(c10::BFloat16);
  else if (dt == at::kHalf) ACT_RUN(c10::Half);
  else TORCH_CHECK(false, "act_kernels.layer_attention: unsupported dtype ", dt);
#undef ACT_RUN
}

std::vector<int64_t> scratch_peak_bytes(bool reset) {
  std::vector<int64_t> peaks = {g_kind_peak[0].load(), g_kind_peak[1].load()};
  if (reset) g_kind_peak[0].store(0), g_kind_peak[1].store(0);
  return peaks;
}

}  // namespace

TORCH_LIBRARY(act_kernels, m) {
  m.def("scratch_peak_bytes(bool reset) -> int[]", &scratch_peak_bytes);
  m.def(
      "calibrate_paged(Tensor query, Tensor(a!) output, Tensor key_cache, Tensor value_cache, Tensor block_table, "
      "Tensor seq_lens, Tensor query_start, Tensor query_lens, Tensor heads, Tensor kv_heads, float scale, "
      "float beta, float threshold, int window, float recompute_below, int max_query_len, int max_seq_len, "
      "int block_elems) -> ()");
  m.impl("calibrate_paged", c10::DispatchKey::CPU, TORCH_FN(calibrate_paged));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("calibrate_paged", &calibrate_paged, "ACT over the paged KV cache (see torch.ops.act_kernels.calibrate_paged)");
  m.def("decode_attention", &decode_attention,
        "decode attention of every head over the paged KV cache, ACT on the given heads (one pass)");
  m.def("layer_attention", &layer_attention,
        "attention of every head of a layer's prefill and decode rows over the paged KV cache, ACT on the given "
        "heads (scores computed once)");
}
