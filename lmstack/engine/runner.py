"""The model runner: owns the weights and the KV pool, runs one ragged step, returns logits.

The scheduler drives it through `run(rows)` only (token ids, block tables, lengths in; logits out),
the narrow interface that can later cross a process boundary for tensor-parallel or disaggregated
serving. Rows are grouped by length so decode rows (one token, or a few under speculation) never
pad up to a prefill chunk; each group is one forward of the one `Transformer` with a `PagedKVCache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmstack.engine.kv_cache import PagedKVCache, RowSpec
from lmstack.model.transformer import Transformer

SHORT_ROW = 8  # rows of at most this many tokens (decode, verification) batch together
MAX_PADDING = 0.25  # a prefill group may hold this fraction of padding tokens


@dataclass
class StepRow:
    tokens: list[int]  # ids fed this step (len == spec.new)
    spec: RowSpec
    num_logits: int  # how many trailing positions need logits (0: none, a prefill chunk mid-prompt)


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def run(self, rows: list[StepRow]) -> list[Tensor | None]:
        """Logits (num_logits, V) for each row that asked for them."""
        out: list[Tensor | None] = [None] * len(rows)
        for group in self._groups(rows):
            T = max(rows[i].spec.new for i in group)
            idx = torch.zeros(len(group), T, dtype=torch.long)
            for j, i in enumerate(group):  # right-aligned: every row's last token sits in column T-1
                idx[j, T - rows[i].spec.new :] = torch.tensor(rows[i].tokens)
            self.cache.prepare([rows[i].spec for i in group], T)
            need = max(rows[i].num_logits for i in group)
            logits = self.model(idx.to(self.device), cache=self.cache, last_logits_only=need <= 1).logits
            for j, i in enumerate(group):
                if rows[i].num_logits:
                    out[i] = logits[j, logits.shape[1] - rows[i].num_logits :]
        return out

    @staticmethod
    def _groups(rows: list[StepRow]) -> list[list[int]]:
        short = [i for i, r in enumerate(rows) if r.spec.new <= SHORT_ROW]
        long = sorted((i for i, r in enumerate(rows) if r.spec.new > SHORT_ROW), key=lambda i: -rows[i].spec.new)
        groups = [short] if short else []
        for i in long:
            group = groups[-1] if groups and groups[-1] is not short else None
            if group is not None:
                width = rows[group[0]].spec.new  # the longest, sorted first
                real = sum(rows[g].spec.new for g in group) + rows[i].spec.new
                if width * (len(group) + 1) <= real * (1 + MAX_PADDING):
                    group.append(i)
                    continue
            groups.append([i])
        return groups
