// Fused dequantize-GEMV/GEMM kernels for lmstack's packed weights (see kernels.py for the Python side).
//
// y (M, N) = x (M, K) @ W^T (+ bias), W stored packed, row by row, so every output row streams its
// bytes once, front to back:
//   bits 8: w int8 (N, K);          W[n,k] = scale[n, k/G] * w[n,k]
//   bits 4: w uint8 (N, K/2), per 32 columns 16 bytes (column j low nibble, j+16 high nibble);
//           W[n,k] = scale[n,k/G] * code + min[n,k/G], min = -8 * scale when mins is null (symmetric).
// Scales and mins are IEEE fp16 (uint16 bits). G is a multiple of 32 dividing K.
//
// Activations are quantized like llama.cpp's Q8_0 (per 32 values: d = absmax/127, q = round(x/d)), so
// each 32-column block is an integer dot product: int8 x int8 (bits 8) or uint4 x int8 (bits 4).
// This header includes no C++ library or torch header on purpose: each ISA file compiles under its own
// `#pragma GCC target`, and inline functions shared between files would be merged by the linker,
// letting an AVX-512 copy run on a machine without AVX-512.
#pragma once
#include <stdint.h>

namespace lmq {

struct QGemm {
  const int8_t* xq;      // (M, K) quantized activations
  const float* xd;       // (M, K/32) activation block scales
  const float* xg;       // (M, K/G) sum over the group's blocks of d * sum(q) (the min / zero-point term)
  int64_t M, K, N;
  const uint8_t* w;      // packed weight rows
  const uint16_t* scales;
  const uint16_t* mins;  // null: symmetric (min = -8 * scale) or int8
  const float* bias;     // null or (N)
  float* y;              // (M, N)
  int bits, group;
};

// One pair per instruction set; the caller (qkernels_bind.cpp) splits the work over threads:
//   quantize_rows: activation rows [m_begin, m_end) -> xq, xd, xg, xq laid out as that ISA's qgemm_rows
//                  reads it for weights of `bits` (so only a pair from one ISA goes together);
//   qgemm_rows:    output columns [n_begin, n_end) for activation rows [m_begin, m_end).
#define LMQ_DECLARE(isa)                                                                                     \
  void quantize_rows_##isa(const float* x, int64_t K, int64_t group, int bits, int64_t m_begin, int64_t m_end,  \
                           int8_t* xq, float* xd, float* xg);                                                \
  void qgemm_rows_##isa(const QGemm& a, int64_t n_begin, int64_t n_end, int64_t m_begin, int64_t m_end);
LMQ_DECLARE(scalar)
#if defined(__x86_64__) || defined(_M_X64)
LMQ_DECLARE(avx2)
LMQ_DECLARE(avx512)
// Packed rows [n_begin, n_end) -> bf16, row n at out + (n - row0) * K (qkernels_bf16.cpp; AVX-512 BF16 only).
void dequantize_rows_bf16(const uint8_t* w, const uint16_t* scales, const uint16_t* mins, int64_t K, int bits,
                          int64_t group, int64_t n_begin, int64_t n_end, int64_t row0, uint16_t* out);
#endif

}  // namespace lmq
