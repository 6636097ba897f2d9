// Skinny float GEMM for the model's plain linear layers at inference: y (M, N) = x (M, K) @ W^T + bias
// for the few activation rows of decode steps (one row single-stream, a row per sequence in the engine),
// with W row-major (N, K) in fp32 or bf16 (bf16 widened to fp32 in registers, so a bf16 model reads half
// the bytes on CPUs without bf16 arithmetic). Plain C types only: the AVX2 file compiles under its own
// `#pragma GCC target`, and an inline function shared with another file could be merged by the linker
// into code the CPU cannot run.
#pragma once
#include <stdint.h>

namespace lmsf {

struct FGemm {
  const float* x;  // (M, K) contiguous
  int64_t M, K, N;
  const void* w;   // (N, K) contiguous, fp32 or bf16 (uint16 bits)
  bool bf16;
  const float* bias;  // null or (N)
  float* y;           // (M, N) contiguous
};

// Output columns [n_begin, n_end) for every activation row. Each output's K products are summed in the
// same order whatever M is, so a row's result does not depend on the other rows of the batch.
void fgemm_cols_avx2(const FGemm& a, int64_t n_begin, int64_t n_end);

}  // namespace lmsf
