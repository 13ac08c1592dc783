"""Adversarial frames against a live node: every one gets an answer (an error with a reason, unless it was a
valid request), the node never crashes or hangs, and an honest session beside it stays token-exact."""

import asyncio
import threading
import time

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from client.remote import run_coroutine
from swarm import protocol
from swarm.protocol import read_frame

SESSION = "<the stream's session>"  # replaced by the real session id when sent

scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=12) | \
    st.binary(max_size=32)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                             max_size=4), max_leaves=8)
dtypes = st.sampled_from(["float32", "bfloat16", "float16", "int64", "", "float32\x00"])
shapes = st.lists(st.integers(-3, 2**40), max_size=4) | st.lists(st.integers(0, 70), min_size=2, max_size=2)


@st.composite
def tensors(draw):
    if draw(st.booleans()):
        return draw(anything)
    shape = draw(shapes)
    dtype = draw(dtypes)
    numel = 1
    for d in shape:
        numel *= max(d, 0)
    if draw(st.booleans()) and 0 < numel <= 70 * 64 and dtype in protocol.DTYPES:  # well-formed, maybe NaN/inf
        values = torch.randn(numel).to(protocol.DTYPES[dtype])
        if draw(st.booleans()):
            values[draw(st.integers(0, numel - 1))] = draw(st.sampled_from([float("nan"), float("inf"), -1e30]))
        if draw(st.booleans()):  # compressed, maybe with a corrupted or lying stream length
            encoded = protocol.encode_tensor(values.view(shape), compress=True)
            # draws with fixed bounds: the values (and so the lengths) differ between runs of an example
            if draw(st.booleans()):
                encoded["top_zlib"] = draw(st.integers(-1, 2**16) | anything)
            if draw(st.booleans()):
                data = bytearray(encoded["data"])
                data[draw(st.integers(0, 2**16)) % len(data)] ^= 0xFF
                encoded["data"] = bytes(data)
            return encoded
        data = values.view(torch.uint8).numpy().tobytes()
    else:
        data = draw(st.binary(max_size=256))
    return {"dtype": dtype, "shape": shape, "data": data}


def fields(name, strategy):
    return st.one_of(strategy, anything).map(lambda value: {name: value})


@st.composite
def messages(draw):
    message = {"v": draw(st.sampled_from([1, 1, 1, 0, 2, "1", None])),
               "type": draw(st.sampled_from(["step", "step", "open", "ping", "stats", "dance", 5, None]))}
    for name, strategy in [("session", st.sampled_from([SESSION, "nope", ""])),
                           ("lengths", st.lists(st.integers(-3, 2**31), max_size=3)),
                           ("hidden", tensors()), ("max_length", st.integers(-5, 2**40)),
                           ("batch_size", st.integers(-1, 100)), ("start", st.integers(-2, 6)), ("end", st.integers(-2, 6)),
                           ("priority", st.sampled_from(["interactive", "batch", "urgent"])),
                           ("compress", st.booleans()),
                           ("page_hashes", st.lists(st.lists(st.binary(min_size=16, max_size=16), max_size=2), max_size=2)),
                           ("push", st.lists(st.fixed_dictionaries({"peer": st.text(max_size=60), "session": st.text(),
                                                                    "dtype": dtypes}), max_size=2))]:
        if draw(st.booleans()):
            message.update(draw(fields(name, strategy)))
    return message


HIDDEN = 64  # the tiny llama's hidden size


@st.composite
def pushed_steps(draw):
    """A push frame's steps and hidden states: consistent (each step's rows in order, maybe NaN in some) or not."""
    steps = [{"session": draw(st.sampled_from([SESSION, SESSION, "nope"])),
              "lengths": draw(st.lists(st.integers(0, 3), min_size=2, max_size=2) | st.lists(st.integers(-1, 40),
                                                                                               max_size=3))}
             for _ in range(draw(st.integers(0, 4)))]
    for step in steps:
        for name, strategy in [("page_hashes", st.lists(st.lists(st.binary(min_size=16, max_size=16), max_size=2),
                                                        max_size=2)),
                               ("push", st.lists(st.fixed_dictionaries({"peer": st.text(max_size=60),
                                                                        "session": st.text(), "dtype": dtypes}),
                                                 max_size=2))]:
            if draw(st.booleans()):
                step.update(draw(fields(name, strategy)))
    rows = sum(max(n, 0) for step in steps for n in step["lengths"])
    if draw(st.booleans()) and rows:
        values = torch.randn(rows, HIDDEN)
        if draw(st.booleans()):
            values[draw(st.integers(0, rows - 1)), 0] = float("nan")
        hidden = protocol.encode_tensor(values, compress=draw(st.booleans()))
    else:
        hidden = draw(tensors())
    return {"steps": draw(st.one_of(st.just(steps), anything)), "hidden": hidden}


