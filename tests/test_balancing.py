from swarm.balancing import better_start, block_throughputs, choose_span, choose_start
from swarm.records import NodeRecord, NodeState


def record(peer, start, end, throughput=100.0, state=NodeState.ONLINE):
    return NodeRecord(peer_id=peer, start=start, end=end, state=state, max_length=1024, free_pages=100,
                      page_size=16, dtype="float32", throughput=throughput)


def test_nodes_joining_one_by_one_cover_the_model_then_double_it():
    records = []
    for i in range(6):
        start = choose_start(records, 6, 2, 100.0)
        records.append(record(f"n{i}", start, start + 2))
    assert sorted((r.start, r.end) for r in records) == [(0, 2), (0, 2), (2, 4), (2, 4), (4, 6), (4, 6)]


def test_the_weakest_blocks_get_the_new_node():
    records = [record("a", 0, 2, throughput=300), record("b", 2, 4, throughput=50), record("c", 4, 6, throughput=100)]
    assert choose_start(records, 6, 2, 100.0) == 2
    assert block_throughputs(records, 6) == ([1] * 6, [300, 300, 50, 50, 100, 100])
    assert choose_start([record("d", 0, 6, state=NodeState.DRAINING)], 6, 3, 1.0) == 0  # draining nodes don't count


def test_nodes_joining_at_once_settle_on_different_spans():
    # everyone first picks blocks 0:2; then each re-checks, seeing the joining nodes whose ids sort before its own
    peers = ["p3", "p1", "p2"]
    starts = {peer: 0 for peer in peers}
    for _ in range(len(peers)):
        records = [record(peer, s, s + 2, state=NodeState.JOINING) for peer, s in starts.items()]
        starts = {peer: choose_span(records, 6, 2, 100.0, peer) for peer in peers}
    assert starts == {"p1": 0, "p2": 2, "p3": 4}


def test_a_node_moves_to_fill_a_hole_but_never_opens_one():
    records = [record("a", 0, 2), record("b", 0, 2), record("c", 4, 6)]
    assert better_start(records, 6, records[0], margin=0.2) == 2
    assert better_start(records, 6, records[2], margin=0.2) is None  # c alone serves 4:6
    # once a is draining, b is the last node on 0:2 and must stay
    records[0] = record("a", 0, 2, state=NodeState.DRAINING)
    assert better_start(records, 6, records[1], margin=0.2) is None


def test_moves_need_a_clear_gain():
    records = [record("a", 0, 2, 100), record("b", 0, 2, 100), record("c", 2, 4, 50), record("d", 4, 6, 200)]
    assert better_start(records, 6, records[0], margin=0.2) == 2  # weakest block: 50 -> 100
    records[2] = record("c", 2, 4, 95)
    assert better_start(records, 6, records[0], margin=0.2) is None  # 95 -> 100 is within the margin
    assert better_start(records, 6, records[0], margin=0.01) == 2


def test_a_move_that_strengthens_the_weakest_blocks_but_not_the_weakest_alone_is_made():
    # six nodes that joined at once and all took 0:2 but two: moving one to 2:4 leaves 4:6 as weak as before
    records = [record(f"a{i}", 0, 2) for i in range(4)] + [record("b", 2, 4), record("c", 4, 6)]
    assert better_start(records, 6, records[0], margin=0.2) == 2
    records[0] = record("a0", 2, 4)
    assert better_start(records, 6, records[1], margin=0.2) == 4
    records[1] = record("a1", 4, 6)
    assert [better_start(records, 6, r, margin=0.2) for r in records] == [None] * 6  # two nodes on every block
