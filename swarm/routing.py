"""Choosing a chain of node spans that covers every block of a model."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from swarm.records import NodeRecord, NodeState


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


def plan_route(model_name: str, records: Iterable[NodeRecord], num_blocks: int, max_length: int,
               exclude: set[str] = frozenset(), rng: random.Random | None = None) -> list[Hop]:
    """Fewest hops from block 0 to num_blocks through online nodes that admit max_length.

    At each block the node reaching furthest wins; among equals, a random one, so clients spread over replicas.
    """
    rng = rng or random.Random()
    online = [r for r in records if r.state == NodeState.ONLINE and r.peer_id not in exclude]
    usable = [r for r in online if r.max_length >= max_length]
    covered = {b for r in online for b in range(r.start, r.end)}
    missing = [b for b in range(num_blocks) if b not in covered]
    if missing:
        raise MissingBlocksError(model_name, missing)
    route, block = [], 0
    while block < num_blocks:
        candidates = [r for r in usable if r.start <= block < r.end]
        if not candidates:
            longest = max(r.max_length for r in online if r.start <= block < r.end)
            raise RoutingError(f"sessions of {max_length} tokens exceed what the nodes serving block {block} of "
                               f"{model_name!r} accept (at most {longest})")
        furthest = max(r.end for r in candidates)
        chosen = rng.choice([r for r in candidates if r.end == furthest])
        route.append(Hop(chosen, block, chosen.end))
        block = chosen.end
    return route
