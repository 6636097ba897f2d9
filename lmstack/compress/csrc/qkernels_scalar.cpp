// Portable kernels: plain C++ loops, the same arithmetic as the SIMD paths (and as kernels.py's reference).
#include <math.h>
#include <string.h>

#include "qkernels.h"

namespace lmq {
namespace {

float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exponent = 127 - 15 + 1;
      while (!(mantissa & 0x400)) {
        mantissa <<= 1;
        --exponent;
      }
      bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
    }
  } else if (exponent == 31) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float out;
  memcpy(&out, &bits, sizeof out);
  return out;
}

}  // namespace

// xq in natural column order whatever `bits` (qgemm_rows_scalar reads it so).
void quantize_rows_scalar(const float* x, int64_t K, int64_t group, int /*bits*/, int64_t m_begin, int64_t m_end,
                          int8_t* xq, float* xd, float* xg) {
  const int64_t nb = K / 32, blocks_per_group = group / 32;
  for (int64_t m = m_begin; m < m_end; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      if (b % blocks_per_group == 0) xg[m * (K / group) + b / blocks_per_group] = 0.f;
      const float* src = x + m * K + b * 32;
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(src[j]));
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      int sum = 0;
      for (int j = 0; j < 32; ++j) {
        const int q = (int)nearbyintf(src[j] * id);  // round half to even, like torch.round and the SIMD paths
        xq[m * K + b * 32 + j] = (int8_t)q;
        sum += q;
      }
      xd[m * nb + b] = d;
      xg[m * (K / group) + b / blocks_per_group] += d * (float)sum;
    }
  }
}

void qgemm_rows_scalar(const QGemm& a, int64_t n_begin, int64_t n_end, int64_t m_begin, int64_t m_end) {
  const int64_t nb = a.K / 32, blocks_per_group = a.group / 32, ng = a.K / a.group;
  const int64_t row_bytes = a.bits == 8 ? a.K : a.K / 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* wrow = a.w + n * row_bytes;
    for (int64_t m = m_begin; m < m_end; ++m) {
      const int8_t* xrow = a.xq + m * a.K;
      float acc = 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        const float d = half_to_float(a.scales[n * ng + g]);
        const float mn = a.mins ? half_to_float(a.mins[n * ng + g]) : -8.f * d;
        for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
          int isum = 0;
          if (a.bits == 8) {
            const int8_t* wb = (const int8_t*)wrow + b * 32;
            for (int j = 0; j < 32; ++j) isum += wb[j] * xrow[b * 32 + j];
            acc += d * a.xd[m * nb + b] * (float)isum;
          } else {
            const uint8_t* wb = wrow + b * 16;
            for (int j = 0; j < 16; ++j) {
              isum += (wb[j] & 0x0F) * xrow[b * 32 + j] + (wb[j] >> 4) * xrow[b * 32 + 16 + j];
            }
            acc += d * a.xd[m * nb + b] * (float)isum;
          }
        }
        if (a.bits == 4) acc += mn * a.xg[m * ng + g];
      }
      a.y[m * a.N + n] = acc + (a.bias ? a.bias[n] : 0.f);
    }
  }
}

}  // namespace lmq
