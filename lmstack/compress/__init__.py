"""Compression: quantized linear layers and the kernels that run them.

Modules with the Seam-1 linear contract (docs/architecture.md, docs/compression.md):
  lmstack.compress.int8.Int8Linear  int8, per output channel or per group (GGUF Q8_0)
      .from_float(linear, group_size=None) | .from_quantized(qweight_int, scales, bias)
  lmstack.compress.int4.Int4Linear  int4 group-wise, symmetric (Q4_0) or asymmetric (Q4_1)
      .from_float(linear, group_size=32, symmetric=True) | .from_codes(codes, scales, zeros, bias)
  lmstack.compress.nf4.NF4Linear    NF4 with double-quantized block absmax (QLoRA's base layer)
      .from_float(linear, block_size=64, absmax_group=256)
All share `lmstack.compress.base.QuantizedLinear`: in_features, out_features, bias, forward,
dequantize() -> (out, in), concat_out(modules), packed buffers in the state dict.

Whole models and files:
  lmstack.compress.model       quantize_model, save_quantized, load_quantized_dir, QuantizedEmbedding
  lmstack.compress.quantize    `lmstack quantize` (int8/int4/nf4 here; gptq/awq/w8a8/qat via their modules)
  lmstack.compress.gguf_load   GGUF Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K kept packed: hub.load_model(ref, keep_quantized=True),
                               what generate/chat/serve/eval do unless given --gguf-weights float
  lmstack.compress.gguf_export quantized layers written to GGUF byte for byte (`lmstack convert --to gguf`)
  lmstack.compress.kernels     the fused C++ GEMV/GEMM kernels (csrc/), built just in time
"""
