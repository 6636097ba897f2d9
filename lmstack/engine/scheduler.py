"""Continuous batching: which sequences run this step and how many of their tokens.

Every step has a token budget (`max_batch_tokens`). Running sequences come first, oldest first
(FCFS): a decoding sequence takes one token (plus drafted tokens under speculation), a sequence
still in prefill takes the next chunk of its prompt. Waiting sequences are admitted, oldest first,
while budget, sequence slots and KV blocks last; a long prompt is prefilled in chunks across steps
while others keep decoding. When a running sequence needs a block and none is free, the most
recently admitted sequence is preempted: its blocks are freed and it waits at the head of the queue
to be recomputed from its tokens (prompt + what it generated), so nothing is lost or truncated.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from lmstack.engine.kv_cache import BlockManager
from lmstack.engine.sampling import TokenSampler


@dataclass(eq=False)
class Sequence:
    """One completion being generated: its tokens, progress through the model, and KV blocks."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    tokens: list[int]  # prompt + generated so far
    num_prompt: int
    max_tokens: int  # prompt + the most it may generate (max_new_tokens, clamped to the context)
    sampler: TokenSampler
    num_computed: int = 0  # tokens whose keys/values are in the cache
    block_table: list[int] = field(default_factory=list)
    registered_blocks: int = 0  # leading full blocks entered in the prefix cache
    chain_parent: int = 0  # hash chain after the registered blocks
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    score_prompt: bool = False  # prompt log-probabilities still to collect: skip the prefix cache, compute all
    admitted: bool = False
    num_preemptions: int = 0
    finish_reason: str | None = None

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ScheduledRow:
    seq: Sequence
    num_new: int  # tokens of seq.tokens fed this step, from seq.num_computed on
    drafts: list[int] = field(default_factory=list)  # speculated tokens fed after them
    draft_probs: Tensor | None = None  # (k, V) the drafter's distributions (None: deterministic drafts)

    @property
    def samples(self) -> bool:
        """The row reaches the end of its known tokens, so the step yields its next token."""
        return self.seq.num_computed + self.num_new == len(self.seq.tokens)


Proposer = Callable[[Sequence, int], tuple[list[int], Tensor | None]]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_tokens: int, max_num_seqs: int):
        self.blocks = blocks
        self.max_batch_tokens, self.max_num_seqs = max_batch_tokens, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # arrival order (seq_id): the oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, propose: Proposer | None = None, max_drafts: int = 0) -> list[ScheduledRow]:
        budget = self.max_batch_tokens
        rows: list[ScheduledRow] = []
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq not in self.running:  # preempted above to make room for an older sequence
                continue
            row = self._plan(seq, budget, propose, max_drafts)
            while not self._reserve(seq, seq.num_computed + row.num_new + len(row.drafts)):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                rows.append(row)
                budget -= row.num_new + len(row.drafts)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq, budget):
                break  # FCFS: later requests do not overtake the head of the queue
            self.waiting.popleft()
            bisect.insort(self.running, seq, key=lambda s: s.seq_id)  # a recomputed sequence keeps its place
            row = ScheduledRow(seq, min(len(seq.tokens) - seq.num_computed, budget))
            rows.append(row)
            budget -= row.num_new
        return rows

    def _plan(self, seq: Sequence, budget: int, propose: Proposer | None, max_drafts: int) -> ScheduledRow:
        remaining = len(seq.tokens) - seq.num_computed
        if remaining > 1 or propose is None:
            return ScheduledRow(seq, min(remaining, budget))
        # Decoding: speculate at most up to the sequence's own limit and the step's budget.
        k = min(max_drafts, seq.max_tokens - len(seq.tokens) - 1, budget - 1)
        drafts, probs = propose(seq, k) if k > 0 else ([], None)
        return ScheduledRow(seq, 1, drafts, probs)

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Give a waiting sequence its cached prefix and the blocks for its first chunk."""
        hits, parent = ([], 0) if seq.score_prompt else self.blocks.lookup_prefix(seq.tokens)
        bs = self.blocks.block_size
        computed = len(hits) * bs
        n = min(len(seq.tokens) - computed, budget)
        fresh = self.blocks.allocate(-(-(computed + n) // bs) - len(hits))
        if fresh is None:
            self.blocks.release(hits)
            return False
        seq.block_table = hits + fresh
        seq.num_computed = computed
        seq.registered_blocks, seq.chain_parent = len(hits), parent
        if not seq.admitted:
            seq.admitted, seq.num_cached_tokens = True, computed
            self.blocks.record_prefix_lookup(seq.num_prompt, computed)
        return True

    def _reserve(self, seq: Sequence, total_tokens: int) -> bool:
        """Grow seq's block table to hold `total_tokens`; False when the pool is out of blocks."""
        need = -(-total_tokens // self.blocks.block_size) - len(seq.block_table)
        if need <= 0:
            return True
        fresh = self.blocks.allocate(need)
        if fresh is None:
            return False
        seq.block_table.extend(fresh)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks; it waits at the head of the queue and is recomputed from its tokens."""
        self.running.remove(seq)
        self._free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _free(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        seq.block_table, seq.num_computed, seq.registered_blocks, seq.chain_parent = [], 0, 0, 0

    def commit(self, seq: Sequence) -> None:
        """Enter seq's newly completed blocks (all tokens computed and final) in the prefix cache."""
        bs = self.blocks.block_size
        for i in range(seq.registered_blocks, seq.num_computed // bs):
            seq.chain_parent = self.blocks.register(
                seq.block_table[i], seq.chain_parent, tuple(seq.tokens[i * bs : (i + 1) * bs])
            )
        seq.registered_blocks = max(seq.registered_blocks, seq.num_computed // bs)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
