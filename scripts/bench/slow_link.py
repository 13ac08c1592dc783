"""A client behind a slow link, with and without compressed hidden states (needs root for network namespaces).

    sudo python scripts/bench/slow_link.py                    # 20 Mbit/s, 1024-token prefill
    sudo python scripts/bench/slow_link.py --rate 100mbit --tokens 2048

A bootstrap peer, two nodes (one block each of a 4096-wide Llama with a tiny MLP and one head, so compute is
small next to the transfers; bfloat16) and the client are each a network namespace on one switch; the
client's port is shaped to --rate in both directions (tbf). The client (InferenceSession, push on) sends a
prefill of --tokens random hidden rows, then decodes single rows; sessions alternate between uncompressed and
compressed, --rounds each. With push, the client's link carries the prefill up once and down twice (each
node's reply, kept for replay). Prints one JSON line: median prefill seconds and decode-step milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HIDDEN_SIZE, DECODE_STEPS = 4096, 10


def run_client(args: argparse.Namespace) -> None:
    """In the client's namespace: time the sessions, print their figures."""
    import torch

    from client.remote import SwarmConnection
    from client.session import InferenceSession

    torch.manual_seed(0)
    connection = SwarmConnection(args.initial_peers)
    runs: dict[str, list[dict]] = {"plain": [], "compressed": []}
    for _ in range(args.rounds):
        for name, compress in (("plain", False), ("compressed", True)):
            with InferenceSession(connection, "wide", 2, args.tokens + DECODE_STEPS, compress=compress) as session:
                prompt = torch.randn(1, args.tokens, HIDDEN_SIZE).to(torch.bfloat16)
                began = time.perf_counter()
                session.step(prompt)
                prefill_s = time.perf_counter() - began
                steps = []
                for _ in range(DECODE_STEPS):
                    began = time.perf_counter()
                    session.step(torch.randn(1, 1, HIDDEN_SIZE).to(torch.bfloat16))
                    steps.append(time.perf_counter() - began)
            runs[name].append({"prefill_s": prefill_s, "decode_ms": 1e3 * statistics.median(steps)})
    connection.shutdown()
    print(json.dumps(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="20mbit", help="the client's link, as tc writes rates")
    parser.add_argument("--tokens", type=int, default=1024, help="prefill rows")
    parser.add_argument("--rounds", type=int, default=2, help="sessions of each kind")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)  # the run inside the namespace
    parser.add_argument("--initial-peers", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return run_client(args)

    import netns
    from local_swarm import LocalSwarm, scratch_folder
    from make_tiny_model import make_wide_model

    if not netns.available():
        sys.exit("needs root to create network namespaces")
    workdir = scratch_folder("bench-slow-link-")
    model = make_wide_model(workdir / "wide", HIDDEN_SIZE, 2)
    with netns.Network() as network, LocalSwarm(workdir / "logs") as swarm:
        hub, boot, client, first, second = (network.host(name) for name in ("hub", "boot", "client", "a", "b"))
        address = {boot: "11.79.0.1", client: "11.79.0.2", first: "11.79.0.3", second: "11.79.0.4"}
        network.bridge(hub, {ns: f"{a}/24" for ns, a in address.items()}, rates={client: args.rate})
        swarm.start_bootstrap("--host", address[boot], netns=boot)
        options = ["--throughput", "100", "--dtype", "bfloat16", "--num-threads", "1"]
        swarm.start_nodes(model, [(0, 1)], "--host", address[first], *options, netns=first)
        swarm.start_nodes(model, [(1, 2)], "--host", address[second], *options, netns=second)
        done = subprocess.run(["ip", "netns", "exec", client, sys.executable, __file__, "--client", "--rounds",
                               str(args.rounds), "--tokens", str(args.tokens), "--initial-peers", *swarm.initial_peers],
                              capture_output=True, text=True, timeout=3600)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    figures = {name: {"prefill_s": round(statistics.median(r["prefill_s"] for r in kind), 2),
                      "decode_ms": round(statistics.median(r["decode_ms"] for r in kind), 1)}
               for name, kind in runs.items()}
    print(json.dumps({"bench": "slow_link", "rate": args.rate, "tokens": args.tokens, "hidden_size": HIDDEN_SIZE,
                      "dtype": "bfloat16", "rounds": args.rounds, **figures,
                      "prefill_speedup": round(figures["plain"]["prefill_s"] / figures["compressed"]["prefill_s"], 2)}))


if __name__ == "__main__":
    main()
