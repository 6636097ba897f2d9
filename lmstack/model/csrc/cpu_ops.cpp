// Fused CPU inference ops for the Transformer (lmstack/model/cpu_ops.py is the Python side).
//
// A decode step of a small model runs each element-wise op on a few hundred values, so ATen's per-op
// cost (dispatch, allocation, the composite's five or six kernels) outweighs the arithmetic. Each op here
// is one pass over its input into one fresh output: RMSNorm, RoPE over the fused q/k/v heads (q, k, v
// written contiguous), SiLU(gate) * up.
//
// Every op returns nullopt where it does not apply (not fp32, not contiguous, shapes it does not know);
// the caller then runs its PyTorch path. The callers only come here without autograd.
//
// Vectorisation: plain loops the compiler vectorises at -O3, built twice through `target_clones`
// (AVX2 and the baseline) on x86-64 Linux; the loader picks the clone the CPU runs (one cpuid check).
// No FMA in either clone, so the AVX2 and baseline results are bit-identical, and RoPE rounds exactly
// like PyTorch's element-wise kernels (RMSNorm adds its squares in another order and SiLU's exp is a
// polynomial of its own: both within 1e-6 relative of PyTorch). Threads: `at::parallel_for` over rows, only when the tensor is large (prefill); one decode
// token's row runs inline on the calling thread. Each op is a `RECORD_FUNCTION` scope, so
// torch.profiler shows it (as lmstack::<op>) next to the aten ops it replaces.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "float_linear.h"
#include "graph_node.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define LMS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LMS_CLONES
#endif

// GCC keeps a loop with float comparisons (exp's clamp) scalar under the default -ftrapping-math;
// these ops never rely on floating-point traps, so the function holding that loop opts out.
#if defined(__GNUC__) && !defined(__clang__)
#define LMS_NO_TRAPS __attribute__((optimize("no-trapping-math")))
#else
#define LMS_NO_TRAPS
#endif

namespace {

using at::Tensor;

// Rows per parallel task: about this many floats, so a few hundred values never wake a second thread.
constexpr int64_t kGrainFloats = 1 << 15;

int64_t grain_rows(int64_t row_len) { return std::max<int64_t>(1, kGrainFloats / std::max<int64_t>(1, row_len)); }

bool is_f32_contiguous(const Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous();
}

// ---------------------------------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, per row.

constexpr int kLanes = 16;  // independent partial sums, two 8-float vectors

// Eight floats as one vector (GCC/Clang vector extension): AVX in the avx2 clone, two SSE halves in the
// baseline, the same lane-wise arithmetic in both. Plain loops that GCC vectorises on their own stop
// vectorising once inlined into a loop nest (the attention below ran scalar that way).
typedef float Float8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline Float8 load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

__attribute__((always_inline)) inline void store8(float* p, Float8 v) { std::memcpy(p, &v, sizeof v); }

// a . b over n floats: kLanes partial sums (two vectors), added as a tree, then any tail (RMSNorm's sum
// of squares, attention scores). Inlined into its LMS_CLONES callers, so each
// clone gets its own vector code and no call per dot product.
__attribute__((always_inline)) inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  Float8 lo = {}, hi = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    lo += load8(a + i) * load8(b + i);
    hi += load8(a + i + 8) * load8(b + i + 8);
  }
  const Float8 v = lo + hi;
  float sum = ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

LMS_CLONES void rms_norm_row(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t n,
                             float eps) {
  const float sum = dot(x, x, n);
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t k = 0; k < n; ++k) y[k] = x[k] * inv * w[k];
}

bool rms_norm_applies(const Tensor& x, const Tensor& weight) {
  return is_f32_contiguous(x) && is_f32_contiguous(weight) && x.dim() >= 1 && weight.dim() == 1 && x.size(-1) > 0 &&
         weight.size(0) == x.size(-1);
}

// y (x's shape, contiguous) = RMSNorm(x); the checks are rms_norm_applies'.
void rms_norm_into(const Tensor& x, const Tensor& weight, double eps, const Tensor& y) {
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto e = static_cast<float>(eps);
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * n, wp, yp + r * n, n, e);
  });
}

std::optional<Tensor> rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  RECORD_FUNCTION("lmstack::rms_norm", std::vector<c10::IValue>());
  if (!rms_norm_applies(x, weight)) return std::nullopt;
  Tensor y = at::empty_like(x);
  rms_norm_into(x, weight, eps, y);
  return y;
}

// ---------------------------------------------------------------------------------------------------
// RoPE in the rotate-half layout with the sign folded into the sin table (apply_rope in transformer.py):
// y = x * cos + roll(x, half) * signed_sin, i.e. y[i] = x[i] c[i] + x[i + half] s[i] for i < half and
// y[i] = x[i] c[i] + x[i - half] s[i] above.

