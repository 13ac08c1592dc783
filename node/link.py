"""A client's stream to the node: the sessions it carries and their outputs, batched into frames.

One stream carries all of a client's sessions on this node. The outputs of its sessions' steps that finish in one
turn of the event loop (the steps of one forward) go back in one ``outputs`` frame with one tensor, so the client
reads and decodes one frame per forward instead of one per session (swarm/protocol.py, INFERENCE_HANDLER).
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


@dataclass(eq=False)
class _Outputs:
    written: asyncio.Future  # done once the frame is written (or the stream failed)
    entries: list[dict] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)
    draining: bool = False


class ClientLink:
    """A client's stream: its writer, the ids of the sessions opened on it, their outputs waiting to be sent."""

    def __init__(self, peer: str, writer: asyncio.StreamWriter, sent: Counter[str]):
        self.peer, self.writer = peer, writer
        self.sent = sent  # the node's count of output frames and the outputs in them
        self.sessions: set[str] = set()
        self.opening: set[asyncio.Task] = set()  # opens waiting for admission
        self.closed = False
        self._outboxes: dict[bool, _Outputs] = {}  # by compressed

    async def send(self, *frame: bytes | memoryview) -> None:
        """Write a frame (an error, an answer, outputs), whole or in parts; a client that went away is not this
        node's problem."""
        with contextlib.suppress(ConnectionError):
            await write_frame(self.writer, *frame)

    async def send_output(self, session_id: str, out: torch.Tensor, pushed: bool, compress: bool,
                          draining: bool) -> None:
        """Send a step's output with the others that finish in this turn; returns once it is written, so that a
        session's replies keep their order."""
        outbox = self._outboxes.get(compress)
        if outbox is None:
            outbox = self._outboxes[compress] = _Outputs(asyncio.get_running_loop().create_future())
            asyncio.create_task(self._flush(compress))
        outbox.entries.append({"session": session_id, "rows": out.shape[0], "pushed": pushed})
        outbox.rows.append(out)
        outbox.draining = outbox.draining or draining
        await outbox.written

    async def _flush(self, compress: bool) -> None:
        """Runs a turn after the outbox opened, when every step that finished in that turn has put its output in."""
        outbox = self._outboxes.pop(compress)
        self.sent.update(output_frames=1, outputs=len(outbox.entries))
        try:
            await self.send(*await pack_rows("outputs", outbox.rows, compress, outputs=outbox.entries,
                                             draining=outbox.draining))
        finally:
            outbox.written.set_result(None)


@dataclass(eq=False)
class ClientSession:
    """A session served here, and the link its replies go to, also for steps that the previous node pushed."""

    session: Session
    link: ClientLink
    compress: bool  # the client asked for compressed tensors (a slow link): outputs and pushes are compressed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time, from the client or a push
    next_hop: tuple[str, str] | None = None  # (peer id, session id) this session's outputs were pushed to last
    last_active: float = field(default_factory=time.monotonic)
