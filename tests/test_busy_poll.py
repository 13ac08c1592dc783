"""BusyPoll keeps the loop turning while held and for its linger after, then stops; disabled, it never runs."""

import asyncio
import time

from swarm.busy_poll import BusyPoll


def test_polls_while_held_then_lingers_then_stops():
    async def main() -> None:
        poller = BusyPoll(linger=0.05)
        with poller.hold():
            await asyncio.sleep(0.1)
            assert not poller._task.done()
        released = time.monotonic()
        await poller._task  # ends by itself once the linger has passed
        assert 0.04 < time.monotonic() - released < 0.5
        poller.poke()
        assert not poller._task.done()
        await poller._task

    asyncio.run(main())


def test_poll_turns_the_loop_without_blocking():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        selects = 0
        select = loop._selector.select

        def counting_select(timeout=None):
            nonlocal selects
            selects += 1
            return select(timeout)

        loop._selector.select = counting_select
        await asyncio.sleep(0.05)
        idle = selects
        selects = 0
        poller = BusyPoll(linger=0.0)
        with poller.hold():
            await asyncio.sleep(0.05)
        assert selects > 20 * max(idle, 1)  # the loop kept polling instead of waiting in select

    asyncio.run(main())


def test_disabled_poller_starts_nothing():
    async def main() -> None:
        poller = BusyPoll(linger=1.0, enabled=False)
        poller.poke()
        with poller.hold():
            await asyncio.sleep(0)
        assert poller._task is None

    asyncio.run(main())