LMS_CLONES void rope_head(const float* __restrict x, const float* __restrict c, const float* __restrict s,
                          float* __restrict y, int64_t half) {
  for (int64_t i = 0; i < half; ++i) y[i] = x[i] * c[i] + x[i + half] * s[i];
  for (int64_t i = half; i < 2 * half; ++i) y[i] = x[i] * c[i] + x[i - half] * s[i];
}

// The cos/sin tables as the Transformer passes them: (T, hd) shared by the batch, or (B|1, 1, T, hd) per
// row (ragged positions). Row (b, t)'s table starts at base + (b * batch_stride + t) * hd.
struct RopeTables {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t batch_stride = 0;  // in rows of hd values

  const float* cos_at(int64_t b, int64_t t, int64_t hd) const { return cos + (b * batch_stride + t) * hd; }
  const float* sin_at(int64_t b, int64_t t, int64_t hd) const { return sin + (b * batch_stride + t) * hd; }
};

std::optional<RopeTables> rope_tables(const Tensor& cos, const Tensor& sin, int64_t B, int64_t T, int64_t hd) {
  if (!is_f32_contiguous(cos) || !is_f32_contiguous(sin) || cos.sizes() != sin.sizes()) return std::nullopt;
  if (hd % 2 != 0 || cos.size(-1) != hd) return std::nullopt;
  RopeTables tables{cos.data_ptr<float>(), sin.data_ptr<float>(), 0};
  if (cos.dim() == 2 && cos.size(0) == T) return tables;
  if (cos.dim() == 4 && cos.size(1) == 1 && cos.size(2) == T && (cos.size(0) == B || cos.size(0) == 1)) {
    tables.batch_stride = cos.size(0) == 1 ? 0 : T;
    return tables;
  }
  return std::nullopt;
}

// rope_qkv's body (after its checks) into q, k, v of its output shapes.
void rope_qkv_into(const Tensor& qkv, const RopeTables& tables, int64_t n_head, int64_t n_kv_head, const Tensor& q,
                   const Tensor& k, const Tensor& v) {
  const int64_t B = qkv.size(0), T = qkv.size(1), hd = q.size(3), heads = n_head + 2 * n_kv_head;
  const float* src = qkv.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  at::parallel_for(0, B * T, grain_rows(heads * hd), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, t = r % T;
      const float* row = src + r * heads * hd;
      const float* c = tables.cos_at(b, t, hd);
      const float* s = tables.sin_at(b, t, hd);
      for (int64_t h = 0; h < n_head; ++h) rope_head(row + h * hd, c, s, qp + ((b * n_head + h) * T + t) * hd, hd / 2);
      for (int64_t h = 0; h < n_kv_head; ++h) {
        const int64_t out = ((b * n_kv_head + h) * T + t) * hd;
        rope_head(row + (n_head + h) * hd, c, s, kp + out, hd / 2);
        std::memcpy(vp + out, row + (n_head + n_kv_head + h) * hd, hd * sizeof(float));
      }
    }
  });
}

// qkv (B, T, (n_head + 2 n_kv_head) * hd), the fused projection's output -> q (B, n_head, T, hd) and
// k (B, n_kv_head, T, hd) with RoPE applied, v (B, n_kv_head, T, hd); all three fresh and contiguous.
std::optional<std::tuple<Tensor, Tensor, Tensor>> rope_qkv(const Tensor& qkv, const Tensor& cos, const Tensor& sin,
                                                           int64_t n_head, int64_t n_kv_head) {
  RECORD_FUNCTION("lmstack::rope_qkv", std::vector<c10::IValue>());
  if (!is_f32_contiguous(qkv) || qkv.dim() != 3 || n_head <= 0 || n_kv_head <= 0) return std::nullopt;
  const int64_t B = qkv.size(0), T = qkv.size(1), hd = cos.size(-1), heads = n_head + 2 * n_kv_head;
  if (hd == 0 || qkv.size(2) != heads * hd) return std::nullopt;
  const auto tables = rope_tables(cos, sin, B, T, hd);
  if (!tables) return std::nullopt;
  Tensor q = at::empty({B, n_head, T, hd}, qkv.options());
  Tensor k = at::empty({B, n_kv_head, T, hd}, qkv.options());
  Tensor v = at::empty({B, n_kv_head, T, hd}, qkv.options());
  rope_qkv_into(qkv, *tables, n_head, n_kv_head, q, k, v);
  return std::make_tuple(q, k, v);
}

