"""`swarm status` against a live loopback swarm: models, nodes' spans, per-block coverage and its gaps."""

import contextlib
import json
import os
import signal
import subprocess
import uuid

from conftest import group_ended
from local_swarm import SWARM


def status(initial_peers: list[str], *args: str) -> str:
    done = subprocess.run([*SWARM, "status", *args, "--initial-peers", *initial_peers], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_status_json_shows_spans_coverage_and_gaps_of_every_model(tiny_model, local_swarm):
    # names of their own: records of other tests' nodes may still be in the shared bootstrap's DHT
    llama, qwen = f"status-llama-{uuid.uuid4().hex[:8]}", f"status-qwen-{uuid.uuid4().hex[:8]}"
    # 4 blocks: served 0:2 and 1:3, block 3 by nobody
    nodes = local_swarm.start_nodes(tiny_model("llama"), [(0, 2), (1, 3)], "--throughput", "50", "--model-name", llama)
    [qwen_node] = local_swarm.start_nodes(tiny_model("qwen3"), [(0, 4)], "--throughput", "20", "--model-name", qwen)

    # without a model name: every model the swarm serves
    view = json.loads(status(local_swarm.initial_peers, "--json"))
    assert view["models"][llama] == 4 and view["models"][qwen] == 4
    by_model = {s["model"]: s for s in view["swarms"]}
    assert set(by_model) >= {llama, qwen}
    swarm = by_model[llama]
    assert swarm["num_blocks"] == 4
    spans = {n["peer_id"]: (n["start"], n["end"], n["state"]) for n in swarm["nodes"]}
    assert spans == {nodes[0].peer_id: (0, 2, "online"), nodes[1].peer_id: (1, 3, "online")}
    assert all(n["free_cache_tokens"] > 0 and n["version"] for n in swarm["nodes"])
    assert [(c["nodes"], c["throughput"]) for c in swarm["coverage"]] == [(1, 50.0), (2, 100.0), (1, 50.0), (0, 0.0)]
    assert swarm["missing_blocks"] == [3]
    assert [n["peer_id"] for n in by_model[qwen]["nodes"]] == [qwen_node.peer_id]
    assert by_model[qwen]["missing_blocks"] == []

    # the table marks the gap
    shown = status(local_swarm.initial_peers, llama)
    assert "NOT SERVED" in shown and nodes[0].peer_id[-6:] in shown

    local_swarm.start_nodes(tiny_model("llama"), [(3, 4)], "--throughput", "50", "--model-name", llama)
    view = json.loads(status(local_swarm.initial_peers, llama, "--json"))  # only the named model
    [swarm] = view["swarms"]
    assert swarm["model"] == llama and swarm["missing_blocks"] == [] and len(swarm["nodes"]) == 3


def test_sigterm_ends_a_watching_status_and_every_process_it_started(bootstrap):
    """`kill PID` of a client command unwinds it like Ctrl-C: its DHT process and libp2p daemon stop with it."""
    watch = subprocess.Popen([*SWARM, "status", "--json", "--watch", "1", "--initial-peers", *bootstrap],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        json.loads(watch.stdout.readline())  # it has joined the swarm
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(timeout=30) == 128 + signal.SIGTERM
        assert group_ended(watch.pid), "processes that `swarm status` started are still running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(watch.pid, signal.SIGKILL)
