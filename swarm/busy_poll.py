"""Keeping an event loop turning, instead of sleeping in epoll, while the next frame is due soon.

A process that waits in epoll_wait for more than about half a millisecond lets its CPU idle, and waking
an idle CPU for the next frame costs 100-300 µs on a virtual machine (the guest halts the vCPU) or a host
with deep C-states. A decode step crosses three processes' waits per hop, so the wake-ups added ~40% to
each hop through the libp2p daemons on an H200 VM (scripts/bench/push.py). While frames are expected, a
poller keeps the loop turning so they are read as they arrive; it costs one core meanwhile, which a GPU
node or a GPU client can spare and a CPU node, whose forward passes need every core, cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator


class BusyPoll:
    """Polls the running loop while held, and for `linger` seconds after the last poke or release; does
    nothing if not enabled."""

    def __init__(self, linger: float, enabled: bool = True):
        self.linger, self.enabled = linger, enabled
        self._holds = 0
        self._until = 0.0
        self._task: asyncio.Task | None = None

    def poke(self) -> None:
        """Work just arrived: keep polling for linger seconds from now."""
        self._until = time.monotonic() + self.linger
        self._start()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Poll while the block runs (a step in flight), then linger."""
        self._holds += 1
        self._start()
        try:
            yield
        finally:
            self._holds -= 1
            self._until = time.monotonic() + self.linger

    def _start(self) -> None:
        if self.enabled and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while self._holds or time.monotonic() < self._until:
            time.sleep(0)  # releases the GIL for a moment: other threads of the process (generate calls) run
            await asyncio.sleep(0)
