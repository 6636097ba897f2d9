// Paged attention for the engine's ragged batches: keys/values are read straight from the block pool
// through each row's block table (no gather copy, no padded mask), and the step's new keys/values are
// written to their slots in the same pass.
//
// One task per (row, kv head), run over torch's own thread pool (at::parallel_for). A task
//   1. stores the row's new keys/values of its kv head into their slots (int8 pools: absmax / 127 per
//      slot and head, rounded half to even, exactly as the PyTorch path quantizes);
//   2. walks the row's keys 0..L-1 in chunks of kChunk slots; every query head of the GQA group and every
//      new token of the row (a query at position p sees keys 0..p) scores the chunk, and an online
//      softmax in fp32 (running max, running sum, rescaled accumulator) folds it in, so a key row is
//      fetched from memory once per group and step (int8 rows are dequantized once per chunk);
//   3. writes y = acc / sum for real tokens and zeros for the left padding.
// The arithmetic kernels (dot products, exp, weighted sums) exist as portable C++ and as AVX2+FMA
// (compiled with a target attribute, chosen at run time), so the build needs no -march flag.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../../model/csrc/graph_node.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LMPA_X86 1
#endif

namespace {

constexpr int64_t kChunk = 32;  // key slots per online-softmax step: a chunk's K and V rows stay in L1
constexpr int64_t kSerialWork = 1 << 18;  // multiply-adds below which waking a second thread costs more than it saves

enum Isa : int64_t { kScalar = 0, kAvx2 = 1 };

// ---------------------------------------------------------------------------------------------------------
// Arithmetic kernels. rows[j] points at key/value row j of a chunk (head_dim floats).

struct Ops {
  // out[j] = dot(q, rows[j]) for j < n
  void (*scores)(const float* q, const float* const* rows, int64_t n, int64_t hd, float* out);
  // s[j] = exp(s[j] - m) for j < n; returns their sum
  float (*exp_sum)(float* s, int64_t n, float m);
  // acc += sum_j w[j] * rows[j]
  void (*accumulate)(float* acc, const float* w, const float* const* rows, int64_t n, int64_t hd);
  // dst = src * scale (an int8 pool row back to fp32)
  void (*dequantize)(const int8_t* src, float scale, int64_t hd, float* dst);
};

void scores_scalar(const float* q, const float* const* rows, int64_t n, int64_t hd, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const float* k = rows[j];
    float s = 0.f;
    for (int64_t d = 0; d < hd; ++d) s += q[d] * k[d];
    out[j] = s;
  }
}

float exp_sum_scalar(float* s, int64_t n, float m) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

void accumulate_scalar(float* acc, const float* w, const float* const* rows, int64_t n, int64_t hd) {
  for (int64_t j = 0; j < n; ++j) {
    const float* v = rows[j];
    const float wj = w[j];
    for (int64_t d = 0; d < hd; ++d) acc[d] += wj * v[d];
  }
}

void dequantize_scalar(const int8_t* src, float scale, int64_t hd, float* dst) {
  for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<float>(src[d]) * scale;
}

constexpr Ops kScalarOps{scores_scalar, exp_sum_scalar, accumulate_scalar, dequantize_scalar};

#ifdef LMPA_X86
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0 (scores minus their running max): Cephes' expf, 2^n * p(r) with |r| <= ln2 / 2,
// relative error ~1e-7; x is clamped at -87.3 (exp underflows to ~1e-38, nothing next to a sum >= 1).
__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

// Eight sums of eight lanes each, in one vector: out[i] = sum of a[i].
__attribute__((target("avx2,fma"))) inline __m256 hsum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// head_dim is a multiple of 8 on this path (checked by the caller). Eight keys at a time: eight
// independent FMA chains hide the FMA latency, and each load of q serves eight keys.
__attribute__((target("avx2,fma"))) void scores_avx2(const float* q, const float* const* rows, int64_t n,
                                                     int64_t hd, float* out) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows[j + i] + d), a[i]);
    }
    _mm256_storeu_ps(out + j, hsum8x8(a));
  }
  for (; j < n; ++j) {
    const float* k = rows[j];
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= hd; d += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), _mm256_loadu_ps(k + d + 8), a1);
    }
    if (d < hd) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), a0);
    out[j] = hsum256(_mm256_add_ps(a0, a1));
  }
}

