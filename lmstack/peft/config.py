"""`PeftConfig`: which parameter-efficient method to apply and its knobs (`--set peft.r=16`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.errors import require

METHODS = (
    "full",
    "freeze",
    "lora",
    "dora",
    "qlora",
    "adalora",
    "dylora",
    "adapter",
    "prefix",
    "ptuning-v2",
    "prompt",
    "bitfit",
    "ia3",
)
LORA_METHODS = ("lora", "dora", "qlora", "dylora", "adalora")
VIRTUAL_TOKEN_METHODS = ("prefix", "ptuning-v2", "prompt")  # virtual key/value positions (lmstack.peft.prompts)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _names(value: list[str] | str) -> list[str]:
    """`"q_proj,v_proj"` (a --set string) or a YAML list -> list of names."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


@dataclass
class PeftConfig:
    """One method and its settings. Fields a method does not use are ignored by it."""

    method: str = "lora"
    # LoRA family. target_modules: module-name patterns; a plain name matches that last path part
    # (`q_proj` matches `layers.3.attn.q_proj`), anything else is a regular expression over the
    # full module name (`layers\.(0|1)\..*_proj`), as in the PEFT library.
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)
    # QLoRA: the frozen base is stored in NF4 (4-bit NormalFloat) with double-quantised scales.
    nf4_block_size: int = 64
    # AdaLoRA (Zhang et al. 2023): every module starts at adalora_init_r ranks in SVD form (P diag(E) Q);
    # ranks are pruned by importance on a cubic budget schedule down to an average of `r` per module.
    adalora_init_r: int = 12
    adalora_tinit: int = 0  # steps at the full budget before pruning starts
    adalora_tfinal: int = 0  # last steps at the final budget
    adalora_delta_t: int = 1  # re-allocate every this many steps
    adalora_beta1: float = 0.85  # EMA of the sensitivity |w * grad|
    adalora_beta2: float = 0.85  # EMA of its uncertainty
    adalora_orth_reg: float = 0.5  # weight of the orthogonality penalty ||P^T P - I||^2 + ||Q Q^T - I||^2
    # Freeze: train only the last `freeze_trainable_layers` blocks, or modules matching `freeze_trainable`.
    freeze_trainable_layers: int = 2
    freeze_trainable: list[str] = field(default_factory=list)
    # Bottleneck adapters: houlsby (after attention and after the MLP) or pfeiffer (after the MLP only).
    adapter_size: int = 64
    adapter_placement: str = "houlsby"
    # Prefix / P-tuning v2 / prompt tuning.
    num_virtual_tokens: int = 16
    prefix_hidden: int = 256  # prefix tuning's reparameterisation MLP width (Li & Liang 2021)
    prompt_init_text: str = ""  # prompt tuning: initialise the soft prompt from this text's embeddings
    # IA3: which modules get a learned output rescaling, and which of them are feed-forward
    # (those rescale their input instead, as in Liu et al. 2022).
    ia3_target_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    ia3_feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])

    def __post_init__(self) -> None:
        require(self.method in METHODS, f"peft method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        self.target_modules = _names(self.target_modules)
        self.freeze_trainable = _names(self.freeze_trainable)
        self.ia3_target_modules = _names(self.ia3_target_modules)
        self.ia3_feedforward_modules = _names(self.ia3_feedforward_modules)
        require(self.r >= 1, f"peft.r must be at least 1, got {self.r}")
        require(0.0 <= self.dropout < 1.0, f"peft.dropout must be in [0, 1), got {self.dropout}")
        require(
            self.adapter_placement in ("houlsby", "pfeiffer"),
            f"peft.adapter_placement must be 'houlsby' or 'pfeiffer', got {self.adapter_placement!r}",
        )
        require(self.num_virtual_tokens >= 1, "peft.num_virtual_tokens must be at least 1")
        require(self.adapter_size >= 1, "peft.adapter_size must be at least 1")
        if self.method == "adalora":
            require(
                self.adalora_init_r >= self.r,
                f"peft.adalora_init_r={self.adalora_init_r} must be >= peft.r={self.r} (AdaLoRA prunes down to r)",
            )

    @property
    def initial_rank(self) -> int:
        """The rank each adapter is created with (AdaLoRA starts wider than its target)."""
        return self.adalora_init_r if self.method == "adalora" else self.r