// x (B, H, T, hd) with any strides but a unit last one (a transposed projection output) -> RoPE'd copy,
// contiguous (B, H, T, hd). The unfused attention path (adapters around q/k/v) uses it.
std::optional<Tensor> rope(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  RECORD_FUNCTION("lmstack::rope", std::vector<c10::IValue>());
  if (!x.device().is_cpu() || x.scalar_type() != at::kFloat || x.dim() != 4 || x.stride(3) != 1) return std::nullopt;
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), hd = x.size(3);
  const auto tables = rope_tables(cos, sin, B, T, hd);
  if (!tables) return std::nullopt;
  Tensor y = at::empty({B, H, T, hd}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2);
  at::parallel_for(0, B * H * T, grain_rows(hd), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * T), h = (r / T) % H, t = r % T;
      rope_head(xp + b * sb + h * sh + t * st, tables->cos_at(b, t, hd), tables->sin_at(b, t, hd), yp + r * hd,
                hd / 2);
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------
// SwiGLU's element-wise part over the fused gate/up output: y = silu(gate) * up, gate and up the two
// halves of the last dimension.

// exp(x) for x in [-87.3, 88] to about 1 ulp (the Cephes expf polynomial): 2^n * e^r with
// n = round(x / ln 2) and |r| <= ln 2 / 2. Written with arithmetic only (the round-to-nearest through
// the 1.5 * 2^23 shift, the 2^n through the exponent bits), so the loop around it vectorises, which a
// call to std::exp would not. The caller clamps x into the range (2^n then stays a normal float).
__attribute__((always_inline)) inline float exp_in_range(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kShift = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * kLog2e + kShift) - kShift;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// y = -gate clamped into exp_in_range's range. A loop of its own: with the clamp inside the exp loop,
// GCC specialises the clamped lanes into gate / (1 + e^88), a subnormal for every lane it computes,
// and the loop ran 5x slower on subnormal assists. Ternaries, not std::min/max, which would not inline
// across LMS_NO_TRAPS.
LMS_CLONES LMS_NO_TRAPS void negate_clamped(const float* __restrict gate, float* __restrict y, int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    const float x = -gate[i];
    const float low = x < -87.3f ? -87.3f : x;
    y[i] = low > 88.f ? 88.f : low;
  }
}

// y = silu(gate) * up = gate / (1 + e^-gate) * up, as PyTorch's silu computes it, in two vectorised passes.
LMS_CLONES void silu_mul_row(const float* __restrict gate, const float* __restrict up, float* __restrict y,
                             int64_t d) {
  negate_clamped(gate, y, d);
  for (int64_t i = 0; i < d; ++i) y[i] = gate[i] / (1.f + exp_in_range(y[i])) * up[i];
}

// y (gate_up's shape with half its last dim) = silu(gate) * up; the checks are silu_mul's.
void silu_mul_into(const Tensor& gate_up, const Tensor& y) {
  const int64_t d = gate_up.size(-1) / 2;
  const int64_t rows = gate_up.numel() / (2 * d);
  const float* src = gate_up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(2 * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_mul_row(src + r * 2 * d, src + r * 2 * d + d, yp + r * d, d);
  });
}

std::optional<Tensor> silu_mul(const Tensor& gate_up) {
  RECORD_FUNCTION("lmstack::silu_mul", std::vector<c10::IValue>());
  if (!is_f32_contiguous(gate_up) || gate_up.dim() < 1 || gate_up.size(-1) % 2 != 0 || gate_up.size(-1) == 0)
    return std::nullopt;
  auto sizes = gate_up.sizes().vec();
  sizes.back() /= 2;
  Tensor y = at::empty(sizes, gate_up.options());
  silu_mul_into(gate_up, y);
  return y;
}

// ---------------------------------------------------------------------------------------------------
// The residual connection a + b of two same-shaped fp32 tensors (one rounding per element, as aten::add):
// an op of this extension so that a captured decode step (DecodeProgram below) can replay it.

LMS_CLONES void add_rows(const float* __restrict a, const float* __restrict b, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
}

void add_into(const Tensor& a, const Tensor& b, const Tensor& y) {
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, a.numel(), kGrainFloats, [&](int64_t begin, int64_t end) {
    add_rows(ap + begin, bp + begin, yp + begin, end - begin);
  });
}

std::optional<Tensor> add(const Tensor& a, const Tensor& b) {
  RECORD_FUNCTION("lmstack::add", std::vector<c10::IValue>());
  if (!is_f32_contiguous(a) || !is_f32_contiguous(b) || a.sizes() != b.sizes()) return std::nullopt;
  Tensor y = at::empty_like(a);
  add_into(a, b, y);
  return y;
}

