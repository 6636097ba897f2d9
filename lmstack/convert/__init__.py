"""Model conversion: Hugging Face safetensors <-> lmstack <-> GGUF.

export.py          `convert()`, what `lmstack convert` runs
hf.py              Hugging Face directories (config.json + safetensors): import and export
gguf.py            GGUF import (dequantized) and export (f32/f16/q8_0)
gguf_reader.py     the binary GGUF reader: metadata, tensor table, memory-mapped tensors
gguf_tokenizer.py  tokenizer and chat template to and from GGUF metadata
inspect.py         `lmstack inspect`: architecture, size, dtypes, tokenizer, template
"""
