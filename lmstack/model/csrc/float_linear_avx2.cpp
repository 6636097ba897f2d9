// AVX2 + FMA kernel of float_linear.h (x86-64; chosen at run time by cpu_ops.cpp).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "float_linear.h"

namespace lmsf {
namespace {  // internal linkage: nothing here may be merged with a copy compiled for another CPU

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Software prefetch of the weight rows the caller reads next, one cache line a `step`, spread over the
// work on the current rows (see `cols`).
struct Prefetcher {
  const char* next;
  const char* end;
  inline void step() {
    if (next < end) {
      _mm_prefetch(next, _MM_HINT_T0);
      next += 64;
    }
  }
};

// Reads eight consecutive weights of a row as fp32. `chunk` is called once per block of `chunk_len()`
// columns of a row (the NF4 block, whose scale it fetches); fp32 and bf16 rows are one chunk.
template <int WT>
struct Reader {
  const FGemm& a;
  __m256 lut_lo, lut_hi;  // NF4 levels 0-7 and 8-15

  explicit Reader(const FGemm& g) : a(g) {
    if (WT == kNF4) {
      lut_lo = _mm256_loadu_ps(g.levels);
      lut_hi = _mm256_loadu_ps(g.levels + 8);
    }
  }

  int64_t chunk_len() const { return WT == kNF4 ? a.block : a.K; }

  // A prefetcher over weight rows [n0, n1) clipped to the matrix (rows are contiguous), or over nothing.
  Prefetcher rows(int64_t n0, int64_t n1) const {
    const int64_t bits = WT == kF32 ? 32 : WT == kBF16 ? 16 : 4;
    const char* base = static_cast<const char*>(a.w);
    n1 = n1 < a.N ? n1 : a.N;
    n0 = n0 < n1 ? n0 : n1;
    return {base + n0 * a.K * bits / 8, base + n1 * a.K * bits / 8};
  }

  __m256 scale(int64_t n, int64_t k) const {
    return WT == kNF4 ? _mm256_set1_ps(a.block_scale[(n * a.K + k) / a.block]) : _mm256_setzero_ps();
  }

  __m256 load(int64_t n, int64_t k, __m256 scale) const {
    const int64_t offset = n * a.K + k;
    if (WT == kBF16) {
      // bf16 is the high half of an fp32: widen the 16-bit values and shift them into place.
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(a.w) + offset));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (WT == kNF4) {
      // Four bytes hold codes 0-7 from the lowest nibble up: lane j takes bits 4j..4j+3. permutevar reads
      // the low three bits of a code; bit 3, moved to the sign, picks the upper half of the table.
      uint32_t word;
      __builtin_memcpy(&word, static_cast<const uint8_t*>(a.w) + offset / 2, sizeof word);
      const __m256i codes = _mm256_and_si256(
          _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(word)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
          _mm256_set1_epi32(15));
      const __m256 level = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, codes), _mm256_permutevar8x32_ps(lut_hi, codes),
                                            _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
      return _mm256_mul_ps(level, scale);
    }
    return _mm256_loadu_ps(static_cast<const float*>(a.w) + offset);
  }

  float at(int64_t n, int64_t k) const {  // one weight (the last K % 8 columns of fp32 / bf16 rows)
    const int64_t offset = n * a.K + k;
    if (WT == kF32) return static_cast<const float*>(a.w)[offset];
    if (WT == kBF16) {
      const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(a.w)[offset]) << 16;
      float out;
      __builtin_memcpy(&out, &bits, sizeof out);
      return out;
    }
    const uint8_t byte = static_cast<const uint8_t*>(a.w)[offset / 2];
    return a.levels[(byte >> (4 * (offset & 1))) & 15] * a.block_scale[offset / a.block];
  }
};

