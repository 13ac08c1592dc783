"""Inference sessions: a chain of node spans that keeps the KV cache of a batch of sequences.

The client keeps every span's inputs. When a node fails (its stream breaks, it stops answering in time, or it
lost the session's cache), the client bans it for a while, plans a new chain for that span's blocks only,
replays the kept inputs there in prefill-sized chunks to rebuild the cache, and finishes the step from that
span on. A node that is leaving says so in its replies; the client then moves its part of the session the
same way, before the node is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection

import torch
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError

from client.link import Inbox, NodeLink
from client.remote import SwarmConnection, run_coroutine
from swarm import direct, protocol
from swarm.protocol import ProtocolError, pack_rows
from swarm.push import Pusher
from swarm.records import NodeState
from swarm.routing import Hop, MissingBlocksError, RoutingError, plan_route

logger = logging.getLogger(__name__)

REPLAY_CHUNK_TOKENS = 512  # rows per replay request, over all sequences of the session
OPEN_QUEUE_SECONDS = 60.0  # a node answers an open within its queue timeout (60 s by default)
CACHE_LOST = {"unknown_session", "session_expired"}  # the node is fine but no longer holds the session
RETRYABLE = CACHE_LOST | {"unavailable", "no_room", "busy", "internal"}  # another node (or a replay) may do it


class NodeError(RuntimeError):
    """A node refused a request; code says why (bad_request, too_long, no_room, unknown_session, ...)."""

    def __init__(self, peer_id: str, code: str, message: str):
        super().__init__(f"node {peer_id[-8:]} refused: {message} [{code}]")
        self.peer_id, self.code = peer_id, code


class SpanFailure(Exception):
    """spans[index] of the chain failed during a step; its input for that step was `hidden`."""

    def __init__(self, index: int, hidden: torch.Tensor, cause: BaseException):
        super().__init__(f"span {index} failed: {cause!r}")
        self.index, self.hidden, self.cause = index, hidden, cause


def failed(error: BaseException) -> bool:
    """Whether the error means the node failed (try another) rather than the request being wrong."""
    if isinstance(error, NodeError):
        return error.code in RETRYABLE
    return isinstance(error, (ConnectionError, OSError, asyncio.TimeoutError, ProtocolError, P2PDaemonError,
                              P2PHandlerError))


class SpanSession:
    """One node's part of a session: steps through blocks [hop.start, hop.end), on the client's stream to that node
    (client/link.py), which it shares with the client's other sessions there."""

    def __init__(self, hop: Hop, link: NodeLink, step_timeout: float, compress: bool = False):
        self.hop, self.link = hop, link
        self.step_timeout, self.compress = step_timeout, compress
        self.session_id: str | None = None
        self.inbox: Inbox | None = None  # the node's replies to this session's steps
        self.queued_s = 0.0  # how long the node kept the session waiting for KV cache room
        self.wire_dtype = protocol.DTYPES[hop.node.dtype]
        self.draining = False  # the node said it is leaving
        # every step's (lengths, input rows), whether the client sent them or the previous node pushed them:
        # what a replacement node replays
        self.inputs: list[tuple[list[int], torch.Tensor]] = []
        self.pusher: Pusher | None = None  # sends steps batched with other sessions' (swarm/push.py)

    @classmethod
    async def open(cls, connection: SwarmConnection, hop: Hop, max_length: int, batch_size: int,
                   priority: str = "interactive", step_timeout: float = 10.0, compress: bool = False,
                   alarm: asyncio.Event | None = None) -> SpanSession:
        """compress: the session's tensors travel compressed, also those the node replies and pushes. alarm: the
        event the inboxes of the session's chain share (client.link.Inbox)."""
        link = await connection.link(hop.node.peer_id, hop.node.label, direct.reachable(hop.node.host), step_timeout)
        span = cls(hop, link, step_timeout, compress)
        span.pusher = connection.pusher
        reply = await link.open(step_timeout + OPEN_QUEUE_SECONDS,  # the node may queue the session
                                max_length=max_length, batch_size=batch_size, start=hop.start, end=hop.end,
                                priority=priority, compress=compress)
        span._check(reply)
        span.session_id, span.queued_s = reply["session"], reply.get("queued_s", 0.0)
        span.inbox = link.inboxes[span.session_id]
        if alarm is not None:
            span.inbox.alarm = alarm
        if span.queued_s > 1:
            logger.info("node %s queued the session %.1f s for KV cache room", hop.node.label, span.queued_s)
        return span

    def _check(self, reply: dict) -> None:
        if reply.get("type") == "error":
            raise NodeError(self.hop.node.peer_id, reply.get("code", "error"), reply.get("message", ""))
        self.draining = self.draining or reply.get("draining", False)

    async def _reply(self, timeout: float | None) -> tuple[dict, torch.Tensor | None]:
        """The node's next reply to this session, and its rows if it is an output."""
        if not self.inbox.empty():  # after the chain's alarm, every node's output is here: no timer to arm
            reply = self.inbox.get_nowait()
        elif self.link.closed:
            raise self.link.error
        else:
            async with asyncio.timeout(timeout):  # unlike wait_for, no task per reply
                reply = await self.inbox.get()
        if isinstance(reply, ConnectionError):
            raise reply
        reply, rows = reply if isinstance(reply, tuple) else (reply, None)
        self._check(reply)
        return reply, rows

    def timeout(self, tokens: int) -> float:
        """How long a step of this many tokens may take here before the node counts as stuck: the base timeout
        plus four times what the node's announced prefill speed needs (100 tokens/s if it announced none)."""
        return self.step_timeout + 4 * tokens / (self.hop.node.prefill_throughput or 100.0)

    def next_hop(self, page_hashes: list[list[bytes]] | None) -> dict:
        """Where a previous node pushes this span's input."""
        return {"peer": self.hop.node.peer_id, "session": self.session_id, "page_hashes": page_hashes,
                "dtype": self.hop.node.dtype, "host": self.hop.node.host}

    async def send(self, hidden: torch.Tensor, lengths: list[int], page_hashes: list[list[bytes]] | None = None,
                   push: list[dict] | None = None) -> None:
        """Send a step; with push, the node sends its output on to push[0], which sends it on to push[1]...

        The step goes in one push frame with the steps that other sessions of this client send the same node in
        this turn of the event loop. That frame is written a turn later, and the step does not wait for it: if it
        fails, the step goes on the client's stream to the node, and if that fails too, the error comes to the
        inbox as the node's reply would."""
        self.inputs.append((lengths, hidden))
        if self.pusher is None:
            await self._send_on_stream(hidden, lengths, page_hashes, push)
            return

        def on_pushed(sent: asyncio.Future) -> None:
            if not sent.result():  # e.g. a node that refuses push streams
                asyncio.create_task(self._send_on_stream(hidden, lengths, page_hashes, push, report=True))

        self.pusher.push(self.next_hop(page_hashes), hidden, lengths, push, self.compress).add_done_callback(on_pushed)

    async def _send_on_stream(self, hidden: torch.Tensor, lengths: list[int], page_hashes: list[list[bytes]] | None,
                              push: list[dict] | None, report: bool = False) -> None:
        """Send a step on the client's stream to the node; report: put an error in the inbox instead of raising it."""
        try:
            await self.link.send(*await pack_rows("step", [hidden.to(self.wire_dtype)], self.compress,
                                                  session=self.session_id, lengths=lengths, page_hashes=page_hashes,
                                                  push=push))
        except ConnectionError as e:
            if not report:
                raise
            self.inbox.put_nowait(e)

    async def receive(self, tokens: int, timeout: float | None = None) -> tuple[torch.Tensor, bool]:
        """The output of this span's next step of `tokens` rows, and whether the node pushed it on; timeout: how long
        to wait for it, self.timeout(tokens) by default."""
        reply, rows = await self._reply(self.timeout(tokens) if timeout is None else timeout)
        if rows is None:
            raise ProtocolError(f"node {self.hop.node.label} answered a step with {reply.get('type')!r}")
        return rows, reply.get("pushed", False)

    async def step(self, hidden: torch.Tensor, lengths: list[int],
                   page_hashes: list[list[bytes]] | None = None) -> torch.Tensor:
        """One step through this span alone."""
        await self.send(hidden, lengths, page_hashes)
        return (await self.receive(sum(lengths)))[0]

    async def close(self) -> None:
        if self.session_id is not None:
            await self.link.close_session(self.session_id)