@st.composite
def push_messages(draw):
    message = {"v": draw(st.sampled_from([1, 1, 1, 2])), "type": draw(st.sampled_from(["steps", "steps", "step", None]))}
    message.update({k: v for k, v in draw(pushed_steps()).items() if draw(st.integers(0, 5))})  # mostly both fields
    return message


def truncated(message: dict, cut: int) -> bytes:
    packed = msgpack.packb(message, use_bin_type=True)
    return packed[:-cut] if len(packed) > cut else b"\xc1"  # 0xc1: a byte msgpack never uses


frames = st.one_of(
    st.binary(max_size=300),  # random bytes
    messages().map(lambda m: ("message", m)),
    st.builds(truncated, messages(), st.integers(1, 40)),
)


class FuzzedStream:
    """A stream to the node with an open session of its own; reopened when the node ends it."""

    def __init__(self, model, peer_id):
        self.model, self.peer_id = model, peer_id
        self.reader = self.writer = self.session = None
        self.frames = self.errors = self.reopened = 0

    def open(self):
        async def open_session():
            self.reader, self.writer = await self.model.connection.open_stream(self.peer_id, protocol.INFERENCE_HANDLER)
            await protocol.write_frame(self.writer, protocol.pack("open", max_length=64, batch_size=2))
            return protocol.unpack(await read_frame(self.reader))["session"]
        self.session = run_coroutine(open_session())
        self.reopened += 1

    def send(self, frame) -> dict | None:
        if isinstance(frame, tuple):
            message = {k: (self.session if v == SESSION else v) for k, v in frame[1].items()}
            frame = msgpack.packb(message, use_bin_type=True)

        async def exchange():
            await protocol.write_frame(self.writer, frame)
            return await read_frame(self.reader)
        self.frames += 1
        try:
            reply = run_coroutine(asyncio.wait_for(exchange(), 10))  # a hang fails the test
        except ConnectionError:
            reply = None
        if reply is None:  # the node ended the stream (a close frame, or framing it could not trust)
            self.open()
            return None
        return protocol.unpack(reply)


@pytest.fixture(scope="module")
def fuzz_target(tiny_model, bootstrap, tmp_path_factory):
    from local_swarm import LocalSwarm

    path = tiny_model("llama")
    with LocalSwarm(tmp_path_factory.mktemp("fuzz-logs")) as swarm:
        swarm.initial_peers = bootstrap
        [node] = swarm.start_nodes(path, [(0, 4)], "--throughput", "100", "--model-name", "fuzz-llama")
        with DistributedModelForCausalLM.from_pretrained(path, initial_peers=bootstrap,
                                                         model_name_in_swarm="fuzz-llama") as model:
            stream = FuzzedStream(model, node.peer_id)
            stream.open()
            yield path, node, model, stream


def honest_generation(path, model):
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([[9, 8, 7, 6, 5, 4, 3]])
    expected = local.generate(ids, max_new_tokens=12, do_sample=False)
    with model.inference_session(max_length=20):
        tokens = model.generate(ids, max_new_tokens=1, do_sample=False)
        while tokens.shape[1] < expected.shape[1]:
            tokens = model.generate(tokens, max_new_tokens=1, do_sample=False)
    return tokens, expected


def check_reply(stream: FuzzedStream, frame) -> None:
    reply = stream.send(frame)
    if reply is not None:
        assert reply["type"] in {"error", "outputs", "opened", "pong", "stats"}, reply
        if reply["type"] == "error":
            assert reply["code"] and reply["message"], reply
            stream.errors += 1


