import random

import pytest

from swarm.records import NodeRecord, NodeState
from swarm.routing import MissingBlocksError, RoutingError, plan_route


def record(peer, start, end, max_length=1024, state=NodeState.ONLINE):
    return NodeRecord(peer_id=peer, start=start, end=end, state=state, max_length=max_length, free_pages=100,
                      page_size=16, dtype="float32")


def test_route_covers_every_block_once_even_with_overlapping_spans():
    records = [record("a", 0, 3), record("b", 2, 6), record("c", 5, 8)]
    route = plan_route("m", records, 8, 100)
    assert [(hop.node.peer_id, hop.start, hop.end) for hop in route] == [("a", 0, 3), ("b", 3, 6), ("c", 6, 8)]


def test_missing_blocks_are_named():
    with pytest.raises(MissingBlocksError, match="blocks 4-5, 7") as error:
        plan_route("m", [record("a", 0, 4), record("b", 6, 7), record("x", 4, 8, state=NodeState.OFFLINE)], 8, 10)
    assert error.value.blocks == [4, 5, 7]


def test_sessions_longer_than_nodes_accept_are_refused_clearly():
    with pytest.raises(RoutingError, match="exceed what the nodes serving block 0"):
        plan_route("m", [record("a", 0, 2, max_length=64)], 2, 100)


def test_replicas_are_spread_at_random():
    records = [record("a", 0, 4), record("b", 0, 4)]
    chosen = {plan_route("m", records, 4, 10, rng=random.Random(seed))[0].node.peer_id for seed in range(20)}
    assert chosen == {"a", "b"}


def test_record_bytes_round_trip_and_reject_bad_spans():
    r = record("a", 0, 4)
    assert NodeRecord.from_bytes(r.to_bytes()) == r
    with pytest.raises(ValueError):
        NodeRecord.from_bytes(record("a", 3, 2).to_bytes())