// Outputs n0..n0+NT-1 for activation rows m0..m0+MT-1: NT weight rows dotted with MT activation rows,
// eight columns a step, MT x NT accumulators. The caller runs every row tile over the same NT weight
// rows one after another, so they come from memory once and from L1 after that.
template <int MT, int NT, int WT>
inline void tile(const Reader<WT>& r, int64_t n0, int64_t m0, Prefetcher& pf) {
  const FGemm& a = r.a;
  const int64_t K = a.K, chunk = r.chunk_len();
  __m256 acc[MT][NT];
  for (int t = 0; t < MT; ++t)
    for (int j = 0; j < NT; ++j) acc[t][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (int64_t c0 = 0; c0 < K; c0 += chunk) {
    const int64_t c1 = c0 + chunk < K ? c0 + chunk : K;
    __m256 scale[NT];
    for (int j = 0; j < NT; ++j) scale[j] = r.scale(n0 + j, c0);
    for (k = c0; k + 8 <= c1; k += 8) {
      __m256 w[NT];
      for (int j = 0; j < NT; ++j) w[j] = r.load(n0 + j, k, scale[j]);
      pf.step();
      for (int t = 0; t < MT; ++t) {
        const __m256 x = _mm256_loadu_ps(a.x + (m0 + t) * K + k);
        for (int j = 0; j < NT; ++j) acc[t][j] = _mm256_fmadd_ps(x, w[j], acc[t][j]);
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
    for (int j = 0; j < NT; ++j) {
      float sum = hsum(acc[t][j]);
      for (int64_t kk = k; kk < K; ++kk) sum += a.x[(m0 + t) * K + kk] * r.at(n0 + j, kk);
      a.y[(m0 + t) * a.N + n0 + j] = sum + (a.bias ? a.bias[n0 + j] : 0.f);
    }
  }
}

// Rows served by the column-chunked path and by the prefetch; more rows (short prefill chunks, up to
// cpu_ops.LINEAR_MAX_ROWS) take plain column blocks, where the activations streaming through L1 evicted
// prefetched weights before their use (0.75-0.8x at 64-128 rows).
constexpr int64_t kMaxRows = 32;

// Every row tile for the weight rows n0..n0+NT-1: tiles of 4 rows, then the 1-3 left over. Up to
// kMaxRows rows, the next NT weight rows are prefetched meanwhile.
template <int NT, int WT>
inline void column_block(const Reader<WT>& r, int64_t n0) {
  Prefetcher pf = r.a.M <= kMaxRows ? r.rows(n0 + NT, n0 + 2 * NT) : r.rows(0, 0);
  int64_t m = 0;
  for (; m + 4 <= r.a.M; m += 4) tile<4, NT, WT>(r, n0, m, pf);
  switch (r.a.M - m) {
    case 3: tile<3, NT, WT>(r, n0, m, pf); break;
    case 2: tile<2, NT, WT>(r, n0, m, pf); break;
    case 1: tile<1, NT, WT>(r, n0, m, pf); break;
    default: break;
  }
}

// fp32 / bf16 weights with more than one row tile: the NT weight rows are taken kChunk columns at a
// time, and every row tile works through that chunk before the next is read, its accumulators kept in
// `acc` (L1) between chunks. The weights then stream from memory evenly instead of in bursts at each
// block's first tile (measured 4-16% faster at 8-16 rows, same process). Each output's sums run in the
// same order as in `tile`, so results are bit-identical.
constexpr int64_t kChunk = 192;

template <int MT, int NT, int WT>
inline void tile_chunk(const Reader<WT>& r, int64_t n0, int64_t m0, int64_t k0, int64_t k1, __m256* acc_out,
                       Prefetcher& pf) {
  const FGemm& a = r.a;
  const int64_t K = a.K;
  __m256 acc[MT][NT];
  for (int t = 0; t < MT; ++t)
    for (int j = 0; j < NT; ++j) acc[t][j] = k0 == 0 ? _mm256_setzero_ps() : acc_out[t * NT + j];
  const __m256 unused_scale = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; k += 8) {
    __m256 w[NT];
    for (int j = 0; j < NT; ++j) w[j] = r.load(n0 + j, k, unused_scale);
    pf.step();
    for (int t = 0; t < MT; ++t) {
      const __m256 x = _mm256_loadu_ps(a.x + (m0 + t) * K + k);
      for (int j = 0; j < NT; ++j) acc[t][j] = _mm256_fmadd_ps(x, w[j], acc[t][j]);
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int j = 0; j < NT; ++j) acc_out[t * NT + j] = acc[t][j];
}

template <int NT, int WT>
inline void column_block_chunked(const Reader<WT>& r, int64_t n0) {
  const FGemm& a = r.a;
  const int64_t M = a.M, K = a.K;  // K % 8 == 0, M <= kMaxRows (checked by the caller)
  __m256 acc[kMaxRows * NT];
  Prefetcher pf = r.rows(n0 + NT, n0 + 2 * NT);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t k1 = k0 + kChunk < K ? k0 + kChunk : K;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile_chunk<4, NT, WT>(r, n0, m, k0, k1, acc + m * NT, pf);
    switch (M - m) {
      case 3: tile_chunk<3, NT, WT>(r, n0, m, k0, k1, acc + m * NT, pf); break;
      case 2: tile_chunk<2, NT, WT>(r, n0, m, k0, k1, acc + m * NT, pf); break;
      case 1: tile_chunk<1, NT, WT>(r, n0, m, k0, k1, acc + m * NT, pf); break;
      default: break;
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < NT; ++j) a.y[m * a.N + n0 + j] = hsum(acc[m * NT + j]) + (a.bias ? a.bias[n0 + j] : 0.f);
}

template <int WT>
void cols(const FGemm& a, int64_t n_begin, int64_t n_end) {
  const Reader<WT> r(a);
  // Three weight rows a block when several activation rows share them (4 x 3 = 12 accumulators, enough
  // independent FMA chains to keep both FMA units busy; measured 10-30% faster than 4 x 2 at 16-32 rows),
  // four when one row decodes alone (a read-bound product).
  // With 2-32 rows, each block prefetches the next block's weight rows, one cache line per step of its
  // first tiles: the block's compute hides their memory latency, which the hardware prefetcher left
  // exposed at the start of every short row stream. Over SmolLM2's weights from memory (same process):
  // 1.16x at 2 rows, 1.35x at 4, 1.26x at 8, 1.22x at 16, 1.10x at 32; no gain at 1 row.
  int64_t n = n_begin;
  if (a.M == 1) {
    Prefetcher none = r.rows(0, 0);  // one row streams its weights: the hardware prefetcher keeps up
    for (; n + 4 <= n_end; n += 4) tile<1, 4, WT>(r, n, 0, none);
  } else if (WT != kNF4 && a.K % 8 == 0 && a.M > 4 && a.M <= kMaxRows) {
    for (; n + 3 <= n_end; n += 3) column_block_chunked<3, WT>(r, n);
  } else {
    for (; n + 3 <= n_end; n += 3) column_block<3, WT>(r, n);
  }
  for (; n < n_end; ++n) column_block<1, WT>(r, n);
}

}  // namespace

void fgemm_cols_avx2(const FGemm& a, int64_t n_begin, int64_t n_end) {
  switch (a.wtype) {
    case kBF16: cols<kBF16>(a, n_begin, n_end); break;
    case kNF4: cols<kNF4>(a, n_begin, n_end); break;
    default: cols<kF32>(a, n_begin, n_end); break;
  }
}

}  // namespace lmsf
#endif
