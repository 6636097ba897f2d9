// AVX2 + FMA + F16C kernels (x86-64 baseline for lmstack's fast path; chosen at run time).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c")
#define LMQ_ISA avx2
#define LMQ_VNNI 0
#include "qkernels_x86.inc"
#endif
