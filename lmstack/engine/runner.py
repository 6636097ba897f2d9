"""The model runner: owns the weights and the KV pool, runs one ragged step, returns logits.

The scheduler drives it through `run(rows)` only (token ids, block tables, lengths in; logits out),
the narrow interface that can later cross a process boundary for tensor-parallel or disaggregated
serving. Rows are grouped by length so decode rows (one token, or a few under speculation) never
pad up to a prefill chunk; each group is one forward of the one `Transformer` with a `PagedKVCache`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from lmstack.engine.kv_cache import PagedKVCache, RowSpec
from lmstack.model import cpu_graph
from lmstack.model.transformer import Transformer

SHORT_ROW = 8  # rows of at most this many tokens (decode, verification) batch together
MAX_PADDING = 0.25  # a prefill group may hold this fraction of padding tokens
MAX_CAPTURES = 8  # captured decode steps kept (by batch size, least recently used dropped)


@dataclass
class StepRow:
    tokens: list[int]  # ids fed this step (len == spec.new)
    spec: RowSpec
    num_logits: int  # how many trailing positions need logits (0: none, a prefill chunk mid-prompt)


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        # Captured decode steps by (rows, row-buffer version); None marks a step that cannot be captured.
        self._captured: OrderedDict[tuple[int, int], cpu_graph.CapturedStep | None] = OrderedDict()

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
            if T == 1 and self._may_capture():
                logits = self._decode_step(idx)
            else:
                logits = self.model(idx.to(self.device), cache=self.cache, last_logits_only=need <= 1).logits
            for j, i in enumerate(group):
                if rows[i].num_logits:
                    out[i] = logits[j, logits.shape[1] - rows[i].num_logits :]
        return out

    def _may_capture(self) -> bool:
        return self.cache.kernel and cpu_graph.enabled(self.model)

    def _decode_step(self, idx: Tensor) -> Tensor:
        """Logits (B, 1, V) of a prepared step of one token per row, through the captured step for B rows
        (docs/engine.md, "Captured decode steps"): captured the first time B rows decode together,
        replayed after. A copy, so that no caller holds the step's own output across steps."""

        def eager() -> Tensor:
            return self.model(idx, cache=self.cache, last_logits_only=True).logits

        key = (idx.shape[0], self.cache.row_buffers_version)
        if key in self._captured:
            self._captured.move_to_end(key)
            captured = self._captured[key]
            if captured is None:
                return eager()
            positions, max_position, _ = self.cache.layout(1, self.device)
            x, rope = self.model.step_inputs(idx, None, positions, max_position)
            logits = captured.run(x, rope, 0)  # the paged attention reads positions from the row buffers
            self.cache.advance(1)
            return logits.clone()
        constants = [*cpu_graph.model_constants(self.model), *self.cache.pools()]
        captured, logits = cpu_graph.capture(eager, constants, 0, fixed_inputs=self.cache.row_inputs())
        self._captured[key] = captured
        while len(self._captured) > MAX_CAPTURES:
            self._captured.popitem(last=False)
        return logits.clone()

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