__attribute__((target("avx2,fma"))) float exp_sum_avx2(float* s, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = hsum256(sum);
  if (j < n) {  // the tail through a zero-padded vector, so every weight comes from the same exp
    alignas(32) float tail[8];
    const int64_t left = n - j;
    for (int64_t i = 0; i < 8; ++i) tail[i] = i < left ? s[j + i] : m;
    _mm256_store_ps(tail, exp256(_mm256_sub_ps(_mm256_load_ps(tail), vm)));
    for (int64_t i = 0; i < left; ++i) {
      s[j + i] = tail[i];
      total += tail[i];
    }
  }
  return total;
}

// acc[d0 .. d0 + 8 R) += sum_j w[j] * rows[j][d0 ..]: R accumulator registers stay in registers across
// the chunk's rows (R = 8 covers head_dim 64 in one pass).
template <int R>
__attribute__((target("avx2,fma"))) inline void accumulate_avx2_block(float* acc, const float* w,
                                                                      const float* const* rows, int64_t n,
                                                                      int64_t d0) {
  __m256 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm256_loadu_ps(acc + d0 + 8 * r);
  for (int64_t j = 0; j < n; ++j) {
    const __m256 wj = _mm256_set1_ps(w[j]);
    const float* v = rows[j] + d0;
    for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(v + 8 * r), a[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + d0 + 8 * r, a[r]);
}

__attribute__((target("avx2,fma"))) void accumulate_avx2(float* acc, const float* w, const float* const* rows,
                                                         int64_t n, int64_t hd) {
  int64_t d = 0;
  for (; d + 64 <= hd; d += 64) accumulate_avx2_block<8>(acc, w, rows, n, d);
  for (; d + 32 <= hd; d += 32) accumulate_avx2_block<4>(acc, w, rows, n, d);
  for (; d < hd; d += 8) accumulate_avx2_block<1>(acc, w, rows, n, d);
}

__attribute__((target("avx2,fma"))) void dequantize_avx2(const int8_t* src, float scale, int64_t hd, float* dst) {
  const __m256 vs = _mm256_set1_ps(scale);
  for (int64_t d = 0; d < hd; d += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + d));
    _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), vs));
  }
}

constexpr Ops kAvx2Ops{scores_avx2, exp_sum_avx2, accumulate_avx2, dequantize_avx2};
#endif

bool isa_supported(int64_t isa) {
  if (isa == kScalar) return true;
#ifdef LMPA_X86
  __builtin_cpu_init();
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return false;
}