// ---------------------------------------------------------------------------------------------------
// Attention of one new token per row over its cached keys (single-stream decode with the contiguous
// KVCache). Two passes per head: scores and their max, then exp-weighted values.

__attribute__((always_inline)) inline void axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(y + i, load8(y + i) + a * load8(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

LMS_CLONES LMS_NO_TRAPS void exp_shifted(float* __restrict s, float shift, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = s[i] - shift;  // <= 0
    s[i] = exp_in_range(x < -87.3f ? -87.3f : x);
  }
}

// The query heads [h0, h0 + group) sharing one kv head over its L keys/values (rows kstride / vstride
// floats apart): scores of every head in one pass over K, then each head's softmax-weighted values.
// One function per clone with dot and axpy inlined: a call per key (dot / axpy through the clones'
// dispatch) cost more than the 64 multiply-adds it ran.
//
// Head sizes 32, 64 and 128 keep the (scaled) query and the output in vector registers instead: a key
// then costs hd / 8 vector multiply-adds for its score and as many for its value, with no loads or
// stores of the output, several times faster than the general loops at SmolLM2's 64.
template <int NV>
__attribute__((always_inline)) inline void attend_fixed(const float* __restrict q, int64_t group,
                                                        const float* __restrict k, int64_t kstride,
                                                        const float* __restrict v, int64_t vstride, int64_t L,
                                                        float scale, float* __restrict s, float* __restrict y) {
  for (int64_t h = 0; h < group; ++h) {
    Float8 qv[NV];
    for (int i = 0; i < NV; ++i) qv[i] = load8(q + h * NV * 8 + i * 8) * scale;
    float best = -INFINITY;
    for (int64_t j = 0; j < L; ++j) {
      const float* kj = k + j * kstride;
      // Two partial sums: one chain of NV dependent adds per key was the bottleneck.
      Float8 even = qv[0] * load8(kj), odd = qv[1] * load8(kj + 8);
      for (int i = 2; i < NV; i += 2) {
        even += qv[i] * load8(kj + i * 8);
        odd += qv[i + 1] * load8(kj + i * 8 + 8);
      }
      const Float8 acc = even + odd;
      const float score = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
      s[j] = score;
      best = score > best ? score : best;
    }
    exp_shifted(s, best, L);
    float total = 0.f;
    Float8 out[NV] = {};
    for (int64_t j = 0; j < L; ++j) {
      const float* vj = v + j * vstride;
      total += s[j];
      for (int i = 0; i < NV; ++i) out[i] += s[j] * load8(vj + i * 8);
    }
    const float inv = 1.f / total;
    for (int i = 0; i < NV; ++i) store8(y + h * NV * 8 + i * 8, out[i] * inv);
  }
}

LMS_CLONES void attend_kv_head(const float* __restrict q, int64_t group, const float* __restrict k, int64_t kstride,
                               const float* __restrict v, int64_t vstride, int64_t L, int64_t hd, float scale,
                               float* __restrict scores, float* __restrict y) {
  switch (hd) {
    case 32: return attend_fixed<4>(q, group, k, kstride, v, vstride, L, scale, scores, y);
    case 64: return attend_fixed<8>(q, group, k, kstride, v, vstride, L, scale, scores, y);
    case 128: return attend_fixed<16>(q, group, k, kstride, v, vstride, L, scale, scores, y);
    default: break;
  }
  for (int64_t j = 0; j < L; ++j) {
    for (int64_t h = 0; h < group; ++h) scores[h * L + j] = dot(q + h * hd, k + j * kstride, hd) * scale;
  }
  for (int64_t h = 0; h < group; ++h) {
    float* s = scores + h * L;
    float best = -INFINITY;
    for (int64_t j = 0; j < L; ++j) best = s[j] > best ? s[j] : best;
    exp_shifted(s, best, L);
    float total = 0.f;
    for (int64_t j = 0; j < L; ++j) total += s[j];
    const float inv = 1.f / total;
    float* out = y + h * hd;
    std::memset(out, 0, hd * sizeof(float));
    for (int64_t j = 0; j < L; ++j) axpy(s[j] * inv, v + j * vstride, out, hd);
  }
}

bool is_f32_heads(const Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 && t.stride(3) == 1;
}

// Attention of one new token per row over its cached keys: q (B, H, 1, hd) contiguous, GQA with H a
// multiple of Hkv. Either k/v (B, Hkv, L, hd) are all the keys (any strides but a unit last one: the
// cache's views), or, with k_cache / v_cache (B, Hkv, max_len, hd) given, k/v are this token's (B, Hkv,
// 1, hd): they are written at position `past` first and the op attends over positions 0..past (the
// contiguous KVCache's whole decode step in one call, no slicing or copy ops). Nothing is written
// unless the op runs. SDPA's CPU kernel costs ~25 us here for a few thousand multiply-adds.
// This token's k/v (B, Hkv, 1, hd) into the caches (B, Hkv, max_len, hd) at position `past`.
void store_token(const Tensor& k, const Tensor& v, const Tensor& kc, const Tensor& vc, int64_t past) {
  const int64_t B = k.size(0), Hkv = k.size(1), hd = k.size(3);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < Hkv; ++g) {
      std::memcpy(kc.data_ptr<float>() + b * kc.stride(0) + g * kc.stride(1) + past * kc.stride(2),
                  k.data_ptr<float>() + b * k.stride(0) + g * k.stride(1), hd * sizeof(float));
      std::memcpy(vc.data_ptr<float>() + b * vc.stride(0) + g * vc.stride(1) + past * vc.stride(2),
                  v.data_ptr<float>() + b * v.stride(0) + g * v.stride(1), hd * sizeof(float));
    }
  }
}

