"""A live node answers bad input with clear errors, keeps serving others, and leaves cleanly."""

import os
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client import DistributedModelForCausalLM
from client.remote import run_coroutine
from client.session import NodeError, SpanSession
from conftest import group_ended
from swarm import protocol
from swarm.protocol import encode_tensor, pack, read_frame, write_frame
from swarm.records import NodeState
from swarm.routing import Hop, MissingBlocksError, RoutingError


async def raw_exchange(connection, peer_id, frames):
    """Send frames on one fresh stream, return the decoded replies."""
    reader, writer = await connection.open_stream(peer_id, protocol.INFERENCE_HANDLER)
    replies = []
    for frame in frames:
        await write_frame(writer, frame)
        replies.append(protocol.unpack(await read_frame(reader)))
    writer.close()
    return replies


@pytest.fixture
def llama_swarm(tiny_model, local_swarm):
    path = tiny_model("llama")
    local_swarm.start_nodes(path, [(0, 2), (2, 4)], "--max-length", "256")
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers) as model:
        yield path, model, local_swarm


def test_bad_input_gets_clear_errors_and_the_node_keeps_serving(llama_swarm):
    path, model, _ = llama_swarm
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = AutoTokenizer.from_pretrained(path)("The quick brown fox", return_tensors="pt").input_ids
    records = run_coroutine(model.connection.records(model.swarm_model_name))
    first = next(r for r in records if r.start == 0 and r.state == NodeState.ONLINE)
    hidden_size = model.config.hidden_size

    with model.inference_session(max_length=32) as honest:
        # an honest session is mid-generation while garbage arrives on other streams
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)

        span = run_coroutine(SpanSession.open(model.connection, Hop(first, 0, 2), max_length=8, batch_size=1))
        good = torch.randn(2, hidden_size)
        cases = [
            (pack("step", session=span.session_id, lengths=[2], hidden=encode_tensor(torch.randn(2, hidden_size + 1))),
             "bad_tensor", "shape"),
            (pack("step", session=span.session_id, lengths=[2], hidden=encode_tensor(good.half())), "bad_tensor", "float32"),
            (pack("step", session=span.session_id, lengths=[9], hidden=encode_tensor(torch.randn(9, hidden_size))),
             "too_long", "max_length"),
            (pack("step", session=span.session_id, lengths=[2], hidden=encode_tensor(good * float("nan"))), "bad_tensor", "NaN"),
            (pack("step", session=span.session_id, lengths=[-1], hidden=encode_tensor(good)), "bad_request", "lengths"),
        ]
        for frame, code, words in cases:
            run_coroutine(span.link.send(frame))
            with pytest.raises(NodeError, match=words) as error:
                run_coroutine(span._reply(10))
            assert error.value.code == code
        # the session that received garbage is intact: a valid step still works at position 0
        out = run_coroutine(span.step(good, [2]))
        assert out.shape == (2, hidden_size) and torch.isfinite(out).all()

        # on a stream of its own, frames that name no session get errors too, and the stream goes on
        replies = run_coroutine(raw_exchange(model.connection, first.peer_id, [
            pack("open", request=1, max_length=10**9, batch_size=1), pack("open", request=2, max_length="long"),
            pack("step", session="x", lengths=[1], hidden=encode_tensor(good[:1])), b"\x93\xc1\xff garbage",
            pack("dance"), pack("step", session=span.session_id, lengths=[1], hidden=encode_tensor(good[:1]))]))
        assert [(r.get("request"), r.get("session"), r["code"]) for r in replies] == [
            (1, None, "too_long"), (2, None, "bad_request"), (None, "x", "unknown_session"), (None, None, "bad_frame"),
            (None, None, "bad_request"), (None, span.session_id, "unknown_session")]  # not this stream's session
        assert "msgpack" in replies[3]["message"] and "unknown message type" in replies[4]["message"]
        run_coroutine(span.close())

        # and the honest session goes on, exact
        generated = model.generate(generated, max_new_tokens=4, do_sample=False)
        assert honest.lengths == [generated.shape[1] - 1]
    assert torch.equal(generated, local.generate(ids, max_new_tokens=8, do_sample=False))


