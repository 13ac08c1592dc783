"""What many coroutines send in one turn of the event loop, sent together.

Sessions that step together finish their steps in one turn: a forward's outputs, a client's steps of one round.
Sending each on its own would cost a frame, a decode and a check per session at the receiver; gathered, they
cost one (push frames, swarm/push.py; output frames, node/link.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


class TurnBatcher(Generic[K, T, R]):
    """Items put under one key in one turn of the event loop go to send(key, items) together, a turn later; each
    put's future gets what that send returned (or raised)."""

    def __init__(self, send: Callable[[K, list[T]], Awaitable[R]]):
        self._send = send
        self._pending: dict[K, tuple[list[T], asyncio.Future]] = {}

    def put(self, key: K, item: T) -> asyncio.Future:
        """Queue item; the future is shared by the items sent with it, so many puts cost their caller one wake."""
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = ([], asyncio.get_running_loop().create_future())
            asyncio.create_task(self._flush(key))  # runs after every coroutine that is ready in this turn
        pending[0].append(item)
        return pending[1]

    async def _flush(self, key: K) -> None:
        items, sent = self._pending.pop(key)
        try:
            result = await self._send(key, items)
        except Exception as e:
            sent.set_exception(e)
        else:
            sent.set_result(result)