// out (B, 1, H, hd) = attention of q (B, H, 1, hd) over the first L keys/values of (B, Hkv, >= L, hd).
void attend_into(const Tensor& q, const Tensor& keys, const Tensor& values, int64_t L, float* op) {
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(3), Hkv = keys.size(1);
  const int64_t group = H / Hkv;
  const float* qp = q.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const int64_t ks0 = keys.stride(0), ks1 = keys.stride(1), ks2 = keys.stride(2);
  const int64_t vs0 = values.stride(0), vs1 = values.stride(1), vs2 = values.stride(2);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t work = group * L * hd * 2;  // multiply-adds per (row, kv head) task
  at::parallel_for(0, B * Hkv, std::max<int64_t>(1, kGrainFloats * 4 / std::max<int64_t>(1, work)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv;
      attend_kv_head(qp + (b * H + g * group) * hd, group, kp + b * ks0 + g * ks1, ks2, vp + b * vs0 + g * vs1, vs2,
                     L, hd, scale, scores.data(), op + (b * H + g * group) * hd);
    }
  });
}

// Whether k_cache / v_cache (B, Hkv, max_len, hd) can take this token's k (B, Hkv, 1, hd) at `past`.
bool caches_fit(const Tensor& k, const Tensor& kc, const Tensor& vc, int64_t past) {
  return is_f32_heads(kc) && is_f32_heads(vc) && kc.sizes() == vc.sizes() && k.size(2) == 1 &&
         kc.size(0) == k.size(0) && kc.size(1) == k.size(1) && kc.size(3) == k.size(3) && past >= 0 &&
         past < kc.size(2);
}

// Attention of one new token per row over its cached keys: q (B, H, 1, hd) contiguous, GQA with H a
// multiple of Hkv. Either k/v (B, Hkv, L, hd) are all the keys (any strides but a unit last one: the
// cache's views), or, with k_cache / v_cache (B, Hkv, max_len, hd) given, k/v are this token's (B, Hkv,
// 1, hd): they are written at position `past` first and the op attends over positions 0..past (the
// contiguous KVCache's whole decode step in one call, no slicing or copy ops). Nothing is written
// unless the op runs. SDPA's CPU kernel costs ~25 us here for a few thousand multiply-adds.
std::optional<Tensor> decode_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const std::optional<Tensor>& k_cache, const std::optional<Tensor>& v_cache,
                                       int64_t past) {
  RECORD_FUNCTION("lmstack::decode_attention", std::vector<c10::IValue>());
  if (!is_f32_contiguous(q) || q.dim() != 4 || q.size(2) != 1) return std::nullopt;
  if (!is_f32_heads(k) || !is_f32_heads(v) || k.sizes() != v.sizes()) return std::nullopt;
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(3), Hkv = k.size(1);
  if (k.size(0) != B || k.size(3) != hd || Hkv == 0 || H % Hkv != 0 || k.size(2) == 0) return std::nullopt;
  if (k_cache.has_value() != v_cache.has_value()) return std::nullopt;
  Tensor out = at::empty({B, 1, H, hd}, q.options());  // returned as (B, H, 1, hd): the caller's transpose is free
  if (k_cache.has_value()) {
    if (!caches_fit(k, *k_cache, *v_cache, past)) return std::nullopt;
    store_token(k, v, *k_cache, *v_cache, past);
    attend_into(q, *k_cache, *v_cache, past + 1, out.data_ptr<float>());
  } else {
    attend_into(q, k, v, k.size(2), out.data_ptr<float>());
  }
  return out.transpose(1, 2);
}

