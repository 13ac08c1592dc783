"""The node daemon: serves inference sessions over libp2p streams and announces itself in the DHT.

Peers on the same machine get the same streams over a unix socket instead (swarm/direct.py).

A client opens one stream to the node for all its sessions here (node/link.py): each starts with an ``open``
frame and ends (its pages return to the pool) when the client sends its ``close``, closes the stream, or leaves
the session idle for longer than the session timeout. A step's input comes from the client (a ``step`` frame on
that stream) or is pushed, in a frame with other sessions' steps (swarm/push.py), by the previous node of the
session's chain or by the client; either way the output goes back to the client on its stream, in a frame with
the outputs of its other sessions' steps of the same forward, and, when the step says so, straight on to the
next node. Every frame is validated before it touches the cache; a bad frame gets an error reply and the
session stays as it was. Admission, batching across sessions and preemption are the scheduler's
(node/scheduler.py); where to serve is swarm/balancing.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import random
import signal
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from aiohttp import web
from hivemind.dht import DHT
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from node.kv_cache import PagePool
from node.limits import RequestRate
from node.link import ClientLink, ClientSession
from node.metrics import NodeCollector, serve_metrics
from node.scheduler import PRIORITIES, AdmissionError, Scheduler, Sequence, Session
from node.span import Span, block_bytes, block_cache_bytes_per_token
from node.throughput import Throughput, cached_estimate, model_identity, probe
from swarm import direct, protocol, rpc
from swarm.balancing import better_start, choose_span
from swarm.checkpoint import load_config
from swarm.dht import shutdown_dht
from swarm.direct import DirectServer
from swarm.protocol import (
    PAGE_HASH_BYTES,
    ProtocolError,
    all_finite,
    decode_tensor_async,
    error_frame,
    pack,
    read_frame,
    write_frame,
)
from swarm.identity import load_identity
from swarm.push import Pusher
from swarm.records import SOFTWARE_VERSION, NodeRecord, NodeState, SignedRecordValidator, announce, fetch_records
from swarm.relays import RELAY_OPTIONS, relayed_peer_options
from swarm.swarm_key import SwarmKey

logger = logging.getLogger(__name__)

MAX_JOIN_ROUNDS = 16  # of re-choosing a span while other nodes join at the same time
MAX_RTT_PEERS = 5  # peers serving the next blocks whose round trip a node measures and announces
MAX_CHAIN_LENGTH = 256
HELLO_TIMEOUT = 10.0  # seconds a private swarm's node waits for a new stream's proof of membership
LINGER_SECONDS = 2.0  # for a refused peer to read why before its stream closes
CPU_KV_CACHE_GB = 0.25  # a CPU node's KV cache unless --kv-cache-gb says otherwise
# Without --kv-cache-gb a GPU node's KV cache takes this share of the memory its loaded span leaves free, less a
# reserve: prefill activations (a 512-token chunk of an 8B-shaped block needs ~50 MB), the decode graphs' pools,
# torch.compile's workspace and what other processes on the GPU allocate meanwhile.
GPU_CACHE_SHARE = 0.9
GPU_RESERVE_BYTES = 2**30
SPAN_CACHE_TOKENS = 16384  # an automatically sized GPU span leaves room for at least this many tokens of cache
MAX_PUSHED_STEPS = 4096  # steps in one push frame: a forward's outputs, or a client's sessions that step together


class RequestError(ValueError):
    """A request the node refuses; the code and message go back to the client."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class NodeConfig:
    model_path: str
    model_name: str
    initial_peers: list[str]
    blocks: tuple[int, int] | None = None  # None: choose the span the swarm needs most
    num_blocks: int | None = None  # span length when choosing; None: as many as memory holds
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    kv_cache_gb: float | None = None  # None: CPU_KV_CACHE_GB on a CPU, what the span leaves free on a GPU
    page_size: int = 16
    max_length: int | None = None
    max_batch_size: int = 64
    max_batch_tokens: int = 512
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (GPU nodes)
    compile: bool = True  # torch.compile the layers that the decode graphs replay
    kv_overcommit: float = 2.0
    swap_gb: float = 0.0
    queue_timeout: float = 60.0
    max_sessions_per_peer: int = 64
    max_sessions: int = 1024  # open and queued sessions of all peers together
    # frames per second on average (bursts of twice that); an upstream node pushes every session's steps as one
    # peer, and one gateway client with 64 fast sessions sends ~2,500 steps/s: 1,000 refused those
    max_requests_per_peer: float = 10000.0
    max_queued_tokens_per_peer: int = 65536
    throughput: float | None = None  # decode tokens/s to announce instead of measuring
    balance_period: float = 120.0  # seconds between rebalancing checks (0: never move)
    balance_margin: float = 0.2  # move only if the swarm's weakest block gets this much faster
    drain_timeout: float = 60.0  # how long a leaving or moving node waits for its sessions to move or end
    join_wait: float = 2.0  # seconds to let other joining nodes' choices reach the DHT
    identity_path: str | None = None
    announce_maddrs: list[str] = field(default_factory=list)
    relay_via: list[str] = field(default_factory=list)  # relays this node is reached through (not directly)
    relay: bool = False  # relay connections for peers that are not directly reachable
    direct_streams: bool = True  # serve peers on this machine on a unix socket as well (swarm/direct.py)
    swarm_key_path: str | None = None  # a private swarm's key file
    public_name: str = ""
    session_timeout: float = 300.0
    announce_period: float = 10.0
    record_ttl: float = 30.0
    metrics_port: int | None = None  # serve Prometheus metrics at http://host:port/metrics


