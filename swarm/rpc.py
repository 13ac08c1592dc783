"""Streams to nodes (with the membership proof of a private swarm, or directly on one machine) and one-shot
requests over a fresh stream: ping (round trip and live load) and stats."""

from __future__ import annotations

import asyncio
import logging
import time

from hivemind.p2p import P2P, PeerID

from swarm import protocol
from swarm.direct import connect as connect_directly
from swarm.protocol import ProtocolError, pack, read_frame, write_frame
from swarm.swarm_key import SwarmKey

logger = logging.getLogger(__name__)


async def open_stream(p2p: P2P, peer_id: str, handler: str, swarm_key: SwarmKey | None = None,
                      direct: bool = False):
    """A stream to a peer's handler. In a private swarm it opens with a hello frame: proof of membership for
    this peer's id. direct: the peer runs on this machine (swarm/direct.py): try its unix socket first."""
    if direct:
        try:
            reply = await call(p2p, peer_id, pack("direct", handler=handler), swarm_key=swarm_key)
            if reply.get("type") == "direct":
                return await connect_directly(reply["path"], reply["ticket"])
            logger.info("no direct stream to %s: %s", peer_id[-8:], reply.get("message"))
        except (OSError, ConnectionError, ProtocolError, KeyError, asyncio.TimeoutError) as e:  # then libp2p
            logger.info("no direct stream to %s: %r", peer_id[-8:], e)
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), handler)
    if swarm_key is not None:
        await write_frame(writer, pack("hello", proof=swarm_key.proof(p2p.peer_id.to_base58())))
    return reader, writer


async def call(p2p: P2P, peer_id: str, frame: bytes, timeout: float = 10.0, swarm_key: SwarmKey | None = None) -> dict:
    """Send one frame on the inference protocol and return the decoded reply."""

    async def exchange() -> dict:
        reader, writer = await open_stream(p2p, peer_id, protocol.INFERENCE_HANDLER, swarm_key)
        try:
            await write_frame(writer, frame)
            reply = await read_frame(reader)
        finally:
            writer.close()
        if reply is None:
            raise ConnectionError(f"node {peer_id} closed the stream")
        return protocol.unpack(reply)

    return await asyncio.wait_for(exchange(), timeout)


async def ping(p2p: P2P, peer_id: str, timeout: float = 5.0, tries: int = 2,
               swarm_key: SwarmKey | None = None) -> tuple[float, dict]:
    """Best round trip in seconds over a few pings (the first also opens the connection), and the last reply."""
    best, reply = float("inf"), {}
    for _ in range(tries):
        began = time.perf_counter()
        reply = await call(p2p, peer_id, pack("ping"), timeout, swarm_key)
        best = min(best, time.perf_counter() - began)
    return best, reply