// ---------------------------------------------------------------------------------------------------
// Linear layers with float weights at decode sizes: y = x @ W^T + bias for a few activation rows
// (float_linear.h; AVX2 + FMA in float_linear_avx2.cpp). MKL's GEMM is built for large matrices: at
// 2-16 rows it streamed a SmolLM2 weight at half the speed it reads it for one row. The Python side
// sends only batches of up to `cpu_ops.LINEAR_MAX_ROWS` rows here.

bool avx2_fma() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

float weight_at(const lmsf::FGemm& a, int64_t n, int64_t k) {
  const int64_t offset = n * a.K + k;
  if (a.wtype == lmsf::kF32) return static_cast<const float*>(a.w)[offset];
  if (a.wtype == lmsf::kBF16) return bf16_to_float(static_cast<const uint16_t*>(a.w)[offset]);
  const uint8_t byte = static_cast<const uint8_t*>(a.w)[offset / 2];
  return a.levels[(byte >> (4 * (offset & 1))) & 15] * a.block_scale[offset / a.block];
}

// The portable path: one dot product per output, in plain C++.
void fgemm_cols_scalar(const lmsf::FGemm& a, int64_t n_begin, int64_t n_end) {
  for (int64_t m = 0; m < a.M; ++m) {
    const float* x = a.x + m * a.K;
    for (int64_t n = n_begin; n < n_end; ++n) {
      float sum = 0.f;
      for (int64_t k = 0; k < a.K; ++k) sum += x[k] * weight_at(a, n, k);
      a.y[m * a.N + n] = sum + (a.bias ? a.bias[n] : 0.f);
    }
  }
}

bool bias_fits(const std::optional<Tensor>& bias, int64_t N) {
  return !bias.has_value() || (is_f32_contiguous(*bias) && bias->numel() == N);
}

bool linear_applies(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  const auto wtype = weight.scalar_type();
  return is_f32_contiguous(x) && x.dim() >= 1 && weight.device().is_cpu() && weight.dim() == 2 &&
         weight.is_contiguous() && (wtype == at::kFloat || wtype == at::kBFloat16) && x.size(-1) == weight.size(1) &&
         bias_fits(bias, weight.size(0));
}

// NF4 (lmstack/compress/nf4.py): packed (ceil(N * K / block) * block / 2) bytes, block_absmax fp32 per
// block, levels the 16 fp32 code values; blocks must not span rows.
bool nf4_applies(const Tensor& x, const Tensor& packed, const Tensor& block_absmax, const Tensor& levels, int64_t N,
                 int64_t block, const std::optional<Tensor>& bias) {
  if (!is_f32_contiguous(x) || x.dim() < 1 || block <= 0 || block % 8) return false;
  const int64_t K = x.size(-1);
  return K > 0 && K % block == 0 && N > 0 && packed.device().is_cpu() && packed.scalar_type() == at::kByte &&
         packed.is_contiguous() && packed.numel() >= N * K / 2 && is_f32_contiguous(block_absmax) &&
         block_absmax.numel() >= N * K / block && is_f32_contiguous(levels) && levels.numel() == 16 &&
         bias_fits(bias, N);
}

void gemm_into(const lmsf::FGemm& a, bool portable) {
  static const bool has_simd = avx2_fma();
  const bool simd = has_simd && !portable;
  // At least ~64k multiply-adds a task: a second thread costs more than it saves on less.
  const int64_t grain = std::max<int64_t>(4, (1 << 16) / std::max<int64_t>(1, a.M * a.K));
  at::parallel_for(0, a.N, grain, [&](int64_t begin, int64_t end) {
    if (simd) {
      lmsf::fgemm_cols_avx2(a, begin, end);
    } else {
      fgemm_cols_scalar(a, begin, end);
    }
  });
}

const float* bias_ptr(const std::optional<Tensor>& bias) { return bias.has_value() ? bias->data_ptr<float>() : nullptr; }

void linear_into(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& y,
                 bool portable = false) {
  const int64_t K = weight.size(1), N = weight.size(0), M = K ? x.numel() / K : 0;
  const int wtype = weight.scalar_type() == at::kBFloat16 ? lmsf::kBF16 : lmsf::kF32;
  gemm_into({x.data_ptr<float>(), M, K, N, weight.data_ptr(), wtype, nullptr, nullptr, 0, bias_ptr(bias),
             y.data_ptr<float>()},
            portable);
}

