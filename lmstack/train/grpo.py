"""RL with verifiable rewards: `lmstack align grpo --model REF --data PROMPTS.jsonl --reward R ... --out DIR`.

GRPO (Shao et al. 2024, DeepSeekMath) on the SFT trainer (methods, logging, checkpoints, resume):
  1. rollouts   for each prompt, `num_generations` (G) completions sampled by the batched engine
                (`LLMEngine.generate` with SamplingParams(n=G, seed)); the engine runs the policy's own
                modules (LoRA included), so sampling is the serving path, not a private loop
  2. rewards    the weighted sum of the reward functions (lmstack.train.rewards) per completion
  3. advantage  group-normalised: A = (r - mean of the prompt's group) / (std of the group + 1e-4)
  4. objective  per completion token, -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) with
                ratio = pi(token) / pi_old(token), plus kl_coef * k3(pi, pi_ref) where
                k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's unbiased, non-negative estimator);
                the mean over a completion's tokens, then over completions
A rollout is reused for `grpo_iterations` optimizer steps (pi_old is the policy that sampled it; with
one iteration pi_old is the policy being stepped, so its log-probs are the forward pass's own, detached:
the ratio is 1, the clip cannot trigger, and no extra pass runs). The reference for the KL
is the base model as loaded (a frozen copy) or `ref_model`; kl_coef 0 keeps no reference at all.

Evaluation: greedy answers to held-out prompts through the engine, scored by the same reward functions:
`accuracy` (share whose first reward is 1) and `mean_reward`.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.data.files import iter_jsonl_rows
from lmstack.engine import EngineConfig, LLMEngine, SamplingParams
from lmstack.errors import LmstackError, require
from lmstack.peft.config import VIRTUAL_TOKEN_METHODS
from lmstack.train.distributed import all_reduce_sum, cleanup, init_distributed, is_main_process, print_main, unwrap
from lmstack.train.reference import check_same_vocabulary, token_logps
from lmstack.train.rewards import call_reward, resolve_reward
from lmstack.train.sft import SFTBatches, SFTConfig, SFTTrainer, load_run_config, preflight, use_chat_template
from lmstack.utils.device import resolve_device


@dataclass
class GRPOConfig(SFTConfig):
    """SFTConfig's keys (method, peft.*, schedule, checkpoints) plus the rollout and the objective."""

    rewards: list[str] = field(default_factory=lambda: ["exact_match", "format"])  # built-ins or module:function
    reward_weights: list[float] = field(default_factory=list)  # empty: 1.0 each
    num_generations: int = 8  # G completions per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # 0: no KL term and no reference model in memory
    ref_model: str = ""  # "": the base model as loaded
    grpo_iterations: int = 1  # optimizer steps per rollout
    eval_prompts: int = 32  # held-out prompts answered greedily at each eval
    out: str = "runs/grpo"
    batch_size: int = 4  # prompts per micro-batch (x num_generations completions)
    seq_len: int = 256  # prompt + completion tokens
    max_steps: int = 50
    eval_every: int = 10
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            self.lr = 1e-5 if self.peft.method == "full" else 1e-4
        super().__post_init__()
        require(self.rewards, "give at least one reward function (--reward NAME or module:function)")
        require(
            not self.reward_weights or len(self.reward_weights) == len(self.rewards),
            f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards",
        )
        require(self.num_generations >= 2, "num_generations must be >= 2 (advantages compare a group)")
        require(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        require(self.temperature > 0, "temperature must be > 0: a greedy group has no spread to learn from")
        require(0 < self.clip_eps < 1, f"clip_eps must be in (0, 1), got {self.clip_eps}")
        require(self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}")
        require(self.grpo_iterations >= 1, "grpo_iterations must be >= 1")


def load_grpo_config(recipe: str | Path | None, overrides: list[str] | None = None) -> GRPOConfig:
    return load_run_config(GRPOConfig, recipe, overrides, "GRPO")


# --- the objective ----------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(B*G,) rewards, groups contiguous -> (B*G,) advantages normalised within each group."""
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    clip_eps: float,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped-ratio objective with an optional k3 KL, per token then per completion.

    logps/old_logps/ref_logps (N,) per completion token, rows (N,) the completion of each token,
    advantages (num_rows,). Returns (loss, stats: clip_fraction and kl).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages[rows]
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if ref_logps is not None and kl_coef > 0:
        log_ratio = ref_logps - logps
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + kl_coef * kl
    counts = torch.zeros(num_rows, dtype=per_token.dtype, device=per_token.device).index_add(
        0, rows, torch.ones_like(per_token)
    )
    per_row = torch.zeros_like(counts).index_add(0, rows, per_token) / counts.clamp(min=1)
    loss = per_row[counts > 0].mean()
    stats = {
        "clip_fraction": float((unclipped != clipped).float().mean()),
        "kl": float(kl.detach().mean()),
    }
    return loss, stats


def rollout_params(cfg: GRPOConfig, n_prompts: int, key: int) -> list[SamplingParams]:
    """One SamplingParams per prompt of a rollout, each with its own range of G seeds: the engine draws the
    i-th of n completions from seed + i, so one shared seed would give every prompt's i-th completion the
    same random numbers. `key` numbers the rollout; different keys get disjoint ranges."""
    G = cfg.num_generations
    return [
        SamplingParams(
            n=G,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=(key * n_prompts * G + j * G) % 2**31,
        )
        for j in range(n_prompts)
    ]


# --- data ---------------------------------------------------------------------------------------------


def read_prompt_rows(path: str | Path) -> list[dict[str, Any]]:
    """{"prompt": text or messages, ...any columns the rewards read}; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise LmstackError(f"prompt file {str(path)!r} not found; pass a .jsonl of {{'prompt': ...}} rows")
    rows = []
    for where, row in iter_jsonl_rows(path):
        if not isinstance(row, dict) or "prompt" not in row:
            raise LmstackError(f"{where}: row has no 'prompt' field; every row needs one")
        prompt = row["prompt"]
        if isinstance(prompt, str):
            row["prompt"] = [{"role": "user", "content": prompt}]
        elif not (isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt)):
            raise LmstackError(f"{where}: 'prompt' must be a string or a list of messages")
        rows.append(row)
    if len(rows) < 2:
        raise LmstackError(f"{path} has {len(rows)} row(s); at least 2 are needed (some are held out)")
    keys = set(rows[0])
    for i, row in enumerate(rows):
        if set(row) != keys:
            raise LmstackError(f"{path}: row {i + 1} has fields {sorted(row)}, the first row {sorted(keys)}")
    return rows


@dataclass
class PromptSet:
    """Prompts rendered with the generation prompt, their text, and the other columns per row."""

    ids: list[list[int]]
    texts: list[str]
    columns: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: np.ndarray) -> tuple[list[list[int]], list[str], dict[str, list[Any]]]:
        return (
            [self.ids[i] for i in idx],
            [self.texts[i] for i in idx],
            {k: [v[i] for i in idx] for k, v in self.columns.items()},
        )


def render_prompts(tokenizer, rows: list[dict[str, Any]]) -> PromptSet:
    texts = [m[-1]["content"] for m in (r["prompt"] for r in rows)]
    ids = [tokenizer.encode(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True)) for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    return PromptSet(ids, texts, columns)


class RewardSet:
    """The configured reward functions with weights; `score` returns the weighted total and each part."""

    def __init__(self, specs: list[str], weights: list[float]):
        self.specs = specs
        self.fns = [resolve_reward(s) for s in specs]
        self.weights = weights or [1.0] * len(specs)

    def score(
        self, prompts: list[str], completions: list[str], columns: dict[str, list]
    ) -> tuple[list[float], list[list[float]]]:
        parts = [call_reward(s, fn, prompts, completions, columns) for s, fn in zip(self.specs, self.fns, strict=True)]
        total = [sum(w * p[i] for w, p in zip(self.weights, parts, strict=True)) for i in range(len(completions))]
        return total, parts

    def dry_run(self, prompts: PromptSet) -> None:
        """Call every function on one row with a well-formed and an empty reply: fail now, not at step 40."""
        _, texts, columns = prompts.take(np.array([0, 0]))
        self.score(texts, ["Answer: 0", ""], columns)


def prepare(cfg: GRPOConfig) -> dict[str, Any]:
    """Load the base, read and render the prompts, check the rewards on a dry sample, keep the reference,
    apply the method: every input problem surfaces before a step runs."""
    from lmstack.hub import load_model
    from lmstack.peft import apply_peft

    require(bool(cfg.base_model), "no base model given; pass --model REF (an alias, a model dir or a .gguf)")
    require(bool(cfg.data), "no prompts given; pass --data FILE.jsonl ({'prompt': ..., 'answer': ...} rows)")
    rows = read_prompt_rows(cfg.data)
    rewards = RewardSet(cfg.rewards, cfg.reward_weights)
    model, tokenizer = load_model(cfg.base_model, device="cpu", dtype=torch.float32)
    if tokenizer is None:
        raise LmstackError(f"{cfg.base_model} has no tokenizer; GRPO needs one to render prompts and score text")
    use_chat_template(tokenizer, cfg, cfg.base_model)
    if cfg.peft.method in VIRTUAL_TOKEN_METHODS:
        raise LmstackError(
            f"method {cfg.peft.method!r} is not supported for GRPO: rollouts run on the batched engine's paged "
            "KV cache, which takes no virtual tokens; use lora, dora, qlora, full, ... (align dpo takes it)"
        )
    if cfg.val_data:
        train_rows, val_rows = rows, read_prompt_rows(cfg.val_data)
    else:
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        n_val = min(len(rows) - 1, max(1, round(cfg.val_fraction * len(rows))))
        train_rows, val_rows = [rows[i] for i in sorted(order[n_val:])], [rows[i] for i in sorted(order[:n_val])]
    train, val = render_prompts(tokenizer, train_rows), render_prompts(tokenizer, val_rows)
    longest = max(len(p) for p in train.ids + val.ids)
    require(
        longest + cfg.max_new_tokens <= min(cfg.seq_len, model.cfg.max_seq_len),
        f"the longest prompt ({longest} tokens) + max_new_tokens={cfg.max_new_tokens} exceeds seq_len={cfg.seq_len} "
        f"or the model's context {model.cfg.max_seq_len}; raise seq_len or shorten the prompts",
    )
    rewards.dry_run(train)
    reference = None
    if cfg.kl_coef > 0:
        if cfg.ref_model:
            reference, ref_tokenizer = load_model(cfg.ref_model, device="cpu", dtype=torch.float32)
            check_same_vocabulary(tokenizer, ref_tokenizer, "reference model", cfg.ref_model)
        else:
            reference = copy.deepcopy(model)
        reference.requires_grad_(False).eval()
    print_main(
        f"[grpo] {len(train)} train / {len(val)} held-out prompts, {cfg.num_generations} completions each, "
        f"rewards {', '.join(cfg.rewards)}"
    )
    cfg.model = dataclasses.replace(model.cfg)
    torch.manual_seed(cfg.seed)
    apply_peft(model, cfg.peft, tokenizer, verbose=is_main_process())
    return {
        "model": model,
        "tokenizer": tokenizer,
        "train": train,
        "val": val,
        "rewards": rewards,
        "reference": reference,
        "val_prompt": val_rows[0]["prompt"],
    }


# --- the trainer ----------------------------------------------------------------------------------------


@dataclass
class _Rollout:
    inputs: torch.Tensor  # (B*G, T) prompt + completion, right-padded
    targets: torch.Tensor  # (B*G, T) completion tokens, -100 elsewhere
    advantages: torch.Tensor  # (B*G,)
    old_logps: torch.Tensor | None  # (N,) per completion token under the policy that sampled; None: the current
    ref_logps: torch.Tensor | None
    reward: float  # mean total reward of the rollout


@dataclass
class _GRPOOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor | None = None


class GRPOTrainer(SFTTrainer):
    cfg: GRPOConfig
    engine: LLMEngine | None = None

    def build_batches(self) -> SFTBatches:
        cfg, ctx = self.cfg, self.ctx
        return SFTBatches(self.data["train"], cfg.batch_size, cfg.grad_accum, cfg.seed, ctx.rank, ctx.world_size)

    def build_model(self, resume_from: Path | None) -> torch.nn.Module:
        if self.data["reference"] is not None:
            self.data["reference"].to(self.device)
        return super().build_model(resume_from)

    def _engine(self) -> LLMEngine:
        """One engine over the training model's own modules: weights update in place between rollouts, so
        prefix caching (KV of old weights) is off and nothing is fused."""
        if self.engine is None:
            cfg = self.cfg
            n = cfg.batch_size * cfg.num_generations
            self.engine = LLMEngine(
                unwrap(self.model),
                self.data["tokenizer"],
                EngineConfig(
                    max_num_seqs=n,
                    max_batch_tokens=max(512, n),
                    enable_prefix_caching=False,
                    fuse=False,
                    kv_cache_mb=64,
                    device=str(self.device),
                ),
            )
        return self.engine

    @torch.no_grad()
    def _generate(
        self, prompt_ids: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> tuple[list[list[int]], list[str]]:
        """Completions (token ids incl. the stop token that ended them, and their text) of every prompt."""
        model = unwrap(self.model)
        was_training = model.training
        with self.autocast:
            outs = self._engine().generate(prompt_ids, params)
        model.train(was_training)
        ids, texts = [], []
        for out in outs:
            for c in out.outputs:
                stop = [c.stop_reason] if c.finish_reason == "stop" and isinstance(c.stop_reason, int) else []
                ids.append(c.token_ids + stop)
                texts.append(c.text)
        return ids, texts

    def _rollout(self, step: int, micro: int) -> _Rollout:
        cfg, data = self.cfg, self.data
        idx = self.batches.indices(step, micro)
        prompt_ids, texts, columns = data["train"].take(idx)
        G = cfg.num_generations
        key = cfg.seed * 1_000_003 + step * 1009 + micro * 31 + self.ctx.rank
        params = rollout_params(cfg, len(prompt_ids), key)
        completions, completion_texts = self._generate(prompt_ids, params)
        group_prompts = [t for t in texts for _ in range(G)]
        group_columns = {k: [v for v in vals for _ in range(G)] for k, vals in columns.items()}
        total, _ = data["rewards"].score(group_prompts, completion_texts, group_columns)
        rewards = torch.tensor(total, dtype=torch.float32)
        pad = data["tokenizer"].pad_id or 0
        rows = [(prompt_ids[i // G], completions[i]) for i in range(len(completions))]
        T = max(len(p) + len(c) for p, c in rows) - 1
        inputs = torch.full((len(rows), T), pad, dtype=torch.long)
        targets = torch.full((len(rows), T), -100, dtype=torch.long)
        for r, (p, c) in enumerate(rows):
            seq = p + c
            inputs[r, : len(seq) - 1] = torch.tensor(seq[:-1])
            if c:
                targets[r, len(p) - 1 : len(seq) - 1] = torch.tensor(c)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        old = ref = None
        with torch.no_grad(), self.autocast:
            if cfg.grpo_iterations > 1:  # with one step per rollout pi_old is the policy being stepped
                old = token_logps(unwrap(self.model), inputs, targets)[0].float()
            if data["reference"] is not None:
                ref = token_logps(data["reference"], inputs, targets)[0].float()
        advantages = group_advantages(rewards, G).to(self.device)
        return _Rollout(inputs, targets, advantages, old, ref, float(rewards.mean()))

    def forward_micro(self, step: int, micro: int) -> _GRPOOutput:
        cfg = self.cfg
        first = step - step % cfg.grpo_iterations  # a rollout serves grpo_iterations steps
        key = (first, micro)
        cached = getattr(self, "_rollouts", {})
        if key not in cached:
            cached = {k: v for k, v in cached.items() if k[0] == first}
            cached[key] = self._rollout(first, micro)
            self._rollouts = cached
        ro = cached[key]
        logps, rows = token_logps(self.model, ro.inputs, ro.targets)
        old_logps = ro.old_logps if ro.old_logps is not None else logps.detach().float()  # ratio 1, same gradient
        loss, stats = grpo_loss(
            logps.float(),
            old_logps,
            ro.advantages,
            rows,
            len(ro.advantages),
            cfg.clip_eps,
            ro.ref_logps,
            cfg.kl_coef,
        )
        self._stats = {**stats, "rollout_reward": ro.reward}
        return _GRPOOutput(loss=loss, lm_loss=loss.detach())

    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        names = sorted(self._stats)  # the same keys on every rank: the mean over ranks is logged
        means = all_reduce_sum([self._stats[k] for k in names], self.ctx)
        world = self.ctx.world_size
        self.tracker.log({"step": self.step + 1, **{k: v / world for k, v in zip(names, means, strict=True)}})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy answers to held-out prompts, scored: accuracy (first reward == 1) and mean total reward."""
        cfg, data, ctx = self.cfg, self.data, self.ctx
        n = min(len(data["val"]), cfg.eval_prompts)
        mine = np.arange(ctx.rank, n, ctx.world_size)  # each rank answers its share of the prompts
        texts, completions, correct, reward_sum = [""], [""], 0.0, 0.0
        if len(mine):
            prompt_ids, texts, columns = data["val"].take(mine)
            params = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
            _, completions = self._generate(prompt_ids, params)
            total, parts = data["rewards"].score(texts, completions, columns)
            correct, reward_sum = float(sum(p == 1.0 for p in parts[0])), float(sum(total))
        correct, reward_sum = all_reduce_sum([correct, reward_sum], ctx)
        result = {
            "val_loss": float("nan"),  # no language-modelling loss here
            "val_ppl": float("nan"),
            "val_bpb": float("nan"),
            "accuracy": correct / n,
            "mean_reward": reward_sum / n,
        }
        if ctx.is_main:
            print(
                f"[grpo] held-out greedy: {cfg.rewards[0]} {100 * result['accuracy']:.1f}% of {n}, "
                f"mean reward {result['mean_reward']:.3f}; e.g. {texts[0][:40]!r} -> {completions[0][:60]!r}",
                file=sys.stderr,
            )
        self.last.update({k: result[k] for k in ("accuracy", "mean_reward")})
        return result


def check_before_launch(cfg: GRPOConfig, resume: bool) -> None:
    """What `--nproc-per-node N` runs once before starting N processes: every check `prepare` makes
    (prompts, rewards on a dry sample, models, vocabulary, method, resume)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    preflight(cfg, resume)
    prepare(cfg)


def grpo(cfg: GRPOConfig, resume: bool = False) -> dict[str, Any]:
    """Train `cfg.base_model` with GRPO on `cfg.data` prompts; OUT/checkpoint is a model reference.
    The summary adds the last held-out greedy accuracy and mean reward (and the first, to compare)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ckpt = preflight(cfg, resume)
    data = prepare(cfg)
    ctx = init_distributed(resolve_device(cfg.device))
    try:
        trainer = GRPOTrainer(cfg, ctx, data, ckpt)
        before = trainer.evaluate() if ckpt is None else {}
        summary = trainer.run()
    finally:
        cleanup(ctx)
    summary["model"] = summary["checkpoint"]
    summary["accuracy"] = trainer.last.get("accuracy", float("nan"))
    summary["mean_reward"] = trainer.last.get("mean_reward", float("nan"))
    summary["accuracy_before"] = before.get("accuracy", float("nan"))
    return summary
