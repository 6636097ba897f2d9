// Skinny GEMM for the model's linear layers at inference: y (M, N) = x (M, K) @ W^T + bias for the few
// activation rows of decode steps (one row single-stream, a row per sequence in the engine) and short
// prefill chunks (up to cpu_ops.LINEAR_MAX_ROWS rows). W is row-major (N, K) in one of three formats,
// widened to fp32 in registers:
//   fp32;
//   bf16 (uint16 bits: a bf16 model reads half the bytes on CPUs without bf16 arithmetic);
//   NF4 (QLoRA's format, lmstack/compress/nf4.py): two 4-bit codes a byte, even index in the low
//   nibble, W = levels[code] * block_scale[block], blocks of `block` consecutive values of the flattened
//   weight, K a multiple of `block` (so no block spans two rows) and `block` a multiple of 8.
// Plain C types only: the AVX2 file compiles under its own `#pragma GCC target`, and an inline function
// shared with another file could be merged by the linker into code the CPU cannot run.
#pragma once
#include <stdint.h>

namespace lmsf {

enum WeightType : int { kF32 = 0, kBF16 = 1, kNF4 = 2 };

struct FGemm {
  const float* x;  // (M, K) contiguous
  int64_t M, K, N;
  const void* w;  // (N, K) in `wtype`
  int wtype;
  const float* block_scale;  // NF4: (N * K / block) absmax per block; else null
  const float* levels;       // NF4: the 16 code values; else null
  int64_t block;             // NF4 block size; else 0
  const float* bias;         // null or (N)
  float* y;                  // (M, N) contiguous
};

// Output columns [n_begin, n_end) for every activation row. Each output's K products are summed in the
// same order whatever M is, so a row's result does not depend on the other rows of the batch.
void fgemm_cols_avx2(const FGemm& a, int64_t n_begin, int64_t n_end);

}  // namespace lmsf