void nf4_linear_into(const Tensor& x, const Tensor& packed, const Tensor& block_absmax, const Tensor& levels,
                     int64_t N, int64_t block, const std::optional<Tensor>& bias, const Tensor& y,
                     bool portable = false) {
  const int64_t K = x.size(-1), M = x.numel() / K;
  gemm_into({x.data_ptr<float>(), M, K, N, packed.data_ptr(), lmsf::kNF4, block_absmax.data_ptr<float>(),
             levels.data_ptr<float>(), block, bias_ptr(bias), y.data_ptr<float>()},
            portable);
}

Tensor empty_output(const Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return at::empty(shape, x.options());
}

std::optional<Tensor> linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, bool portable) {
  RECORD_FUNCTION("lmstack::linear", std::vector<c10::IValue>());
  if (!linear_applies(x, weight, bias)) return std::nullopt;
  Tensor y = empty_output(x, weight.size(0));
  linear_into(x, weight, bias, y, portable);
  return y;
}

std::optional<Tensor> nf4_linear(const Tensor& x, const Tensor& packed, const Tensor& block_absmax,
                                 const Tensor& levels, int64_t N, int64_t block, const std::optional<Tensor>& bias,
                                 bool portable) {
  RECORD_FUNCTION("lmstack::nf4_linear", std::vector<c10::IValue>());
  if (!nf4_applies(x, packed, block_absmax, levels, N, block, bias)) return std::nullopt;
  Tensor y = empty_output(x, N);
  nf4_linear_into(x, packed, block_absmax, levels, N, block, bias, y, portable);
  return y;
}

// ---------------------------------------------------------------------------------------------------
// Captured decode steps (lmstack/model/cpu_graph.py). Each `*_node` takes the tensors one eager call of
// the op above read and returned, checks them as that op did, and returns a graph_node.h capsule that
// recomputes the op into the same output tensors; the replayed program therefore reads and writes the
// addresses the eager step used. The decode attention's node stores and attends at the replayed position.

using lmstack_graph::make_node;

py::capsule rms_norm_node(const Tensor& x, const Tensor& weight, double eps, const Tensor& y) {
  TORCH_CHECK(rms_norm_applies(x, weight) && is_f32_contiguous(y) && y.sizes() == x.sizes(), "rms_norm_node: shapes");
  return make_node([x, weight, eps, y](int64_t) { rms_norm_into(x, weight, eps, y); });
}

py::capsule rope_qkv_node(const Tensor& qkv, const Tensor& cos, const Tensor& sin, int64_t n_head,
                          int64_t n_kv_head, const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(is_f32_contiguous(q) && is_f32_contiguous(k) && is_f32_contiguous(v) && q.dim() == 4,
              "rope_qkv_node: outputs");
  const auto tables = rope_tables(cos, sin, qkv.size(0), qkv.size(1), q.size(3));
  TORCH_CHECK(tables.has_value() && is_f32_contiguous(qkv), "rope_qkv_node: inputs");
  // The tables are the capture's cos/sin buffers, refilled before every replay: keep them alive.
  return make_node([qkv, cos, sin, t = *tables, n_head, n_kv_head, q, k, v](int64_t) {
    rope_qkv_into(qkv, t, n_head, n_kv_head, q, k, v);
  });
}

py::capsule silu_mul_node(const Tensor& gate_up, const Tensor& y) {
  TORCH_CHECK(is_f32_contiguous(gate_up) && is_f32_contiguous(y) && y.numel() * 2 == gate_up.numel(),
              "silu_mul_node: shapes");
  return make_node([gate_up, y](int64_t) { silu_mul_into(gate_up, y); });
}

py::capsule linear_node(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& y) {
  TORCH_CHECK(linear_applies(x, weight, bias) && is_f32_contiguous(y) && y.numel() * weight.size(1) == x.numel() * weight.size(0),
              "linear_node: shapes");
  return make_node([x, weight, bias, y](int64_t) { linear_into(x, weight, bias, y); });
}

py::capsule nf4_linear_node(const Tensor& x, const Tensor& packed, const Tensor& block_absmax, const Tensor& levels,
                            int64_t N, int64_t block, const std::optional<Tensor>& bias, const Tensor& y) {
  TORCH_CHECK(nf4_applies(x, packed, block_absmax, levels, N, block, bias) && is_f32_contiguous(y) &&
                  y.numel() * x.size(-1) == x.numel() * N,
              "nf4_linear_node: shapes");
  return make_node([x, packed, block_absmax, levels, N, block, bias, y](int64_t) {
    nf4_linear_into(x, packed, block_absmax, levels, N, block, bias, y);
  });
}