std::vector<int64_t> supported_isas() {
  std::vector<int64_t> out;
  for (int64_t isa : {kScalar, kAvx2}) {
    if (isa_supported(isa)) out.push_back(isa);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// The step: shapes, pointers and strides shared by every task.

struct Step {
  int64_t B, T, n_head, n_kv, hd, group, block_size, blocks_per_row;
  float scale;
  const float *q, *k, *v;  // q (B, n_head, T, hd), k/v (B, n_kv, T, hd): any strides, last one 1
  int64_t q_s[3], k_s[3], v_s[3];
  float* y;  // (B, T, n_head, hd) contiguous
  void *k_pool, *v_pool;  // (slots, n_kv, hd) fp32 or int8
  float *k_scale, *v_scale;  // (slots, n_kv) for int8 pools, else null
  const int32_t* tables;  // (B, blocks_per_row)
  const int64_t *past, *fresh;  // (B,)

  int64_t slot(int64_t b, int64_t pos) const {
    return static_cast<int64_t>(tables[b * blocks_per_row + pos / block_size]) * block_size + pos % block_size;
  }
};

// Per-thread scratch, grown on demand and reused across steps.
struct Scratch {
  std::vector<float> q, acc, m, l, s, deq;
  std::vector<const float*> krows, vrows;
};

void store_row(const Step& st, int64_t b, int64_t h) {
  const int64_t past = st.past[b], fresh = st.fresh[b], pad = st.T - fresh, hd = st.hd;
  for (int64_t i = 0; i < fresh; ++i) {
    const int64_t slot = st.slot(b, past + i), t = pad + i;
    const int64_t dst = (slot * st.n_kv + h) * hd;
    const float* ksrc = st.k + b * st.k_s[0] + h * st.k_s[1] + t * st.k_s[2];
    const float* vsrc = st.v + b * st.v_s[0] + h * st.v_s[1] + t * st.v_s[2];
    if (st.k_scale == nullptr) {
      std::memcpy(static_cast<float*>(st.k_pool) + dst, ksrc, hd * sizeof(float));
      std::memcpy(static_cast<float*>(st.v_pool) + dst, vsrc, hd * sizeof(float));
      continue;
    }
    for (int which = 0; which < 2; ++which) {  // int8: absmax / 127 per (slot, head), round half to even
      const float* src = which ? vsrc : ksrc;
      float amax = 0.f;
      for (int64_t d = 0; d < hd; ++d) amax = std::max(amax, std::fabs(src[d]));
      const float scale = std::max(amax, 1e-8f) / 127.f;
      int8_t* out = static_cast<int8_t*>(which ? st.v_pool : st.k_pool) + dst;
      for (int64_t d = 0; d < hd; ++d) out[d] = static_cast<int8_t>(std::nearbyint(src[d] / scale));
      (which ? st.v_scale : st.k_scale)[slot * st.n_kv + h] = scale;
    }
  }
}

// Row pointers for the chunk's slots; int8 rows are dequantized into `deq` (n rows of hd floats).
void chunk_rows(const Step& st, const Ops& ops, const void* pool, const float* scales, const int64_t* slots,
                int64_t n, int64_t h, float* deq, const float** rows) {
  const int64_t hd = st.hd;
  if (scales == nullptr) {
    for (int64_t j = 0; j < n; ++j) rows[j] = static_cast<const float*>(pool) + (slots[j] * st.n_kv + h) * hd;
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const int8_t* src = static_cast<const int8_t*>(pool) + (slots[j] * st.n_kv + h) * hd;
    ops.dequantize(src, scales[slots[j] * st.n_kv + h], hd, deq + j * hd);
    rows[j] = deq + j * hd;
  }
}

void attend_task(const Step& st, const Ops& ops, int64_t b, int64_t h, Scratch& sc) {
  const int64_t past = st.past[b], fresh = st.fresh[b], pad = st.T - fresh, hd = st.hd, G = st.group;
  const int64_t L = past + fresh, nq = fresh * G;  // query i = (token i / G, head h * G + i % G)
  store_row(st, b, h);
  for (int64_t t = 0; t < pad; ++t) {  // left padding: its output is ignored, make it zeros
    std::memset(st.y + ((b * st.T + t) * st.n_head + h * G) * hd, 0, G * hd * sizeof(float));
  }
  if (fresh == 0) return;
  sc.q.resize(nq * hd);
  sc.acc.assign(nq * hd, 0.f);
  sc.m.assign(nq, -std::numeric_limits<float>::infinity());
  sc.l.assign(nq, 0.f);
  sc.s.resize(kChunk);
  sc.krows.resize(kChunk);
  sc.vrows.resize(kChunk);
  if (st.k_scale != nullptr) sc.deq.resize(2 * kChunk * hd);
  for (int64_t i = 0; i < nq; ++i) {  // queries pre-scaled by 1/sqrt(head_dim)
    const float* src = st.q + b * st.q_s[0] + (h * G + i % G) * st.q_s[1] + (pad + i / G) * st.q_s[2];
    for (int64_t d = 0; d < hd; ++d) sc.q[i * hd + d] = src[d] * st.scale;
  }
  int64_t slots[kChunk];
  for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
    const int64_t cn = std::min(kChunk, L - c0);
    for (int64_t j = 0; j < cn; ++j) slots[j] = st.slot(b, c0 + j);
    float* deq = sc.deq.data();
    chunk_rows(st, ops, st.k_pool, st.k_scale, slots, cn, h, deq, sc.krows.data());
    chunk_rows(st, ops, st.v_pool, st.v_scale, slots, cn, h, deq + kChunk * hd, sc.vrows.data());
    // Token i / G sits at position past + i / G and sees keys up to it: earlier tokens see fewer.
    for (int64_t i = std::max<int64_t>(0, c0 - past) * G; i < nq; ++i) {
      const int64_t visible = std::min(cn, past + i / G - c0 + 1);
      float* s = sc.s.data();
      ops.scores(sc.q.data() + i * hd, sc.krows.data(), visible, hd, s);
      float mx = s[0];
      for (int64_t j = 1; j < visible; ++j) mx = std::max(mx, s[j]);
      float* acc = sc.acc.data() + i * hd;
      if (mx > sc.m[i]) {  // a new running max: rescale what was summed so far
        const float factor = std::exp(sc.m[i] - mx);
        sc.l[i] *= factor;
        for (int64_t d = 0; d < hd; ++d) acc[d] *= factor;
        sc.m[i] = mx;
      }
      sc.l[i] += ops.exp_sum(s, visible, sc.m[i]);
      ops.accumulate(acc, s, sc.vrows.data(), visible, hd);
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    float* out = st.y + ((b * st.T + pad + i / G) * st.n_head + h * G + i % G) * hd;
    const float inv = 1.f / sc.l[i];
    const float* acc = sc.acc.data() + i * hd;
    for (int64_t d = 0; d < hd; ++d) out[d] = acc[d] * inv;
  }
}

void check_pool(const torch::Tensor& pool, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(pool.is_contiguous() && pool.sizes() == like.sizes() && pool.scalar_type() == like.scalar_type(),
              name, " must be contiguous with the shape and dtype of k_pool");
}

// The step's arguments checked and turned into a Step (y left null) and its Ops: q (B, n_head, T, hd),
// k/v (B, n_kv, T, hd) fp32 with unit last stride; k_pool/v_pool (slots, n_kv, hd) fp32, or int8 with
// k_scale/v_scale (slots, n_kv, 1) fp32; tables (B, W) int32; past/fresh (B,) int64. The rows' contents
// (lengths, block ids) are checked by check_rows, on every run.
struct Prepared {
  Step st;
  const Ops* ops;
  int64_t num_blocks;
};

Prepared prepare(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& k_pool,
                 const torch::Tensor& v_pool, const c10::optional<torch::Tensor>& k_scale,
                 const c10::optional<torch::Tensor>& v_scale, const torch::Tensor& tables, const torch::Tensor& past,
                 const torch::Tensor& fresh, int64_t block_size, int64_t isa) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-d (B, heads, T, head_dim)");
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->stride(3) == 1 && t->device().is_cpu(),
                "q, k, v must be fp32 CPU tensors with a contiguous last dimension");
  }
  const int64_t B = q.size(0), n_head = q.size(1), T = q.size(2), hd = q.size(3), n_kv = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(2) == T && k.size(3) == hd,
              "k and v must be (B, n_kv_head, T, head_dim) like q");
  TORCH_CHECK(n_kv > 0 && n_head % n_kv == 0, "n_head must be a multiple of n_kv_head");
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.size(1) == n_kv && k_pool.size(2) == hd && k_pool.is_contiguous(),
              "k_pool must be contiguous (slots, n_kv_head, head_dim)");
  check_pool(v_pool, k_pool, "v_pool");
  const bool quantized = k_pool.scalar_type() == torch::kChar;
  TORCH_CHECK(quantized || k_pool.scalar_type() == torch::kFloat, "pools must be fp32 or int8");
  TORCH_CHECK(quantized == (k_scale.has_value() && v_scale.has_value()), "int8 pools need k_scale and v_scale");
  const int64_t slots = k_pool.size(0);
  if (quantized) {
    for (const auto* s : {&*k_scale, &*v_scale}) {
      TORCH_CHECK(s->scalar_type() == torch::kFloat && s->is_contiguous() && s->numel() == slots * n_kv,
                  "k_scale/v_scale must be contiguous fp32 (slots, n_kv_head, 1)");
    }
  }
  TORCH_CHECK(tables.scalar_type() == torch::kInt && tables.dim() == 2 && tables.size(0) == B && tables.is_contiguous(),
              "block tables must be contiguous int32 (B, blocks)");
  TORCH_CHECK(past.scalar_type() == torch::kLong && fresh.scalar_type() == torch::kLong && past.numel() == B &&
                  fresh.numel() == B && past.is_contiguous() && fresh.is_contiguous(),
              "past and fresh must be contiguous int64 (B,)");
  TORCH_CHECK(block_size > 0 && slots % block_size == 0, "block_size must divide the pool's slots");
  TORCH_CHECK(isa_supported(isa), "paged attention: instruction set ", isa, " is not supported by this CPU");
  const Ops* ops =
