"""A node's Prometheus endpoint, scraped while a client generates through it: sessions and pages move; its JSON logs."""

import json
import time
import urllib.request

import torch
from prometheus_client.parser import text_string_to_metric_families

from client import DistributedModelForCausalLM
from conftest import free_port


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if not sample.labels}


def test_metrics_show_sessions_pages_and_tokens_move_during_generation(tiny_model, local_swarm):
    path = tiny_model("llama")
    port = free_port()
    local_swarm.start_nodes(path, [(0, 4)], "--metrics-port", str(port), "--page-size", "4", "--log-format", "json")
    idle = scrape(port)
    assert idle["swarm_node_sessions"] == 0 and idle["swarm_node_kv_pages_used"] == 0
    assert idle["swarm_node_kv_pages_free"] > 0

    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers) as model:
        with model.inference_session(max_length=40):
            ids = model.generate(ids, max_new_tokens=4, do_sample=False)
            first = scrape(port)
            ids = model.generate(ids, max_new_tokens=10, do_sample=False)
            second = scrape(port)
    closed = scrape(port)
    for _ in range(50):  # the node frees the session once it sees the stream close
        if closed["swarm_node_sessions"] == 0:
            break
        time.sleep(0.1)
        closed = scrape(port)

    assert first["swarm_node_sessions"] == 1 and second["swarm_node_sessions"] == 1
    assert 0 < first["swarm_node_kv_pages_used"] < second["swarm_node_kv_pages_used"]  # 9 tokens, then 19, 4 a page
    assert first["swarm_node_kv_pages_free"] > second["swarm_node_kv_pages_free"]
    assert second["swarm_node_tokens_total"] - first["swarm_node_tokens_total"] == 10
    assert second["swarm_node_tokens_per_second"] > 0
    assert second["process_cpu_seconds_total"] > first["process_cpu_seconds_total"] > 0
    assert closed["swarm_node_sessions"] == 0 and closed["swarm_node_kv_pages_used"] < second["swarm_node_kv_pages_used"]

    # --log-format json: the node's own log lines are JSON objects
    [log] = local_swarm.log_dir.glob("node-*.log")
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    serving = [e for e in entries if e["logger"] == "node.server" and e["message"].startswith("serving blocks 0:4")]
    assert serving and serving[0]["level"] == "INFO" and serving[0]["time"]