def test_a_bad_push_frame_or_step_loses_nothing_else(llama_swarm):
    """Push frames carry many sessions' steps: a malformed frame is dropped whole, a bad step within a good frame
    gets its session an error, and the other steps of that frame are served."""
    path, model, _ = llama_swarm
    records = run_coroutine(model.connection.records(model.swarm_model_name))
    first = next(r for r in records if r.start == 0 and r.state == NodeState.ONLINE)
    hidden_size = model.config.hidden_size
    good, bad = (SpanSession.open(model.connection, Hop(first, 0, 2), max_length=8, batch_size=1) for _ in range(2))
    good, bad = run_coroutine(good), run_coroutine(bad)
    good.pusher = bad.pusher = None  # this test writes the push frames itself
    rows = torch.randn(2, hidden_size)
    expected = run_coroutine(SpanSession.open(model.connection, Hop(first, 0, 2), max_length=8, batch_size=1))
    expected.pusher = None
    expected_out = run_coroutine(expected.step(rows, [2]))

    def step(span, lengths):
        return {"session": span.session_id, "lengths": lengths, "page_hashes": None, "push": None}

    async def push_frames() -> None:
        _, writer = await model.connection.open_stream(first.peer_id, protocol.PUSH_HANDLER)
        for frame in [b"\x93\xc1 garbage", pack("step", session=good.session_id, lengths=[2], hidden=encode_tensor(rows)),
                      pack("steps", steps=[step(good, [2])], hidden=encode_tensor(rows[:1])),  # rows missing
                      pack("steps", steps=[step(good, [-2])], hidden=encode_tensor(rows)),
                      pack("steps", steps=[], hidden=encode_tensor(rows[:0])),
                      pack("steps", steps=[step(good, [2])], hidden=encode_tensor(rows.half()))]:
            await write_frame(writer, frame)
        # one frame: an unknown session's step, a step with NaN, a step too long for its session, a good step
        await write_frame(writer, pack("steps", steps=[{**step(good, [1]), "session": "no-such-session"},
                                                       step(bad, [2]), step(bad, [9]), step(good, [2])],
                                       hidden=encode_tensor(torch.cat([rows[:1], rows * float("nan"),
                                                                       torch.randn(9, hidden_size), rows]))))
        writer.close()

    run_coroutine(push_frames())
    # the good session's only reply is its step's output; the bad one's, an error for each of its steps
    out, pushed = run_coroutine(good.receive(2))
    assert torch.equal(out, expected_out) and not pushed
    replies = []
    for _ in range(2):
        with pytest.raises(NodeError) as error:
            run_coroutine(bad.receive(2))
        replies.append(error.value.code)
    assert sorted(replies) == ["bad_tensor", "too_long"]
    # nothing else reached the sessions, which go on from where their steps left them
    second = torch.randn(1, hidden_size)
    assert run_coroutine(good.step(second, [1])).shape == (1, hidden_size)
    assert torch.equal(run_coroutine(bad.step(rows, [2])), expected_out)
    stats = run_coroutine(model.connection.node_stats(first.peer_id))
    assert stats["push_frames"] >= 1 and stats["pushed_steps"] >= 3
    for span in (good, bad, expected):
        run_coroutine(span.close())


def test_clear_client_errors(llama_swarm, tiny_model):
    path, model, swarm = llama_swarm
    with pytest.raises(RoutingError, match="exceed what the nodes serving block 0"):
        with model.inference_session(max_length=1000):
            pass

    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                     model_name_in_swarm="no-such-model") as unknown:
        with pytest.raises(RoutingError, match="no node announces model 'no-such-model'"):
            unknown.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)


def test_missing_block_is_named(tiny_model, local_swarm):
    path = tiny_model("qwen3")
    local_swarm.start_nodes(path, [(0, 3)], "--model-name", "half-qwen3")
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="half-qwen3", failover_deadline=2) as model:
        with pytest.raises(MissingBlocksError, match="waited 2 s for a node; still no online node serves block 3 of "
                                                     "model 'half-qwen3'"):
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)


def test_sigterm_announces_offline_and_exits(tiny_model, local_swarm):
    path = tiny_model("olmo2")
    [node] = local_swarm.start_nodes(path, [(0, 4)], "--model-name", "leaving-olmo2")
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="leaving-olmo2") as model:
        assert [r.state for r in run_coroutine(model.connection.records(model.swarm_model_name))] == [NodeState.ONLINE]
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=20) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = [r.state for r in run_coroutine(model.connection.records(model.swarm_model_name))]
            if states == [NodeState.OFFLINE]:
                break
            time.sleep(0.5)
        assert states == [NodeState.OFFLINE]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["systemd-stop", "ctrl-c"])
