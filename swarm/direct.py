"""Direct streams between peers on one machine: a node's handlers on a unix socket, beside libp2p.

A frame between two processes of one machine crossed two libp2p daemons: a round trip took ~1 ms on a 2-core
machine and 0.53 ms on an H200 host, against 0.18-0.19 ms over a unix socket, and a decode step takes three
such hops. A node therefore also serves its handlers on a unix socket in a directory only its user can open, and
announces where it runs (HOST: the kernel's boot and the network namespace). A peer with the same HOST asks the
node for a ticket over libp2p, where the node learns the peer's id and, in a private swarm, checks its
membership; the peer presents the ticket on the socket, and from then on the node serves that connection
exactly as a libp2p stream from that peer. A ticket is good once, for TICKET_SECONDS. Where any of it fails
(another user, another mount namespace), the peer uses libp2p.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy

from swarm.protocol import FRAME_HEADER, MAX_FRAME_BYTES, ProtocolError, pack, read_frame, unpack, write_frame

TICKET_SECONDS = 10.0
STALE_SECONDS = 60.0  # a node's socket this old listens, unless its node was killed
MAX_TICKETS = 4096  # unused tickets a node keeps; a peer that asks for more loses its oldest ones
QUEUED_BYTES = 2**20  # received and not yet read: beyond this a stream stops reading until its frames are taken

# serves one stream from an authenticated peer: (peer id, reader, writer)
Handler = Callable[[str, "FrameStream", "FrameStream"], Awaitable[None]]


def _host() -> str:
    """Who can use a node's socket: processes of the same kernel boot see the same files (unless their mount
    namespaces differ, which the socket's absence shows), and in the same network namespace the same network,
    so a direct stream never bypasses a link that a test or an operator shapes between namespaces. '' off Linux."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        network = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return ""
    return hashlib.blake2b(f"{boot}/{network}".encode(), digest_size=8).hexdigest()


HOST = _host()


def reachable(host: object) -> bool:
    """Whether a node that announced host (in its record, or a client says so in a push chain) may be reached
    directly from this process; connect() checks that it is."""
    return isinstance(host, str) and bool(host) and host == HOST


