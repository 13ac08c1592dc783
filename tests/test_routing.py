import random
from collections import Counter

import pytest

from swarm.records import NodeRecord, NodeState
from swarm.routing import MissingBlocksError, Probe, RoutingError, plan_route


def record(peer, start, end, max_length=1024, state=NodeState.ONLINE, throughput=100.0, **fields):
    return NodeRecord(peer_id=peer, start=start, end=end, state=state, max_length=max_length, free_pages=100,
                      page_size=16, dtype="float32", throughput=throughput, **fields)


def chain(route):
    return [(hop.node.peer_id, hop.start, hop.end) for hop in route]


def test_route_covers_every_block_once_even_with_overlapping_spans():
    records = [record("a", 0, 3), record("b", 2, 6), record("c", 5, 8)]
    route = plan_route("m", records, 8, 100)
    assert [hop.start for hop in route] == [0] + [hop.end for hop in route[:-1]] and route[-1].end == 8
    assert [hop.node.peer_id for hop in route] == ["a", "b", "c"]


def test_a_part_of_the_chain_can_be_planned_alone():
    records = [record("a", 0, 3), record("b", 2, 6), record("c", 5, 8)]
    assert chain(plan_route("m", records, 8, 100, blocks=(3, 6))) == [("b", 3, 6)]
    assert chain(plan_route("m", records, 8, 100, blocks=(6, 8))) == [("c", 6, 8)]
    with pytest.raises(MissingBlocksError, match="block 4 "):
        plan_route("m", records, 8, 100, blocks=(4, 6), blocked={"b"})


def test_missing_blocks_are_named():
    with pytest.raises(MissingBlocksError, match="blocks 4-5, 7") as error:
        plan_route("m", [record("a", 0, 4), record("b", 6, 7), record("x", 4, 8, state=NodeState.OFFLINE)], 8, 10)
    assert error.value.blocks == [4, 5, 7]


def test_sessions_longer_than_nodes_accept_are_refused_clearly():
    with pytest.raises(RoutingError, match="exceed what the nodes serving block 0"):
        plan_route("m", [record("a", 0, 2, max_length=64)], 2, 100)


def test_replicas_of_equal_cost_are_spread_at_random():
    records = [record("a", 0, 4), record("b", 0, 4)]
    chosen = {plan_route("m", records, 4, 10, rng=random.Random(seed))[0].node.peer_id for seed in range(20)}
    assert chosen == {"a", "b"}


def test_the_faster_chain_wins():
    records = [record("slow1", 0, 2, throughput=50), record("slow2", 2, 4, throughput=50),
               record("fast1", 0, 2, throughput=200), record("fast2", 2, 4, throughput=200)]
    assert chain(plan_route("m", records, 4, 10)) == [("fast1", 0, 2), ("fast2", 2, 4)]


def test_a_slow_link_is_routed_around():
    # b1 and b2 compute faster, but the link into b2 is slow for everyone
    records = [record("a1", 0, 2, throughput=100, rtts={"a2": 0.002, "b2": 0.5}), record("a2", 2, 4, throughput=100),
               record("b1", 0, 2, throughput=150, rtts={"b2": 0.5, "a2": 0.002}), record("b2", 2, 4, throughput=150)]
    probes = {peer: Probe(rtt=0.002, sessions=0) for peer in ("a1", "a2", "b1", "b2")}
    assert chain(plan_route("m", records, 4, 10, probes=probes)) == [("b1", 0, 2), ("a2", 2, 4)]


def test_the_client_measured_round_trip_counts():
    records = [record("near", 0, 4), record("far", 0, 4, throughput=120)]
    probes = {"near": Probe(rtt=0.001, sessions=0), "far": Probe(rtt=0.2, sessions=0)}
    assert chain(plan_route("m", records, 4, 10, probes=probes)) == [("near", 0, 4)]
    probes["far"].rtt = 0.001
    assert chain(plan_route("m", records, 4, 10, probes=probes)) == [("far", 0, 4)]


def test_unreachable_blocked_and_not_allowed_nodes_are_skipped():
    records = [record("a", 0, 4), record("b", 0, 4), record("c", 0, 4)]
    probes = {"a": Probe(0.001, 0), "b": Probe(0.001, 0)}  # c did not answer the client's ping
    assert {plan_route("m", records, 4, 10, probes=probes, rng=random.Random(s))[0].node.peer_id
            for s in range(20)} == {"a", "b"}
    assert plan_route("m", records, 4, 10, blocked={"a", "b"})[0].node.peer_id == "c"
    assert plan_route("m", records, 4, 10, allowed={"b"})[0].node.peer_id == "b"
    with pytest.raises(MissingBlocksError):
        plan_route("m", records, 4, 10, allowed={"b"}, blocked={"b"})


def test_clients_spread_over_replicas_in_proportion_to_speed():
    records = [record("fast", 0, 4, throughput=300), record("slow", 0, 4, throughput=100)]
    sessions = Counter()
    for _ in range(16):
        probes = {peer: Probe(rtt=0.001, sessions=sessions[peer]) for peer in ("fast", "slow")}
        sessions[plan_route("m", records, 4, 10, probes=probes)[0].node.peer_id] += 1
    assert sessions == {"fast": 12, "slow": 4}


def test_a_node_without_cache_room_counts_as_busier():
    roomy, full = record("roomy", 0, 4), record("full", 0, 4, throughput=150)
    assert plan_route("m", [roomy, full], 4, 10)[0].node.peer_id == "full"
    probes = {"roomy": Probe(0.001, 0, free_pages=100), "full": Probe(0.001, 0, free_pages=0)}
    assert plan_route("m", [roomy, full], 4, 10, probes=probes)[0].node.peer_id == "roomy"


def test_relayed_nodes_are_used_only_when_needed():
    direct, relayed = record("direct", 0, 4), record("relayed", 0, 4, relayed=True)
    assert all(plan_route("m", [direct, relayed], 4, 10, rng=random.Random(s))[0].node.peer_id == "direct"
               for s in range(10))
    assert plan_route("m", [relayed], 4, 10)[0].node.peer_id == "relayed"


def test_record_bytes_round_trip_and_reject_bad_fields():
    r = record("a", 0, 4, rtts={"b": 0.01}, relayed=True, public_name="x")
    assert NodeRecord.from_bytes(r.to_bytes()) == r
    for bad in (record("a", 3, 2), record("a", 0, 2, throughput=-1), record("a", 0, 2, rtts={"b": "fast"})):
        with pytest.raises(ValueError):
            NodeRecord.from_bytes(bad.to_bytes())
