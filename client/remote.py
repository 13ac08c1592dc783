"""The client's connection to the swarm: a client-mode DHT peer and its libp2p daemon.

hivemind runs one background event loop per process for client-side networking (RemoteExpertWorker);
the client's coroutines run there, so synchronous callers such as ``generate`` can wait on them.
"""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from hivemind.dht import DHT
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2P, PeerID

from swarm import protocol
from swarm.protocol import pack, read_frame, write_frame
from swarm.records import NodeRecord, fetch_records

T = TypeVar("T")


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    return RemoteExpertWorker.run_coroutine(coro)


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
