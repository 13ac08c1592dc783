"""The node's paged KV cache: one pool of fixed-size pages shared by every session and local layer.

A sequence owns a block table (the list of its pages); page p holds tokens [p * page_size, (p+1) * page_size)
of that sequence for every layer of the span at once, so one table serves all local layers.

Full pages can be shared between sequences with the same prefix: the pool counts references and keeps an
index from a prefix key to the page that holds it. Sequences only ever append, and only full pages are
shared, so a shared page is never written again and needs no copy-on-write.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch


class OutOfPages(RuntimeError):
    """The pool has too few free pages for a request."""


@dataclass
class SequenceCache:
    """One sequence's place in the pool: its pages and how many tokens it holds."""

    pages: list[int] = field(default_factory=list)
    length: int = 0


@dataclass
class SharedPage:
    """A full page that sequences with the same prefix attach instead of computing it."""

    page: int
    digest: bytes  # of the span inputs that produced the page: a sequence attaches it only if its inputs match
    outputs: torch.Tensor  # span outputs of the page's tokens, [page_size, hidden], on the host


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
        # One more page that no sequence owns: padding rows of a CUDA graph's batch write and read there.
        self.scratch_page = num_pages
        shape = (num_layers, (num_pages + 1) * page_size, kv_heads, head_dim)
        # Stored flat over (page, offset) so a token's slot is page * page_size + offset.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages
        self._shared: dict[Hashable, SharedPage] = {}
        self._key_of_page: dict[int, Hashable] = {}

    @staticmethod
    def page_bytes(num_layers: int, page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * page_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one local layer, [slots, kv_heads, head_dim] each (views)."""
        return self.keys[index], self.values[index]

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's keys and values over all local layers."""
        return 2 * self.keys[:, 0].numel() * self.keys.element_size()

    def full_pages(self, start: int, end: int) -> range:
        """Indices of the pages that tokens [start, end) of a sequence cover completely."""
        return range(-(-start // self.page_size), end // self.page_size)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def shared_pages(self) -> int:
        """Pages that more than one sequence holds."""
        return sum(1 for refs in self._refs if refs > 1)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_reserve(self, seq: SequenceCache, new_length: int) -> bool:
        return self.pages_for(new_length) - len(seq.pages) <= len(self._free)

    def reserve(self, seq: SequenceCache, new_length: int) -> None:
        """Give seq enough pages to hold new_length tokens, all or nothing."""
        if not self.can_reserve(seq, new_length):
            missing = self.pages_for(new_length) - len(seq.pages)
            raise OutOfPages(f"need {missing} more KV pages, {len(self._free)} free")
        while len(seq.pages) < self.pages_for(new_length):
            page = self._free.pop()
            self._refs[page] = 1
            seq.pages.append(page)

    def release(self, seq: SequenceCache) -> None:
        for page in reversed(seq.pages):
            self._unref(page)
        seq.pages = []
        seq.length = 0

    def truncate(self, seq: SequenceCache, length: int) -> None:
        """Forget seq's tokens from length on, returning the pages it no longer needs."""
        keep = self.pages_for(length)
        for page in reversed(seq.pages[keep:]):
            self._unref(page)
        del seq.pages[keep:]
        seq.length = min(seq.length, length)

    def _unref(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)
            key = self._key_of_page.pop(page, None)
            if key is not None:
                del self._shared[key]

    def share(self, key: Hashable, seq: SequenceCache, index: int, digest: bytes, outputs: torch.Tensor) -> None:
        """Offer seq's full page number index to later sequences whose prefix has the same key."""
        page = seq.pages[index]
        if key not in self._shared and page not in self._key_of_page:
            self._shared[key] = SharedPage(page, digest, outputs)
            self._key_of_page[page] = key

    def lookup(self, key: Hashable) -> SharedPage | None:
        return self._shared.get(key)

    def attach(self, seq: SequenceCache, shared: SharedPage) -> None:
        """Append a shared full page to seq, which must end on a page boundary with no page reserved ahead."""
        assert seq.length == len(seq.pages) * self.page_size, "attach needs a sequence that ends on a page boundary"
        self._refs[shared.page] += 1
        seq.pages.append(shared.page)
        seq.length += self.page_size

    def slots(self, seq: SequenceCache, start: int, end: int) -> torch.Tensor:
        """Flat pool slots of the sequence's tokens [start, end)."""
        positions = torch.arange(start, end)
        pages = torch.tensor(seq.pages, dtype=torch.long)[positions // self.page_size]
        return pages * self.page_size + positions % self.page_size

    def read(self, seq: SequenceCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Host copies of the keys and values of seq's tokens, [layers, length, kv_heads, head_dim] each."""
        slots = self.slots(seq, 0, seq.length).to(self.keys.device)
        return self.keys[:, slots].to("cpu"), self.values[:, slots].to("cpu")

    def write(self, seq: SequenceCache, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put keys and values from read() back as seq's first tokens; seq must have pages for them."""
        slots = self.slots(seq, 0, keys.shape[1]).to(self.keys.device)
        self.keys[:, slots] = keys.to(self.keys.device)
        self.values[:, slots] = values.to(self.values.device)
