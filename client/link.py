"""The client's stream to a node, shared by all its sessions there.

A task reads the node's frames and routes them: the answer to an open by its request number, a session's outputs
and errors to that session's inbox. A node answers the steps of one forward in one ``outputs`` frame
(swarm/protocol.py, INFERENCE_HANDLER), which is decoded once and split among its sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

import torch

from swarm import protocol
from swarm.protocol import ProtocolError, decode_tensor_async, pack, read_frame, write_frame

logger = logging.getLogger(__name__)


class Inbox(asyncio.Queue):
    """A session's replies from one node, in order: (reply, rows) for an output, the reply alone for an error, or the
    ConnectionError that ended the stream.

    Every reply but an output that the node pushed on to the next node of the chain also sets ``alarm``, which the
    inboxes of one chain share: a step waits on it for its last output or for a reply it must act on, while the
    outputs it only keeps for replay come in without waking it (client/session.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.alarm = asyncio.Event()

    def put_nowait(self, reply: tuple[dict, torch.Tensor] | dict | ConnectionError) -> None:
        super().put_nowait(reply)
        if not (isinstance(reply, tuple) and reply[0].get("pushed")):
            self.alarm.set()


class NodeLink:
    """An open stream to one node. Sessions take their replies from their inbox (Inbox)."""

    def __init__(self, label: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.label, self.writer = label, writer
        self.inboxes: dict[str, Inbox] = {}  # by session id
        self.error: ConnectionError | None = None  # why the stream ended
        self._requests: dict[int, asyncio.Future] = {}  # opens waiting for their answer
        self._numbers = itertools.count()
        self._reading = asyncio.create_task(self._read(reader))

    @property
    def closed(self) -> bool:
        return self.error is not None

    async def send(self, *frame: bytes | memoryview) -> None:
        """Write a frame, whole or in parts (swarm.protocol.pack_rows)."""
        if self.error is not None:
            raise self.error
        try:
            if self.writer.is_closing():
                raise ConnectionError("the stream is closed")
            await write_frame(self.writer, *frame)
        except (ConnectionError, OSError, RuntimeError) as e:  # RuntimeError: asyncio's "handler is closed"
            raise self.error or ConnectionError(f"the stream to node {self.label} broke: {e!r}") from e

    async def open(self, timeout: float, **fields) -> dict:
        """Open a session; returns the node's answer (an ``opened`` or ``error`` frame). Its inbox is ready then."""
        number = next(self._numbers)
        answer = self._requests[number] = asyncio.get_running_loop().create_future()
        try:
            await self.send(pack("open", request=number, **fields))
            async with asyncio.timeout(timeout):
                return await answer
        finally:
            del self._requests[number]

    async def close_session(self, session_id: str) -> None:
        self.inboxes.pop(session_id, None)
        with contextlib.suppress(ConnectionError):
            await self.send(pack("close", session=session_id))

    def close(self) -> None:
        self._reading.cancel()
        self.writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (frame := await read_frame(reader)) is not None:
                await self._route(protocol.unpack(frame))
            error = ConnectionError(f"node {self.label} closed the stream")
        except (ProtocolError, ConnectionError, OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
            error = ConnectionError(f"the stream to node {self.label} broke: {e!r}")
        except asyncio.CancelledError:
            error = ConnectionError("the stream was closed")
        self.error = error
        for answer in self._requests.values():
            if not answer.done():
                answer.set_exception(error)
        for inbox in self.inboxes.values():
            inbox.put_nowait(error)
        self.writer.close()

    async def _route(self, message: dict) -> None:
        """Hand a frame to whoever waits for it. A malformed frame raises: the node is not to be trusted."""
        if message["type"] == "outputs":
            outputs, draining = message["outputs"], message.get("draining", False)
            hidden = await decode_tensor_async(message["hidden"])
            for output, rows in zip(outputs, hidden.split([output["rows"] for output in outputs]), strict=True):
                inbox = self.inboxes.get(output["session"])
                if inbox is not None:  # else the session closed meanwhile
                    output["draining"] = draining
                    inbox.put_nowait((output, rows))
        elif "request" in message:
            answer = self._requests.get(message["request"])
            if answer is not None and not answer.done():
                if message["type"] == "opened":
                    self.inboxes[message["session"]] = Inbox()
                answer.set_result(message)
            elif message["type"] == "opened":  # its open timed out here: end it there
                await self.send(pack("close", session=message["session"]))
        elif message.get("session") in self.inboxes:
            self.inboxes[message["session"]].put_nowait(message)
        else:
            logger.warning("node %s: %s (%s)", self.label, message.get("message"), message.get("code"))

