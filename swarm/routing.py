"""Choosing the chain of node spans for a session: minimum expected latency per token.

A chain is a path over (block, node) states: from block b, a node serving b can take the session to any
block boundary up to its span's end. A hop costs the network delay from the previous node (half the round
trip: with server-to-server push, a step's output travels one way to the next node), a fixed per-hop
overhead, and the node's compute time for those blocks, stretched by its load: a node running s sessions
(queued ones and, if its free cache pages cannot hold the session, the one it would preempt included) is
counted (1 + s) times slower.
That makes many clients spread over replicas in proportion to their speed instead of piling onto one.
Dijkstra finds the cheapest chain.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from swarm.records import NodeRecord, NodeState

HOP_OVERHEAD = 1e-3  # seconds to serialize, send and schedule a step at one more node
RELAY_PENALTY = 0.02  # seconds added to each hop into a relayed node, so direct nodes are preferred


class RoutingError(RuntimeError):
    """The swarm cannot serve the request right now."""


class MissingBlocksError(RoutingError):
    def __init__(self, model_name: str, blocks: list[int], reason: str = "no online node serves"):
        self.blocks = blocks
        super().__init__(f"{reason} block{'s' if len(blocks) > 1 else ''} {_ranges(blocks)} of model {model_name!r}")


def _ranges(blocks: list[int]) -> str:
    parts, start = [], None
    for i, b in enumerate(blocks):
        start = b if start is None else start
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            parts.append(f"{start}" if start == b else f"{start}-{b}")
            start = None
    return ", ".join(parts)


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) of the chain, run by one node (a part of its span, if spans overlap)."""

    node: NodeRecord
    start: int
    end: int


@dataclass
class Probe:
    """What the client measured of a node just now: round trip in seconds and its live load."""

    rtt: float
    sessions: int
    queued: int = 0
    free_pages: int | None = None


def plan_route(model_name: str, records: Iterable[NodeRecord], num_blocks: int, max_length: int, *,
               probes: Mapping[str, Probe] | None = None, allowed: Collection[str] | None = None,
               blocked: Collection[str] = frozenset(), blocks: tuple[int, int] | None = None,
               rng: random.Random | None = None) -> list[Hop]:
    """The chain of least expected latency per token through online nodes that admit max_length.

    probes: the client's measurements per peer id; with them, nodes it could not reach are skipped. Without
    them, round trips count as zero and loads come from the records. allowed / blocked: peer ids to use only /
    never. blocks: plan only blocks [start, end) (to replace a broken part of a chain). Equal costs are broken
    at random, so replicas share clients.
    """
    rng = rng or random.Random()
    first, last = blocks or (0, num_blocks)
    online = [r for r in records if r.state == NodeState.ONLINE and r.peer_id not in blocked
              and (allowed is None or r.peer_id in allowed) and (probes is None or r.peer_id in probes)]
    covered = {b for r in online for b in range(r.start, r.end)}
    missing = [b for b in range(first, last) if b not in covered]
    if missing:
        raise MissingBlocksError(model_name, missing)
    usable = [r for r in online if r.max_length >= max_length]
    for block in range(first, last):
        if not any(r.start <= block < r.end for r in usable):
            longest = max(r.max_length for r in online if r.start <= block < r.end)
            raise RoutingError(f"sessions of {max_length} tokens exceed what the nodes serving block {block} of "
                               f"{model_name!r} accept (at most {longest})")
    return _cheapest_chain(usable, first, last, max_length, probes or {}, rng)


def _cheapest_chain(nodes: list[NodeRecord], first: int, num_blocks: int, max_length: int,
                    probes: Mapping[str, Probe], rng: random.Random) -> list[Hop]:
    """Dijkstra from block `first` to block num_blocks (the end of the planned range)."""
    def rtt(node: NodeRecord) -> float:
        probe = probes.get(node.peer_id)
        return (probe.rtt if probe else 0.0) + (RELAY_PENALTY if node.relayed else 0.0)

    def between(a: NodeRecord, b: NodeRecord) -> float:
        """Round trip from node a to node b: announced by a, else guessed from the client's view of both."""
        announced = a.rtts.get(b.peer_id)
        return announced if announced is not None else (rtt(a) + rtt(b)) / 2

    def compute(node: NodeRecord, blocks: int) -> float:
        probe = probes.get(node.peer_id)
        load = probe.sessions + probe.queued if probe else node.sessions + node.queued
        free_pages = probe.free_pages if probe and probe.free_pages is not None else node.free_pages
        if free_pages * node.page_size < max_length:
            load += 1  # the session would wait for room or push another one out
        per_token = 1 / node.throughput if node.throughput > 0 else 1.0
        return per_token * blocks / (node.end - node.start) * (1 + load) * jitter[node.peer_id]

    jitter = {node.peer_id: 1 + 1e-9 * rng.random() for node in nodes}
    boundaries = sorted({b for r in nodes for b in (r.start, r.end) if first < b <= num_blocks} | {num_blocks})
    # state: (cost so far, block reached, index of the node that reached it or -1 for the client)
    best: dict[tuple[int, int], float] = {(first, -1): 0.0}
    came_from: dict[tuple[int, int], tuple[int, int]] = {}
    queue = [(0.0, first, -1)]
    while queue:
        cost, block, last = heapq.heappop(queue)
        if block == num_blocks:
            return _walk_back(came_from, nodes, (block, last))
        if cost > best[block, last]:
            continue
        for i, node in enumerate(nodes):
            if i == last or not node.start <= block < node.end:
                continue
            delay = HOP_OVERHEAD + (rtt(node) / 2 if last < 0 else between(nodes[last], node) / 2)
            for end in (b for b in boundaries if block < b <= node.end):
                total = cost + delay + compute(node, end - block) + (rtt(node) / 2 if end == num_blocks else 0.0)
                if total < best.get((end, i), float("inf")):
                    best[end, i] = total
                    came_from[end, i] = (block, last)
                    heapq.heappush(queue, (total, end, i))
    raise RoutingError("no chain of nodes covers the model")  # unreachable: coverage was checked


def _walk_back(came_from: dict, nodes: list[NodeRecord], state: tuple[int, int]) -> list[Hop]:
    route = []
    while state in came_from:
        previous = came_from[state]
        route.append(Hop(nodes[state[1]], previous[0], state[0]))
        state = previous
    return route[::-1]