#ifdef LMPA_X86
      (isa == kAvx2 && hd % 8 == 0) ? &kAvx2Ops :
#endif
                                    &kScalarOps;
  Step st{B,
          T,
          n_head,
          n_kv,
          hd,
          n_head / n_kv,
          block_size,
          tables.size(1),
          1.f / std::sqrt(static_cast<float>(hd)),
          q.data_ptr<float>(),
          k.data_ptr<float>(),
          v.data_ptr<float>(),
          {q.stride(0), q.stride(1), q.stride(2)},
          {k.stride(0), k.stride(1), k.stride(2)},
          {v.stride(0), v.stride(1), v.stride(2)},
          nullptr,
          k_pool.data_ptr(),
          v_pool.data_ptr(),
          quantized ? k_scale->data_ptr<float>() : nullptr,
          quantized ? v_scale->data_ptr<float>() : nullptr,
          tables.data_ptr<int32_t>(),
          past.data_ptr<int64_t>(),
          fresh.data_ptr<int64_t>()};
  return {st, ops, slots / block_size};
}

// Checks every row's lengths and block ids against the pool; returns the step's multiply-adds (whether
// a second thread pays).
int64_t check_rows(const Step& st, int64_t num_blocks) {
  int64_t work = 0;
  for (int64_t b = 0; b < st.B; ++b) {
    const int64_t p = st.past[b], f = st.fresh[b];
    TORCH_CHECK(p >= 0 && f >= 0 && f <= st.T, "row ", b, ": past must be >= 0 and 0 <= fresh <= T");
    const int64_t used = (p + f + st.block_size - 1) / st.block_size;
    TORCH_CHECK(used <= st.blocks_per_row, "row ", b, ": its block table holds ", st.blocks_per_row, " blocks, ", used,
                " needed");
    for (int64_t i = 0; i < used; ++i) {
      const int32_t block = st.tables[b * st.blocks_per_row + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, "row ", b, ": block ", block, " is outside the pool");
    }
    work += 2 * f * (p + f) * st.hd * st.n_head;
  }
  return work;
}