def test_a_signal_to_the_whole_process_group_ends_the_node_and_its_children(tiny_model, local_swarm, sig):
    """systemd's stop and Ctrl-C in a terminal signal every process of the node's group at once: the node's DHT
    process then outlived its shutdown, and the node waited for it forever."""
    [node] = local_swarm.start_nodes(tiny_model("llama"), [(0, 4)], "--model-name", "group-signal")
    os.killpg(node.pid, sig)
    node.wait(timeout=30)
    assert group_ended(node.pid), "processes of the node's group are still running"


def test_a_killed_node_leaves_no_key_behind(tiny_model, local_swarm, tmp_path, monkeypatch):
    """A node without --identity makes a fresh private key in a temporary folder, which a SIGKILL (the OOM
    killer's) gave it no chance to remove: the node removes it as soon as its libp2p daemon has read the key."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the node's temporary folders go here
    [node] = local_swarm.start_nodes(tiny_model("llama"), [(0, 4)], "--model-name", "killed-key")
    local_swarm.kill(node)
    assert not list(tmp_path.glob("swarm-identity-*"))


def free_pages_become(model, expected, timeout=8.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [record] = run_coroutine(model.connection.records(model.swarm_model_name))
        if record.free_pages == expected:
            return True
        time.sleep(0.2)
    return False


def test_closed_and_idle_sessions_return_their_pages(tiny_model, local_swarm):
    path = tiny_model("llama")
    local_swarm.start_nodes(path, [(0, 4)], "--session-timeout", "2", "--announce-period", "0.5", "--page-size", "16",
                            "--model-name", "pages-llama")
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="pages-llama") as model:
        [record] = run_coroutine(model.connection.records(model.swarm_model_name))
        total = record.free_pages
        hidden = model.config.hidden_size
        closed = run_coroutine(SpanSession.open(model.connection, Hop(record, 0, 4), max_length=64, batch_size=2))
        run_coroutine(closed.step(torch.randn(20 + 3, hidden), [20, 3]))  # pages are taken as tokens arrive
        assert free_pages_become(model, total - 2 - 1)
        run_coroutine(closed.close())
        assert free_pages_become(model, total)

        idle = run_coroutine(SpanSession.open(model.connection, Hop(record, 0, 4), max_length=64, batch_size=1))
        run_coroutine(idle.step(torch.randn(17, hidden), [17]))
        assert free_pages_become(model, total - 2)
        assert free_pages_become(model, total)  # 2 s without a frame: the node closed it
        with pytest.raises((NodeError, ConnectionError, protocol.ProtocolError)):
            run_coroutine(idle.step(torch.randn(1, hidden), [1]))


def test_a_push_frame_with_two_steps_of_one_session_runs_them_in_order(llama_swarm):
    """The steps of a push frame run together, but a session's second step waits for its first."""
    _, model, _ = llama_swarm
    records = run_coroutine(model.connection.records(model.swarm_model_name))
    first = next(r for r in records if r.start == 0 and r.state == NodeState.ONLINE)
    spans = [run_coroutine(SpanSession.open(model.connection, Hop(first, 0, 2), max_length=8, batch_size=1))
             for _ in range(2)]
    for span in spans:
        span.pusher = None  # this test writes the push frame itself
    rows = torch.randn(3, model.config.hidden_size)
    reference, pushed_to = spans
    expected = [run_coroutine(reference.step(rows[:2], [2])), run_coroutine(reference.step(rows[2:], [1]))]

    async def push_frame() -> None:
        _, writer = await model.connection.open_stream(first.peer_id, protocol.PUSH_HANDLER)
        steps = [{"session": pushed_to.session_id, "lengths": [n], "page_hashes": None, "push": None} for n in (2, 1)]
        await write_frame(writer, pack("steps", steps=steps, hidden=encode_tensor(rows)))
        writer.close()

    run_coroutine(push_frame())
    for want in expected:
        out, _ = run_coroutine(pushed_to.receive(want.shape[0]))
        assert torch.equal(out, want)
    for span in spans:
        run_coroutine(span.close())