class InferenceSession:
    """Keeps the KV cache of batch_size sequences of up to max_length tokens along a chain of nodes.

    Use as a context manager; ``step`` sends hidden states after the embeddings and returns them before
    the final norm. ``lengths`` counts the tokens each sequence holds. priority "batch" lets nodes serve
    interactive sessions first and preempt this one before them. The chain is the one of least expected
    latency (swarm/routing.py) among allowed_nodes (all, if None) less blocked_nodes (peer ids). With push,
    each node sends its output straight to the next one and the client waits only for the last; without it,
    the client carries every hop's output itself. With compress, hidden states travel losslessly compressed
    on every link of the chain (~28% fewer bytes in bfloat16, ~14% in float16/float32): that pays on links
    slower than ~50-150 Mbit/s, depending on the dtype and the CPU (scripts/bench/compression.py).

    Failures are recovered (module docstring). A node that does not answer a step within step_timeout
    seconds (plus time for the step's size) counts as failed. If no node serves some blocks (when opening,
    or after a failure), the session waits for one up to failover_deadline seconds, then raises
    MissingBlocksError. ``failovers`` lists the seconds each recovery took.
    """

    def __init__(self, connection: SwarmConnection, model_name: str, num_blocks: int, max_length: int,
                 batch_size: int = 1, priority: str = "interactive", *, push: bool = True,
                 allowed_nodes: Collection[str] | None = None, blocked_nodes: Collection[str] = (),
                 step_timeout: float = 10.0, failover_deadline: float = 60.0, compress: bool = False):
        self.connection, self.model_name, self.num_blocks = connection, model_name, num_blocks
        self.max_length, self.batch_size, self.priority = max_length, batch_size, priority
        self.push, self.allowed_nodes, self.blocked_nodes = push, allowed_nodes, set(blocked_nodes)
        self.step_timeout, self.failover_deadline, self.compress = step_timeout, failover_deadline, compress
        self.lengths = [0] * batch_size
        # token ids and their page-hash chains, per page size, so nodes can share cache pages of equal prefixes;
        # None once a step came without token ids
        self.tokens: list[list[int]] | None = [[] for _ in range(batch_size)]
        self.page_chains: dict[int, list[list[bytes]]] = {}
        self.spans: list[SpanSession] = []
        self.alarm = asyncio.Event()  # set by the chain's replies that a step must act on (client.link.Inbox)
        self.late = False  # the alarm went off because the step's first node did not answer in time
        self.failovers: list[float] = []
        self.closed = False

    def __enter__(self) -> InferenceSession:
        run_coroutine(self._open())
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> InferenceSession:
        """For coroutines on the client's event loop, with astep."""
        await self._open()
        return self

    async def __aexit__(self, *exc) -> None:
        self.closed = True
        await self._close()

    async def _open(self) -> None:
        try:
            self.spans = await self._open_chain(0, self.num_blocks, time.monotonic() + self.failover_deadline)
        except BaseException:
            await self._close()
            raise

    async def _plan(self, start: int, end: int, deadline: float) -> list[Hop]:
        """A chain for blocks [start, end) among reachable, unbanned nodes; missing blocks are waited for (with
        backoff) until the deadline."""
        delay = 0.5
        while True:
            records = await self.connection.records(self.model_name)
            if not records and not self.spans:  # at open; after a failure, the nodes may come back
                raise RoutingError(f"no node announces model {self.model_name!r}: the name is unknown to the swarm "
                                   "or all its nodes are offline")
            excluded = self.blocked_nodes | self.connection.banned()
            candidates = [r for r in records if r.state == NodeState.ONLINE and r.peer_id not in excluded
                          and (self.allowed_nodes is None or r.peer_id in self.allowed_nodes)
                          and r.start < end and start < r.end]
            probes = await self.connection.probe(candidates)
            try:
                return plan_route(self.model_name, candidates, self.num_blocks, self.max_length, probes=probes,
                                  blocks=(start, end))
            except MissingBlocksError as e:
                if time.monotonic() + delay > deadline:
                    raise MissingBlocksError(self.model_name, e.blocks, f"waited {self.failover_deadline:.0f} s "
                                                                        "for a node; still no online node serves")
                logger.info("%s; waiting %.1f s for a node", e, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)

    async def _open_chain(self, start: int, end: int, deadline: float,
                          history: list[tuple[list[int], torch.Tensor]] = ()) -> list[SpanSession]:
        """Open sessions on a chain for blocks [start, end) and replay history (the inputs of block `start`)
        through it. A node that fails meanwhile is banned and the chain planned again."""
        while True:
            route = await self._plan(start, end, deadline)
            logger.info("route for blocks %d:%d: %s", start, end,
                        " -> ".join(f"{hop.node.label}[{hop.start}:{hop.end}]" for hop in route))
            spans: list[SpanSession] = []
            hop = route[0]
            try:
                inputs = list(history)
                for hop in route:
                    spans.append(await SpanSession.open(self.connection, hop, self.max_length, self.batch_size,
                                                        self.priority, self.step_timeout, self.compress, self.alarm))
                    inputs = await self._replay(spans[-1], inputs)
                return spans
            except Exception as e:
                await asyncio.gather(*(span.close() for span in spans), return_exceptions=True)
                if not failed(e) or time.monotonic() > deadline:
                    raise
                logger.warning("node %s failed while joining the session (%r); planning again", hop.node.label, e)
                self.connection.ban(hop.node.peer_id)

    async def _replay(self, span: SpanSession, history: list[tuple[list[int], torch.Tensor]]
                      ) -> list[tuple[list[int], torch.Tensor]]:
        """Run a span's past inputs through it again, in chunks; returns its outputs, chunk by chunk."""
        if not history:
            return []
        rows = [[] for _ in range(self.batch_size)]  # each sequence's input rows, in order
        for lengths, hidden in history:
            for i, part in enumerate(hidden.split(lengths)):
                rows[i].append(part)
        rows = [torch.cat(parts) for parts in rows]
        width = max(1, REPLAY_CHUNK_TOKENS // self.batch_size)
        outputs = []
        for position in range(0, max(len(r) for r in rows), width):
            lengths = [max(0, min(width, len(r) - position)) for r in rows]
            hidden = torch.cat([r[position:position + n] for r, n in zip(rows, lengths)])
            hashes = self._page_hashes(span.hop.node.page_size, [position] * self.batch_size, lengths)
            await span.send(hidden, lengths, hashes)
            outputs.append((lengths, (await span.receive(sum(lengths)))[0]))
        return outputs

    def step(self, hidden: torch.Tensor, new_lengths: list[int] | None = None,
             token_ids: list[list[int]] | None = None) -> torch.Tensor:
        """Run hidden [batch, T, hidden_size] through every block; returns the same shape.

        new_lengths[i] says how many of row i's last positions are new tokens (default: all T); the
        other positions are padding and come back as zeros. token_ids[i] are row i's new tokens: with them
        nodes can share KV pages between sessions with a common prefix (the ids themselves are not sent).
        """
        return run_coroutine(self.astep(hidden, new_lengths, token_ids))

    async def astep(self, hidden: torch.Tensor, new_lengths: list[int] | None = None,
                    token_ids: list[list[int]] | None = None) -> torch.Tensor:
        """step() for coroutines on the client's event loop (client.remote.run_coroutine): many sessions can
        step concurrently from one thread, without threads contending for the GIL."""
        if self.closed:
            raise RuntimeError("the inference session is closed")
        batch, width, _ = hidden.shape
        if batch != self.batch_size:
            raise ValueError(f"this session holds {self.batch_size} sequences, got a batch of {batch}")
        new_lengths = list(new_lengths) if new_lengths is not None else [width] * batch
        for i, n in enumerate(new_lengths):
            if self.lengths[i] + n > self.max_length:
                raise ValueError(f"sequence {i} would reach {self.lengths[i] + n} tokens, beyond the session's "
                                 f"max_length {self.max_length}")
        padded = any(n != width for n in new_lengths)
        if padded:
            packed = torch.cat([hidden[i, width - n:] for i, n in enumerate(new_lengths)])
        else:  # every position is new (decode steps): the rows are packed already
            packed = hidden.reshape(batch * width, -1)
        packed = packed.to("cpu", copy=True)  # a copy on the host: sent from there, and kept there for replay
        self._add_tokens(token_ids)
        out = await self._step(packed, new_lengths)
        if hidden.is_cuda:  # from pinned memory the copy queues behind the device's work instead of waiting for it
            out = out.pin_memory()
        out = out.to(hidden.device, hidden.dtype, non_blocking=True)
        for i, n in enumerate(new_lengths):
            self.lengths[i] += n
        await self._move_off_draining_nodes()
        if not padded:
            return out.view(batch, width, -1)  # ~1 µs a step, view(hidden.shape) ~2.6 (a torch.Size argument)
        result = torch.zeros_like(hidden)
        offset = 0
        for i, n in enumerate(new_lengths):
            result[i, width - n:] = out[offset:offset + n]
            offset += n
        return result

    async def _step(self, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        index = 0
        while True:
            try:
                return await self._run_from(index, hidden, lengths)
            except SpanFailure as failure:
                if not failed(failure.cause):
                    raise failure.cause from None
                began = time.monotonic()
                broken = self.spans[failure.index]
                logger.warning("node %s failed (%r); moving blocks %d:%d", broken.hop.node.label, failure.cause,
                               broken.hop.start, broken.hop.end)
                if not await self._lost_cache_only(broken, failure.cause):
                    self.connection.ban(broken.hop.node.peer_id)
                await self._replace(failure.index, broken.inputs[:-1])  # the step's own input is sent again below
                index, hidden = failure.index, failure.hidden
                self.failovers.append(time.monotonic() - began)

    async def _lost_cache_only(self, span: SpanSession, error: BaseException) -> bool:
        """Whether the node is fine and only dropped the session (expired, restarted): it then may take the
        replay itself. A broken stream is checked with a ping."""
        if getattr(error, "code", None) in CACHE_LOST:
            return True
        if not isinstance(error, ConnectionError):
            return False
        return span.hop.node.peer_id in await self.connection.probe([span.hop.node], timeout=1.0)

    async def _run_from(self, index: int, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Run the step through spans[index:], whose first span takes hidden as input; raises SpanFailure."""
        spans = self.spans[index:]
        tokens = sum(lengths)
        starts = self.lengths
        hashes = [self._page_hashes(span.hop.node.page_size, starts, lengths) for span in spans]
        chain = [span.next_hop(span_hashes) for span, span_hashes in zip(spans, hashes)]

        async def send(offset: int, rows: torch.Tensor) -> None:
            try:
                await spans[offset].send(rows, lengths, hashes[offset], push=chain[offset + 1:] if self.push else None)
            except Exception as e:
                raise SpanFailure(index + offset, rows, e) from e

        self.alarm.clear()
        await send(0, hidden)
        # Pushed along the chain, the step comes back from every node, and only the last output, or a reply to act
        # on, wakes this task: one wake per step instead of one per node. The first node's deadline still holds.
        first_late = self.push and len(spans) > 1 and not await self._alarm(spans[0].timeout(tokens))
        for offset, span in enumerate(spans):
            try:
                hidden, pushed = await span.receive(tokens, 0.0 if first_late and offset == 0 else None)
            except Exception as e:
                raise SpanFailure(index + offset, span.inputs[-1][1], e) from e
            if offset + 1 < len(spans):
                if self.push and pushed:  # every node answers on its own stream; the others' outputs are kept
                    spans[offset + 1].inputs.append((lengths, hidden))
                else:  # no push, or the node could not reach the next one: carry its output there ourselves
                    await send(offset + 1, hidden)
        return hidden

    async def _alarm(self, timeout: float) -> bool:
        """Wait for the alarm; False if it did not go off within timeout seconds. Every step of every session waits
        here: a plain timer that sets the alarm costs it ~1 µs, asyncio.timeout ~4 (64 sessions
        waiting at once in one loop, on a 2-core host)."""
        if self.alarm.is_set():
            return True
        self.late = False
        timer = asyncio.get_running_loop().call_later(timeout, self._too_late)
        try:
            await self.alarm.wait()
        finally:
            timer.cancel()
        return not self.late

    def _too_late(self) -> None:
        self.late = True
        self.alarm.set()

    async def _replace(self, index: int, history: list[tuple[list[int], torch.Tensor]], wait: bool = True) -> None:
        """Put a new chain, with history replayed, in place of spans[index]. Without wait, missing blocks
        raise MissingBlocksError at once."""
        old = self.spans[index]
        deadline = time.monotonic() + (self.failover_deadline if wait else 0.0)
        self.spans[index:index + 1] = await self._open_chain(old.hop.start, old.hop.end, deadline, history)
        await old.close()

    async def _move_off_draining_nodes(self) -> None:
        """Move the parts of the session on nodes that are leaving, while they still serve it."""
        for index in reversed(range(len(self.spans))):
            span = self.spans[index]
            if span.draining:
                began = time.monotonic()
                self.connection.ban(span.hop.node.peer_id)
                try:
                    await self._replace(index, span.inputs, wait=False)
                except Exception as e:
                    if not (isinstance(e, RoutingError) or failed(e)):
                        raise
                    # nowhere to go yet: stay while it still serves, and try again after the next step
                    logger.info("node %s is leaving, but moving failed (%r); staying for now", span.hop.node.label, e)
                    continue
                logger.info("node %s is leaving; moved blocks %d:%d", span.hop.node.label, span.hop.start,
                            span.hop.end)
                self.failovers.append(time.monotonic() - began)

    def _add_tokens(self, token_ids: list[list[int]] | None) -> None:
        if token_ids is None or self.tokens is None:
            self.tokens = None
        else:
            for tokens, new in zip(self.tokens, token_ids):
                tokens.extend(new)

    def _page_hashes(self, page_size: int, starts: list[int], lengths: list[int]) -> list[list[bytes]] | None:
        """Per sequence, the token-hash chain links of the full pages that rows [start, start + length) complete."""
        if self.tokens is None:
            return None
        chains = self.page_chains.setdefault(page_size, [[] for _ in range(self.batch_size)])
        completed = []
        for tokens, chain, start, n in zip(self.tokens, chains, starts, lengths):
            for page in range(len(chain), len(tokens) // page_size):
                chain.append(protocol.page_hash(chain[-1] if chain else b"",
                                                tokens[page * page_size:(page + 1) * page_size]))
            completed.append(chain[start // page_size:(start + n) // page_size])
        return completed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            run_coroutine(self._close())

    async def _close(self) -> None:
        await asyncio.gather(*(span.close() for span in self.spans), return_exceptions=True)
        self.spans = []
