"""The node's paged KV cache: one pool of fixed-size pages shared by every session and local layer.

A sequence owns a block table (the list of its pages); page p holds tokens [p * page_size, (p+1) * page_size)
of that sequence for every layer of the span at once, so one table serves all local layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class OutOfPages(RuntimeError):
    """The pool has too few free pages for a request."""


@dataclass
class SequenceCache:
    """One sequence's place in the pool: its pages and how many tokens it holds."""

    pages: list[int] = field(default_factory=list)
    length: int = 0


class PagePool:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        if num_pages < 1:
            raise ValueError("the KV cache needs at least one page; raise --kv-cache-gb")
        self.page_size = page_size
        self.num_pages = num_pages
        shape = (num_layers, num_pages * page_size, kv_heads, head_dim)
        # Stored flat over (page, offset) so a token's slot is page * page_size + offset.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(num_pages - 1, -1, -1))

    @staticmethod
    def page_bytes(num_layers: int, page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * page_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def reserve(self, seq: SequenceCache, new_length: int) -> None:
        """Give seq enough pages to hold new_length tokens, all or nothing."""
        missing = self.pages_for(new_length) - len(seq.pages)
        if missing > len(self._free):
            raise OutOfPages(f"need {missing} more KV pages, {len(self._free)} free")
        for _ in range(max(missing, 0)):
            seq.pages.append(self._free.pop())

    def release(self, seq: SequenceCache) -> None:
        self._free.extend(reversed(seq.pages))
        seq.pages = []
        seq.length = 0

    def slots(self, seq: SequenceCache, start: int, end: int) -> torch.Tensor:
        """Flat pool slots of the sequence's tokens [start, end)."""
        positions = torch.arange(start, end)
        pages = torch.tensor(seq.pages, dtype=torch.long)[positions // self.page_size]
        return pages * self.page_size + positions % self.page_size
