"""The client's connection to the swarm: a client-mode DHT peer and its libp2p daemon.

The client's networking runs on one background uvloop event loop per process; synchronous callers such as
``generate`` (from any number of threads) wait on coroutines submitted to it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import uvloop
from hivemind.dht import DHT
from hivemind.p2p import P2P

from client.link import NodeLink
from swarm import protocol, rpc
from swarm.dht import shutdown_dht
from swarm.heap import keep_freed_memory
from swarm.protocol import pack
from swarm.push import Pusher
from swarm.records import NodeRecord, SignedRecordValidator, fetch_models, fetch_records
from swarm.routing import Probe
from swarm.swarm_key import SwarmKey

T = TypeVar("T")
logger = logging.getLogger(__name__)

BAN_SECONDS, MAX_BAN_SECONDS = 5.0, 300.0


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()
_heap_frozen = False


def _client_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = uvloop.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="swarm-client-loop", daemon=True).start()
    return _loop


def _settle_heap() -> None:
    """Collect cyclic garbage before a connection, whose DHT process hivemind forks: garbage left here would be
    collected in the child, where freeing a CUDA tensor or event aborts it (seen after a failed test's traceback
    let go of a GPU model).

    Then exempt what is alive at the first connection (modules, the model's weights) from the cycle collector: a
    full collection walked all of it, pausing every session ~0.5 s every few thousand steps. Once per process, so
    that objects of the application's later life stay collectable; acyclic garbage is freed by reference counting.
    """
    global _heap_frozen
    gc.collect()
    if not _heap_frozen:
        _heap_frozen = True
        gc.freeze()


# Threads for forwards whose decoder stack waits on the client's event loop (client/batching.py, prefill steps).
# Not the loop's default executor: the loop's own coroutines need that (to compress large tensors), and forwards
# waiting on the loop would fill it. Idle threads are reused, so there are as many as forwards wait at once.
_forward_threads = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="swarm-client-forward")


async def in_forward_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a thread that may wait on the client's event loop, in the caller's context."""
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    return await asyncio.get_running_loop().run_in_executor(_forward_threads, call)


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run coro on the client's event loop and wait for its result; an interrupted wait (Ctrl-C) cancels it."""
    future = asyncio.run_coroutine_threadsafe(coro, _client_loop())
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


class SwarmConnection:
    """swarm_key: a private swarm's key (or its file); None for a public swarm."""

    def __init__(self, initial_peers: Sequence[str], host: str = "127.0.0.1",
                 swarm_key: SwarmKey | str | Path | None = None):
        self.swarm_key = SwarmKey.load(swarm_key) if isinstance(swarm_key, (str, Path)) else swarm_key
        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddrs printed by `swarm bootstrap` or a node")
        _settle_heap()
        keep_freed_memory()
        self.dht = DHT(initial_peers=list(initial_peers), client_mode=True, start=True,
                       host_maddrs=[f"/ip4/{host}/tcp/0"], record_validators=[SignedRecordValidator()])
        self.p2p: P2P = run_coroutine(self.dht.replicate_p2p())
        self.pusher = Pusher(self.p2p, self.swarm_key)  # sends the steps of sessions that step together in one frame
        self._bans: dict[str, tuple[float, int]] = {}  # peer id -> (banned until, failures in a row)
        self._links: dict[str, NodeLink] = {}  # by peer id
        self._link_locks: dict[str, asyncio.Lock] = {}

    def ban(self, peer_id: str) -> None:
        """Keep sessions off a node that failed: 5 s, doubling with each failure in a row, up to 5 minutes."""
        failures = self._bans.get(peer_id, (0.0, 0))[1] + 1
        self._bans[peer_id] = (time.monotonic() + min(BAN_SECONDS * 2 ** (failures - 1), MAX_BAN_SECONDS), failures)

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {peer for peer, (until, _) in self._bans.items() if until > now}

    async def records(self, model_name: str) -> list[NodeRecord]:
        return await fetch_records(self.dht, model_name, self.swarm_key)

    async def models(self) -> dict[str, int]:
        """The models served in the swarm now: name -> number of blocks."""
        return await fetch_models(self.dht, self.swarm_key)

    async def open_stream(self, peer_id: str, handler: str, direct: bool = False):
        """direct: the node runs on this machine; its unix socket is tried first (swarm/direct.py)."""
        return await rpc.open_stream(self.p2p, peer_id, handler, self.swarm_key, direct)

    async def link(self, peer_id: str, label: str, direct: bool = False, timeout: float = 10.0) -> NodeLink:
        """The stream to a node that all sessions of this client there share: opened on first use, and again after
        it broke."""
        if peer_id not in self._link_locks:
            self._link_locks[peer_id] = asyncio.Lock()
        async with self._link_locks[peer_id]:  # sessions opening at once share one stream
            link = self._links.get(peer_id)
            if link is None or link.closed:
                reader, writer = await asyncio.wait_for(
                    self.open_stream(peer_id, protocol.INFERENCE_HANDLER, direct), timeout)
                link = self._links[peer_id] = NodeLink(label, reader, writer)
            return link

    async def probe(self, records: Sequence[NodeRecord], timeout: float = 5.0) -> dict[str, Probe]:
        """Ping the nodes at once: round trip and live load of each one that answered."""
        answers = await asyncio.gather(*(rpc.ping(self.p2p, r.peer_id, timeout, swarm_key=self.swarm_key)
                                         for r in records),
                                       return_exceptions=True)
        probes = {}
        for record, answer in zip(records, answers):
            if isinstance(answer, BaseException):
                logger.info("node %s did not answer a ping: %r", record.label, answer)
                continue
            rtt, reply = answer
            probes[record.peer_id] = Probe(rtt, int(reply.get("sessions", 0)), int(reply.get("queued", 0)),
                                           int(reply.get("free_pages", record.free_pages)))
        return probes

    async def _close_streams(self) -> None:
        self.pusher.close()
        for link in self._links.values():
            link.close()
        await self.p2p.shutdown()

    async def node_stats(self, peer_id: str) -> dict:
        """A node's figures: span, state, scheduler counters (sessions, pages, preemptions...) and its sessions'
        chains (where each one's outputs are pushed)."""
        return await rpc.call(self.p2p, peer_id, pack("stats"), swarm_key=self.swarm_key)

    def shutdown(self) -> None:
        run_coroutine(self._close_streams())
        shutdown_dht(self.dht)
