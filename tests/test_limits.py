"""Global and per-peer limits answer with clear errors, and the node keeps serving within them."""

import time

import pytest

from client import DistributedModelForCausalLM
from client.remote import run_coroutine
from client.session import NodeError, SpanSession
from swarm import protocol
from swarm.protocol import pack, read_frame, write_frame
from swarm.routing import Hop


def test_session_cap_and_request_rate(tiny_model, local_swarm):
    path = tiny_model("llama")
    [node] = local_swarm.start_nodes(path, [(0, 4)], "--max-sessions", "2", "--max-requests-per-peer", "20",
                                     "--throughput", "100", "--model-name", "limited-llama")
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="limited-llama") as model:
        [record] = run_coroutine(model.connection.records(model.swarm_model_name))
        hop = Hop(record, 0, 4)
        opened = [run_coroutine(SpanSession.open(model.connection, hop, 16, 1)) for _ in range(2)]
        with pytest.raises(NodeError, match="maximum of 2 sessions") as error:
            run_coroutine(SpanSession.open(model.connection, hop, 16, 1))
        assert error.value.code == "busy"

        async def burst(count: int) -> list[dict]:
            reader, writer = await model.connection.open_stream(node.peer_id, protocol.INFERENCE_HANDLER)
            replies = []
            for _ in range(count):
                await write_frame(writer, pack("ping"))
                replies.append(protocol.unpack(await read_frame(reader)))
            writer.close()
            return replies

        time.sleep(2.5)
        replies = run_coroutine(burst(60))  # a burst of 40 (twice the rate) passes, then about 20 per second
        refused = [r for r in replies if r["type"] == "error"]
        assert 10 <= len(refused) <= 20 and all(r["code"] == "busy" and "per second" in r["message"] for r in refused)
        time.sleep(1)
        assert all(r["type"] == "pong" for r in run_coroutine(burst(5)))  # the bucket refills
        for span in opened:
            run_coroutine(span.close())
