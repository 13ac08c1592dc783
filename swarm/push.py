"""Pushing steps to a node's push handler, many sessions' steps in one frame.

A node pushes each step's output to the next node of that session's chain, and a client may send the steps of
its sessions to their first node the same way. Steps bound for one node in one turn of the event loop (a
forward's outputs, or the steps of a client's sessions that step together) go out as one frame with one tensor
(swarm/protocol.py, PUSH_HANDLER), so the receiving node reads, decodes and checks it once for all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from hivemind.p2p import P2P

from swarm import direct, protocol, rpc
from swarm.protocol import pack_rows, write_frame
from swarm.swarm_key import SwarmKey
from swarm.turns import TurnBatcher

logger = logging.getLogger(__name__)

OPEN_TIMEOUT = 5.0  # seconds to open a push stream
# After a push to a node failed, steps for it go the other way (the client carries them) for this long: a node
# of another protocol version refuses every push stream, and trying again at each step would cost a round trip.
RETRY_SECONDS = 10.0


class Pusher:
    """One push stream per node, opened on first use and reopened RETRY_SECONDS after a failure."""

    def __init__(self, p2p: P2P, swarm_key: SwarmKey | None):
        self.p2p, self.swarm_key = p2p, swarm_key
        self._writers: dict[str, asyncio.StreamWriter] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._frames = TurnBatcher(self._send)  # by (peer, dtype, compressed, reachable directly)
        self._failed: dict[str, float] = {}  # peer -> when its last push failed

    def push(self, hop: dict, rows: torch.Tensor, lengths: list[int], rest: list[dict] | None,
             compress: bool = False) -> asyncio.Future:
        """Send rows as a step of hop's session (a chain entry: peer, session, dtype, host, page_hashes), whose
        output the node pushes on along rest. The future says whether it was sent: False if that failed."""
        if time.monotonic() - self._failed.get(hop["peer"], -RETRY_SECONDS) < RETRY_SECONDS:
            refused = asyncio.get_running_loop().create_future()
            refused.set_result(False)
            return refused
        step = {"session": hop["session"], "lengths": lengths, "page_hashes": hop.get("page_hashes"),
                "push": rest or None}
        return self._frames.put((hop["peer"], hop["dtype"], compress, direct.reachable(hop.get("host"))),
                                (step, rows.to(protocol.DTYPES[hop["dtype"]])))

    async def _send(self, key: tuple[str, str, bool, bool], steps: list[tuple[dict, torch.Tensor]]) -> bool:
        """Write one frame of the steps for a node; False if that failed."""
        peer, _, compress, reachable = key
        try:
            frame = await pack_rows("steps", [rows for _, rows in steps], compress, steps=[step for step, _ in steps])
            if peer not in self._locks:
                self._locks[peer] = asyncio.Lock()
            async with self._locks[peer]:  # one stream per peer, opened once
                if peer not in self._writers:
                    _, self._writers[peer] = await asyncio.wait_for(
                        rpc.open_stream(self.p2p, peer, protocol.PUSH_HANDLER, self.swarm_key, direct=reachable),
                        OPEN_TIMEOUT)
                await write_frame(self._writers[peer], *frame)
        except Exception as e:
            logger.info("could not push %d steps to %s (%s); not trying again for %.0f s", len(steps), peer[-8:], e,
                        RETRY_SECONDS)
            self._failed[peer] = time.monotonic()
            writer = self._writers.pop(peer, None)
            if writer is not None:
                writer.close()
            return False
        return True

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
