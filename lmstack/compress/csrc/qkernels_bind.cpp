// Python binding: checks, scratch buffers, run-time ISA choice and threading (at::parallel_for, which
// is torch's own OpenMP pool, so the kernels never start a second thread pool).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "../../model/csrc/graph_node.h"
#include "qkernels.h"

namespace {

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

bool isa_supported(int64_t isa) {
  if (isa == kScalar) return true;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == kAvx2) return avx2;
  if (isa == kAvx512) {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }
#endif
  return false;
}

bool bf16_supported() {
#if defined(__x86_64__) || defined(_M_X64)
  return isa_supported(kAvx512) && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

std::vector<int64_t> supported_isas() {
  std::vector<int64_t> out;
  for (int64_t isa : {kScalar, kAvx2, kAvx512}) {
    if (isa_supported(isa)) out.push_back(isa);
  }
  return out;
}

using QuantizeFn = void (*)(const float*, int64_t, int64_t, int, int64_t, int64_t, int8_t*, float*, float*);
using GemmFn = void (*)(const lmq::QGemm&, int64_t, int64_t, int64_t, int64_t);

void pick(int64_t isa, QuantizeFn* quantize, GemmFn* gemm) {
  TORCH_CHECK(isa_supported(isa), "lmstack kernels: instruction set ", isa, " is not supported by this CPU");
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == kAvx512) {
    *quantize = lmq::quantize_rows_avx512;
    *gemm = lmq::qgemm_rows_avx512;
    return;
  }
  if (isa == kAvx2) {
    *quantize = lmq::quantize_rows_avx2;
    *gemm = lmq::qgemm_rows_avx2;
    return;
  }
#endif
  *quantize = lmq::quantize_rows_scalar;
  *gemm = lmq::qgemm_rows_scalar;
}

// The arguments both entry points take, checked once: shapes (M rows of K, N outputs), dtypes, and the
// raw pointers to the optional mins and bias.
struct QArgs {
  int64_t M, K, N;
  const uint16_t* mins;
  const float* bias;
};

QArgs check_args(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                 const c10::optional<torch::Tensor>& mins, const c10::optional<torch::Tensor>& bias, int64_t bits,
                 int64_t group) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() >= 1 && x.is_contiguous(), "x must be contiguous fp32 (..., K)");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, N = w.size(0);
  TORCH_CHECK(K % 32 == 0 && group % 32 == 0 && K % group == 0, "K and the group size must be multiples of 32");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(1) == (bits == 8 ? K : K / 2), "packed weight shape");
  TORCH_CHECK(w.element_size() == 1, "packed weight must be int8/uint8");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && scales.numel() == N * (K / group),
              "scales must be contiguous fp16 (N, K / group)");
  const uint16_t* mins_ptr = nullptr;
  if (mins.has_value()) {
    TORCH_CHECK(bits == 4 && mins->scalar_type() == torch::kHalf && mins->is_contiguous() &&
                    mins->numel() == scales.numel(),
                "mins must be contiguous fp16 like scales (int4 only)");
    mins_ptr = reinterpret_cast<const uint16_t*>(mins->data_ptr());
  }
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias must be contiguous fp32 (N)");
    bias_ptr = bias->data_ptr<float>();
  }
  return {M, K, N, mins_ptr, bias_ptr};
}

// y (M rows of N, contiguous) = x @ dequant(W)^T + bias, for arguments check_args accepted.
void qlinear_into(const QArgs& args, const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                  int64_t bits, int64_t group, QuantizeFn quantize, GemmFn gemm, float* y) {
  const int64_t M = args.M, K = args.K, N = args.N;  // plain locals: lambdas below capture them
  // The quantized activations live in per-thread scratch that only grows: a decode step makes ~120 calls,
  // and three allocations each would cost more than the quantization itself.
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xd, xg;
  if (xq.size() < static_cast<size_t>(M * K)) xq.resize(M * K);
  if (xd.size() < static_cast<size_t>(M * (K / 32))) xd.resize(M * (K / 32));
  if (xg.size() < static_cast<size_t>(M * (K / group))) xg.resize(M * (K / group));
  const float* x_ptr = x.data_ptr<float>();
  int8_t* xq_ptr = xq.data();
  float* xd_ptr = xd.data();
  float* xg_ptr = xg.data();
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    quantize(x_ptr, K, group, static_cast<int>(bits), begin, end, xq_ptr, xd_ptr, xg_ptr);
  });

  lmq::QGemm a{xq_ptr, xd_ptr, xg_ptr, M, K, N, reinterpret_cast<const uint8_t*>(w.data_ptr()),
               reinterpret_cast<const uint16_t*>(scales.data_ptr()), args.mins, args.bias, y, static_cast<int>(bits),
               static_cast<int>(group)};
  // Activation tiles of 64 rows keep their int8 copy (64 x K bytes) in L2 while every weight row streams by.
  // Each thread gets at least ~256k multiply-adds: waking a second thread for less (a k_proj at batch 1)
  // costs more than it saves, and far more on a loaded machine.
  constexpr int64_t kRowTile = 64, kMinWork = 1 << 18;
  for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
    const int64_t m1 = std::min(M, m0 + kRowTile);
    const int64_t grain = std::max<int64_t>(4, kMinWork / (K * (m1 - m0)));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { gemm(a, begin, end, m0, m1); });
  }
}

