"""Decode steps of concurrent generate() calls, run as one batch per turn of the client's event loop.

A decode step runs the family's forward around the swarm: embeddings before the decoder stack, final norm and
lm head after it. N generate() calls at once (``swarm api``'s requests, an application's threads) would each
run that forward for their own rows, N forwards a step that each read the whole lm head. Their decode loops
all run on the client's event loop (client/model.py), so the steps they take in one turn of it are known
together: the batcher runs them as one forward over all their rows. Each call's rows step through its own
session (concurrently; steps to the same node travel in one frame), and each call gets its rows of the logits.

With client graphs (client/graphs.py) the forward is two replays around the sessions' steps on the event loop;
without, the family's forward runs in a worker thread and waits on the event loop for the sessions' steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from client.graphs import ClientGraphs
from client.remote import in_forward_thread, run_coroutine

if TYPE_CHECKING:
    from client.model import SwarmLayers
    from client.session import InferenceSession


@dataclass
class _Step:
    """One call's decode step: its session's rows, their new token ids [rows, 1] and positions [rows, 1]."""

    session: InferenceSession
    input_ids: torch.Tensor
    positions: torch.Tensor
    new_lengths: list[int]
    token_ids: list[list[int]]
    logits: asyncio.Future
    error: BaseException | None = None


class StepBatcher:
    """Runs the decode steps taken in one event-loop turn as one forward. forward(input_ids=, position_ids=) is
    the family's forward with its stack bound to ``swarm_layers``; graphs, where the client has them."""

    def __init__(self, forward: Callable[..., Any], swarm_layers: SwarmLayers, graphs: ClientGraphs | None):
        self.forward, self.swarm_layers, self.graphs = forward, swarm_layers, graphs
        self.pending: list[_Step] = []
        self.running: set[asyncio.Task] = set()  # the event loop keeps only weak references to tasks
        self.forwards = self.rows = 0  # batches run and the rows they held: how well steps batch

    async def logits(self, session: InferenceSession, input_ids: torch.Tensor, positions: torch.Tensor,
                     new_lengths: list[int], token_ids: list[list[int]]) -> torch.Tensor:
        """The logits [rows, vocab] of a decode step of session's rows: input_ids [rows, 1] on the model's
        device, positions [rows, 1] on the host. Call it on the client's event loop."""
        loop = asyncio.get_running_loop()
        if not self.pending:  # a task starts next turn, when every call that is ready this turn has added its step
            task = loop.create_task(self._run())
            self.running.add(task)
            task.add_done_callback(self.running.discard)
        step = _Step(session, input_ids, positions, new_lengths, token_ids, loop.create_future())
        self.pending.append(step)
        return await step.logits

    async def _run(self) -> None:
        steps = [step for step in self.pending if not step.logits.done()]  # left out: calls cancelled meanwhile
        self.pending = []
        if not steps:
            return
        try:
            ids = torch.cat([step.input_ids for step in steps])
            positions = torch.cat([step.positions for step in steps])
            self.forwards, self.rows = self.forwards + 1, self.rows + len(ids)
            graphs = self.graphs.get(len(ids)) if self.graphs is not None else None
            if graphs is not None:
                hidden = graphs.embed(ids, positions)
                out = await self._sessions(steps, hidden)
                logits = graphs.head(out.pin_memory().to(hidden.device, non_blocking=True))
            else:
                logits = await in_forward_thread(self._eager, steps, ids, positions)
        except asyncio.CancelledError:
            for step in steps:
                step.logits.cancel()
            raise
        except Exception as e:
            for step in steps:
                if not step.logits.done():
                    step.logits.set_exception(e)
            return
        for step, rows in zip(steps, logits[:, -1].split([len(step.new_lengths) for step in steps])):
            if step.logits.done():  # its call was cancelled meanwhile
                continue
            if step.error is not None:
                step.logits.set_exception(step.error)
            else:
                step.logits.set_result(rows)

    def _eager(self, steps: list[_Step], ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The family's forward over the batch, in a worker thread: the stack waits on the event loop."""
        with self.swarm_layers.bind(_Sessions(self, steps)), torch.no_grad():
            return self.forward(input_ids=ids, position_ids=positions.to(ids.device)).logits

    async def _sessions(self, steps: list[_Step], hidden: torch.Tensor) -> torch.Tensor:
        """Each step's rows of hidden [batch, 1, hidden_size] through its session, concurrently; their outputs
        on the host, zeros for the rows of a step that failed (its error is kept for its call)."""
        rows = hidden.cpu().split([len(step.new_lengths) for step in steps])
        tasks = [asyncio.ensure_future(step.session.astep(x, step.new_lengths, step.token_ids))
                 for step, x in zip(steps, rows)]
        for step, task in zip(steps, tasks):  # an interrupted call (Ctrl-C) stops its session's step
            step.logits.add_done_callback(lambda logits, task=task: logits.cancelled() and task.cancel())
        outputs = await asyncio.gather(*tasks, return_exceptions=True)
        for step, out in zip(steps, outputs):
            if isinstance(out, BaseException):
                step.error = out
        return torch.cat([torch.zeros_like(x) if step.error is not None else out
                          for step, x, out in zip(steps, rows, outputs)])


class _Sessions:
    """Stands in for the session while the eager forward runs: the stack's input goes through the steps'
    sessions on the event loop."""

    def __init__(self, batcher: StepBatcher, steps: list[_Step]):
        self.batcher, self.steps = batcher, steps

    def step(self, hidden: torch.Tensor, *args: Any) -> torch.Tensor:
        return run_coroutine(self.batcher._sessions(self.steps, hidden)).to(hidden.device, hidden.dtype)
