"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, over the whole span.

A decode step of a few tokens costs more in kernel launches and Python than in arithmetic: one 8B-shaped
layer at batch 1 took 0.55 ms eager and 0.23 ms replayed from a graph on an H100. A graph reads its inputs
from static buffers, so a step copies its hidden states and its sequences' positions, slots and block
tables there and replays the graph of the smallest bucket that holds the batch. Rows past the batch are
padding: they write their keys and values to the pool's scratch page and attend to that page only.
The graphs can replay layers compiled by torch.compile, which fuses their small kernels first.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch

from node.attention import DecodeBatch, PagedCache
from node.kv_cache import PagePool, SequenceCache

if TYPE_CHECKING:
    from node.span import Span

logger = logging.getLogger(__name__)


class DecodeGraphs:
    @torch.no_grad()  # the weights require grad: without this, torch.compile would trace for a backward pass
    def __init__(self, span: Span, pool: PagePool, max_batch_size: int, max_length: int, compile: bool = False):
        self.span, self.pool, self.compiled = span, pool, compile
        # torch.compile fuses each layer's small kernels (norms, rotary, residual adds, activations, the KV
        # write): ~35 of 47 kernels of an 8B-shaped layer, a third of its 0.21 ms at batch 1 in a graph (H200).
        # Layers of one class share one compiled graph per bucket. Coordinate descent tunes the generated
        # kernels' block sizes (Inductor writes batch-1 matmuls as its own reductions, fused with the norms):
        # on an H200 it took 8B-shaped layers at batch 1 from 0.158 to 0.127 ms each, for 28 s more compiling
        # when Inductor's disk cache is cold.
        options = {"coordinate_descent_tuning": True}
        layers = ([torch.compile(layer, dynamic=False, options=options) for layer in span.layers] if compile
                  else span.layers)
        self.buckets = sorted({min(2**i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)})
        self.max_batch_size = max_batch_size
        largest, device = self.buckets[-1], span.device
        # A step's inputs go up in one copy from a pinned buffer to a device buffer that holds them all, in this
        # order: positions, write slots and lengths; block tables; hidden states (a step copies a prefix). From
        # pinned memory the copy queues behind the device's work, where from pageable memory each copy waited for
        # the device (0.2-0.3 ms per step on an H200 that two nodes and a client share); one copy instead of
        # three took a batch-1 step's host work from 0.13 to 0.05 ms on an H200 host. Fixed buffers, because
        # pinning each step's tensors anew took 24-40% of a node's event loop at 64 sessions (py-spy, H200).
        shapes = {"meta": ((3, largest), torch.int64), "tables": ((largest, pool.pages_for(max_length)), torch.int32),
                  "hidden": ((largest, span.config.hidden_size), span.dtype)}
        self.offsets, size = {}, 0
        for name, (shape, dtype) in shapes.items():
            self.offsets[name] = size
            size += -(-math.prod(shape) * dtype.itemsize // 256) * 256  # each aligned as an allocation would be
        # Two pinned buffers, used in turn: the scheduler queues a step while the previous one may still wait for
        # the device, and its upload with it.
        self.inputs = torch.zeros(size, dtype=torch.uint8, device=device)
        self.host_inputs = [torch.zeros(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.meta, self.tables, self.hidden = (self._view(self.inputs, name, *shapes[name]) for name in shapes)
        self.host = [{name: self._view(buffer, name, *shapes[name]) for name in shapes} for buffer in self.host_inputs]
        for host in self.host:
            host["meta"].copy_(DecodeBatch.host_inputs([], pool.page_size, largest, pool.scratch_page)[0])
            host["tables"].fill_(pool.scratch_page)
        self.inputs.copy_(self.host_inputs[0])
        self.uploaded = [torch.cuda.Event(), torch.cuda.Event()]  # recorded after a buffer's copy: it is free again
        self.turn = 0  # the buffer the next step fills
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        began = time.perf_counter()
        memory = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            cache = PagedCache(pool, self._batch(bucket), span.start)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # compiles kernels and sets up cuBLAS outside the capture
                span.run_blocks(self.hidden[:bucket], cache, span.start, span.end, layers)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory):
                self.outputs[bucket] = span.run_blocks(self.hidden[:bucket], cache, span.start, span.end, layers)
            self.graphs[bucket] = graph
        logger.info("captured %sdecode graphs for batch sizes %s in %.1f s", "compiled " if compile else "",
                    self.buckets, time.perf_counter() - began)

    def _batch(self, size: int) -> DecodeBatch:
        return DecodeBatch(self.meta[0, :size], self.meta[1, :size], self.tables[:size], self.meta[2, :size],
                           self.pool.page_size)

    def run(self, hidden: torch.Tensor, seqs: list[SequenceCache]) -> torch.Tensor:
        """The span's outputs for one new token per sequence, hidden [B, hidden_size] -> [B, hidden_size].

        The sequences must have pages for their new token (PagePool.reserve).
        """
        size = len(seqs)
        bucket = next(b for b in self.buckets if b >= size)
        meta, tables = DecodeBatch.host_inputs(seqs, self.pool.page_size, bucket, self.pool.scratch_page)
        host, host_inputs, uploaded = self.host[self.turn], self.host_inputs[self.turn], self.uploaded[self.turn]
        self.turn = 1 - self.turn
        uploaded.synchronize()  # the copy two steps back is done (long since, when its outputs came back)
        host["meta"][:, :bucket].copy_(meta)
        host["tables"][:bucket, :tables.shape[1]].copy_(tables)
        on_host = hidden.device.type == "cpu"
        if on_host:
            host["hidden"][:size].copy_(hidden)
        end = self.offsets["hidden"] + (self.hidden[:size].nbytes if on_host else 0)
        self.inputs[:end].copy_(host_inputs[:end], non_blocking=True)
        uploaded.record()
        if not on_host:
            self.hidden[:size].copy_(hidden)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:size].clone()

    def _view(self, buffer: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        start = self.offsets[name]
        return buffer[start:start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