def fuzz(fuzz_target, examples: int) -> None:
    path, node, model, stream = fuzz_target
    storm = settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
                     database=None)(given(frame=frames)(check_reply))
    result = {}
    honest = threading.Thread(target=lambda: result.update(zip(("tokens", "expected"), honest_generation(path, model))))
    frames_before, errors_before = stream.frames, stream.errors
    honest.start()
    storm(stream)
    honest.join()
    assert node.poll() is None, "the node crashed"
    assert torch.equal(result["tokens"], result["expected"])
    sent, errors = stream.frames - frames_before, stream.errors - errors_before
    assert sent >= examples and errors > examples // 2, (sent, errors)
    tokens, expected = honest_generation(path, model)  # and after the storm
    assert torch.equal(tokens, expected)


def test_malformed_frames_get_errors_and_the_node_keeps_serving_honest_sessions(fuzz_target):
    fuzz(fuzz_target, 2000)


push_frames = st.one_of(st.binary(max_size=300), push_messages().map(lambda m: ("message", m)),
                        st.builds(truncated, push_messages(), st.integers(1, 40)))


def test_malformed_push_frames_lose_nothing_and_the_node_keeps_serving(fuzz_target):
    """Push frames (many sessions' steps in one) from a peer: the node answers each step it can place on its
    session's client stream, drops the rest, and an honest session beside it stays token-exact."""
    path, node, model, _ = fuzz_target
    session = FuzzedStream(model, node.peer_id)
    session.open()
    replies = []

    async def drain() -> None:  # the session's client stream gets an output or an error for every step pushed into it
        while (frame := await read_frame(session.reader)) is not None:
            replies.append(protocol.unpack(frame))

    async def open_push_stream():
        _, writer = await model.connection.open_stream(node.peer_id, protocol.PUSH_HANDLER)
        return writer

    async def start_draining() -> asyncio.Task:
        return asyncio.create_task(drain())

    async def close_streams() -> None:
        draining.cancel()
        writer.close()
        session.writer.close()

    writer = run_coroutine(open_push_stream())
    draining = run_coroutine(start_draining())

    def push(frame) -> None:
        if isinstance(frame, tuple):
            message = frame[1]
            if isinstance(message.get("steps"), list):
                message = {**message, "steps": [{**s, "session": session.session} if isinstance(s, dict)
                                                and s.get("session") == SESSION else s for s in message["steps"]]}
            frame = msgpack.packb(message, use_bin_type=True)
        run_coroutine(protocol.write_frame(writer, frame))

    storm = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck),
                     database=None)(given(frame=push_frames)(push))
    result = {}
    honest = threading.Thread(target=lambda: result.update(zip(("tokens", "expected"), honest_generation(path, model))))
    honest.start()
    storm()
    honest.join()
    assert node.poll() is None, "the node crashed"
    assert torch.equal(result["tokens"], result["expected"])
    time.sleep(1)  # the last steps' replies
    assert {r["type"] for r in replies} <= {"outputs", "error"} and all(
        r["code"] and r["message"] for r in replies if r["type"] == "error"), replies[:5]
    run_coroutine(close_streams())

    async def push_one_step(session: FuzzedStream, rows: torch.Tensor) -> dict:
        writer = await open_push_stream()
        try:
            await protocol.write_frame(writer, protocol.pack("steps", steps=[{"session": session.session,
                                                                              "lengths": [1, 1]}],
                                                             hidden=protocol.encode_tensor(rows)))
            return protocol.unpack(await asyncio.wait_for(read_frame(session.reader), 10))
        finally:
            writer.close()
            session.writer.close()

    fresh = FuzzedStream(model, node.peer_id)  # a well-formed push after the storm is served
    fresh.open()
    reply = run_coroutine(push_one_step(fresh, torch.randn(2, HIDDEN)))
    assert reply["type"] == "outputs" and protocol.decode_tensor(reply["hidden"]).shape == (2, HIDDEN), reply
    tokens, expected = honest_generation(path, model)  # and after the storm
    assert torch.equal(tokens, expected)


@pytest.mark.slow
def test_twenty_thousand_malformed_frames(fuzz_target):
    fuzz(fuzz_target, 20000)