torch::Tensor qlinear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                      const c10::optional<torch::Tensor>& mins, const c10::optional<torch::Tensor>& bias,
                      int64_t bits, int64_t group, int64_t isa) {
  const QArgs args = check_args(x, w, scales, mins, bias, bits, group);
  QuantizeFn quantize;
  GemmFn gemm;
  pick(isa, &quantize, &gemm);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = args.N;
  auto y = torch::empty(out_shape, x.options());
  qlinear_into(args, x, w, scales, bits, group, quantize, gemm, y.data_ptr<float>());
  return y;
}

// A captured decode step (lmstack/model/cpu_graph.py): `qlinear` of these arguments again into y, the
// tensor the eager call returned. The node holds every tensor, so the addresses it reads stay valid.
py::capsule qlinear_node(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                         const c10::optional<torch::Tensor>& mins, const c10::optional<torch::Tensor>& bias,
                         int64_t bits, int64_t group, int64_t isa, const torch::Tensor& y) {
  const QArgs args = check_args(x, w, scales, mins, bias, bits, group);
  TORCH_CHECK(y.scalar_type() == torch::kFloat && y.is_contiguous() && y.numel() == args.M * args.N,
              "qlinear_node: y must be the contiguous fp32 (..., N) output");
  QuantizeFn quantize;
  GemmFn gemm;
  pick(isa, &quantize, &gemm);
  float* y_ptr = y.data_ptr<float>();
  return lmstack_graph::make_node([args, x, w, scales, mins, bias, bits, group, quantize, gemm, y, y_ptr](int64_t) {
    qlinear_into(args, x, w, scales, bits, group, quantize, gemm, y_ptr);
  });
}

// y (..., N) = x (..., K) @ dequant(W)^T + bias as bf16 GEMMs (oneDNN, fp32 accumulation), for batches
// of many rows on CPUs with AVX-512 BF16. The weight is dequantized slab by slab (kSlab rows) into
// per-thread scratch that is reused: a fresh buffer per call would page-fault on every call (56 MB for
// SmolLM2's head), and a slab stays in cache while the GEMM reads it.
torch::Tensor qlinear_bf16(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                           const c10::optional<torch::Tensor>& mins, const c10::optional<torch::Tensor>& bias,
                           int64_t bits, int64_t group) {
  TORCH_CHECK(bf16_supported(), "lmstack kernels: this CPU has no AVX-512 BF16");
  const QArgs args = check_args(x, w, scales, mins, bias, bits, group);
  const int64_t M = args.M, K = args.K, N = args.N;  // plain locals: lambdas below capture them
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  auto y = torch::empty({M, N}, x.options());
#if defined(__x86_64__) || defined(_M_X64)
  constexpr int64_t kSlab = 2048;
  const int64_t slab = std::min(N, kSlab);
  thread_local std::vector<uint16_t> scratch;
  if (scratch.size() < static_cast<size_t>(slab * K)) scratch.resize(slab * K);
  uint16_t* buffer = scratch.data();  // the calling thread's: inside parallel_for `scratch` names the worker's
  const auto xb = x.reshape({M, K}).to(torch::kBFloat16);
  const auto* w_ptr = reinterpret_cast<const uint8_t*>(w.data_ptr());
  const auto* s_ptr = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  for (int64_t n0 = 0; n0 < N; n0 += slab) {
    const int64_t n1 = std::min(N, n0 + slab);
    at::parallel_for(n0, n1, std::max<int64_t>(1, (1 << 15) / K), [&](int64_t begin, int64_t end) {
      lmq::dequantize_rows_bf16(w_ptr, s_ptr, args.mins, K, static_cast<int>(bits), group, begin, end, n0, buffer);
    });
    const auto weight = torch::from_blob(buffer, {n1 - n0, K}, x.options().dtype(torch::kBFloat16));
    y.narrow(1, n0, n1 - n0).copy_(at::matmul(xb, weight.t()));
  }
#endif
  if (args.bias != nullptr) y.add_(*bias);
  return y.view(out_shape);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lmstack fused dequantize-GEMV/GEMM kernels for int8 and int4 packed weights";
  m.def("qlinear", &qlinear, "y = x @ dequant(W).T + bias with activations quantized per 32 (Q8_0 style)");
  m.def("bf16_supported", &bf16_supported, "whether this CPU has AVX-512 BF16 (qlinear_bf16 runs)");
  m.def("qlinear_bf16", &qlinear_bf16, "y = x @ dequant(W).T + bias as bf16 GEMMs over dequantized weight slabs");
  m.def("qlinear_node", &qlinear_node, "a captured decode step: qlinear of these arguments into y");
  m.def("supported_isas", &supported_isas, "instruction sets this CPU runs: 0 scalar, 1 avx2, 2 avx512-vnni");
}
