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
from collections.abc import Awaitable, Callable
from pathlib import Path

from swarm.protocol import ProtocolError, pack, read_frame, unpack, write_frame

TICKET_SECONDS = 10.0
STALE_SECONDS = 60.0  # a node's socket this old listens, unless its node was killed
MAX_TICKETS = 4096  # unused tickets a node keeps; a peer that asks for more loses its oldest ones

# serves one stream from an authenticated peer: (peer id, reader, writer)
Handler = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


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
        self._server = await asyncio.start_unix_server(self._accept, self.path)

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

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            frame = await asyncio.wait_for(read_frame(reader, max_bytes=1024), TICKET_SECONDS)
            if frame is None:
                raise ConnectionError("closed before presenting a ticket")
            peer, handler, expiry = self._tickets.pop(unpack(frame).get("ticket"))
        except (KeyError, TypeError, ProtocolError, ConnectionError, asyncio.TimeoutError):  # TypeError: unhashable
            writer.close()
            return
        if expiry < time.monotonic():
            writer.close()
            return
        try:
            await write_frame(writer, pack("ticket_ok"))
        except ConnectionError:
            writer.close()
            return
        self.accepted += 1
        await self.handlers[handler](peer, reader, writer)


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


async def connect(path: str, ticket: bytes, timeout: float = 5.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A direct stream: present the ticket on the node's socket at path."""
    if not isinstance(path, str) or not isinstance(ticket, bytes) or not _ours(path):
        raise ConnectionError(f"{path!r} is not a node's socket of this user")
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        await write_frame(writer, pack("ticket", ticket=ticket))
        answer = await asyncio.wait_for(read_frame(reader), timeout)
        if answer is None or unpack(answer).get("type") != "ticket_ok":
            raise ConnectionError("the node refused the ticket")
    except BaseException:
        writer.close()
        raise
    return reader, writer
