"""Attention over the paged KV cache, plugged into transformers' own decoder layers.

Layers get a ``PagedCache`` as their cache (past_key_values or layer_past before transformers 5.24), and
again as the keyword argument ``paged_cache``, which reaches the attention function. For a ``PackedBatch``
(prefill chunks, or any batch on CPU) its ``update`` writes the step's keys and values into the pool and
returns every key/value of the step's sequences, gathered densely; families that dispatch through
transformers' AttentionInterface then call ``paged_attention`` (registered as ``ATTENTION_NAME``), which
applies the packed batch's block-diagonal causal mask, with the layer's sliding window. Families that bypass
the interface run their own math over the same keys/values and the full causal mask that the executor passes
as attention_mask. For a ``DecodeBatch`` (one new token per sequence, on CUDA) nothing is gathered:
``update`` passes the new keys and values through, and ``paged_attention`` writes them into the pool and
runs the paged decode kernel (node/paged_decode.py) over the pool in place.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from node.kv_cache import PagePool, SequenceCache

ATTENTION_NAME = "swarm_paged"


@dataclass
class PackedBatch:
    """One forward through the span: several sequences' new tokens packed along one axis."""

    seqs: list[SequenceCache]
    new_lengths: list[int]
    positions: torch.Tensor  # [T] position of each new token in its sequence
    write_slots: torch.Tensor  # [T] pool slot of each new token
    read_slots: torch.Tensor  # [S] pool slots of every token of every sequence, past and new
    query_seq: torch.Tensor
    key_seq: torch.Tensor
    key_pos: torch.Tensor
    dtype: torch.dtype
    attention_calls: list[int] = field(default_factory=list)
    cache_updates: list[int] = field(default_factory=list)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, seqs: list[SequenceCache], new_lengths: list[int], page_size: int, num_layers: int,
              dtype: torch.dtype, device: torch.device) -> PackedBatch:
        """Index tensors for the sequences' new tokens, computed for all sequences at once (one forward can
        pack dozens of decodes, and per-sequence tensor ops would cost more than the tiny decode itself)."""
        index = torch.arange(len(seqs))
        past = torch.tensor([seq.length for seq in seqs])
        new = torch.tensor(new_lengths)
        total = past + new
        query_seq = torch.repeat_interleave(index, new)
        key_seq = torch.repeat_interleave(index, total)
        positions = past[query_seq] + torch.arange(len(query_seq)) - (new.cumsum(0) - new)[query_seq]
        key_pos = torch.arange(len(key_seq)) - (total.cumsum(0) - total)[key_seq]
        pages = torch.tensor(list(itertools.chain.from_iterable(seq.pages for seq in seqs)), dtype=torch.long)
        first_page = torch.tensor([0] + [len(seq.pages) for seq in seqs[:-1]]).cumsum(0)

        def slots(seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return pages[first_page[seq] + pos // page_size] * page_size + pos % page_size

        tensors = [t.to(device) for t in (positions, slots(query_seq, positions), slots(key_seq, key_pos), query_seq,
                                          key_seq, key_pos)]
        return cls(seqs, new_lengths, *tensors, dtype, [0] * num_layers, [0] * num_layers)

    def mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """Additive [1, 1, T, S] mask: a token sees its own sequence's keys up to itself, within the window."""
        if sliding_window not in self._masks:
            q_pos = self.positions[:, None]
            allowed = (self.query_seq[:, None] == self.key_seq[None, :]) & (self.key_pos[None, :] <= q_pos)
            if sliding_window is not None:
                allowed &= self.key_pos[None, :] > q_pos - sliding_window
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
            mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
            self._masks[sliding_window] = mask[None, None]
        return self._masks[sliding_window]


@dataclass
class DecodeBatch:
    """One new token per sequence, attended straight from the pool through each sequence's block table.

    The tensors may be views of a CUDA graph's static buffers (node/cuda_graphs.py).
    """

    positions: torch.Tensor  # [B] position of each sequence's new token
    write_slots: torch.Tensor  # [B] pool slot of each new token
    block_tables: torch.Tensor  # [B, W] int32 pages of each sequence, in order; entries past its end unused
    lengths: torch.Tensor  # [B] keys of each sequence, the new token's included
    page_size: int

    @classmethod
    def build(cls, seqs: list[SequenceCache], page_size: int, device: torch.device) -> DecodeBatch:
        """The sequences must have pages for their new token (PagePool.reserve)."""
        meta, tables = cls.host_inputs(seqs, page_size, len(seqs), pad_page=0)
        meta, tables = meta.to(device), tables.to(device)
        return cls(meta[0], meta[1], tables, meta[2], page_size)

    @staticmethod
    def host_inputs(seqs: list[SequenceCache], page_size: int, rows: int, pad_page: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions, write slots and lengths [3, rows], and block tables [rows, W], built from Python lists
        in one tensor each (per-sequence tensors would cost more than a decode step's arithmetic). Rows past
        the sequences are padding: position 0, written to and reading only pad_page."""
        positions = [seq.length for seq in seqs]
        slots = [seq.pages[p // page_size] * page_size + p % page_size for seq, p in zip(seqs, positions)]
        pad = rows - len(seqs)
        meta = torch.tensor([positions + [0] * pad, slots + [pad_page * page_size] * pad,
                             [p + 1 for p in positions] + [1] * pad])
        width = max((len(seq.pages) for seq in seqs), default=1)
        tables = torch.tensor([seq.pages + [pad_page] * (width - len(seq.pages)) for seq in seqs] + [[pad_page] * width] * pad,
                              dtype=torch.int32)
        return meta, tables


class PagedCache(Cache):
    """The transformers Cache that layers see: it reads and writes the node's page pool."""

    def __init__(self, pool: PagePool, batch: PackedBatch | DecodeBatch, first_layer: int):
        super().__init__(layers=[])
        self.pool, self.batch, self.first_layer = pool, batch, first_layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if isinstance(self.batch, DecodeBatch):
            # paged_attention writes them through the layer's paged_kv: using layer_idx here would make
            # torch.compile compile every layer apart
            return key_states, value_states
        local = layer_idx - self.first_layer
        self.batch.cache_updates[local] += 1
        keys, values = self.pool.keys[local], self.pool.values[local]
        # [1, Hkv, T, D] -> [T, Hkv, D]
        keys[self.batch.write_slots] = key_states[0].transpose(0, 1).to(keys.dtype)
        values[self.batch.write_slots] = value_states[0].transpose(0, 1).to(values.dtype)
        gathered_k = keys[self.batch.read_slots].transpose(0, 1).unsqueeze(0)
        gathered_v = values[self.batch.read_slots].transpose(0, 1).unsqueeze(0)
        return gathered_k, gathered_v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((seq.length for seq in self.batch.seqs), default=0)


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, *,
                    paged_cache: PagedCache, paged_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """paged_cache and, for a decode step, paged_kv (the pool's keys and values of this layer) are keyword
    arguments of the layer's forward that transformers passes on to here: a context variable would do too, but
    torch.compile cannot trace reading one. A decode step uses the layer's pool tensors rather than
    module.layer_idx, so that torch.compile sees the same code for every layer and compiles it once."""
    batch = paged_cache.batch
    window = kwargs.pop("sliding_window", None) or getattr(module, "sliding_window", None)
    if isinstance(batch, DecodeBatch):
        from node.paged_decode import paged_decode_attention  # Triton: CUDA nodes only

        keys, values = paged_kv
        # [1, H, B, D] -> [B, H, D]
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        keys[batch.write_slots] = k.to(keys.dtype)
        values[batch.write_slots] = v.to(values.dtype)
        output = paged_decode_attention(q, keys, values, batch.block_tables, batch.lengths, batch.page_size,
                                        scaling if scaling is not None else query.shape[-1] ** -0.5, window)
        return output[None], None
    batch.attention_calls[module.layer_idx - paged_cache.first_layer] += 1
    mask = batch.mask(window)
    if kwargs.get("softcap") is not None or getattr(module, "sinks", None) is not None:
        # softcap (gemma2) and attention sinks (gpt-oss) exist only in the family's own eager math
        family_eager = sys.modules[type(module).__module__].eager_attention_forward
        output, _ = family_eager(module, query, key, value, mask, scaling=scaling, dropout=0.0, **kwargs)
        return output, None
    output, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=scaling,
                                       is_causal=False, **kwargs)
    return output, None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
