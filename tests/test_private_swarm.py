"""A private swarm beside an outsider on the same DHT: the outsider reads nothing, writes nothing members
accept, and its calls are refused; members generate the local model's tokens."""

import torch
from hivemind.dht import DHT
from hivemind.utils import get_dht_time
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from client.remote import SwarmConnection, run_coroutine
from conftest import assert_same_tokens
from swarm import protocol, rpc
from swarm.protocol import pack
from swarm.records import NodeRecord, NodeState, model_key
from swarm.swarm_key import SwarmKey


def test_private_swarm_is_closed_to_outsiders(tiny_model, local_swarm, tmp_path):
    path = tiny_model("llama")
    key_file = tmp_path / "swarm.key"
    key = SwarmKey.create(key_file)
    name = "private-llama"  # a name no public node of the shared test DHT uses
    nodes = local_swarm.start_nodes(path, [(0, 2), (2, 4)], "--swarm-key", str(key_file), "--throughput", "100",
                                    "--model-name", name)
    outsider = SwarmConnection(local_swarm.initial_peers)  # on the same DHT, without the key
    raw = DHT(initial_peers=local_swarm.initial_peers, start=True)  # an outsider that stores whatever it likes
    try:
        assert run_coroutine(outsider.records(name)) == []
        assert name not in run_coroutine(outsider.models())  # nor in the swarm's list of models
        # even knowing the members' DHT key, the outsider finds only sealed bytes
        members_key = model_key(name, key)
        sealed = raw.get(members_key, latest=True).value
        assert set(sealed) == {node.peer_id for node in nodes}
        for entry in sealed.values():
            try:
                NodeRecord.from_bytes(entry.value)
                raise AssertionError("a sealed record decoded without the key")
            except (ValueError, TypeError):
                pass
        # a record it writes under the members' key is not accepted by them
        fake = NodeRecord(peer_id=str(raw.peer_id), start=0, end=4, state=NodeState.ONLINE, max_length=64,
                          free_pages=10, page_size=16, dtype="float32", throughput=1e6)
        raw.store(members_key, subkey=str(raw.peer_id), value=fake.to_bytes(), expiration_time=get_dht_time() + 60)
        # its calls are refused: without a proof, with another swarm's key, with a member's proof (stolen: it is
        # bound to the member's peer id)
        node = nodes[0].peer_id
        refused = [run_coroutine(rpc.call(outsider.p2p, node, pack("ping"))),
                   run_coroutine(rpc.call(outsider.p2p, node, pack("ping"), swarm_key=SwarmKey(bytes(32)))),
                   run_coroutine(call_with_hello(outsider, node, pack("hello", proof=key.proof(node))))]
        assert all(reply["type"] == "error" and reply["code"] == "unauthorized" for reply in refused), refused
    finally:
        outsider.shutdown()
        raw.shutdown()

    local = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm=name, swarm_key=key_file) as model:
        records = run_coroutine(model.connection.records(model.swarm_model_name))
        assert sorted(r.peer_id for r in records) == sorted(node.peer_id for node in nodes)  # not the fake one
        assert run_coroutine(model.connection.models()) == {name: 4}
        assert_same_tokens(model.generate(ids, max_new_tokens=8, do_sample=False),
                           local.generate(ids, max_new_tokens=8, do_sample=False), local)


async def call_with_hello(connection, peer_id, hello):
    reader, writer = await rpc.open_stream(connection.p2p, peer_id, protocol.INFERENCE_HANDLER)
    try:
        await protocol.write_frame(writer, hello)
        await protocol.write_frame(writer, pack("ping"))
        return protocol.unpack(await protocol.read_frame(reader))
    finally:
        writer.close()
