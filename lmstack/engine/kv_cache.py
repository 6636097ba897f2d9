"""Paged KV cache: a pool of fixed-size blocks, per-sequence block tables, prefix caching.

Two halves, kept apart so a KV block store can later move to another process:
- `BlockManager` (host bookkeeping): which blocks are free, reference counts, and the prefix cache,
  a map from a block's hash chain (hash of the parent block's key and this block's tokens) to the
  block that holds those keys/values. Full blocks are immutable, so sequences share them freely;
  a freed block keeps its contents and stays findable until it is reused (LRU).
- `PagedKVCache` (tensors): per layer, keys and values for `num_blocks * block_size` token slots.
  It implements the model's cache protocol (`layout`, `advance`, and `attend`, which owns the whole
  attention) for a ragged batch: each row is one sequence with its own length and block table, new
  tokens left-padded to a common T. On the CPU in fp32, `attend` runs the C++ kernel of
  `engine/paged_attention.py`, which reads keys/values through the block tables in place; elsewhere it
  gathers each row's keys/values (`update`) and runs SDPA with a (B, 1, T, L) mask.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmstack.config import ModelConfig
from lmstack.engine.paged_attention import kernel_enabled, paged_attention

BlockKey = tuple[int, tuple[int, ...]]  # (parent block's chain hash, this block's token ids)


def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype, quantized: bool = False) -> int:
    """Bytes of keys + values for one block over all layers (int8: one byte per value + an fp32
    scale per token and head)."""
    per_head = cfg.head_dim + 4 if quantized else cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layer * cfg.n_kv_head * per_head * block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refs = [0] * num_blocks
        self.key_of: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}  # hash-chain key -> block holding it
        self.free_plain: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # unreferenced but findable, LRU first
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # -- capacity -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_plain) + len(self.free_cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - self.num_free / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens looked up."""
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    # -- allocation -----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (private to the caller), or None when the pool cannot provide them."""
        if n > self.num_free:
            return None
        blocks = []
        for _ in range(n):
            if self.free_plain:
                block = self.free_plain.pop()
            else:  # evict the least recently used cached block
                block, _ = self.free_cached.popitem(last=False)
                key = self.key_of[block]
                if key is not None and self.cached.get(key) == block:
                    del self.cached[key]
                self.key_of[block] = None
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.key_of[block] is not None:
                    self.free_cached[block] = None  # most recently used: evicted last
                else:
                    self.free_plain.append(block)

    # -- prefix cache ---------------------------------------------------------------------------
    def lookup_prefix(self, tokens: list[int]) -> tuple[list[int], int]:
        """Blocks already holding a prefix of `tokens` (referenced for the caller) and the chain hash
        after them. At least one token is left to compute, so the last prompt token yields logits."""
        if not self.enable_prefix_caching:
            return [], 0
        bs, parent, blocks = self.block_size, 0, []
        for i in range((len(tokens) - 1) // bs):
            key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
            block = self.cached.get(key)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.free_cached[block]
            self.refs[block] += 1
            blocks.append(block)
            parent = hash(key)
        return blocks, parent

    def record_prefix_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        """Count a prompt's first admission towards the hit rate (re-admissions after preemption do not)."""
        self.prefix_query_tokens += prompt_tokens
        self.prefix_hit_tokens += hit_tokens

    def register(self, block: int, parent: int, tokens: tuple[int, ...]) -> int:
        """Record that a full `block` holds `tokens` after the chain `parent`; returns its chain hash."""
        key = (parent, tokens)
        if self.enable_prefix_caching and self.key_of[block] is None:
            self.key_of[block] = key
            self.cached.setdefault(key, block)  # an identical block computed twice: keep the first
        return hash(key)


@dataclass
class RowSpec:
    """One row of a ragged step: a sequence's block table, tokens already stored, tokens this step."""

    block_table: list[int]
    past: int
    new: int


class PagedKVCache:
    """Keys/values of all sequences in one slot pool per layer: (num_blocks * block_size, n_kv_head, head_dim).

    `quantized=True` stores int8 values with one scale per token and head (absmax / 127), about a
    quarter of fp32's bytes; keys/values are dequantized as attention reads them.
    """

    def __init__(
        self, cfg: ModelConfig, num_blocks: int, block_size: int, device, dtype: torch.dtype, quantized: bool = False
    ):
        slots = num_blocks * block_size
        shape = (slots, cfg.n_kv_head, cfg.head_dim)
        store = torch.int8 if quantized else dtype
        self.k = [torch.zeros(shape, device=device, dtype=store) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=store) for _ in range(cfg.n_layer)]
        scale_shape = (slots, cfg.n_kv_head, 1)
        self.k_scale = [torch.ones(scale_shape, device=device) for _ in range(cfg.n_layer)] if quantized else None
        self.v_scale = [torch.ones(scale_shape, device=device) for _ in range(cfg.n_layer)] if quantized else None
        self.num_blocks, self.block_size, self.device, self.dtype = num_blocks, block_size, device, dtype
        self.gqa = cfg.n_kv_head != cfg.n_head
        self.kernel = kernel_enabled(device, dtype)  # the C++ paged attention, else gather + SDPA
        self._layout: tuple[Tensor, int, None] | None = None
        # The kernel's per-row inputs live in buffers that persist across steps (rows x blocks of a
        # full context, grown when a step needs more): a captured decode step (lmstack.model.cpu_graph)
        # reads them where they are, so `prepare` refills them in place. `row_buffers_version` changes
        # whenever they are reallocated, which retires the captures made over the old ones.
        self.row_buffers_version = 0
        self._allocate_row_buffers(rows=16, width=min(num_blocks, -(-cfg.max_seq_len // block_size)))

    def _allocate_row_buffers(self, rows: int, width: int) -> None:
        self._table_buffer = torch.zeros(rows, width, dtype=torch.int32)
        self._past_buffer = torch.zeros(rows, dtype=torch.long)
        self._new_buffer = torch.zeros(rows, dtype=torch.long)
        self.row_buffers_version += 1

    def _fill_row_buffers(self, rows: list[RowSpec], past: Tensor, new: Tensor) -> None:
        """Block tables, stored and new token counts of `rows` into the first len(rows) buffer rows."""
        B, width = len(rows), max(len(r.block_table) for r in rows)
        have_rows, have_width = self._table_buffer.shape
        if have_rows < B or have_width < width:
            self._allocate_row_buffers(max(B, have_rows), max(width, have_width))
        for b, row in enumerate(rows):  # entries past a row's own blocks are never read
            self._table_buffer[b, : len(row.block_table)] = torch.tensor(row.block_table, dtype=torch.int32)
        self._tables = self._table_buffer[:B]
        self._past = self._past_buffer[:B]
        self._new = self._new_buffer[:B]
        self._past.copy_(past)
        self._new.copy_(new)

    def pools(self) -> list[Tensor]:
        """Every tensor of the block pool (keys, values and their int8 scales, all layers)."""
        return [*self.k, *self.v, *(self.k_scale or ()), *(self.v_scale or ())]

    def row_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """The kernel's per-row inputs of the prepared step: block tables (B, width) int32, stored and new
        token counts (B,) int64, views of the persistent buffers."""
        return self._tables, self._past, self._new

    def prepare(self, rows: list[RowSpec], T: int) -> None:
        """Lay out the next forward: row b holds `rows[b].new` tokens right-aligned in T columns
        (left padding), continuing after `rows[b].past` stored tokens."""
        lengths = [r.past + r.new for r in rows]
        past = torch.tensor([r.past for r in rows])
        new = torch.tensor([r.new for r in rows])
        column = torch.arange(T)[None, :]
        pad = (T - new)[:, None]
        # Query at position p sees keys 0..p of its own row; padding columns get position 0.
        positions = torch.where(column >= pad, past[:, None] + column - pad, 0)  # (B, T)
        self._shape = (len(rows), T, max(lengths))
        self._layout = (positions.to(self.device), max(lengths) - 1, None)
        self._rows, self._positions, self._gather_ready = rows, positions, False
        if self.kernel:
            self._fill_row_buffers(rows, past, new)
        else:
            self._prepare_gather(rows, T, positions)

    def _prepare_gather(self, rows: list[RowSpec], T: int, positions: Tensor) -> None:
        """Slots to write this step's tokens to, slots to gather every row's keys from, and the mask."""
        bs, (B, _, L) = self.block_size, self._shape
        gather = torch.zeros(B, L, dtype=torch.long)
        write_slots, write_index = [], []
        for b, row in enumerate(rows):
            table = torch.tensor(row.block_table, dtype=torch.long)
            pos = torch.arange(row.past + row.new)
            slots = table[pos // bs] * bs + pos % bs  # slot of every position of this sequence
            gather[b, : len(pos)] = slots
            write_slots.append(slots[row.past :])
            write_index.append(torch.arange(b * T + T - row.new, (b + 1) * T))
        mask = torch.arange(L)[None, None, :] <= positions[:, :, None]  # (B, T, L)
        device = self.device
        self._write_slots = torch.cat(write_slots).to(device)
        self._write_index = torch.cat(write_index).to(device)
        self._padded = sum(r.new for r in rows) != B * T
        self._gather = gather.view(-1).to(device)
        self._mask = mask[:, None].to(device)
        self._gather_ready = True

    def layout(self, T: int, device) -> tuple[Tensor, int, None]:
        """Positions for RoPE; no mask, as `attend` masks by itself."""
        assert self._layout is not None and self._shape[1] == T, "PagedKVCache.prepare() must describe this step"
        return self._layout

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store this step's k, v (B, n_kv_head, T, head_dim) and return causal attention y (B, n_head, T,
        head_dim) of q (B, n_head, T, head_dim) over each row's own keys (docs/architecture.md, Seam 2)."""
        if self.kernel and q.dtype == k.dtype == v.dtype == torch.float32:
            scales = None if self.k_scale is None else (self.k_scale[layer], self.v_scale[layer])
            pools = (self.k[layer], self.v[layer])
            return paged_attention(q, k, v, pools, scales, self._tables, self._past, self._new, self.block_size)
        if not self._gather_ready:  # activations in another dtype (autocast): the portable path this step
            self._prepare_gather(self._rows, self._shape[1], self._positions)
        k_all, v_all = self.update(layer, k, v)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=self._mask, enable_gqa=self.gqa)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        B, n_kv, T, hd = k.shape
        _, _, L = self._shape
        out = []
        for name, new in (("k", k), ("v", v)):
            pool = getattr(self, name)[layer]
            tokens = new.transpose(1, 2).reshape(B * T, n_kv, hd)
            if self._padded:
                tokens = tokens.index_select(0, self._write_index)
            if self.k_scale is None:
                pool.index_copy_(0, self._write_slots, tokens.to(pool.dtype))
                gathered = pool.index_select(0, self._gather)
            else:
                scales = getattr(self, f"{name}_scale")[layer]
                scale = tokens.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127
                pool.index_copy_(0, self._write_slots, (tokens.float() / scale).round_().to(torch.int8))
                scales.index_copy_(0, self._write_slots, scale)
                gathered = (pool.index_select(0, self._gather) * scales.index_select(0, self._gather)).to(self.dtype)
            out.append(gathered.view(B, L, n_kv, hd).transpose(1, 2))
        return out[0], out[1]  # (B, n_kv_head, L, head_dim)

    def advance(self, n: int) -> None:
        """Lengths live in the scheduler's sequences; the layout is for one forward only."""
        self._layout = None