py::capsule add_node(const Tensor& a, const Tensor& b, const Tensor& y) {
  TORCH_CHECK(is_f32_contiguous(a) && is_f32_contiguous(b) && is_f32_contiguous(y) && a.sizes() == b.sizes() &&
                  y.sizes() == a.sizes(),
              "add_node: shapes");
  return make_node([a, b, y](int64_t) { add_into(a, b, y); });
}

// The cached decode attention at the replayed position: k/v stored there, attention over 0..position.
py::capsule decode_attention_node(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_cache,
                                  const Tensor& v_cache, const Tensor& out) {
  TORCH_CHECK(is_f32_contiguous(q) && q.dim() == 4 && q.size(2) == 1 && caches_fit(k, k_cache, v_cache, 0) &&
                  out.numel() == q.numel() && out.is_contiguous(),
              "decode_attention_node: shapes");
  float* op = out.data_ptr<float>();
  return make_node([q, k, v, k_cache, v_cache, out, op](int64_t position) {
    TORCH_CHECK(position >= 0 && position < k_cache.size(2), "decode position ", position, " is outside the KV cache");
    store_token(k, v, k_cache, v_cache, position);
    attend_into(q, k_cache, v_cache, position + 1, op);
  });
}

// A captured decode step: graph_node.h steps from any extension, run in order with the GIL released.
class DecodeProgram {
 public:
  void append(const py::capsule& step) {
    auto* node = static_cast<lmstack_graph::Node*>(PyCapsule_GetPointer(step.ptr(), lmstack_graph::kCapsuleName));
    if (node == nullptr) throw py::error_already_set();
    nodes_.push_back(*node);
    owners_.push_back(step);
  }

  void run(int64_t position) {
    py::gil_scoped_release release;
    for (const auto& node : nodes_) node.run(node.state, position);
  }

  size_t size() const { return nodes_.size(); }

 private:
  std::vector<lmstack_graph::Node> nodes_;
  std::vector<py::capsule> owners_;  // keep each step's state (and the tensors it holds) alive
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim (fp32, contiguous), or None", py::arg("x"),
        py::arg("weight"), py::arg("eps"));
  m.def("rope_qkv", &rope_qkv, "fused q/k/v output -> RoPE'd q, k and v heads, contiguous, or None",
        py::arg("qkv"), py::arg("cos"), py::arg("signed_sin"), py::arg("n_head"), py::arg("n_kv_head"));
  m.def("rope", &rope, "RoPE over (B, H, T, hd) heads into a contiguous copy, or None", py::arg("x"),
        py::arg("cos"), py::arg("signed_sin"));
  m.def("decode_attention", &decode_attention,
        "one query token per row over cached keys/values (GQA), storing k/v at `past` first when the caches "
        "are given; or None",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("k_cache") = py::none(), py::arg("v_cache") = py::none(),
        py::arg("past") = 0);
  m.def("silu_mul", &silu_mul, "silu(gate) * up over the halves of the last dim, or None", py::arg("gate_up"));
  m.def("add", &add, "a + b for same-shaped contiguous fp32 tensors, or None", py::arg("a"), py::arg("b"));
  m.def("rms_norm_node", &rms_norm_node, "captured rms_norm step into y");
  m.def("rope_qkv_node", &rope_qkv_node, "captured rope_qkv step into q, k, v");
  m.def("silu_mul_node", &silu_mul_node, "captured silu_mul step into y");
  m.def("linear", &linear, "x @ weight.T + bias for fp32 x and an fp32 or bf16 (N, K) weight, or None", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("portable") = false);
  m.def("linear_simd", &avx2_fma, "whether linear runs its AVX2 + FMA kernel (else portable C++)");
  m.def("linear_node", &linear_node, "captured linear into y");
  m.def("nf4_linear", &nf4_linear, "x @ W.T + bias for fp32 x and NF4 weights (packed codes, absmax per block), or None",
        py::arg("x"), py::arg("packed"), py::arg("block_absmax"), py::arg("levels"), py::arg("out_features"),
        py::arg("block"), py::arg("bias"), py::arg("portable") = false);
  m.def("nf4_linear_node", &nf4_linear_node, "captured nf4_linear into y");
  m.def("add_node", &add_node, "captured residual add into y");
  m.def("decode_attention_node", &decode_attention_node,
        "captured cached decode attention (store k/v at the replayed position, attend) into out");
  py::class_<DecodeProgram>(m, "DecodeProgram", "a captured decode step's ops, replayed in order")
      .def(py::init<>())
      .def("append", &DecodeProgram::append, "add a step (a graph node capsule)")
      .def("run", &DecodeProgram::run, "run every step for the token at `position`", py::arg("position"))
      .def("__len__", &DecodeProgram::size);
}
