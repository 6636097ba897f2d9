// AVX-512 VNNI kernels on 256-bit vectors (vpdpbusd), for CPUs with avx512f/bw/vl/vnni; chosen at run time.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define LMQ_ISA avx512
#define LMQ_VNNI 1
#include "qkernels_x86.inc"
#endif
