"""Inference sessions: a chain of node spans that keeps the KV cache of a batch of sequences."""

from __future__ import annotations

import asyncio
import logging

import torch

from client.remote import SwarmConnection, run_coroutine
from swarm import protocol
from swarm.protocol import decode_tensor, encode_tensor, pack, read_frame, write_frame
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
        reply = await read_frame(self.reader)
        if reply is None:
            raise ConnectionError(f"node {self.hop.node.peer_id} closed the stream")
        message = protocol.unpack(reply)
        if message["type"] == "error":
            raise NodeError(self.hop.node.peer_id, message.get("code", "error"), message.get("message", ""))
        return message

    async def step(self, hidden: torch.Tensor, lengths: list[int],
                   page_hashes: list[list[bytes]] | None = None) -> torch.Tensor:
        reply = await self._request(pack("step", session=self.session_id, lengths=lengths, page_hashes=page_hashes,
                                         hidden=encode_tensor(hidden.to(self.wire_dtype))))
        return decode_tensor(reply["hidden"])

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
    interactive sessions first and preempt this one before them.
    """

    def __init__(self, connection: SwarmConnection, model_name: str, num_blocks: int, max_length: int,
                 batch_size: int = 1, priority: str = "interactive"):
        self.connection, self.model_name, self.num_blocks = connection, model_name, num_blocks
        self.max_length, self.batch_size, self.priority = max_length, batch_size, priority
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
        route = plan_route(self.model_name, records, self.num_blocks, self.max_length)
        logger.info("route: %s", " -> ".join(f"{hop.node.peer_id[-6:]}[{hop.start}:{hop.end}]" for hop in route))
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
        for span in self.spans:
            hashes = page_hashes[span.hop.node.page_size] if page_hashes is not None else None
            hidden = await span.step(hidden, lengths, hashes)
        return hidden

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            run_coroutine(self._close())

    async def _close(self) -> None:
        await asyncio.gather(*(span.close() for span in self.spans), return_exceptions=True)
        self.spans = []
