"""Stopping hivemind's DHT process for certain, so that the process that started it can exit."""

from __future__ import annotations

import logging

from hivemind.dht import DHT

logger = logging.getLogger(__name__)

KILL_WAIT_SECONDS = 5.0


def shutdown_dht(dht: DHT) -> None:
    """DHT.shutdown, then SIGKILL if the process is still there. When Ctrl-C in a terminal or systemd's stop signals a
    node's whole process group, its DHT process outlived DHT.shutdown (hivemind's terminate included), and
    multiprocessing's exit handler then waited for it forever."""
    dht.shutdown()
    if dht.is_alive():
        logger.warning("the DHT process outlived its shutdown; killing it")
        dht.kill()
        dht.join(KILL_WAIT_SECONDS)
