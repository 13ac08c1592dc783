"""Where a node should serve: the span-choice and rebalancing math over node records (pure functions).

A block's throughput is the sum of the throughputs of the nodes serving it, and a swarm is only as fast as
its weakest block. A node therefore takes the span that leaves the fewest blocks uncovered and, among those,
makes the weakest block strongest (then the next weakest, and so on). Online and joining nodes count as
serving; draining ones are on their way out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from swarm.records import NodeRecord, NodeState

SERVING = (NodeState.ONLINE, NodeState.JOINING)


def block_throughputs(records: Iterable[NodeRecord], num_blocks: int) -> tuple[list[int], list[float]]:
    """Per block: how many serving nodes cover it, and their summed throughput."""
    counts, totals = [0] * num_blocks, [0.0] * num_blocks
    for r in records:
        if r.state in SERVING:
            for block in range(r.start, min(r.end, num_blocks)):
                counts[block] += 1
                totals[block] += r.throughput
    return counts, totals


def _score(counts: list[int], totals: list[float]) -> tuple:
    """Larger is better: fewer uncovered blocks, then the sorted throughputs, weakest first."""
    return -counts.count(0), sorted(totals)


def _with_span(counts: list[int], totals: list[float], start: int, end: int, throughput: float) -> tuple:
    counts = [c + (start <= b < end) for b, c in enumerate(counts)]
    totals = [t + throughput * (start <= b < end) for b, t in enumerate(totals)]
    return _score(counts, totals)


def choose_start(records: Iterable[NodeRecord], num_blocks: int, span_length: int, throughput: float) -> int:
    """The start of the best span of span_length blocks for a node of this throughput; ties go to the lowest."""
    counts, totals = block_throughputs(records, num_blocks)
    starts = range(num_blocks - span_length + 1)
    return max(starts, key=lambda s: (_with_span(counts, totals, s, s + span_length, throughput), -s))


def choose_span(records: Iterable[NodeRecord], num_blocks: int, span_length: int, throughput: float,
                peer_id: str) -> int:
    """A joining node's start. It counts online nodes and the joining nodes whose peer ids sort before its own:
    nodes that join at once see each other's choices in that order and settle on different spans."""
    others = [r for r in records if r.peer_id != peer_id
              and (r.state == NodeState.ONLINE or (r.state == NodeState.JOINING and r.peer_id < peer_id))]
    return choose_start(others, num_blocks, span_length, throughput)


def better_start(records: Iterable[NodeRecord], num_blocks: int, me: NodeRecord, margin: float) -> int | None:
    """Where node `me` should move its span, or None to stay.

    It moves only if that uncovers fewer blocks, or if, comparing the blocks' throughputs weakest first, the
    first one the move changes gains more than margin (relative: 0.2 is 20%); and never if leaving its span
    would uncover a block. Weakest first, not the weakest alone: with 0:2 served four times and 2:4 and 4:6
    once each, no single move raises the weakest block, yet each move to 2:4 or 4:6 is the way there.
    """
    others = [r for r in records if r.peer_id != me.peer_id]
    counts, totals = block_throughputs(others, num_blocks)
    if any(counts[b] == 0 for b in range(me.start, min(me.end, num_blocks))):
        return None
    length = me.end - me.start
    start = choose_start(others, num_blocks, length, me.throughput)
    if start == me.start:
        return None
    (covered_if_stay, stay), (covered_if_move, move) = (  # covered: minus the uncovered blocks
        _with_span(counts, totals, s, s + length, me.throughput) for s in (me.start, start))
    if covered_if_move != covered_if_stay:
        return start if covered_if_move > covered_if_stay else None
    for if_stay, if_move in zip(stay, move):  # throughputs, weakest first
        if not math.isclose(if_stay, if_move):
            return start if if_move > if_stay * (1 + margin) else None
    return None
