// Packed weights -> bf16 rows, for CPUs with AVX-512 BF16 (vcvtne2ps2bf16): prefill-sized batches run
// as one bf16 GEMM (oneDNN) over weights dequantized here, which on such CPUs is several times faster
// than integer dot products at many rows (see kernels.py, `uses_bf16_gemm`). Chosen at run time.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")
#include <immintrin.h>

#include "qkernels.h"

namespace lmq {
namespace {

// 16 int32 codes -> w = code * scale + min -> 16 bf16 at out.
inline void store_bf16(__m512i codes, __m512 scale, __m512 min, uint16_t* out) {
  const __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(codes), scale, min);
  _mm256_storeu_si256((__m256i*)out, (__m256i)_mm512_cvtneps_pbh(w));
}

}  // namespace

void dequantize_rows_bf16(const uint8_t* w, const uint16_t* scales, const uint16_t* mins, int64_t K, int bits,
                          int64_t group, int64_t n_begin, int64_t n_end, int64_t row0, uint16_t* out) {
  const int64_t nb = K / 32, blocks_per_group = group / 32, ng = K / group;
  const int64_t row_bytes = bits == 8 ? K : K / 2;
  const __m128i nibble = _mm_set1_epi8(0x0F);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* wrow = w + n * row_bytes;
    uint16_t* orow = out + (n - row0) * K;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t g = n * ng + b / blocks_per_group;
      const float d = _cvtsh_ss(scales[g]);
      const __m512 scale = _mm512_set1_ps(d);
      if (bits == 8) {
        const __m512 zero = _mm512_setzero_ps();
        const __m128i lo = _mm_loadu_si128((const __m128i*)(wrow + b * 32));
        const __m128i hi = _mm_loadu_si128((const __m128i*)(wrow + b * 32 + 16));
        store_bf16(_mm512_cvtepi8_epi32(lo), scale, zero, orow + b * 32);
        store_bf16(_mm512_cvtepi8_epi32(hi), scale, zero, orow + b * 32 + 16);
      } else {  // 16 bytes: column j in the low nibble of byte j, column j + 16 in its high nibble
        const __m512 min = _mm512_set1_ps(mins ? _cvtsh_ss(mins[g]) : -8.f * d);
        const __m128i bytes = _mm_loadu_si128((const __m128i*)(wrow + b * 16));
        const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
        store_bf16(_mm512_cvtepu8_epi32(lo), scale, min, orow + b * 32);
        store_bf16(_mm512_cvtepu8_epi32(hi), scale, min, orow + b * 32 + 16);
      }
    }
  }
}

}  // namespace lmq
#endif
