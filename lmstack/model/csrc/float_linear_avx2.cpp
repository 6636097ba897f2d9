// AVX2 + FMA kernel of float_linear.h (x86-64; chosen at run time by cpu_ops.cpp).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "float_linear.h"

namespace lmsf {
namespace {  // internal linkage: nothing here may be merged with a copy compiled for another CPU

inline __m256 load_w(const void* w, int64_t offset, bool bf16) {
  if (bf16) {
    // bf16 is the high half of an fp32: widen the 16-bit values and shift them into place.
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + offset));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps(static_cast<const float*>(w) + offset);
}

inline float w_at(const void* w, int64_t offset, bool bf16) {
  if (!bf16) return static_cast<const float*>(w)[offset];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(w)[offset]) << 16;
  float out;
  __builtin_memcpy(&out, &bits, sizeof out);
  return out;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Outputs n0..n0+NT-1 for activation rows m0..m0+MT-1: NT weight rows dotted with MT activation rows,
// eight columns a step, MT x NT accumulators. The caller runs every row tile over the same NT weight
// rows one after another, so they come from memory once and from L1 after that.
template <int MT, int NT, bool BF16>
inline void tile(const FGemm& a, int64_t n0, int64_t m0) {
  const int64_t K = a.K;
  __m256 acc[MT][NT];
  for (int t = 0; t < MT; ++t)
    for (int j = 0; j < NT; ++j) acc[t][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 w[NT];
    for (int j = 0; j < NT; ++j) w[j] = load_w(a.w, (n0 + j) * K + k, BF16);
    for (int t = 0; t < MT; ++t) {
      const __m256 x = _mm256_loadu_ps(a.x + (m0 + t) * K + k);
      for (int j = 0; j < NT; ++j) acc[t][j] = _mm256_fmadd_ps(x, w[j], acc[t][j]);
    }
  }
  for (int t = 0; t < MT; ++t) {
    for (int j = 0; j < NT; ++j) {
      float sum = hsum(acc[t][j]);
      for (int64_t kk = k; kk < K; ++kk) sum += a.x[(m0 + t) * K + kk] * w_at(a.w, (n0 + j) * K + kk, BF16);
      a.y[(m0 + t) * a.N + n0 + j] = sum + (a.bias ? a.bias[n0 + j] : 0.f);
    }
  }
}

// Every row tile for the weight rows n0..n0+NT-1: tiles of 4 rows, then the 1-3 left over.
template <int NT, bool BF16>
inline void column_block(const FGemm& a, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= a.M; m += 4) tile<4, NT, BF16>(a, n0, m);
  switch (a.M - m) {
    case 3: tile<3, NT, BF16>(a, n0, m); break;
    case 2: tile<2, NT, BF16>(a, n0, m); break;
    case 1: tile<1, NT, BF16>(a, n0, m); break;
    default: break;
  }
}

template <bool BF16>
void cols(const FGemm& a, int64_t n_begin, int64_t n_end) {
  // Three weight rows a block when several activation rows share them (4 x 3 = 12 accumulators, enough
  // independent FMA chains to keep both FMA units busy; measured 10-30% faster than 4 x 2 at 16-32 rows),
  // four when one row decodes alone (a read-bound product).
  int64_t n = n_begin;
  if (a.M == 1) {
    for (; n + 4 <= n_end; n += 4) tile<1, 4, BF16>(a, n, 0);
  } else {
    for (; n + 3 <= n_end; n += 3) column_block<3, BF16>(a, n);
  }
  for (; n < n_end; ++n) column_block<1, BF16>(a, n);
}

}  // namespace

void fgemm_cols_avx2(const FGemm& a, int64_t n_begin, int64_t n_end) {
  if (a.bf16) {
    cols<true>(a, n_begin, n_end);
  } else {
    cols<false>(a, n_begin, n_end);
  }
}

}  // namespace lmsf
#endif