// Runs the checked step into y (B, T, n_head, hd) contiguous.
void run(const Prepared& prepared, float* y) {
  Step st = prepared.st;
  st.y = y;
  const int64_t work = check_rows(st, prepared.num_blocks);
  // Tasks run row-major (task = b * n_kv + h): a row's kv heads, which share the slots' cache lines, run
  // back to back on one thread (7.4 vs 8.2 ms for a 16-row decode step's 30 layers, 1 thread, than
  // kv-head-major), and a row's writes and reads of one kv head stay inside one task (no races).
  const int64_t tasks = st.B * st.n_kv;
  const int64_t grain = work < kSerialWork ? tasks : 1;
  const Ops& ops = *prepared.ops;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    thread_local Scratch scratch;
    for (int64_t task = begin; task < end; ++task) attend_task(st, ops, task / st.n_kv, task % st.n_kv, scratch);
  });
}

// Returns y (B, T, n_head, hd) contiguous; rows hold `fresh` tokens right-aligned in T columns.
torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                              const c10::optional<torch::Tensor>& k_scale, const c10::optional<torch::Tensor>& v_scale,
                              const torch::Tensor& tables, const torch::Tensor& past, const torch::Tensor& fresh,
                              int64_t block_size, int64_t isa) {
  RECORD_FUNCTION("lmstack::paged_attention", std::vector<c10::IValue>());  // named in torch.profiler tables
  const Prepared prepared = prepare(q, k, v, k_pool, v_pool, k_scale, v_scale, tables, past, fresh, block_size, isa);
  auto y = torch::empty({prepared.st.B, prepared.st.T, prepared.st.n_head, prepared.st.hd},
                        q.options().memory_format(at::MemoryFormat::Contiguous));
  run(prepared, y.data_ptr<float>());
  return y;
}

// A captured decode step (lmstack/model/cpu_graph.py): the same attention into y, the tensor the eager
// call returned. Tables, past and fresh are read (and checked) on every run: the engine refills them
// in place before each replay.
py::capsule paged_attention_node(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                 const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                                 const c10::optional<torch::Tensor>& k_scale,
                                 const c10::optional<torch::Tensor>& v_scale, const torch::Tensor& tables,
                                 const torch::Tensor& past, const torch::Tensor& fresh, int64_t block_size, int64_t isa,
                                 const torch::Tensor& y) {
  const Prepared prepared = prepare(q, k, v, k_pool, v_pool, k_scale, v_scale, tables, past, fresh, block_size, isa);
  const Step& st = prepared.st;
  TORCH_CHECK(y.scalar_type() == torch::kFloat && y.is_contiguous() && y.numel() == st.B * st.T * st.n_head * st.hd,
              "paged_attention_node: y must be the contiguous (B, T, n_head, head_dim) output");
  float* y_ptr = y.data_ptr<float>();
  return lmstack_graph::make_node([prepared, q, k, v, k_pool, v_pool, k_scale, v_scale, tables, past, fresh, y,
                                   y_ptr](int64_t) { run(prepared, y_ptr); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention,
        "causal attention of ragged rows over a paged KV pool; stores the step's keys/values first");
  m.def("paged_attention_node", &paged_attention_node, "a captured decode step: paged_attention into y");
  m.def("supported_isas", &supported_isas, "instruction sets this CPU runs: 0 scalar, 1 avx2");
}
