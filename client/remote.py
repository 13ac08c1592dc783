"""The client's connection to the swarm: a client-mode DHT peer and its libp2p daemon.

The client's networking runs on one background uvloop event loop per process; synchronous callers such as
``generate`` (from any number of threads) wait on coroutines submitted to it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import uvloop
from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID

from swarm import protocol
from swarm.protocol import pack, read_frame, write_frame
from swarm.records import NodeRecord, fetch_records

T = TypeVar("T")


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _client_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = uvloop.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="swarm-client-loop", daemon=True).start()
    return _loop


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run coro on the client's event loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, _client_loop()).result()


class SwarmConnection:
    def __init__(self, initial_peers: Sequence[str], host: str = "127.0.0.1"):
        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddrs printed by `swarm bootstrap` or a node")
        self.dht = DHT(initial_peers=list(initial_peers), client_mode=True, start=True,
                       host_maddrs=[f"/ip4/{host}/tcp/0"])
        self.p2p: P2P = run_coroutine(self.dht.replicate_p2p())

    async def records(self, model_name: str) -> list[NodeRecord]:
        return await fetch_records(self.dht, model_name)

    async def open_stream(self, peer_id: str, handler: str):
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), handler)
        return reader, writer

    async def node_stats(self, peer_id: str) -> dict:
        """A node's scheduler figures: sessions, queue, pages used and shared, preemptions, forwards."""
        reader, writer = await self.open_stream(peer_id, protocol.INFERENCE_HANDLER)
        try:
            await write_frame(writer, pack("stats"))
            reply = await read_frame(reader)
        finally:
            writer.close()
        if reply is None:
            raise ConnectionError(f"node {peer_id} closed the stream")
        return protocol.unpack(reply)

    def shutdown(self) -> None:
        run_coroutine(self.p2p.shutdown())
        self.dht.shutdown()
