"""The node's step scheduler: continuous batching over one page pool, with admission and preemption.

A session's step appends input rows to its sequences; each iteration packs pending rows of many sessions
into one forward through the span: decodes (one pending token) first, then prefill chunks, each in arrival
order, under a token budget, so a long prompt never stalls other sessions' decodes.

Sessions are admitted while their declared pages fit the pool times an overcommit factor, else they queue.
Pages are taken as tokens arrive; when the pool runs dry, the most junior session (lowest priority, then
newest) is preempted: its keys and values are swapped to host memory, or dropped and later recomputed from
the span inputs the node keeps for every sequence. The most senior session can always take pages from
juniors, so every session completes. Full pages whose prefix key (the client's token-hash chain) matches a
page already in the pool are attached instead of computed.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from node.kv_cache import PagePool, SequenceCache
from node.span import Span

logger = logging.getLogger(__name__)

PRIORITIES = ("interactive", "batch")  # a session's priority class, most urgent first

# Pipelining. Steps that arrive together (one frame of a client's sessions, or of the previous node) would go
# through every stage of their chains together: each stage waits while the others work, and a round lasts the
# sum of all stages' host and device time. Cut into halves, the first half's outputs travel on while the second
# half computes, and the stages work at once. Another forward reads the weights again, so a node halves its
# batches only while forwards take under HALVE_BELOW of its time, and stops above HALVE_UNTIL (halving itself
# raises that share; the gap keeps the node from flapping). On an H200, 64 sessions of one client through 2 nodes
# of an 8B-shaped model decoded 3,244 tokens/s this way, 2,894 in whole batches of 64 (scripts/bench/gpu.py).
HALVE_BELOW, HALVE_UNTIL = 0.5, 0.8
BUSY_SECONDS = 0.5  # time constant of the moving average of the share of time spent in forwards


class AdmissionError(RuntimeError):
    """A session the node cannot take: it would never fit, or it waited too long in the queue."""


@dataclass(eq=False)
class Sequence:
    """One sequence of a session: its cache, every input row it received, and its prefix keys."""

    cache: SequenceCache = field(default_factory=SequenceCache)
    chunks: list[torch.Tensor] = field(default_factory=list)  # host copies of the received rows, oldest first
    received: int = 0
    page_keys: list[bytes] | None = field(default_factory=list)  # token-hash chain per full page; None: unknown
    swapped: tuple[torch.Tensor, torch.Tensor] | None = None  # host keys/values while preempted to host
    out_start: int = 0  # first position whose output the current step returns
    out_row: int = 0  # the step output's row for out_start

    @property
    def pending(self) -> int:
        return self.received - self.cache.length

    def inputs(self, start: int, end: int) -> torch.Tensor:
        """Received rows [start, end); old rows are needed only to recompute, so chunks are merged lazily."""
        if start < self.received - self.chunks[-1].shape[0]:
            self.chunks = [torch.cat(self.chunks)]
        first = self.received - self.chunks[-1].shape[0]
        return self.chunks[-1][start - first:end - first]

    def forget_inputs_from(self, length: int) -> None:
        self.chunks = [torch.cat(self.chunks)[:length]] if self.chunks else []
        self.received = length


@dataclass(eq=False)
class Step:
    rows: int  # tokens in the step
    future: asyncio.Future
    arrived: float
    received_before: list[int]
    # [rows, hidden]: a view of the rows that one forward computed when they are the whole output (a decode step),
    # else a buffer the rows are copied into as they are computed
    output: torch.Tensor | None = None


@dataclass(eq=False)
class Session:
    id: str
    peer: str
    start: int
    end: int
    max_length: int
    priority: int
    seqs: list[Sequence]
    order: int = -1  # admission order; with priority it says who is junior
    step: Step | None = None
    closed: bool = False

    @property
    def rank(self) -> tuple[int, int]:
        """Greater is more junior: preempted first."""
        return self.priority, self.order

    @property
    def resident(self) -> bool:
        return any(seq.cache.pages for seq in self.seqs)


@dataclass(eq=False)
class Chunk:
    """Rows [position, position + length) of one sequence, computed in this iteration."""

    session: Session
    seq: Sequence
    position: int
    length: int


def copy_to_host(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Start copying a CUDA tensor to pinned host memory: the host tensor, and an event that passes once it is
    filled."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensor.device))
    return host, copied


@dataclass(eq=False)
class Forward:
    """A forward queued on the span's device (or computed, on a CPU): its chunks and, once it is done, its
    outputs on the host."""

    chunks: list[Chunk]
    sessions: set[Session]
    began: float
    out: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None  # passes once out is filled; None when there is nothing to wait for
    error: Exception | None = None

    def done(self) -> bool:
        """Whether its outputs are on the host; an error of the device fails the forward."""
        try:
            return self.copied is None or self.copied.query()
        except Exception as e:
            self.error = e
            return True


class Scheduler:
    def __init__(self, span: Span, pool: PagePool, *, max_batch_tokens: int = 512, max_batch_size: int = 64,
                 overcommit: float = 2.0, swap_bytes: int = 0, queue_timeout: float = 60.0,
                 max_in_flight: int | None = None):
        if max_batch_tokens <= max_batch_size:
            # decodes take at most max_batch_size tokens, so prefills always get part of every iteration
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must exceed max_batch_size ({max_batch_size})")
        self.span, self.pool = span, pool
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size
        self.overcommit, self.swap_bytes, self.queue_timeout = overcommit, swap_bytes, queue_timeout
        # A GPU node queues the next forward while the device computes the last one: the host's work between two
        # forwards (answering one, building the next) would otherwise leave the device idle. A CPU computes as it
        # launches, so one at a time there.
        self.max_in_flight = max_in_flight or (2 if span.device.type == "cuda" else 1)
        self.sessions: list[Session] = []
        self.waiting: deque[tuple[Session, asyncio.Future]] = deque()
        self.declared_pages = 0
        self.swap_used = 0
        self.counters: Counter[str] = Counter()
        self._queued_tokens: Counter[str] = Counter()  # per peer: tokens of its steps not answered yet
        self._orders = itertools.count()
        self._in_flight: deque[Forward] = deque()  # oldest first: the device finishes them in order
        self._wake = asyncio.Event()
        self.busy = 0.0  # moving average of the share of time spent in forwards
        self._halving = False  # capping forwards at half of max_batch_size (see HALVE_BELOW)
        self._last_forward_end = time.perf_counter()

    # ----- admission -----

    def declared(self, session: Session) -> int:
        return len(session.seqs) * self.pool.pages_for(session.max_length)

    def _fits(self, session: Session) -> bool:
        return self.declared_pages + self.declared(session) <= self.overcommit * self.pool.num_pages

    async def admit(self, session: Session) -> float:
        """Wait until the session may start; returns the seconds it queued."""
        if self.declared(session) > self.pool.num_pages:
            raise AdmissionError(f"the session needs {self.declared(session)} KV pages, more than the node's "
                                 f"{self.pool.num_pages}")
        if not self.waiting and self._fits(session):
            self._admit(session)
            return 0.0
        queued_at = time.monotonic()
        admitted = asyncio.get_running_loop().create_future()
        self.waiting.append((session, admitted))
        self.counters["queued_sessions"] += 1
        try:
            await asyncio.wait_for(asyncio.shield(admitted), self.queue_timeout)
        except asyncio.TimeoutError:
            raise AdmissionError(f"the node's KV cache stayed full for {self.queue_timeout:.0f} s") from None
        finally:
            if not admitted.done():
                self.waiting.remove((session, admitted))
                self._admit_waiting()  # whoever queued behind this session may fit now
        return time.monotonic() - queued_at

    def _admit(self, session: Session) -> None:
        session.order = next(self._orders)
        self.declared_pages += self.declared(session)
        self.sessions.append(session)

    def _admit_waiting(self) -> None:
        while self.waiting and self._fits(self.waiting[0][0]):
            session, admitted = self.waiting.popleft()
            self._admit(session)
            admitted.set_result(None)

    def close(self, session: Session) -> None:
        """End a session, queued or admitted; its pages return to the pool once no forward is using them."""
        session.closed = True
        if session.step is not None and not session.step.future.done():
            session.step.future.cancel()
        if session in self._computing():
            return  # _finish releases it
        self._release(session)

    def _release(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.remove(session)
            self.declared_pages -= self.declared(session)
            for seq in session.seqs:
                self.pool.release(seq.cache)
                self._drop_swap(seq)
            self._admit_waiting()
        self._wake.set()

    # ----- steps -----

    def submit(self, session: Session, hidden: torch.Tensor, lengths: list[int],
               page_keys: list[list[bytes]] | None) -> asyncio.Future:
        """Queue a step: lengths[i] new rows of hidden [sum(lengths), hidden] for sequence i. The future
        resolves to the span's outputs for those rows.

        page_keys[i] lists the token-hash chain of the full pages sequence i completes in this step; None
        means the client sent no hashes, which ends prefix sharing for the session.
        """
        step = Step(hidden.shape[0], asyncio.get_running_loop().create_future(), time.monotonic(),
                    [seq.received for seq in session.seqs])
        row = 0
        for i, (seq, n) in enumerate(zip(session.seqs, lengths)):
            if n:
                seq.chunks.append(hidden[row:row + n])
                seq.received += n
            seq.out_start, seq.out_row = seq.received - n, row
            if page_keys is None or seq.page_keys is None:
                seq.page_keys = None
            else:
                seq.page_keys.extend(page_keys[i])
            row += n
        session.step = step
        # counted here and uncounted when the future is done (answered, failed or cancelled): summing the pending
        # rows of all sessions instead cost O(sessions) per step
        tokens = hidden.shape[0]
        self._queued_tokens[session.peer] += tokens
        step.future.add_done_callback(lambda _: self._unqueue(session.peer, tokens))
        self._wake.set()
        return step.future

    def _unqueue(self, peer: str, tokens: int) -> None:
        self._queued_tokens[peer] -= tokens
        if not self._queued_tokens[peer]:
            del self._queued_tokens[peer]

    def sessions_of(self, peer: str) -> int:
        return sum(s.peer == peer for s in self.sessions) + sum(s.peer == peer for s, _ in self.waiting)

    def queued_tokens(self, peer: str) -> int:
        """Tokens of the peer's steps waiting for computation."""
        return self._queued_tokens[peer]

    async def run(self) -> None:
        while True:
            self._wake.clear()
            while len(self._in_flight) < self.max_in_flight and (chunks := self._schedule()):
                self._launch(chunks)
            if not self._in_flight:
                await self._wake.wait()
            elif await self._outputs_or_room(self._in_flight[0]):
                self._finish(self._in_flight.popleft())
                await asyncio.sleep(0)  # let the steps just answered send their next ones into the next iteration

    async def _outputs_or_room(self, forward: Forward) -> bool:
        """Wait until the forward is done (True), or until new steps may go into another forward meanwhile
        (False). Polled between the loop's turns: waiting in a thread instead would hand the GIL back and forth
        with the busy loop at every step, and each handoff can take the interpreter's 5 ms switch interval."""
        while not forward.done():
            if self._wake.is_set() and len(self._in_flight) < self.max_in_flight:
                return False
            await asyncio.sleep(0)
        return True

    def _launch(self, chunks: list[Chunk]) -> None:
        """Queue a forward of the chunks on the span's device (a CPU computes it here, on the event loop)."""
        forward = Forward(chunks, {c.session for c in chunks}, time.perf_counter())
        try:
            hidden = torch.cat([c.seq.inputs(c.position, c.position + c.length) for c in chunks])
            session = chunks[0].session
            out = self.span.forward(self.pool, hidden, [c.seq.cache for c in chunks], [c.length for c in chunks],
                                    session.start, session.end).to(hidden.dtype)
            if out.device.type == "cpu":
                forward.out = out
            else:
                forward.out, forward.copied = copy_to_host(out)
        except Exception as e:  # a bug or a device error: these steps fail in _finish, the node goes on
            forward.error = e
        self._in_flight.append(forward)

    def _finish(self, forward: Forward) -> None:
        """Answer the steps of a done forward."""
        if forward.error is None:
            self._complete(forward.chunks, forward.out)
        else:
            logger.error("forward failed for sessions %s", [s.id for s in forward.sessions], exc_info=forward.error)
            self._fail(forward.chunks, forward.error)
        # time from the previous forward's end, where they overlap: the share of time the device computed
        self._count_forward(max(forward.began, self._last_forward_end))
        for session in forward.sessions:
            if session.closed:
                self._release(session)

    def _count_forward(self, began: float) -> None:
        end = time.perf_counter()
        self.counters["forward_s"] += end - began
        interval = max(end - self._last_forward_end, 1e-9)  # this forward and the idle time before it
        weight = 1 - math.exp(-interval / BUSY_SECONDS)
        self.busy += weight * ((end - began) / interval - self.busy)
        self._last_forward_end = end
        self._halving = self.busy < (HALVE_UNTIL if self._halving else HALVE_BELOW)

    def _computing(self) -> set[Session]:
        """The sessions of forwards not done: their pages are being written and their steps wait for outputs."""
        return set().union(*(forward.sessions for forward in self._in_flight))

    # ----- one iteration -----

    def _schedule(self) -> list[Chunk]:
        in_flight = self._computing()  # a session's next rows wait for its forward on the way
        ready = [(s, seq) for s in self.sessions if s.step is not None and not s.step.future.done()
                 and s not in in_flight for seq in s.seqs if seq.pending > 0]
        if not ready:
            return []
        # One forward runs one range of blocks: the range of the oldest step, so no range starves.
        oldest, _ = min(ready, key=lambda item: item[0].step.arrived)
        ready = [(s, seq) for s, seq in ready if (s.start, s.end) == (oldest.start, oldest.end)]
        # decodes first; then by priority class and arrival, so that when more steps are ready than a forward takes,
        # the oldest go first and none starves
        ready.sort(key=lambda item: (item[1].pending > 1, item[0].priority, item[0].step.arrived))
        chunks: list[Chunk] = []
        budget = self.max_batch_tokens
        size = max(self.max_batch_size // 2, 1) if self._halving else self.max_batch_size
        computing: set[Hashable] = set()  # prefix keys of pages computed in this iteration
        preempted: set[Session] = set()
        for session, seq in ready:
            if len(chunks) == size or budget == 0:
                break
            if session in preempted:
                continue
            if seq.swapped is None:
                self._attach_shared_pages(session, seq)
            if seq.pending == 0:
                self._finish_if_done(session)
                continue
            length, keys = self._chunk_length(session, seq, budget, computing)
            if length == 0:
                continue  # another sequence computes its next page right now; attach it next iteration
            chunk = Chunk(session, seq, seq.cache.length, length)
            # a step that gets no pages waits for a senior session to finish or step; the steps behind it, which
            # may be those senior ones, still get their turn in this forward
            if self._place(chunk, chunks, preempted, in_flight):
                chunks.append(chunk)
                computing.update(keys)
                budget -= length
        return chunks

    def _chunk_length(self, session: Session, seq: Sequence, budget: int,
                      computing: set[Hashable]) -> tuple[int, list[Hashable]]:
        """The rows of the sequence this iteration computes, and the prefix keys of the full pages among them."""
        page_size, start = self.pool.page_size, seq.cache.length
        length = min(seq.pending, budget)
        if length < seq.pending and (start + length) // page_size * page_size > start:
            length = (start + length) // page_size * page_size - start  # end chunks on a page boundary
        keys = []
        for index in self.pool.full_pages(start, start + length):
            key = self._page_key(session, seq, index)
            if key is None:
                break
            if key in computing:
                return max(index * page_size - start, 0), keys
            keys.append(key)
        return length, keys

    def _page_key(self, session: Session, seq: Sequence, index: int) -> Hashable | None:
        if seq.page_keys is None or index >= len(seq.page_keys):
            return None
        return session.start, session.end, seq.page_keys[index]

    def _page_digest(self, seq: Sequence, index: int) -> bytes:
        rows = seq.inputs(index * self.pool.page_size, (index + 1) * self.pool.page_size)
        return hashlib.blake2b(rows.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).digest()

    def _attach_shared_pages(self, session: Session, seq: Sequence) -> None:
        page_size = self.pool.page_size
        while seq.pending >= page_size and seq.cache.length == len(seq.cache.pages) * page_size:
            index = seq.cache.length // page_size
            key = self._page_key(session, seq, index)
            shared = self.pool.lookup(key) if key is not None else None
            if shared is None or shared.digest != self._page_digest(seq, index):
                return
            self.pool.attach(seq.cache, shared)
            self._emit(session, seq, index * page_size, shared.outputs)
            self.counters["prefix_pages_attached"] += 1

    def _place(self, chunk: Chunk, placed: list[Chunk], preempted: set[Session], in_flight: set[Session]) -> bool:
        """Reserve the chunk's pages, preempting juniors that are in no forward (this one, or one on its way) where
        the pool is dry."""
        seq, end = chunk.seq, chunk.position + chunk.length
        while not self.pool.can_reserve(seq.cache, end):
            victim = self._pick_victim(chunk.session, {c.session for c in placed} | in_flight)
            if victim is None:
                return False
            self._preempt(victim)
            preempted.add(victim)
        self.pool.reserve(seq.cache, end)
        if seq.swapped is not None:
            self._swap_in(seq)
        return True

    def _pick_victim(self, requester: Session, protected: set[Session]) -> Session | None:
        """The most junior resident session below the requester; else the most junior idle one of its priority
        or lower, whose pages no step needs now and which takes them back by seniority when it steps again."""
        resident = [s for s in self.sessions if s is not requester and s not in protected and s.resident]
        juniors = [s for s in resident if s.rank > requester.rank]
        candidates = juniors or [s for s in resident if s.priority >= requester.priority
                                 and (s.step is None or s.step.future.done())]
        return max(candidates, key=lambda s: s.rank, default=None)

    def _preempt(self, session: Session) -> None:
        held = sum(seq.cache.length for seq in session.seqs if seq.cache.pages)
        swap = self.swap_used + held * self.pool.token_bytes <= self.swap_bytes
        for seq in session.seqs:
            if not seq.cache.pages:
                continue
            if swap:
                seq.swapped = self.pool.read(seq.cache)
                self.swap_used += seq.cache.length * self.pool.token_bytes
                length = seq.cache.length
                self.pool.release(seq.cache)
                seq.cache.length = length
            else:
                self.counters["recomputed_tokens"] += seq.cache.length
                self.pool.release(seq.cache)
        self.counters["preemptions"] += 1
        self.counters["swapped_out" if swap else "dropped"] += 1
        logger.info("preempted session %s (%s, %d tokens held): %s", session.id, PRIORITIES[session.priority], held,
                    "swapped to host" if swap else "dropped, to recompute from its inputs")

    def _swap_in(self, seq: Sequence) -> None:
        keys, values = seq.swapped
        self.pool.write(seq.cache, keys, values)
        self._drop_swap(seq)

    def _drop_swap(self, seq: Sequence) -> None:
        if seq.swapped is not None:
            keys, _ = seq.swapped
            self.swap_used -= keys.shape[1] * self.pool.token_bytes
            seq.swapped = None

    # ----- results -----

    def _emit(self, session: Session, seq: Sequence, position: int, rows: torch.Tensor) -> None:
        """Give the current step the outputs of positions [position, position + len(rows)) that it returns."""
        step, first = session.step, max(position, seq.out_start)
        count = position + rows.shape[0] - first
        if count <= 0:
            return
        if step.output is None:
            if count == step.rows:  # all of the step's output: no buffer, no copy
                step.output = rows[first - position:]
                return
            step.output = rows.new_empty((step.rows, rows.shape[1]))
        out_row = seq.out_row + first - seq.out_start
        step.output[out_row:out_row + count] = rows[first - position:]

    def _complete(self, chunks: list[Chunk], out: torch.Tensor) -> None:
        page_size, row = self.pool.page_size, 0
        for chunk in chunks:
            rows = out[row:row + chunk.length]
            row += chunk.length
            if chunk.session.closed:
                continue
            self._emit(chunk.session, chunk.seq, chunk.position, rows)
            end = chunk.position + chunk.length
            for index in self.pool.full_pages(chunk.position, end):
                key = self._page_key(chunk.session, chunk.seq, index)
                if key is None:
                    break
                if self.pool.lookup(key) is None:
                    offset = index * page_size - chunk.position
                    self.pool.share(key, chunk.seq.cache, index, self._page_digest(chunk.seq, index),
                                    rows[offset:offset + page_size].clone())
        self.counters["forwards"] += 1
        self.counters["batched_tokens"] += row
        for session in {c.session for c in chunks}:
            self._finish_if_done(session)

    def _finish_if_done(self, session: Session) -> None:
        step = session.step
        if step is not None and all(seq.pending == 0 for seq in session.seqs):
            session.step = None
            if not step.future.done():
                step.future.set_result(step.output)

    def _fail(self, chunks: list[Chunk], error: Exception) -> None:
        """Undo the failed steps, so each session stays as it was before its step."""
        for session in {c.session for c in chunks}:
            step, session.step = session.step, None
            for seq, before in zip(session.seqs, step.received_before):
                if seq.swapped is not None and seq.cache.length > before:
                    self._drop_swap(seq)  # its host copy holds rows of the failed step: recompute instead
                    seq.cache.length = 0
                self.pool.truncate(seq.cache, min(seq.cache.length, before))
                seq.forget_inputs_from(before)
                if seq.page_keys is not None:
                    del seq.page_keys[before // self.pool.page_size:]
            if not step.future.done():
                step.future.set_exception(error)

    def stats(self) -> dict[str, int | float]:
        pages_used = self.pool.num_pages - self.pool.free_pages
        tokens = sum(seq.cache.length for s in self.sessions for seq in s.seqs if seq.cache.pages)
        steps = sum(s.step is not None for s in self.sessions)
        return {"sessions": len(self.sessions), "queued": len(self.waiting), "queued_steps": steps,
                "pages_total": self.pool.num_pages, "pages_used": pages_used, "pages_free": self.pool.free_pages,
                "pages_shared": self.pool.shared_pages, "tokens_held": tokens,
                "swap_bytes_used": self.swap_used, "busy": round(self.busy, 3), **self.counters}
