"""Inference sessions: a chain of node spans that keeps the KV cache of a batch of sequences."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

import torch

from client.remote import SwarmConnection, run_coroutine
from swarm import protocol
from swarm.protocol import decode_tensor, encode_tensor, pack, read_frame, write_frame
from swarm.records import NodeState
from swarm.routing import Hop, RoutingError, plan_route

logger = logging.getLogger(__name__)


class NodeError(RuntimeError):
    """A node refused a request; code says why (bad_request, too_long, no_room, unknown_session, ...)."""

    def __init__(self, peer_id: str, code: str, message: str):
        super().__init__(f"node {peer_id[-8:]} refused: {message} [{code}]")
        self.peer_id, self.code = peer_id, code


class SpanSession:
    """One node's part of a session: an open stream that carries steps through blocks [hop.start, hop.end)."""

    def __init__(self, hop: Hop, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.hop, self.reader, self.writer = hop, reader, writer
        self.session_id: str | None = None
        self.queued_s = 0.0  # how long the node kept the session waiting for KV cache room
        self.wire_dtype = protocol.DTYPES[hop.node.dtype]
        # every step's (lengths, input rows), whether the client sent them or the previous node pushed them:
        # what a replacement node would have to replay
        self.inputs: list[tuple[list[int], torch.Tensor]] = []

    @classmethod
    async def open(cls, connection: SwarmConnection, hop: Hop, max_length: int, batch_size: int,
                   priority: str = "interactive") -> SpanSession:
        reader, writer = await connection.open_stream(hop.node.peer_id, protocol.INFERENCE_HANDLER)
        span = cls(hop, reader, writer)
        reply = await span._request(pack("open", max_length=max_length, batch_size=batch_size, start=hop.start,
                                         end=hop.end, priority=priority))
        span.session_id, span.queued_s = reply["session"], reply.get("queued_s", 0.0)
        if span.queued_s > 1:
            logger.info("node %s queued the session %.1f s for KV cache room", hop.node.peer_id[-6:], span.queued_s)
        return span

    async def _request(self, frame: bytes) -> dict:
        await write_frame(self.writer, frame)
        return await self._reply()

    async def _reply(self) -> dict:
        reply = await read_frame(self.reader)
        if reply is None:
            raise ConnectionError(f"node {self.hop.node.peer_id} closed the stream")
        message = protocol.unpack(reply)
        if message["type"] == "error":
            raise NodeError(self.hop.node.peer_id, message.get("code", "error"), message.get("message", ""))
        return message

    def next_hop(self, page_hashes: list[list[bytes]] | None) -> dict:
        """Where a previous node pushes this span's input."""
        return {"peer": self.hop.node.peer_id, "session": self.session_id, "page_hashes": page_hashes,
                "dtype": self.hop.node.dtype}

    async def send(self, hidden: torch.Tensor, lengths: list[int], page_hashes: list[list[bytes]] | None = None,
                   push: list[dict] | None = None) -> None:
        """Send a step; with push, the node sends its output on to push[0], which sends it on to push[1]..."""
        self.inputs.append((lengths, hidden))
        await write_frame(self.writer, pack("step", session=self.session_id, lengths=lengths, page_hashes=page_hashes,
                                            hidden=encode_tensor(hidden.to(self.wire_dtype)), push=push))

    async def receive(self) -> tuple[torch.Tensor, bool]:
        """The output of this span's next step, and whether the node pushed it on to the next node."""
        reply = await self._reply()
        return decode_tensor(reply["hidden"]), reply.get("pushed", False)

    async def step(self, hidden: torch.Tensor, lengths: list[int],
                   page_hashes: list[list[bytes]] | None = None) -> torch.Tensor:
        await self.send(hidden, lengths, page_hashes)
        return (await self.receive())[0]

    async def close(self) -> None:
        try:
            await write_frame(self.writer, pack("close"))
        except (ConnectionError, OSError):
            pass
        self.writer.close()


class InferenceSession:
    """Keeps the KV cache of batch_size sequences of up to max_length tokens along a chain of nodes.

    Use as a context manager; ``step`` sends hidden states after the embeddings and returns them before
    the final norm. ``lengths`` counts the tokens each sequence holds. priority "batch" lets nodes serve
    interactive sessions first and preempt this one before them. The chain is the one of least expected
    latency (swarm/routing.py) among allowed_nodes (all, if None) less blocked_nodes (peer ids). With push,
    each node sends its output straight to the next one and the client waits only for the last; without it,
    the client carries every hop's output itself.
    """

    def __init__(self, connection: SwarmConnection, model_name: str, num_blocks: int, max_length: int,
                 batch_size: int = 1, priority: str = "interactive", *, push: bool = True,
                 allowed_nodes: Collection[str] | None = None, blocked_nodes: Collection[str] = ()):
        self.connection, self.model_name, self.num_blocks = connection, model_name, num_blocks
        self.max_length, self.batch_size, self.priority = max_length, batch_size, priority
        self.push, self.allowed_nodes, self.blocked_nodes = push, allowed_nodes, set(blocked_nodes)
        self.lengths = [0] * batch_size
        # token ids and their page-hash chains, per page size, so nodes can share cache pages of equal prefixes;
        # None once a step came without token ids
        self.tokens: list[list[int]] | None = [[] for _ in range(batch_size)]
        self.page_chains: dict[int, list[list[bytes]]] = {}
        self.spans: list[SpanSession] = []
        self.closed = False

    def __enter__(self) -> InferenceSession:
        run_coroutine(self._open())
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def _open(self) -> None:
        records = await self.connection.records(self.model_name)
        if not records:
            raise RoutingError(f"no node announces model {self.model_name!r}: the name is unknown to the swarm "
                               "or all its nodes are offline")
        candidates = [r for r in records if r.state == NodeState.ONLINE and r.peer_id not in self.blocked_nodes
                      and (self.allowed_nodes is None or r.peer_id in self.allowed_nodes)]
        probes = await self.connection.probe(candidates)
        route = plan_route(self.model_name, candidates, self.num_blocks, self.max_length, probes=probes)
        logger.info("route: %s", " -> ".join(f"{hop.node.label}[{hop.start}:{hop.end}]" for hop in route))
        try:
            for hop in route:
                self.spans.append(await SpanSession.open(self.connection, hop, self.max_length, self.batch_size,
                                                         self.priority))
        except BaseException:
            await self._close()
            raise

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
        packed = torch.cat([hidden[i, width - n:] for i, n in enumerate(new_lengths)])
        page_hashes = self._extend_page_chains(token_ids)
        out = (await self._step(packed, new_lengths, page_hashes)).to(hidden.dtype)
        result = torch.zeros_like(hidden)
        offset = 0
        for i, n in enumerate(new_lengths):
            result[i, width - n:] = out[offset:offset + n]
            offset += n
            self.lengths[i] += n
        return result

    def _extend_page_chains(self, token_ids: list[list[int]] | None) -> dict[int, list[list[bytes]]] | None:
        """Add the step's tokens; returns, per page size, the hashes of the pages each row completes."""
        if token_ids is None or self.tokens is None:
            self.tokens = None
            return None
        for tokens, new in zip(self.tokens, token_ids):
            tokens.extend(new)
        completed = {}
        for page_size in {span.hop.node.page_size for span in self.spans}:
            chains = self.page_chains.setdefault(page_size, [[] for _ in range(self.batch_size)])
            completed[page_size] = []
            for tokens, new, chain in zip(self.tokens, token_ids, chains):
                for page in range(len(chain), len(tokens) // page_size):
                    chain.append(protocol.page_hash(chain[-1] if chain else b"",
                                                    tokens[page * page_size:(page + 1) * page_size]))
                completed[page_size].append(chain[(len(tokens) - len(new)) // page_size:len(tokens) // page_size])
        return completed

    async def _step(self, hidden: torch.Tensor, lengths: list[int],
                    page_hashes: dict[int, list[list[bytes]]] | None) -> torch.Tensor:
        hashes = [page_hashes[span.hop.node.page_size] if page_hashes is not None else None for span in self.spans]
        if not self.push:
            for span, span_hashes in zip(self.spans, hashes):
                hidden = await span.step(hidden, lengths, span_hashes)
            return hidden
        chain = [span.next_hop(span_hashes) for span, span_hashes in zip(self.spans, hashes)]
        await self.spans[0].send(hidden, lengths, hashes[0], push=chain[1:])
        for i, span in enumerate(self.spans):
            # every node answers on its own stream; the last answer is the result, the others are kept for replay
            hidden, pushed = await span.receive()
            if i + 1 < len(self.spans):
                following = self.spans[i + 1]
                if pushed:
                    following.inputs.append((lengths, hidden))
                else:  # the node could not reach the next one: carry its output there ourselves
                    await following.send(hidden, lengths, hashes[i + 1], push=chain[i + 2:])
        return hidden

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            run_coroutine(self._close())

    async def _close(self) -> None:
        await asyncio.gather(*(span.close() for span in self.spans), return_exceptions=True)
        self.spans = []