class FrameStream(asyncio.BufferedProtocol):
    """Both ends of a direct stream, for read_frame and write_frame (as reader and as writer).

    The socket receives each frame straight into a buffer of its own, and readexactly hands out the frame's header
    and body as they are. asyncio's StreamReader copied every frame three times on the way (into its buffer, out
    of it, into bytes): reading 256 KB frames of hidden states cost 75-250 µs of CPU each, against 30-170 µs
    this way (2-core machine, less while the reader has other work). The buffer is left uninitialized: in a
    client of 64 sessions, which keeps much of what it receives (for replay), a zeroed bytearray of that size
    took ~150 µs to allocate, as its pages were new, against ~25 µs.
    """

    def __init__(self, serve: Callable[[FrameStream], Awaitable[None]] | None = None):
        self._serve = serve  # on a server: what serves the stream once connected
        self._task: asyncio.Task | None = None
        self._transport: asyncio.Transport | None = None
        self._header = bytearray(FRAME_HEADER.size)
        self._body: memoryview | None = None  # the frame being received, once its header is in
        self._filled = 0  # bytes of the header or body received so far
        self._chunks: deque[bytearray | memoryview] = deque()  # frames' headers and bodies, received, not yet read
        self._queued = 0
        self._reading_paused = False
        self._lost = False
        self._waiter: asyncio.Future | None = None  # a readexactly waiting for data
        self._writing_paused = False
        self._drainers: list[asyncio.Future] = []

    # ----- receiving -----

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        if self._serve is not None:
            self._task = asyncio.get_running_loop().create_task(self._serve(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._header if self._body is None else self._body)[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._body is None:
            if self._filled < len(self._header):
                return
            (length,) = FRAME_HEADER.unpack(self._header)
            self._queue(self._header)
            if length > MAX_FRAME_BYTES:  # read_frame refuses it; take nothing more from this peer
                self._transport.close()
                return
            self._header, self._filled = bytearray(FRAME_HEADER.size), 0
            self._body = memoryview(numpy.empty(length, numpy.uint8))  # uninitialized (see the class docstring)
        if self._filled == len(self._body):
            self._queue(self._body)
            self._body, self._filled = None, 0

    def _queue(self, chunk: bytearray | memoryview) -> None:
        self._chunks.append(chunk)
        self._queued += len(chunk)
        if self._queued > QUEUED_BYTES and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wake()
        for drainer in self._drainers:
            if not drainer.done():
                drainer.set_exception(ConnectionResetError("the stream is closed"))
        self._drainers.clear()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def readexactly(self, n: int) -> bytearray | memoryview:
        """As StreamReader.readexactly; read_frame's header and body are the chunks queued, taken whole."""
        while self._queued < n:
            if self._lost or self._transport.is_closing():
                partial = b"".join(self._chunks) + (self._header if self._body is None else self._body)[:self._filled]
                raise asyncio.IncompleteReadError(partial, n)
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self._chunks and len(self._chunks[0]) == n:
            data = self._chunks.popleft()
        else:  # not a whole header or body, as read_frame reads: join and split chunks
            data = bytearray()
            while len(data) < n:
                chunk, wanted = self._chunks.popleft(), n - len(data)
                data += chunk[:wanted]
                if len(chunk) > wanted:
                    self._chunks.appendleft(chunk[wanted:])
        self._queued -= n
        if self._reading_paused and self._queued <= QUEUED_BYTES:
            self._reading_paused = False
            self._transport.resume_reading()
        return data

    # ----- sending -----

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        self._transport.writelines(parts)

    async def drain(self) -> None:
        if self._lost or self._transport.is_closing():
            raise ConnectionResetError("the stream is closed")
        if self._writing_paused:
            drainer = asyncio.get_running_loop().create_future()
            self._drainers.append(drainer)
            await drainer

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        for drainer in self._drainers:
            if not drainer.done():
                drainer.set_result(None)
        self._drainers.clear()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()


class DirectServer:
    """A node's unix socket: serves handlers (by protocol name) to the holders of tickets."""

    def __init__(self, handlers: dict[str, Handler]):
        self.handlers = handlers
        self._directory = tempfile.TemporaryDirectory(prefix="swarm-direct-")  # mode 0700: this user only
        self.path = os.path.join(self._directory.name, "node.sock")
        self._tickets: dict[bytes, tuple[str, str, float]] = {}  # ticket -> (peer id, handler, expiry)
        self._server: asyncio.AbstractServer | None = None
        self.accepted = 0  # direct streams served so far

    async def start(self) -> None:
        # in a thread: its probes may wait (up to a second on a busy socket) while the node serves libp2p streams
        await asyncio.to_thread(remove_stale_directories, Path(self._directory.name).parent)
        self._server = await asyncio.get_running_loop().create_unix_server(lambda: FrameStream(self._accept),
                                                                           self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._directory.cleanup()

    def ticket(self, peer: str, handler: str) -> dict:
        """A ticket for one direct stream of peer to handler (one of self.handlers), and where to present it."""
        now = time.monotonic()
        if len(self._tickets) >= MAX_TICKETS:
            self._tickets = {t: v for t, v in self._tickets.items() if v[2] > now}
            while len(self._tickets) >= MAX_TICKETS:
                del self._tickets[next(iter(self._tickets))]
        ticket = secrets.token_bytes(16)
        self._tickets[ticket] = (peer, handler, now + TICKET_SECONDS)
        return {"path": self.path, "ticket": ticket}

    async def _accept(self, stream: FrameStream) -> None:
        try:
            frame = await asyncio.wait_for(read_frame(stream, max_bytes=1024), TICKET_SECONDS)
            if frame is None:
                raise ConnectionError("closed before presenting a ticket")
            peer, handler, expiry = self._tickets.pop(unpack(frame).get("ticket"))
        except (KeyError, TypeError, ProtocolError, ConnectionError, asyncio.TimeoutError):  # TypeError: unhashable
            stream.close()
            return
        if expiry < time.monotonic():
            stream.close()
            return
        try:
            await write_frame(stream, pack("ticket_ok"))
        except ConnectionError:
            stream.close()
            return
        self.accepted += 1
        await self.handlers[handler](peer, stream, stream)


def _ours(path: str | Path) -> bool:
    """Whether path is the socket of a node run by this user: a node names any path it likes, and this process
    must not write to another program's socket."""
    path = Path(path)
    directory = path.parent.stat()
    return (path.name == "node.sock" and path.parent.name.startswith("swarm-direct-")
            and directory.st_uid == os.getuid() and stat.S_IMODE(directory.st_mode) == 0o700)


def remove_stale_directories(parent: Path) -> None:
    """Remove the socket directories that this user's killed nodes left in parent: a node stopped by SIGKILL (the
    OOM killer's signal) cannot remove its own. Stale means older than STALE_SECONDS and refusing connections (or
    without a socket); a node binds its socket an instant before it listens, so a younger one is left alone."""
    for directory in parent.glob("swarm-direct-*"):
        path = directory / "node.sock"
        try:
            if not _ours(path) or time.time() - directory.stat().st_mtime < STALE_SECONDS:
                continue
            if path.exists():
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.settimeout(1.0)
                    probe.connect(str(path))
                continue  # a node listens there
        except ConnectionRefusedError:
            pass
        except OSError:  # gone meanwhile, a busy node's full backlog, not a directory, ...
            continue
        shutil.rmtree(directory, ignore_errors=True)


async def connect(path: str, ticket: bytes, timeout: float = 5.0) -> tuple[FrameStream, FrameStream]:
    """A direct stream, as (reader, writer): present the ticket on the node's socket at path."""
    if not isinstance(path, str) or not isinstance(ticket, bytes) or not _ours(path):
        raise ConnectionError(f"{path!r} is not a node's socket of this user")
    _, stream = await asyncio.get_running_loop().create_unix_connection(FrameStream, path)
    try:
        await write_frame(stream, pack("ticket", ticket=ticket))
        answer = await asyncio.wait_for(read_frame(stream), timeout)
        if answer is None or unpack(answer).get("type") != "ticket_ok":
            raise ConnectionError("the node refused the ticket")
    except BaseException:
        stream.close()
        raise
    return stream, stream