class Submitted(NamedTuple):
    """A step handed to the scheduler: its session, its message, the rest of its chain and its output's future."""

    served: ClientSession
    message: dict
    chain: list[dict]
    output: asyncio.Future


class Node:
    """A node daemon. It joins the DHT, takes a span (given, or chosen from the swarm's records), measures its
    throughput, serves sessions, and moves its span when that makes the swarm clearly faster."""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.model_config = load_config(config.model_path)
        self.hidden_size: int = self.model_config.hidden_size  # read per step: a config's attributes are slow
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            # graph capture, events and the probe's synchronizations use the current device: make it this one
            torch.cuda.set_device(self.device)
        self.span: Span | None = None
        self.pool: PagePool | None = None
        self.scheduler: Scheduler | None = None
        self.max_length = 0
        self.throughput = Throughput(0.0, 0.0)
        self.start, self.end = config.blocks or (0, 0)
        self.state = NodeState.JOINING
        self.rtts: dict[str, float] = {}
        self.sessions: dict[str, ClientSession] = {}  # by session id
        self.pusher: Pusher | None = None  # this node's push streams to the next nodes of its sessions' chains
        self.pushes_received: Counter[str] = Counter()  # push frames and the steps in them
        self.outputs_sent: Counter[str] = Counter()  # output frames to clients and the outputs in them
        self.direct_server: DirectServer | None = None  # this node's unix socket, where the platform has them
        self._scheduler_task: asyncio.Task | None = None
        self._expiry_task: asyncio.Task | None = None
        self._stop = asyncio.Event()  # exit now
        self._leaving = asyncio.Event()  # drain, then exit
        self.dht: DHT | None = None
        self.p2p: P2P | None = None
        self.swarm_key = SwarmKey.load(config.swarm_key_path) if config.swarm_key_path else None
        self.request_rate = RequestRate(config.max_requests_per_peer)
        self._metrics: web.AppRunner | None = None

    @property
    def peer_id(self) -> str:
        return self.dht.peer_id.to_base58()

    def record(self) -> NodeRecord:
        return NodeRecord(peer_id=self.peer_id, start=self.start, end=self.end, state=self.state,
                          num_blocks=self.model_config.num_hidden_layers, timestamp=get_dht_time(),
                          max_length=self.max_length, page_size=self.config.page_size,
                          dtype=protocol.DTYPE_NAMES[self.config.dtype], throughput=self.throughput.decode,
                          prefill_throughput=self.throughput.prefill, rtts=self.rtts,
                          relayed=bool(self.config.relay_via), public_name=self.config.public_name,
                          host=direct.HOST if self.direct_server else "", **self._load())

    async def _announce(self) -> None:
        await announce(self.dht, self.config.model_name, self.record(), self.config.record_ttl, self.swarm_key)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        # Without --identity a node is a new peer each run, with a fresh key in a temporary folder. The folder
        # goes once the DHT is up (its libp2p daemon has read the key), so a node killed later leaves no key.
        temporary = None if self.config.identity_path else tempfile.TemporaryDirectory(prefix="swarm-identity-")
        identity_path = self.config.identity_path or Path(temporary.name) / "identity.key"
        fresh = not Path(identity_path).exists()  # a new key cannot be in use by another peer: skip that check
        key = load_identity(identity_path)
        try:
            self.dht = DHT(initial_peers=self.config.initial_peers, start=True, identity_path=str(identity_path),
                           record_validators=[SignedRecordValidator(key)], check_if_identity_free=not fresh,
                           host_maddrs=[f"/ip4/{self.config.host}/tcp/{self.config.port}"],
                           announce_maddrs=self.config.announce_maddrs or None,
                           **(relayed_peer_options(self.config.relay_via) if self.config.relay_via else {}),
                           **(RELAY_OPTIONS if self.config.relay else {}))
        finally:
            if temporary is not None:
                temporary.cleanup()
        try:
            self.p2p = await self.dht.replicate_p2p()
            self.pusher = Pusher(self.p2p, self.swarm_key)
            self._expiry_task = asyncio.create_task(self._expire_idle_sessions())
            await self.p2p.add_binary_stream_handler(protocol.INFERENCE_HANDLER, self._handle_stream)
            await self.p2p.add_binary_stream_handler(protocol.PUSH_HANDLER, self._handle_push)
            if self.config.direct_streams and direct.HOST:
                self.direct_server = DirectServer({protocol.INFERENCE_HANDLER: self._serve_stream,
                                                   protocol.PUSH_HANDLER: self._serve_push})
                await self.direct_server.start()
            if self.config.metrics_port is not None:
                collector = NodeCollector(lambda: self.scheduler.stats() if self.scheduler else {}, self._metrics_info)
                self._metrics = await serve_metrics(collector, self.config.host, self.config.metrics_port)
                logger.info("metrics at http://%s:%d/metrics", self.config.host, self.config.metrics_port)
            start, end = self.config.blocks or await self._choose_span()
            await self._serve(start, end)
            try:
                maddrs = self.dht.get_visible_maddrs()
            except ValueError:  # a relayed node has no address of its own until its relay slot is reserved
                maddrs = [f"/p2p/{self.peer_id}"]
            for maddr in maddrs:
                print(f"node serving {self.config.model_name} blocks {self.start}:{self.end} at {maddr}", flush=True)
            await self._keep_announcing()
        finally:
            await self._shutdown()

    def _metrics_info(self) -> dict[str, str]:
        return {"model": self.config.model_name, "peer_id": self.peer_id, "blocks": f"{self.start}:{self.end}",
                "state": self.state.value, "version": SOFTWARE_VERSION}

    def _on_signal(self) -> None:
        """SIGTERM or SIGINT: leave gracefully; a second one: exit now."""
        if self._leaving.is_set():
            self._stop.set()
        else:
            logger.info("leaving: draining sessions for up to %.0f s (signal again to exit now)",
                        self.config.drain_timeout)
            self._leaving.set()

    async def _keep_announcing(self) -> None:
        next_balance = self._next_balance_time()
        while not self._stop.is_set():
            if self._leaving.is_set():
                await self._leave()
                return
            await self._announce()
            records = await fetch_records(self.dht, self.config.model_name, self.swarm_key)
            self.rtts = await self._measure_rtts(records)  # announced with the next refresh
            if time.monotonic() >= next_balance:
                await self._rebalance()
                next_balance = self._next_balance_time()
            wakers = [asyncio.ensure_future(event.wait()) for event in (self._stop, self._leaving)]
            await asyncio.wait(wakers, timeout=self.config.announce_period, return_when=asyncio.FIRST_COMPLETED)
            for waker in wakers:
                waker.cancel()

    def _next_balance_time(self) -> float:
        # jittered, so that nodes which see the same hole do not all move into it at once
        if not self.config.balance_period or self.config.blocks:
            return float("inf")
        return time.monotonic() + self.config.balance_period * random.uniform(0.5, 1.5)

    # ----- span choice, loading, rebalancing -----

    def _span_length(self) -> int:
        total = self.model_config.num_hidden_layers
        if self.config.num_blocks:
            return min(self.config.num_blocks, total)
        config = self.config
        per_block = block_bytes(config.model_path, config.dtype)
        if self.device.type == "cuda":
            budget = torch.cuda.mem_get_info(self.device)[0] * GPU_CACHE_SHARE - GPU_RESERVE_BYTES
            if config.kv_cache_gb is None:  # the cache gets what the span leaves: each block brings its share
                per_block += SPAN_CACHE_TOKENS * block_cache_bytes_per_token(config.model_path, config.dtype)
            else:
                budget -= config.kv_cache_gb * 2**30
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2  # leave half to the rest
            budget = (free - self._kv_cache_bytes() - config.swap_gb * 2**30) * 0.9
        fits = int(budget) // per_block
        if fits < 1:
            raise RuntimeError(f"not enough memory for one block of {config.model_name} next to its KV cache")
        return min(fits, total)

    def _kv_cache_bytes(self) -> int:
        """The KV pool's memory: --kv-cache-gb, else on a GPU the share of free memory that the loaded span leaves
        (GPU_CACHE_SHARE, less GPU_RESERVE_BYTES), else CPU_KV_CACHE_GB."""
        if self.config.kv_cache_gb is not None:
            return int(self.config.kv_cache_gb * 2**30)
        if self.device.type != "cuda":
            return int(CPU_KV_CACHE_GB * 2**30)
        torch.cuda.empty_cache()  # blocks the allocator keeps from loading count as free
        free = torch.cuda.mem_get_info(self.device)[0]
        room = int(free * GPU_CACHE_SHARE) - GPU_RESERVE_BYTES
        if room <= 0:
            raise RuntimeError(f"only {free / 2**30:.2f} GB of GPU memory is free next to blocks {self.start}:{self.end}; "
                               "serve fewer blocks or set --kv-cache-gb")
        return room

    def _estimated_throughput(self, length: int, records: list[NodeRecord]) -> float:
        """Before the span is loaded: the cached probe of this model on this device, else the swarm's median."""
        if self.config.throughput:
            return self.config.throughput
        cached = cached_estimate(model_identity(self.config.model_name, self.model_config), length, self.device,
                                 self.config.dtype)
        if cached:
            return cached
        others = sorted(r.throughput * (r.end - r.start) / length for r in records if r.throughput > 0)
        return others[len(others) // 2] if others else 1.0

    async def _choose_span(self) -> tuple[int, int]:
        """Take the span the swarm needs most. Nodes joining at the same time announce their choices as
        joining and re-choose, each seeing those that sort before it, until no choice changes."""
        length = self._span_length()
        num_blocks = self.model_config.num_hidden_layers
        previous = None
        for _ in range(MAX_JOIN_ROUNDS):
            records = await fetch_records(self.dht, self.config.model_name, self.swarm_key)
            self.throughput = Throughput(self._estimated_throughput(length, records), 0.0)
            choice = choose_span(records, num_blocks, length, self.throughput.decode, self.peer_id)
            if choice == previous:
                break
            previous, self.start, self.end = choice, choice, choice + length
            await self._announce()
            await asyncio.sleep(self.config.join_wait * random.uniform(1, 1.5))
        logger.info("chose blocks %d:%d of %d", self.start, self.end, num_blocks)
        return self.start, self.end

    async def _serve(self, start: int, end: int) -> None:
        """Load blocks [start, end), measure them and go online."""
        self.state, self.start, self.end = NodeState.JOINING, start, end
        await self._announce()
        config = self.config
        self.span = await asyncio.to_thread(Span, config.model_path, start, end, config.device, config.dtype)
        page_bytes = PagePool.page_bytes(self.span.layer_count, config.page_size, self.span.kv_heads,
                                         self.span.head_dim, config.dtype)
        num_pages = self._kv_cache_bytes() // page_bytes
        self.pool = PagePool(self.span.layer_count, num_pages, config.page_size, self.span.kv_heads,
                             self.span.head_dim, config.dtype, config.device)
        model_max = getattr(self.model_config, "max_position_embeddings", None) or 2**31
        self.max_length = min(config.max_length or model_max, model_max, num_pages * config.page_size)
        if config.cuda_graphs:
            await asyncio.to_thread(self.span.capture_graphs, self.pool, config.max_batch_size, self.max_length,
                                    config.compile)
        if config.throughput:
            self.throughput = Throughput(config.throughput, config.throughput)
        else:
            self.throughput = await asyncio.to_thread(probe, self.span, self.pool, config.model_name)
        self.scheduler = Scheduler(self.span, self.pool, max_batch_tokens=config.max_batch_tokens,
                                   max_batch_size=config.max_batch_size, overcommit=config.kv_overcommit,
                                   swap_bytes=int(config.swap_gb * 2**30), queue_timeout=config.queue_timeout)
        self._scheduler_task = asyncio.create_task(self.scheduler.run())
        # Exempt what lives as long as the span (modules, layers, the pool) from the cycle collector: a full
        # collection walked all of it, pausing the node ~0.5 s every few thousand steps. Unfrozen first, so that a
        # previous span's garbage (after rebalancing) is collected.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.state = NodeState.ONLINE
        await self._announce()
        logger.info("serving blocks %d:%d of %s at %.1f tokens/s; KV cache of %d pages x %d tokens; sessions up to "
                    "%d tokens", start, end, config.model_name, self.throughput.decode, num_pages, config.page_size,
                    self.max_length)

    async def _rebalance(self) -> None:
        records = await fetch_records(self.dht, self.config.model_name, self.swarm_key)
        me = self.record()
        target = better_start(records, self.model_config.num_hidden_layers, me, self.config.balance_margin)
        if target is None:
            return
        length = self.end - self.start
        logger.info("moving from blocks %d:%d to %d:%d makes the swarm faster: draining", self.start, self.end,
                    target, target + length)
        self.state = NodeState.DRAINING
        await self._announce()
        if not await self._drained():
            logger.warning("sessions did not end within %.0f s; staying on blocks %d:%d", self.config.drain_timeout,
                           self.start, self.end)
            self.state = NodeState.ONLINE
            await self._announce()
            return
        self._scheduler_task.cancel()
        self.span = self.pool = self.scheduler = None  # free the old span before loading the new one
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        await self._serve(target, target + length)

    async def _leave(self) -> None:
        """Announce draining, so clients move their sessions away (every reply tells them), and wait for that."""
        self.state = NodeState.DRAINING
        await self._announce()
        if not await self._drained():
            logger.warning("%d sessions were still open after %.0f s", len(self.sessions), self.config.drain_timeout)

    async def _drained(self) -> bool:
        """Wait until every session here has ended (new ones are refused while draining)."""
        deadline = time.monotonic() + self.config.drain_timeout
        while self.scheduler and (self.scheduler.sessions or self.scheduler.waiting):
            if time.monotonic() > deadline or self._stop.is_set():
                return False
            await asyncio.sleep(0.2)
        return True

    async def _measure_rtts(self, records: list[NodeRecord]) -> dict[str, float]:
        """Round trips to a few online peers serving the block after this span, for clients' routing."""
        following = [r for r in records if r.start <= self.end < r.end and r.peer_id != self.peer_id
                     and r.state == NodeState.ONLINE]
        following = random.sample(following, min(len(following), MAX_RTT_PEERS))
        timeout = min(5.0, self.config.announce_period)  # a dead peer must not delay the next refresh much
        rtts = await asyncio.gather(*(rpc.ping(self.p2p, r.peer_id, timeout, swarm_key=self.swarm_key)
                                      for r in following),
                                    return_exceptions=True)
        return {r.peer_id: rtt[0] for r, rtt in zip(following, rtts) if not isinstance(rtt, BaseException)}

    async def _shutdown(self) -> None:
        logger.info("shutting down")
        self.state = NodeState.OFFLINE
        for task in (self._scheduler_task, self._expiry_task):
            if task is not None:
                task.cancel()
        if self._metrics is not None:
            await self._metrics.cleanup()
        if self.direct_server is not None:
            await self.direct_server.stop()
        if self.dht is not None and self.dht.is_alive():
            try:
                await asyncio.wait_for(self._announce(), 5)
            except Exception as e:
                logger.warning("could not announce going offline: %s", e)
            shutdown_dht(self.dht)

    # ----- serving sessions -----

    async def _member(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """In a private swarm, a stream must open with a hello frame proving membership for the caller's peer id."""
        if self.swarm_key is None:
            return True
        try:
            message = protocol.unpack(await asyncio.wait_for(read_frame(reader), HELLO_TIMEOUT) or b"")
            if message["type"] == "hello" and self.swarm_key.check(peer, message.get("proof")):
                return True
        except (ProtocolError, asyncio.TimeoutError, ConnectionError):
            pass
        logger.info("refusing a stream from %s: no proof of membership in this private swarm", peer)
        await _say_last(reader, writer, error_frame("unauthorized", "this is a private swarm: open streams with a "
                                                                    "hello frame proving membership (--swarm-key)"))
        return False

    async def _handle_stream(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = stream_info.peer_id.to_base58()
        if await self._member(peer, reader, writer):
            await self._serve_stream(peer, reader, writer)

    async def _serve_stream(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve a client's stream, over libp2p or directly (swarm/direct.py): the opens, steps and closes of its
        sessions, and one-shot requests (ping, stats, direct). Its sessions end with it."""
        link = ClientLink(peer, writer, self.outputs_sent)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.config.session_timeout):  # unlike wait_for, no task per frame
                        frame = await read_frame(reader)
                except TimeoutError:
                    if link.sessions or link.opening:
                        continue  # idle sessions expire one by one (_expire_idle_sessions)
                    logger.info("closing an idle stream from %s", peer)
                    break
                if frame is None:
                    break
                message = None
                try:
                    message = protocol.unpack(frame)
                    if not self.request_rate.allow(peer):
                        raise RequestError("busy", f"more than {self.config.max_requests_per_peer:g} requests per "
                                                   "second from one peer; slow down")
                    if message["type"] == "close" and "session" not in message:
                        break
                    reply = self._answer(link, message)
                except Exception as e:
                    reply = self._error_reply(e, peer, message)
                if reply is not None:
                    await write_frame(writer, reply)
        except ProtocolError as e:  # framing is lost (oversized or truncated frame): say why, then end the stream
            logger.info("dropping the stream from %s: %s", peer, e)
            with contextlib.suppress(ConnectionError):
                await write_frame(writer, error_frame("bad_frame", str(e)))
        except ConnectionError as e:
            logger.debug("stream from %s ended: %s", peer, e)
        finally:
            link.closed = True
            for task in link.opening:
                task.cancel()
            for session_id in list(link.sessions):
                self._close_session(session_id)
            writer.close()

    def _answer(self, link: ClientLink, message: dict) -> bytes | None:
        """The reply to a frame on a client's stream, or None where it comes later (opens, steps) or never (close)."""
        kind = message["type"]
        if kind == "step":
            served = self._served(message.get("session"))
            if served is None or served.link is not link:
                raise RequestError("unknown_session", f"unknown session {message.get('session')!r}; open one first")
            # the session's lock keeps its steps in order
            asyncio.create_task(self._run_steps([(served, message, None)]))
            return None
        if kind == "open":
            task = asyncio.create_task(self._open(link, message))  # it may queue for room: the stream goes on
            link.opening.add(task)
            task.add_done_callback(link.opening.discard)
            return None
        if kind == "close":
            served = self._served(message.get("session"))
            if served is not None and served.link is link:
                self._close_session(served.session.id)
            return None
        if kind == "ping":
            return pack("pong", state=self.state.value, **self._load())
        if kind == "stats":
            return pack("stats", **(self.scheduler.stats() if self.scheduler else {}), start=self.start, end=self.end,
                        state=self.state.value, throughput=self.throughput.decode, cpu_s=time.process_time(),
                        chains=self._chains(), **self.pushes_received, **self.outputs_sent,
                        direct_streams=self.direct_server.accepted if self.direct_server else 0)
        if kind == "direct":
            handler = message.get("handler")
            if self.direct_server is None or handler not in self.direct_server.handlers:
                raise RequestError("bad_request", f"this node serves no direct streams to {handler!r}")
            return pack("direct", **self.direct_server.ticket(link.peer, handler))
        raise RequestError("bad_request", f"unknown message type {kind!r}")

    async def _open(self, link: ClientLink, message: dict) -> None:
        """Open a session on the client's stream, once there is room for it; the reply names the open's request."""
        try:
            compress = message.get("compress", False)
            if not isinstance(compress, bool):
                raise RequestError("bad_request", f"compress must be true or false, got {compress!r}")
            session = self._new_session(message, link.peer)
            queued = await self._admit(session)
            if link.closed:  # the client went away while the session queued
                self.scheduler.close(session)
                return
            self.sessions[session.id] = ClientSession(session, link, compress)
            link.sessions.add(session.id)
            reply = pack("opened", request=message.get("request"), session=session.id,
                         max_length=session.max_length, queued_s=queued)
        except Exception as e:
            reply = self._error_reply(e, link.peer, message)
        await link.send(reply)

    def _served(self, session_id: Any) -> ClientSession | None:
        return self.sessions.get(session_id) if isinstance(session_id, str) else None

    def _close_session(self, session_id: str) -> None:
        served = self.sessions.pop(session_id)
        served.link.sessions.discard(session_id)
        self.scheduler.close(served.session)
        logger.info("closed session %s; %d pages free", session_id, self.pool.free_pages)

    async def _expire_idle_sessions(self) -> None:
        """End sessions idle for longer than the session timeout; their clients learn why at their next step, and
        replay elsewhere or here."""
        timeout = self.config.session_timeout
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            now = time.monotonic()
            for session_id, served in list(self.sessions.items()):
                if now - served.last_active > timeout and not served.lock.locked():
                    logger.info("closing idle session %s of %s", session_id, served.link.peer)
                    self._close_session(session_id)
                    asyncio.create_task(served.link.send(error_frame(
                        "session_expired", f"the session was idle for more than {timeout:.0f} s; its cache is gone",
                        session=session_id)))

    @staticmethod
    def _error_reply(error: Exception, peer: str, request: Any = None) -> bytes:
        """An error frame naming the session or open request it answers, so that the client can route it."""
        ids = {key: request[key] for key in ("session", "request")
               if isinstance(request, dict) and isinstance(request.get(key), (str, int))}
        if isinstance(error, ProtocolError):
            return error_frame("bad_frame", str(error), **ids)
        if isinstance(error, RequestError):
            return error_frame(error.code, str(error), **ids)
        # a bug on our side: this request fails, the node and the session go on
        logger.error("error serving a request from %s", peer, exc_info=error)
        return error_frame("internal", f"node error: {type(error).__name__}: {error}", **ids)

    async def _handle_push(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = stream_info.peer_id.to_base58()
        if await self._member(peer, reader, writer):
            await self._serve_push(peer, reader, writer)

    async def _serve_push(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Frames of steps pushed by the previous node of sessions' chains, or by their client; each step runs as if
        its client had sent it on its stream, and its output (or error) goes to that client."""
        try:
            while (frame := await read_frame(reader)) is not None:
                try:
                    if not self.request_rate.allow(peer):
                        raise RequestError("busy", "too many push frames from one peer")
                    steps = await self._pushed_steps(protocol.unpack(frame))
                except (ProtocolError, RequestError) as e:
                    logger.info("ignoring a push from %s: %s", peer, e)
                    continue
                self.pushes_received.update(push_frames=1, pushed_steps=len(steps))
                asyncio.create_task(self._run_steps(steps))
        except (ProtocolError, ConnectionError) as e:
            logger.info("push stream from %s ended: %s", peer, e)
        finally:
            writer.close()

    async def _pushed_steps(self, message: dict) -> list[tuple[ClientSession, dict, torch.Tensor | RequestError]]:
        """The steps of a push frame, each with its session and its rows of the frame's hidden states,
        which are decoded and checked once for all of them. Steps of sessions that ended meanwhile are left out."""
        steps = message.get("steps")
        if message["type"] != "steps" or not isinstance(steps, list) or not 0 < len(steps) <= MAX_PUSHED_STEPS:
            raise RequestError("bad_request", f"a push frame must list 1 to {MAX_PUSHED_STEPS} steps")
        if not all(isinstance(step, dict) and _valid_lengths(step.get("lengths")) for step in steps):
            raise RequestError("bad_request", "each pushed step's lengths must be a list of non-negative integers")
        counts = [sum(step["lengths"]) for step in steps]
        hidden = await self._hidden(message.get("hidden"), check_finite=False)
        if hidden.shape[0] != sum(counts):
            raise RequestError("bad_tensor", f"the steps of a push frame hold {sum(counts)} rows, its hidden states "
                                             f"{hidden.shape[0]}")
        finite = all_finite(hidden)  # where not, each step checks its own rows
        known = []
        for step, rows in zip(steps, hidden.split(counts)):
            served = self._served(step.get("session"))
            if served is None:
                logger.info("ignoring a pushed step of an unknown session")
            else:
                known.append((served, step, rows if finite or all_finite(rows) else _not_finite()))
        return known

    async def _run_steps(self, steps: list[tuple[ClientSession, dict, torch.Tensor | RequestError | None]]) -> None:
        """Compute steps, push each output to the next node of its chain if asked, and send it to its client. Each
        step comes with its rows if they came decoded (pushed), or why they were refused, or None (in its message).

        The steps of a push frame run as one unit: submitted together, and the outputs of each forward pushed on
        and sent together, so the node spends one task and a few wakes of it per frame instead of per step. A step
        whose session still runs an earlier step waits for it in a unit of its own."""
        running: list[Submitted] = []
        try:
            for served, message, hidden in steps:
                if len(steps) > 1 and served.lock.locked():
                    asyncio.create_task(self._run_steps([(served, message, hidden)]))
                    continue
                await served.lock.acquire()  # at once, unless a step waits for its session's previous one
                try:
                    step = await self._submit(served, message, hidden)
                except Exception as e:
                    try:
                        await served.link.send(self._error_reply(e, served.session.peer, message))
                    finally:
                        served.lock.release()
                    continue
                running.append(step)
            while running:
                # awaited directly, this task wakes with the forward's end, before the scheduler's next forward (on a
                # CPU node that holds the loop: a wake behind it would push this forward's outputs after the next's)
                try:
                    await running[0].output
                except (Exception, asyncio.CancelledError):  # the step failed, or its session closed: answered below
                    if asyncio.current_task().cancelling():
                        raise
                done = [step for step in running if step.output.done()]
                running = [step for step in running if not step.output.done()]
                await self._answer_steps(done)
        finally:
            for step in running:
                step.served.lock.release()

    async def _submit(self, served: ClientSession, message: dict, hidden: torch.Tensor | RequestError | None
                      ) -> Submitted:
        """Check a step and hand it to the scheduler."""
        served.last_active = time.monotonic()
        session = served.session
        chain = self._push_chain(message.get("push"))
        if hidden is None:
            hidden = await self._hidden(message.get("hidden"))
        if isinstance(hidden, RequestError):
            raise hidden
        lengths = message.get("lengths")
        if not _valid_lengths(lengths) or len(lengths) != len(session.seqs):
            raise RequestError("bad_request", f"lengths must list {len(session.seqs)} non-negative integers")
        if hidden.shape[0] != sum(lengths):
            raise RequestError("bad_tensor", f"hidden states must have shape [{sum(lengths)}, {self.hidden_size}] "
                                             f"(tokens in this step, hidden size), got {list(hidden.shape)}")
        for i, (seq, n) in enumerate(zip(session.seqs, lengths)):
            if seq.received + n > session.max_length:
                raise RequestError("too_long", f"sequence {i} would reach {seq.received + n} tokens, beyond the "
                                               f"session's max_length {session.max_length}")
        page_keys = self._page_keys(session, message.get("page_hashes"), lengths)
        if self.scheduler.queued_tokens(session.peer) + sum(lengths) > self.config.max_queued_tokens_per_peer:
            raise RequestError("busy", f"a peer may have at most {self.config.max_queued_tokens_per_peer} tokens "
                                       "waiting here; retry when its steps finish")
        if sum(lengths) == 0:
            output = asyncio.get_running_loop().create_future()
            output.set_result(hidden)
        else:
            output = self.scheduler.submit(session, hidden, lengths, page_keys)
        return Submitted(served, message, chain, output)

    async def _answer_steps(self, steps: list[Submitted]) -> None:
        """Push the outputs of finished steps on, then send them (or the steps' errors) to their clients, and let
        their sessions step again."""
        try:
            outputs = []
            for served, message, chain, future in steps:
                if future.cancelled():  # the session closed
                    continue
                if future.exception() is not None:
                    await served.link.send(self._error_reply(future.exception(), served.session.peer, message))
                    continue
                out = future.result()
                push = (self.pusher.push(chain[0], out, message["lengths"], chain[1:], served.compress) if chain
                        else None)
                outputs.append((served, chain, out, push))
            sent = []
            for served, chain, out, push in outputs:
                pushed = push is not None and await push  # the first waits: the pushes of a forward share frames
                if pushed:
                    served.next_hop = (chain[0]["peer"], chain[0]["session"])
                sent.append(served.link.send_output(served.session.id, out, pushed, served.compress,
                                                    self.state == NodeState.DRAINING))
            for output in sent:
                await output
        finally:
            for step in steps:
                step.served.lock.release()

    @staticmethod
    def _push_chain(chain: Any) -> list[dict]:
        """The rest of the session's chain, in order: where this step's output goes next."""
        if chain is None:
            return []
        if not isinstance(chain, list) or len(chain) > MAX_CHAIN_LENGTH or not all(
                isinstance(hop, dict) and isinstance(hop.get("peer"), str) and isinstance(hop.get("session"), str)
                and hop.get("dtype") in protocol.DTYPES for hop in chain):
            raise RequestError("bad_request", f"push must list up to {MAX_CHAIN_LENGTH} maps of peer, session and "
                                              "dtype")
        return chain

    def _load(self) -> dict[str, int]:
        """Sessions open and queued, and free cache pages: what clients route by (records and pings)."""
        if self.scheduler is None:
            return {"sessions": 0, "queued": 0, "free_pages": 0}
        return {"sessions": len(self.scheduler.sessions), "queued": len(self.scheduler.waiting),
                "free_pages": self.pool.free_pages}

    def _chains(self) -> list[dict]:
        """Each session here and where its outputs go, under digests of the session ids: the ids themselves let
        anyone push steps into a session, so they are never shown."""
        return [{"session": _digest(session_id), "client": served.session.peer, "start": served.session.start,
                 "end": served.session.end,
                 "next": None if served.next_hop is None else {"peer": served.next_hop[0],
                                                                "session": _digest(served.next_hop[1])}}
                for session_id, served in self.sessions.items()]

    def _new_session(self, message: dict, peer: str) -> Session:
        if self.state != NodeState.ONLINE:
            raise RequestError("unavailable", f"node is {self.state.value}")
        max_length, batch_size = message.get("max_length"), message.get("batch_size", 1)
        start, end = message.get("start", self.start), message.get("end", self.end)
        for name, value in (("max_length", max_length), ("batch_size", batch_size), ("start", start), ("end", end)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise RequestError("bad_request", f"{name} must be an integer, got {value!r}")
        if not self.start <= start < end <= self.end:
            raise RequestError("bad_request", f"blocks {start}:{end} are not within this node's span "
                                              f"{self.start}:{self.end}")
        if not 1 <= max_length <= self.max_length:
            raise RequestError("too_long", f"max_length {max_length} is outside what this node accepts (1..{self.max_length})")
        if not 1 <= batch_size <= self.config.max_batch_size:
            raise RequestError("bad_request", f"batch_size must be within 1..{self.config.max_batch_size}")
        priority = message.get("priority", PRIORITIES[0])
        if priority not in PRIORITIES:
            raise RequestError("bad_request", f"priority must be one of {PRIORITIES}, got {priority!r}")
        load = self._load()
        if load["sessions"] + load["queued"] >= self.config.max_sessions:
            raise RequestError("busy", f"this node holds its maximum of {self.config.max_sessions} sessions")
        if self.scheduler.sessions_of(peer) >= self.config.max_sessions_per_peer:
            raise RequestError("busy", f"a peer may hold at most {self.config.max_sessions_per_peer} sessions here")
        return Session(uuid.uuid4().hex, peer, start, end, max_length, PRIORITIES.index(priority),
                       [Sequence() for _ in range(batch_size)])

    async def _admit(self, session: Session) -> float:
        try:
            queued = await self.scheduler.admit(session)
        except AdmissionError as e:
            raise RequestError("no_room", str(e)) from None
        except BaseException:  # cancelled: the client's stream ended while the session queued
            self.scheduler.close(session)
            raise
        logger.info("opened session %s for %s: blocks %d:%d, %d x %d tokens, %s, queued %.2f s", session.id,
                    session.peer, session.start, session.end, len(session.seqs), session.max_length,
                    PRIORITIES[session.priority], queued)
        return queued

    async def _hidden(self, obj: Any, check_finite: bool = True) -> torch.Tensor:
        """Hidden states from a frame: decoded, of the node's dtype and hidden size, and (if check_finite) free of
        NaN and infinity."""
        hidden = await decode_tensor_async(obj)
        if hidden.dtype != self.config.dtype:
            raise RequestError("bad_tensor", f"hidden states must be {protocol.DTYPE_NAMES[self.config.dtype]}, got "
                                             f"{protocol.DTYPE_NAMES[hidden.dtype]}")
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise RequestError("bad_tensor", f"hidden states must have shape [tokens, {self.hidden_size}] (tokens in "
                                             f"this step, hidden size), got {list(hidden.shape)}")
        if check_finite and not all_finite(hidden):
            raise _not_finite()
        return hidden

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


def _not_finite() -> RequestError:
    return RequestError("bad_tensor", "hidden states contain NaN or infinity")


def _valid_lengths(lengths: Any) -> bool:
    return isinstance(lengths, list) and all(type(n) is int and n >= 0 for n in lengths)


def _digest(session_id: str) -> str:
    return hashlib.blake2b(session_id.encode(), digest_size=6).hexdigest()


async def _say_last(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frame: bytes) -> None:
    """Write a stream's last frame and close it once the peer has closed its side (or after a moment): closing
    at once can reset the stream before the frame reaches the peer."""
    async def drain_until_closed() -> None:
        while await reader.read(65536):
            pass

    with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
        await write_frame(writer, frame)
        await asyncio.wait_for(drain_until_closed(), LINGER_SECONDS)
    writer.close()
