"""Per-token latency through a loopback chain with and without server-to-server push, and the per-hop overhead.

    python scripts/bench/push.py                     # hidden size 4096, 3 blocks, 200 timed steps
    python scripts/bench/push.py --hidden-size 1024 --steps 50

The model is made here: llama blocks of the given hidden size with one 128-wide attention head and a
128-wide MLP, so a block's compute is small and what is measured is moving a [1, hidden] state between
processes. One client session decodes batch 1, one token per step, through:
  - 3 nodes of one block each, with push (node -> node -> node -> client),
  - the same 3 nodes without push (client -> node -> client, three times),
  - 1 node serving all 3 blocks (the same compute, no hop between nodes).
Per-hop overhead: with push a token crosses 4 hops (client -> node 1 -> node 2 -> node 3 -> client); what the
step's latency spends outside the nodes' forward passes (their forward_s counters), divided by 4, is the cost
of one hop: serializing, sending through both libp2p daemons, and handing the step to the node's scheduler.
The 1-node chain shows the same compute with 2 hops. Prints one JSON line; latencies are means over --steps
steps, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from local_swarm import LocalSwarm, scratch_folder  # noqa: E402

NUM_BLOCKS = 3


def make_model(path: Path, hidden_size: int) -> Path:
    from make_tiny_model import make_tiny_model

    return make_tiny_model(path, "llama", hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=NUM_BLOCKS,
                           num_attention_heads=1, num_key_value_heads=1, head_dim=128)


def forward_seconds(connection, peers: set[str]) -> float:
    from client.remote import run_coroutine

    return sum(run_coroutine(connection.node_stats(peer)).get("forward_s", 0.0) for peer in peers)


def measure(connection, model_name: str, hidden_size: int, steps: int, push: bool, peers: set[str]) -> tuple[float, float]:
    """Mean seconds per step, and mean seconds of it spent in the nodes' forward passes."""
    import torch

    from client.session import InferenceSession

    with InferenceSession(connection, model_name, NUM_BLOCKS, steps + 10, push=push, allowed_nodes=peers) as session:
        assert len(session.spans) == len(peers), "the route is not the chain under test"
        hidden = torch.randn(1, 1, hidden_size) * 0.1
        session.step(hidden)  # opens the push streams
        computed = forward_seconds(connection, peers)
        began = time.perf_counter()
        for _ in range(steps):
            session.step(hidden)
        elapsed = time.perf_counter() - began
        computed = forward_seconds(connection, peers) - computed
    return elapsed / steps, computed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu", help="the nodes' device: the blocks are tiny, what is measured "
                                                        "is moving hidden states")
    args = parser.parse_args()

    import torch

    from client.remote import SwarmConnection, run_coroutine

    torch.set_num_threads(1)
    workdir = scratch_folder("bench-push-")
    model_path = make_model(workdir / "wide-llama", args.hidden_size)
    with LocalSwarm(workdir / "logs") as swarm:
        swarm.start_bootstrap()
        options = ["--num-threads", "1", "--throughput", "1000", "--device", args.device]
        swarm.start_nodes(model_path, [(b, b + 1) for b in range(NUM_BLOCKS)] + [(0, NUM_BLOCKS)], *options)
        connection = SwarmConnection(swarm.initial_peers)
        try:
            records = run_coroutine(connection.records(model_path.name))
            chain = {r.peer_id for r in records if r.end - r.start == 1}
            whole = {r.peer_id for r in records if r.end - r.start == NUM_BLOCKS}
            latency_ms, compute_ms = {}, {}
            for name, push, peers in (("push", True, chain), ("no_push", False, chain), ("one_node", True, whole)):
                # a first pass meets every cache length once (first-time kernel choices on GPUs), untimed
                measure(connection, model_path.name, args.hidden_size, args.steps, push, peers)
                latency, compute = measure(connection, model_path.name, args.hidden_size, args.steps, push, peers)
                latency_ms[name], compute_ms[name] = round(1000 * latency, 3), round(1000 * compute, 3)
        finally:
            connection.shutdown()
    print(json.dumps({
        "bench": "push", "hidden_size": args.hidden_size, "nodes": NUM_BLOCKS, "batch": 1, "steps": args.steps,
        "per_token_ms": latency_ms, "forward_ms": compute_ms,
        "push_saves_ms": round(latency_ms["no_push"] - latency_ms["push"], 3),
        "per_hop_overhead_ms": round((latency_ms["push"] - compute_ms["push"]) / (NUM_BLOCKS + 1), 3),
    }))


if __name__ == "__main__":
    main()
