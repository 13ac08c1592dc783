"""A node's Prometheus endpoint (`swarm node --metrics-port`): its scheduler's figures, read at scrape time.

Served by aiohttp on the node's event loop, so a scrape reads the scheduler between its iterations and never
sees it half-updated (a scrape thread could).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

GAUGES = {  # scheduler figure -> (metric name, help)
    "sessions": ("swarm_node_sessions", "open inference sessions"),
    "queued": ("swarm_node_queued_sessions", "sessions waiting for KV cache room"),
    "queued_steps": ("swarm_node_queued_steps", "sessions' steps waiting for a forward"),
    "pages_used": ("swarm_node_kv_pages_used", "KV cache pages in use"),
    "pages_free": ("swarm_node_kv_pages_free", "KV cache pages free"),
    "pages_shared": ("swarm_node_kv_pages_shared", "KV cache pages shared between sessions by prefix"),
    "tokens_held": ("swarm_node_kv_tokens", "tokens whose keys and values the cache holds"),
    "busy": ("swarm_node_busy", "share of recent time spent in forward passes (moving average over ~0.5 s)"),
}
COUNTERS = {
    "batched_tokens": ("swarm_node_tokens", "tokens computed by the span"),
    "forwards": ("swarm_node_forwards", "forward passes through the span"),
    "forward_s": ("swarm_node_forward_seconds", "seconds spent in forward passes"),
    "preemptions": ("swarm_node_preemptions", "sessions preempted when the KV cache ran dry"),
    "recomputed_tokens": ("swarm_node_recomputed_tokens", "tokens recomputed after their pages were dropped"),
}


class NodeCollector:
    """stats() -> the scheduler's figures (Scheduler.stats, empty before the span is loaded); info: labels."""

    def __init__(self, stats: Callable[[], dict[str, float]], info: Callable[[], dict[str, str]]):
        self.stats, self.info = stats, info
        self._last: tuple[float, float] | None = None  # (time, tokens) at the previous scrape

    def collect(self) -> Iterator[Metric]:
        stats, now = self.stats(), time.monotonic()
        info = InfoMetricFamily("swarm_node", "what the node serves")
        info.add_metric([], self.info())
        yield info
        for key, (name, text) in GAUGES.items():
            yield GaugeMetricFamily(name, text, value=stats.get(key, 0))
        for key, (name, text) in COUNTERS.items():
            yield CounterMetricFamily(name, text, value=stats.get(key, 0))
        tokens = stats.get("batched_tokens", 0)
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = (tokens - self._last[1]) / (now - self._last[0])
        self._last = (now, tokens)
        yield GaugeMetricFamily("swarm_node_tokens_per_second", "tokens computed per second since the previous scrape",
                                value=rate)


async def serve_metrics(collector: NodeCollector, host: str, port: int) -> web.AppRunner:
    """Serve GET /metrics on host:port; stop it with `await runner.cleanup()`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory, open files: what the host spends

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
