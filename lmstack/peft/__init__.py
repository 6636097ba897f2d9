"""Parameter-efficient fine-tuning on the one model definition (docs/finetuning.md).

from lmstack.peft import PeftConfig, apply_peft, save_adapter, load_adapter, merge_adapter, set_adapter
model = apply_peft(model, PeftConfig(method="lora", r=8, target_modules=["q_proj", "v_proj"]))
"""

from lmstack.peft.config import METHODS, PeftConfig
from lmstack.peft.io import adapter_base, is_adapter_dir, load_adapter, merge_adapter, save_adapter
from lmstack.peft.model import apply_peft, count_parameters, set_adapter, set_dylora_rank, store_frozen_base

__all__ = [
    "METHODS",
    "PeftConfig",
    "adapter_base",
    "apply_peft",
    "count_parameters",
    "is_adapter_dir",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
    "set_adapter",
    "set_dylora_rank",
    "store_frozen_base",
]
