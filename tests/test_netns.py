"""Multi-host swarms on one machine: each host a network namespace (needs root; skipped otherwise)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import netns
from conftest import assert_same_tokens
from local_swarm import LocalSwarm

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root to create network namespaces")

GENERATE = Path(__file__).with_name("generate_in_swarm.py")
IDS = [5, 17, 42, 99, 3]


def generate_in(namespace, model, initial_peers, runs=1, timeout=180):
    result = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, str(GENERATE), str(model),
                             "--initial-peers", *initial_peers, "--ids", *map(str, IDS), "--runs", str(runs)],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["runs"]


def expected_tokens(model):
    local = AutoModelForCausalLM.from_pretrained(model).eval()
    return local, local.generate(torch.tensor([IDS]), max_new_tokens=8, do_sample=False)


def test_the_client_routes_around_a_slow_link(tiny_model, tmp_path):
    path = tiny_model("llama")
    with netns.Network() as network, LocalSwarm(tmp_path / "logs") as swarm:
        hub, boot, client, fast, slow, tail = (network.host(name) for name in
                                               ("hub", "boot", "client", "fast", "slow", "tail"))
        address = {boot: "11.78.0.1", client: "11.78.0.2", fast: "11.78.0.3", slow: "11.78.0.4", tail: "11.78.0.5"}
        network.bridge(hub, {ns: f"{a}/24" for ns, a in address.items()}, rates={slow: "100kbit"})
        swarm.start_bootstrap("--host", address[boot], netns=boot)
        same = ["--throughput", "100", "--announce-period", "2"]
        [fast_node] = swarm.start_nodes(path, [(0, 2)], "--host", address[fast], *same, netns=fast)
        [slow_node] = swarm.start_nodes(path, [(0, 2)], "--host", address[slow], *same, netns=slow)
        swarm.start_nodes(path, [(2, 4)], "--host", address[tail], *same, netns=tail)
        runs = generate_in(client, path, swarm.initial_peers, runs=4)
    local, expected = expected_tokens(path)
    for run in runs:
        assert run["route"][0] == fast_node.peer_id != slow_node.peer_id
        assert_same_tokens(torch.tensor([run["tokens"]]), expected, local)


def test_a_client_reaches_a_node_only_through_a_relay(tiny_model, tmp_path):
    path = tiny_model("llama")
    with netns.Network() as network, LocalSwarm(tmp_path / "logs") as swarm:
        relay, node, client = network.host("relay"), network.host("node"), network.host("client")
        network.link(relay, "11.77.1.1/24", node, "11.77.1.2/24")
        network.link(relay, "11.77.2.1/24", client, "11.77.2.2/24")  # no route between node and client
        maddrs = swarm.start_bootstrap("--host", "0.0.0.0", "--relay", netns=relay)
        to_node = [m for m in maddrs if "/11.77.1.1/" in m]
        to_client = [m for m in maddrs if "/11.77.2.1/" in m]
        swarm.initial_peers = to_node
        swarm.start_nodes(path, [(0, 4)], "--host", "11.77.1.2", "--relay-via", *to_node, "--throughput", "100",
                          netns=node)
        unreachable = subprocess.run(["ip", "netns", "exec", client, sys.executable, "-c",
                                      "import socket; socket.create_connection(('11.77.1.2', 1), timeout=2)"],
                                     capture_output=True, text=True)
        assert "unreachable" in unreachable.stderr
        [run] = generate_in(client, path, to_client)
    local, expected = expected_tokens(path)
    assert_same_tokens(torch.tensor([run["tokens"]]), expected, local)
