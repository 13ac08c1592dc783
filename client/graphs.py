"""The client's part of a decode step, replayed from CUDA graphs.

A decode step runs the family's forward around the swarm: embeddings before the decoder stack, final norm
and lm head after it. Its kernels are few, but transformers' Python around them is not. So each batch size
gets two graphs, captured from one run of the family's forward split where it calls the swarm: ``before``
maps token ids and positions to the hidden states the swarm receives, ``after`` maps the swarm's output to
logits. With the swarm replaced by a host round trip, batch-1 greedy decoding of an 8B-shaped Llama cost the
client 2.29 ms per token eagerly and 1.51-1.54 ms with the graphs on an H200 host; the same kernels called by
hand took 0.44-0.53 ms (the rest is the decode loop and the hand-off to the client's event loop, which
generate() avoids by running its decode loop on that event loop when graphs are on: client/model.py).

A forward that cannot be captured (one that reads a value back from the device, or copies one from pageable
host memory as falcon's attention mask does) runs eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from client.model import SwarmLayers

logger = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 64  # larger batches run eagerly: their graphs' buffers grow with the batch, their gain does not


class StepGraphs:
    """The client's work of one decode step of ``batch`` sequences, one new token each, as two CUDA graphs.

    forward(input_ids=, position_ids=) is the family's forward with its stack bound to ``swarm_layers``.
    """

    def __init__(self, forward: Callable[..., Any], swarm_layers: SwarmLayers, batch: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.swarm_output = torch.zeros(batch, 1, hidden_size, dtype=dtype, device=device)
        self.before, self.after = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        self.hidden: torch.Tensor  # the swarm's input: set where the capture splits
        # Threads may step sessions of one model at once, each on its current stream: a step waits on the
        # stream for the previous one's outputs to be copied out of the graphs' buffers.
        self.lock = threading.Lock()
        self.copied = torch.cuda.Event()
        split = _Split(self, torch.cuda.graph_pool_handle())
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), swarm_layers.bind(split), torch.no_grad():
            forward(input_ids=self.ids, position_ids=self.positions)  # cuBLAS sets up its workspace outside the capture
            split.start(self.before)
            try:
                self.logits = forward(input_ids=self.ids, position_ids=self.positions).logits
                split.end()
            except BaseException:
                split.abandon()
                raise
        torch.cuda.current_stream(device).wait_stream(stream)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The hidden states the swarm receives for input_ids [rows, 1] at positions [rows, 1], rows <= batch."""
        return self._replay(self.before, [(self.ids, input_ids), (self.positions, positions)], self.hidden)

    def head(self, swarm_output: torch.Tensor) -> torch.Tensor:
        """The logits [rows, 1, vocab] of the swarm's output [rows, 1, hidden_size], rows <= batch."""
        return self._replay(self.after, [(self.swarm_output, swarm_output)], self.logits)

    def _replay(self, graph: torch.cuda.CUDAGraph, inputs: list[tuple[torch.Tensor, torch.Tensor]],
                output: torch.Tensor) -> torch.Tensor:
        rows = len(inputs[0][1])  # the rows past them compute from stale inputs, and nobody reads them
        with self.lock:
            stream = torch.cuda.current_stream(output.device)
            stream.wait_event(self.copied)
            for buffer, values in inputs:
                buffer[:rows].copy_(values)
            graph.replay()
            result = output[:rows].clone()
            self.copied.record(stream)
        return result


class _Split:
    """Stands in for the session while the forward is captured: where the swarm would run, it ends the graph
    ``before`` and starts ``after``, which reads the swarm's output from its buffer. Outside a capture (the
    warm-up) it hands the hidden states back."""

    def __init__(self, graphs: StepGraphs, pool: Any):
        self.graphs, self.pool = graphs, pool
        self.capturing: torch.cuda.CUDAGraph | None = None

    def start(self, graph: torch.cuda.CUDAGraph) -> None:
        # thread_local: other threads' CUDA calls (the event loop's copies of other sessions) go on meanwhile
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        self.capturing = graph

    def end(self) -> None:
        self.capturing.capture_end()
        self.capturing = None

    def abandon(self) -> None:
        if self.capturing is not None:
            with contextlib.suppress(RuntimeError):  # the failed capture is invalid: ending it reports that again
                self.capturing.capture_end()
            self.capturing = None

    def step(self, hidden: torch.Tensor, *args: Any) -> torch.Tensor:
        if self.capturing is None:
            return hidden
        self.graphs.hidden = hidden
        self.end()
        self.start(self.graphs.after)
        return self.graphs.swarm_output


class ClientGraphs:
    """StepGraphs per batch size, a power of two that smaller batches pad to (the client batches the steps of
    concurrent generate() calls, whose count changes every step: client/batching.py), captured when a batch
    size first decodes; none after a capture failed."""

    def __init__(self, forward: Callable[..., Any], swarm_layers: SwarmLayers, hidden_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.forward, self.swarm_layers = forward, swarm_layers
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self.graphs: dict[int, StepGraphs] = {}
        self.failed = False
        self.lock = threading.Lock()

    def get(self, rows: int) -> StepGraphs | None:
        """The graphs that decode steps of ``rows`` sequences replay, or None where they run eagerly."""
        batch = 1 << (rows - 1).bit_length()
        with self.lock:
            if self.failed or batch > MAX_GRAPH_BATCH:
                return None
            if batch not in self.graphs:
                try:
                    graphs = StepGraphs(self.forward, self.swarm_layers, batch, self.hidden_size, self.dtype,
                                        self.device)
                except Exception as e:  # whatever the family's code raises under capture: eager decoding still works
                    self.failed = True
                    logger.warning("decode steps run the client's part eagerly: its forward cannot be captured in "
                                   "a CUDA graph (%s: %s)", type(e).__name__, e)
                    return None
                self.graphs[batch] = graphs
            return self.graphs[batch]
