"""Which model serves a request: named models and weighted A/B splits.

`--model name=REF` (repeatable) names the models; `--ab exp=a:90,b:10` adds a name under which
requests are split between models `a` and `b` by weight. The split is sticky per `user` field: the
same user always lands on the same variant (a hash of experiment and user picks a point on the
weight line), so a conversation never switches model halfway; requests without a user are split
at random.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lmstack.errors import LmstackError, require

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def parse_model_arg(arg: str) -> tuple[str, str]:
    """'name=REF' -> (name, REF); a bare REF is named after its alias, file stem or directory name."""
    if "=" in arg:
        name, ref = arg.split("=", 1)
        if NAME.match(name) and ref:
            return name, ref
    ref = arg
    path = Path(ref)
    name = path.stem if path.suffix.lower() == ".gguf" else path.name or ref
    require(
        bool(NAME.match(name)),
        f"cannot derive a model name from {arg!r}; name it explicitly: --model NAME={arg}",
    )
    return name, ref


@dataclass(frozen=True)
class Variant:
    model: str
    weight: float


@dataclass(frozen=True)
class ABSplit:
    name: str
    variants: tuple[Variant, ...]

    def choose(self, user: str | None, rng: random.Random) -> str:
        """The variant's model name: sticky for a given user, weighted random without one."""
        total = sum(v.weight for v in self.variants)
        if user:
            digest = hashlib.sha256(f"{self.name}\0{user}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64 * total
        else:
            point = rng.random() * total
        for variant in self.variants:
            point -= variant.weight
            if point < 0:
                return variant.model
        return self.variants[-1].model


def parse_ab_arg(arg: str, models: set[str]) -> ABSplit:
    """'exp=a:90,b:10' -> ABSplit; every variant must be a served model and weights positive."""
    usage = f"--ab {arg!r} should look like NAME=MODEL_A:90,MODEL_B:10"
    require("=" in arg, usage)
    name, spec = arg.split("=", 1)
    require(bool(NAME.match(name)), f"{usage}; {name!r} is not a valid name")
    require(name not in models, f"--ab name {name!r} is already a model's name; pick another name for the split")
    variants = []
    for part in spec.split(","):
        model, sep, weight = part.rpartition(":")
        require(bool(sep and model), usage)
        try:
            value = float(weight)
        except ValueError:
            raise LmstackError(f"{usage}; weight {weight!r} is not a number") from None
        require(value > 0, f"{usage}; weight of {model!r} must be > 0, got {weight}")
        require(model in models, f"--ab variant {model!r} is not a served model; serve it with --model {model}=REF")
        variants.append(Variant(model, value))
    require(len(variants) >= 2, f"{usage}; an A/B split needs at least two variants")
    require(len({v.model for v in variants}) == len(variants), f"{usage}; each variant may appear once")
    return ABSplit(name, tuple(variants))


class Router:
    """Resolves a request's `model` field to a served model name (and the split it came through)."""

    def __init__(self, models: list[str], splits: list[ABSplit], seed: int | None = None):
        self.models = list(models)
        self.splits = {s.name: s for s in splits}
        self._rng = random.Random(seed)

    def names(self) -> list[str]:
        return [*self.models, *self.splits]

    def route(self, requested: str, user: str | None) -> tuple[str, str | None] | None:
        """(model name, split name or None), or None when `requested` names nothing served."""
        if requested in self.splits:
            return self.splits[requested].choose(user, self._rng), requested
        if requested in self.models:
            return requested, None
        return None
