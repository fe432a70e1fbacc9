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
inline void qk_panels(const float* Q, int64_t R, int64_t D, const PackedKeys& K, int64_t p0, int64_t p1, float* S,
                      int64_t lds) {
  constexpr int RB = 6;
  int64_t r = 0;
  for (; r + RB <= R; r += RB) {
    const float* q0 = Q + r * D;
    for (int64_t p = p0; p < p1; ++p) {
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
    for (int64_t p = p0; p < p1; ++p) {
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

template <typename T>
void prefill_task(const Args<T>& a, int64_t g, int64_t hs, int64_t ql, int64_t block_elems) {
  const int64_t D = a.D, L = a.seq_lens(g), row0 = a.query_start(g);
  const int64_t h = a.heads(hs), kvh = a.kv_heads(hs);
  const int64_t W = a.window;
  const int64_t first = L - ql;  // position of this call's first row
  if (L <= 0 || first < 0) return;
  // keys any row can see
  const int64_t klo = W > 0 ? std::max<int64_t>(0, first - W + 1) : 0;
  const int64_t nk = L - klo;

  // Keys of this (sequence, head) packed in panels (float32); queries as [ql, D], scaled.
  PackedKeys K;
  pack_keys(a, g, kvh, klo, L, K);
  std::vector<float> Q(ql * D), lse(ql), col(nk, 0.0f);
  for (int64_t i = 0; i < ql; ++i) load_row(a.q + (row0 + i) * a.q_s0 + h * a.q_s1, a.q_s2, D, a.scale, &Q[i * D]);

  // Pass 1: row log-sum-exp and column sums, a block of rows at a time.
  // Blocks of at most 60 rows (a multiple of the product's 6-row tile): under the causal
  // mask each block multiplies only the panels up to its last row, so small blocks skip most
  // of the masked upper triangle.
  const int64_t row_stride = K.panels * kPanel;
  const int64_t rows_per_block =
      std::max<int64_t>(6, std::min<int64_t>({ql, int64_t{60}, block_elems / std::max<int64_t>(1, row_stride)}));
  std::vector<float> S(rows_per_block * row_stride);
  ScratchUse use(static_cast<int64_t>((K.data.size() + Q.size() + lse.size() + col.size() + S.size()) *
                                      sizeof(float)));
  for (int64_t r0 = 0; r0 < ql; r0 += rows_per_block) {
    const int64_t r1 = std::min(ql, r0 + rows_per_block);
    const int64_t kb = W > 0 ? std::max(klo, first + r0 - W + 1) : klo;  // first key of the block's band
    const int64_t ke = first + r1;                                       // one past its last key
    const int64_t p0 = (kb - klo) / kPanel, p1 = (ke - klo + kPanel - 1) / kPanel;
    const int64_t kb0 = klo + p0 * kPanel;  // key of S's column 0
    const int64_t lds = (p1 - p0) * kPanel;
    qk_panels(&Q[r0 * D], r1 - r0, D, K, p0, p1, S.data(), lds);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t pos = first + i;
      const int64_t lo = W > 0 ? std::max<int64_t>(klo, pos - W + 1) : klo;
      float* s = S.data() + (i - r0) * lds + (lo - kb0);
      const int64_t n = pos + 1 - lo;
      const float m = row_max(s, n);
      float z = 0.0f;
#pragma omp simd reduction(+ : z)
      for (int64_t j = 0; j < n; ++j) {
        s[j] = exp_neg(s[j] - m);
        z += s[j];
      }
      lse[i] = m + std::log(z);
      const float inv = 1.0f / z;
      float* c = col.data() + (lo - klo);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) c[j] += s[j] * inv;
    }
  }

  // Sinks: mean attention over the rows that see each key (spec section 1); position 0 never.
  std::vector<int64_t> sinks;
  std::vector<uint8_t> is_sink(nk, 0);
  for (int64_t j = klo; j < L; ++j) {
    // rows i in [0, ql) with first + i >= j and first + i <= j + W - 1
    const int64_t i_lo = std::max<int64_t>(0, j - first);
    const int64_t i_hi = W > 0 ? std::min<int64_t>(ql - 1, j + W - 1 - first) : ql - 1;
    const int64_t count = i_hi - i_lo + 1;
    if (j == 0 || count <= 0) continue;
    if (col[j - klo] / static_cast<float>(count) > a.tau) {
      sinks.push_back(j);
      is_sink[j - klo] = 1;
    }
  }
  if (sinks.empty()) return;

  // Pass 2: per row, P_S and o_S over the sink columns only.
  const int64_t ns = static_cast<int64_t>(sinks.size());
  std::vector<float> KS(ns * D), VS(ns * D, 0.0f), o_s(D), acc(D), p(nk);
  ScratchUse use2(static_cast<int64_t>((KS.size() + VS.size() + o_s.size() + acc.size() + p.size() + ns * 2 + nk / 4) * 4));
  for (int64_t k = 0; k < ns; ++k) {
    for (int64_t d = 0; d < D; ++d) KS[k * D + d] = K.at(d, sinks[k] - klo);
    add_value(a.V, a.table, g, kvh, sinks[k], 1.0f, D, &VS[k * D]);
  }
  for (int64_t i = 0; i < ql; ++i) {
    const int64_t pos = first + i;
    const int64_t lo = W > 0 ? std::max<int64_t>(0, pos - W + 1) : 0;
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
    row_scores_packed(q, K, lo - klo, pos + 1 - klo, p.data());
    float pm = 0.0f, nm = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      p[j] = exp_neg(p[j] - lse[i]);
      if (is_sink[lo - klo + j]) pm += p[j]; else nm += p[j];
    }
    if (nm <= kNonSinkEps) continue;
    full_row_output(a, g, kvh, lo, pos + 1, p.data(), &is_sink[lo - klo], 1.0f + (1.0f - a.beta) * pm / nm,
                    acc.data());
    store_row(acc.data(), D, orow, a.o_s2);
  }
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
  Args<T> a{query.data_ptr<T>(), query.stride(0), query.stride(1), query.stride(2),
            output.data_ptr<T>(), output.stride(0), output.stride(1), output.stride(2),
            Paged<T>(key_cache), Paged<T>(value_cache),
            Index(block_table), Index(seq_lens), Index(query_start), Index(seq_lens), Index(heads), Index(heads),
            query.size(2), static_cast<float>(scale), static_cast<float>(beta), static_cast<float>(threshold),
            0.0f, window};
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
  Args<T> a{query.data_ptr<T>(), query.stride(0), query.stride(1), query.stride(2),
            output.data_ptr<T>(), output.stride(0), output.stride(1), output.stride(2),
            Paged<T>(key_cache), Paged<T>(value_cache),
            Index(block_table), Index(seq_lens), Index(query_start), Index(query_lens), Index(heads), Index(kv_heads),
            query.size(2), static_cast<float>(scale), static_cast<float>(beta), static_cast<float>(threshold),
            static_cast<float>(recompute_below), window};
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

void decode_attention(const at::Tensor& query, const at::Tensor& output, const at::Tensor& key_cache,
                      const at::Tensor& value_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                      const at::Tensor& query_start, const at::Tensor& heads, double scale, double beta,
                      double threshold, int64_t window, int64_t max_seq_len) {
  const auto dt = query.scalar_type();
  TORCH_CHECK(output.scalar_type() == dt && key_cache.scalar_type() == dt && value_cache.scalar_type() == dt,
              "act_kernels.decode_attention: query, output and caches must share one dtype");
  TORCH_CHECK(query.dim() == 3 && output.dim() == 3 && key_cache.dim() == 4 && value_cache.dim() == 4,
              "act_kernels.decode_attention: query/output [T, H, D], caches [blocks, kv_heads, block, D]");
  TORCH_CHECK(query.size(1) % key_cache.size(1) == 0, "act_kernels.decode_attention: heads not a multiple of KV heads");
  TORCH_CHECK(query.device().is_cpu(), "act_kernels.decode_attention is a CPU kernel");
#define ACT_RUN(T)                                                                                                 \
  run_decode<T>(query, output, key_cache, value_cache, block_table, seq_lens, query_start, heads, scale, beta, threshold, \
                window, max_seq_len)
  if (dt == at::kFloat) ACT_RUN(float);
  else if (dt == at::kBFloat16) ACT_RUN(c10::BFloat16);
  else if (dt == at::kHalf) ACT_RUN(c10::Half);
  else TORCH_CHECK(false, "act_kernels.decode_attention: unsupported dtype ", dt);
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
}
