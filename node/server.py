"""The node daemon: serves inference sessions over libp2p streams and announces itself in the DHT.

One stream is one session: the client opens it with an ``open`` frame, sends ``step`` frames of hidden
states, and the session ends (its pages return to the pool) when the client closes the stream, sends
``close``, or sends nothing for longer than the session timeout. Every frame is validated before it touches
the cache; a bad frame gets an error reply and the session stays as it was. Admission, batching across
sessions and preemption are the scheduler's (node/scheduler.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.dht import DHT
from hivemind.p2p import P2P

from node.kv_cache import PagePool
from node.scheduler import PRIORITIES, AdmissionError, Scheduler, Sequence, Session
from node.span import Span
from swarm import protocol
from swarm.protocol import (
    PAGE_HASH_BYTES,
    ProtocolError,
    decode_tensor,
    encode_tensor,
    error_frame,
    pack,
    read_frame,
    write_frame,
)
from swarm.records import NodeRecord, NodeState, announce

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the node refuses; the code and message go back to the client."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class NodeConfig:
    model_path: str
    model_name: str
    start: int
    end: int
    initial_peers: list[str]
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    kv_cache_gb: float = 0.25
    page_size: int = 16
    max_length: int | None = None
    max_batch_size: int = 64
    max_batch_tokens: int = 512
    kv_overcommit: float = 2.0
    swap_gb: float = 0.0
    queue_timeout: float = 60.0
    max_sessions_per_peer: int = 64
    max_queued_tokens_per_peer: int = 65536
    identity_path: str | None = None
    session_timeout: float = 300.0
    announce_period: float = 10.0
    record_ttl: float = 30.0


class Node:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.span = Span(config.model_path, config.start, config.end, config.device, config.dtype)
        page_bytes = PagePool.page_bytes(self.span.layer_count, config.page_size, self.span.kv_heads,
                                         self.span.head_dim, config.dtype)
        num_pages = int(config.kv_cache_gb * 2**30) // page_bytes
        self.pool = PagePool(self.span.layer_count, num_pages, config.page_size, self.span.kv_heads,
                             self.span.head_dim, config.dtype, config.device)
        model_max = getattr(self.span.config, "max_position_embeddings", None) or 2**31
        self.max_length = min(config.max_length or model_max, model_max, num_pages * config.page_size)
        self.hidden_size = self.span.config.hidden_size
        on_cpu = self.span.device.type == "cpu"
        self._compute = None if on_cpu else ThreadPoolExecutor(max_workers=1, thread_name_prefix="span")
        self.scheduler = Scheduler(self.span, self.pool, self._compute, max_batch_tokens=config.max_batch_tokens,
                                   max_batch_size=config.max_batch_size, overcommit=config.kv_overcommit,
                                   swap_bytes=int(config.swap_gb * 2**30), queue_timeout=config.queue_timeout)
        self.state = NodeState.JOINING
        self._stop = asyncio.Event()
        self.dht: DHT | None = None
        self.p2p: P2P | None = None
        logger.info("loaded blocks %d:%d of %s; KV cache of %d pages x %d tokens; sessions up to %d tokens",
                    config.start, config.end, config.model_name, num_pages, config.page_size, self.max_length)

    def record(self) -> NodeRecord:
        return NodeRecord(peer_id=self.dht.peer_id.to_base58(), start=self.config.start, end=self.config.end,
                          state=self.state, max_length=self.max_length, free_pages=self.pool.free_pages,
                          page_size=self.config.page_size, dtype=protocol.DTYPE_NAMES[self.config.dtype])

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        scheduler = asyncio.create_task(self.scheduler.run())
        self.dht = DHT(initial_peers=self.config.initial_peers, start=True, identity_path=self.config.identity_path,
                       host_maddrs=[f"/ip4/{self.config.host}/tcp/{self.config.port}"])
        try:
            self.p2p = await self.dht.replicate_p2p()
            await self.p2p.add_binary_stream_handler(protocol.INFERENCE_HANDLER, self._handle_stream)
            await announce(self.dht, self.config.model_name, self.record(), self.config.record_ttl)
            self.state = NodeState.ONLINE
            for maddr in self.dht.get_visible_maddrs():
                print(f"node serving {self.config.model_name} blocks {self.config.start}:{self.config.end} at {maddr}",
                      flush=True)
            while not self._stop.is_set():
                await announce(self.dht, self.config.model_name, self.record(), self.config.record_ttl)
                try:
                    await asyncio.wait_for(self._stop.wait(), self.config.announce_period)
                except asyncio.TimeoutError:
                    pass
        finally:
            scheduler.cancel()
            await self._shutdown()

    async def _shutdown(self) -> None:
        logger.info("shutting down")
        self.state = NodeState.OFFLINE
        if self.dht is not None and self.dht.is_alive():
            try:
                await asyncio.wait_for(announce(self.dht, self.config.model_name, self.record(), self.config.record_ttl), 5)
            except Exception as e:
                logger.warning("could not announce going offline: %s", e)
            self.dht.shutdown()
        if self._compute is not None:
            self._compute.shutdown(wait=False, cancel_futures=True)

    async def _handle_stream(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = stream_info.peer_id.to_base58()
        session = None
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(read_frame(reader), self.config.session_timeout)
                except asyncio.TimeoutError:
                    logger.info("closing an idle stream from %s", peer)
                    break
                if frame is None:
                    break
                try:
                    message = protocol.unpack(frame)
                    if message["type"] == "open":
                        if session is not None:
                            raise RequestError("bad_request", "this stream already has an open session")
                        session = self._new_session(message, peer)
                        queued = await self._admit(session)
                        reply = pack("opened", session=session.id, max_length=session.max_length, queued_s=queued)
                    elif message["type"] == "step":
                        reply = await self._step(session, message, peer)
                    elif message["type"] == "stats":
                        reply = pack("stats", **self.scheduler.stats())
                    elif message["type"] == "close":
                        break
                    else:
                        raise RequestError("bad_request", f"unknown message type {message['type']!r}")
                except ProtocolError as e:
                    reply = error_frame("bad_frame", str(e))
                except RequestError as e:
                    reply = error_frame(e.code, str(e))
                except Exception as e:  # a bug on our side: this request fails, the node and the session go on
                    logger.exception("error serving a request from %s", peer)
                    reply = error_frame("internal", f"node error: {type(e).__name__}: {e}")
                await write_frame(writer, reply)
        except ProtocolError as e:  # framing is lost (oversized or truncated frame): say why, then end the stream
            logger.info("dropping the stream from %s: %s", peer, e)
            with contextlib.suppress(ConnectionError):
                await write_frame(writer, error_frame("bad_frame", str(e)))
        except ConnectionError as e:
            logger.debug("stream from %s ended: %s", peer, e)
        finally:
            if session is not None:
                self.scheduler.close(session)
                logger.info("closed session %s; %d pages free", session.id, self.pool.free_pages)
            writer.close()

    def _new_session(self, message: dict, peer: str) -> Session:
        if self.state != NodeState.ONLINE:
            raise RequestError("unavailable", f"node is {self.state.value}")
        max_length, batch_size = message.get("max_length"), message.get("batch_size", 1)
        start, end = message.get("start", self.config.start), message.get("end", self.config.end)
        for name, value in (("max_length", max_length), ("batch_size", batch_size), ("start", start), ("end", end)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise RequestError("bad_request", f"{name} must be an integer, got {value!r}")
        if not self.config.start <= start < end <= self.config.end:
            raise RequestError("bad_request", f"blocks {start}:{end} are not within this node's span "
                                              f"{self.config.start}:{self.config.end}")
        if not 1 <= max_length <= self.max_length:
            raise RequestError("too_long", f"max_length {max_length} is outside what this node accepts (1..{self.max_length})")
        if not 1 <= batch_size <= self.config.max_batch_size:
            raise RequestError("bad_request", f"batch_size must be within 1..{self.config.max_batch_size}")
        priority = message.get("priority", PRIORITIES[0])
        if priority not in PRIORITIES:
            raise RequestError("bad_request", f"priority must be one of {PRIORITIES}, got {priority!r}")
        if self.scheduler.sessions_of(peer) >= self.config.max_sessions_per_peer:
            raise RequestError("busy", f"a peer may hold at most {self.config.max_sessions_per_peer} sessions here")
        return Session(uuid.uuid4().hex, peer, start, end, max_length, PRIORITIES.index(priority),
                       [Sequence() for _ in range(batch_size)])

    async def _admit(self, session: Session) -> float:
        try:
            queued = await self.scheduler.admit(session)
        except AdmissionError as e:
            raise RequestError("no_room", str(e)) from None
        logger.info("opened session %s for %s: blocks %d:%d, %d x %d tokens, %s, queued %.2f s", session.id,
                    session.peer, session.start, session.end, len(session.seqs), session.max_length,
                    PRIORITIES[session.priority], queued)
        return queued

    async def _step(self, session: Session | None, message: dict, peer: str) -> bytes:
        if session is None or message.get("session") != session.id:
            raise RequestError("unknown_session", f"unknown session {message.get('session')!r}; open one first")
        lengths = message.get("lengths")
        if (not isinstance(lengths, list) or len(lengths) != len(session.seqs)
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths)):
            raise RequestError("bad_request", f"lengths must list {len(session.seqs)} non-negative integers")
        hidden = decode_tensor(message.get("hidden"))
        expected_dtype = protocol.DTYPE_NAMES[self.config.dtype]
        if message["hidden"]["dtype"] != expected_dtype:
            raise RequestError("bad_tensor", f"hidden states must be {expected_dtype}, got {message['hidden']['dtype']}")
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size or hidden.shape[0] != sum(lengths):
            raise RequestError("bad_tensor", f"hidden states must have shape [{sum(lengths)}, {self.hidden_size}] "
                                             f"(tokens in this step, hidden size), got {list(hidden.shape)}")
        for i, (seq, n) in enumerate(zip(session.seqs, lengths)):
            if seq.received + n > session.max_length:
                raise RequestError("too_long", f"sequence {i} would reach {seq.received + n} tokens, beyond the "
                                               f"session's max_length {session.max_length}")
        page_keys = self._page_keys(session, message.get("page_hashes"), lengths)
        if not torch.isfinite(hidden).all():
            raise RequestError("bad_tensor", "hidden states contain NaN or infinity")
        if self.scheduler.pending_tokens(peer) + sum(lengths) > self.config.max_queued_tokens_per_peer:
            raise RequestError("busy", f"a peer may have at most {self.config.max_queued_tokens_per_peer} tokens "
                                       "waiting here; retry when its steps finish")
        if sum(lengths) == 0:
            return pack("output", session=session.id, hidden=encode_tensor(hidden))
        out = await self.scheduler.submit(session, hidden, lengths, page_keys)
        return pack("output", session=session.id, hidden=encode_tensor(out))

    def _page_keys(self, session: Session, page_hashes: Any, lengths: list[int]) -> list[list[bytes]] | None:
        """Check the token-hash chain of the pages each sequence completes in this step (None: not sent)."""
        if page_hashes is None:
            return None
        page_size = self.pool.page_size
        if not isinstance(page_hashes, list) or len(page_hashes) != len(session.seqs):
            raise RequestError("bad_request", f"page_hashes must list {len(session.seqs)} lists of hashes")
        for i, (seq, n, hashes) in enumerate(zip(session.seqs, lengths, page_hashes)):
            completed = (seq.received + n) // page_size - seq.received // page_size
            if (not isinstance(hashes, list) or len(hashes) != completed
                    or not all(isinstance(h, bytes) and len(h) == PAGE_HASH_BYTES for h in hashes)):
                raise RequestError("bad_request", f"page_hashes[{i}] must list {completed} hashes of "
                                                  f"{PAGE_HASH_BYTES} bytes, one per page of {page_size} tokens "
                                                  "this step completes")
        return page_hashes
