"""Reward functions for GRPO: Python callables, built-in or named `module:function` / `path/file.py:function`.

A reward function takes the batch and returns one float per completion (TRL's convention):

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float]: ...

`columns` holds every other field of the data rows, one list per field (the arithmetic task passes
`answer`). Built-ins:
  exact_match   1.0 when the number after the last "Answer:" (or, without one, the last number in the
                reply) equals the row's `answer`, else 0.0
  format        1.0 when the reply ends with "Answer: N" (an integer, optional final period), else 0.0
Each function is called once on a dry sample before training, so one that raises, returns the wrong
number of values or non-numbers is refused with its name before any step runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError

RewardFn = Callable[..., list[float]]

_ANSWER = re.compile(r"Answer:\s*(-?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+")
_FORMAT = re.compile(r"Answer:\s*-?\d+\s*\.?\s*$", re.IGNORECASE)


def extract_answer(completion: str) -> str | None:
    """The integer a reply gives: after its last "Answer:", else its last number; None when it has none."""
    tagged = _ANSWER.findall(completion)
    if tagged:
        return tagged[-1]
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def exact_match(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """1.0 where the reply's answer equals the row's `answer` (as integers), else 0.0."""
    scores = []
    for completion, expected in zip(completions, answer, strict=True):
        got = extract_answer(completion)
        scores.append(float(got is not None and int(got) == int(str(expected).strip())))
    return scores


def format_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 where the reply ends with "Answer: N", else 0.0."""
    return [float(bool(_FORMAT.search(c.strip()))) for c in completions]


BUILTIN_REWARDS: dict[str, RewardFn] = {"exact_match": exact_match, "format": format_reward}


def resolve_reward(spec: str) -> RewardFn:
    """A built-in name, `package.module:function` or `path/to/file.py:function` -> the callable."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise LmstackError(
            f"reward {spec!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor 'module:function'"
        )
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise LmstackError(f"reward {spec!r}: file {where} not found")
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure in user code becomes one clear message
            raise LmstackError(f"reward {spec!r}: importing {where} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise LmstackError(f"reward {spec!r}: cannot import module {where!r} ({exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise LmstackError(f"reward {spec!r}: {where} has no function {name!r}")
    return fn


def call_reward(
    name: str, fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list]
) -> list[float]:
    """Call one reward function on a batch; any failure or a malformed result names the function."""
    try:
        values = fn(prompts, completions, **columns)
    except Exception as exc:  # noqa: BLE001 - user code: report which function failed and how
        raise LmstackError(
            f"reward function {name!r} raised {type(exc).__name__}: {exc} (on prompt {prompts[0][:60]!r}); "
            "fix it or drop it from --reward"
        ) from None
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise LmstackError(f"reward function {name!r} must return a list of numbers, got {values!r:.80}") from None
    if len(values) != len(completions):
        raise LmstackError(f"reward function {name!r} returned {len(values)} values for {len(completions)} completions")
    if not all(math.isfinite(v) for v in values):
        raise LmstackError(f"reward function {name!r} returned a non-finite value: {values}")
    return values
