"""A client's stream to the node: the sessions it carries and their outputs, batched into frames.

One stream carries all of a client's sessions on this node. The outputs of its sessions' steps that finish in one
turn of the event loop (the steps of one forward) go back in one ``outputs`` frame with one tensor (swarm/turns.py),
so the client reads and decodes one frame per forward instead of one per session (swarm/protocol.py,
INFERENCE_HANDLER).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from node.scheduler import Session
from swarm.protocol import pack_rows, write_frame
from swarm.turns import TurnBatcher


class ClientLink:
    """A client's stream: its writer, the ids of the sessions opened on it, and their outputs on the way."""

    def __init__(self, peer: str, writer: asyncio.StreamWriter, sent: Counter[str]):
        self.peer, self.writer = peer, writer
        self.sent = sent  # the node's count of output frames and the outputs in them
        self.sessions: set[str] = set()
        self.opening: set[asyncio.Task] = set()  # opens waiting for admission
        self.closed = False
        self._frames = TurnBatcher(self._send_outputs)  # by compressed

    async def send(self, *frame: bytes | memoryview) -> None:
        """Write a frame (an error, an answer, outputs), whole or in parts; a client that went away is not this
        node's problem."""
        with contextlib.suppress(ConnectionError):
            await write_frame(self.writer, *frame)

    def send_output(self, session_id: str, out: torch.Tensor, pushed: bool, compress: bool,
                    draining: bool) -> asyncio.Future:
        """Send a step's output with the others that finish in this turn; the future is done once it is written (a
        session's next reply waits for it, so that its replies keep their order)."""
        return self._frames.put(compress, ({"session": session_id, "rows": out.shape[0], "pushed": pushed}, out,
                                           draining))

    async def _send_outputs(self, compress: bool, outputs: list[tuple[dict, torch.Tensor, bool]]) -> None:
        self.sent.update(output_frames=1, outputs=len(outputs))
        await self.send(*await pack_rows("outputs", [out for _, out, _ in outputs], compress,
                                         outputs=[entry for entry, _, _ in outputs],
                                         draining=any(draining for _, _, draining in outputs)))


@dataclass(eq=False)
class ClientSession:
    """A session served here, and the link its replies go to, also for steps that the previous node pushed."""

    session: Session
    link: ClientLink
    compress: bool  # the client asked for compressed tensors (a slow link): outputs and pushes are compressed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time, from the client or a push
    next_hop: tuple[str, str] | None = None  # (peer id, session id) this session's outputs were pushed to last
    last_active: float = field(default_factory=time.monotonic)
