"""CPU cost of moving decode steps through the swarm, per process, with many concurrent sessions.

    python scripts/bench/step_cost.py                          # 64 sessions, hidden size 4096, 2 nodes
    python scripts/bench/step_cost.py --sessions 1 16 64 --steps 100

One client process decodes N sessions as coroutines on its event loop (InferenceSession.astep), one token
per step, through 2 nodes of one block each; the blocks are tiny (one 16-wide head, a 16-wide MLP), so
what is measured is the path a step takes, not its compute. There is no embedding or head: the client
sends the same [1, 1, hidden] state each step.

Every process's CPU time (user + system, from /proc) is divided by the steps taken: the client's Python
process, each node's Python process (less its forward passes, which the node counts), and the libp2p
daemons. A step is one token of one session through the whole chain, so a node's figure is its cost of one
hop. 1e6 / (CPU µs per step) is the most steps/s that process could carry on a core of its own: the
ceiling it puts on aggregate throughput. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from local_swarm import LocalSwarm, scratch_folder  # noqa: E402

NUM_BLOCKS = 2
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def process_tree(root: int) -> dict[int, str]:
    """pid -> command name of root and all its descendants."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        parent = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
        names[int(entry)] = name
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        tree[pid] = names.get(pid, "?")
        todo.extend(children.get(pid, []))
    return tree


def cpu_by_role(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds per role: '<name>' for each root's own process, '<name>_p2pd' for its libp2p daemons,
    '<name>_dht' for the rest of its tree (the DHT process)."""
    trees = {name: process_tree(root) for name, root in roots.items()}
    totals: dict[str, float] = {}
    for name, root in roots.items():
        # the nodes are children of this process: their trees count as theirs, not the client's
        theirs = {pid for other, tree in trees.items() if roots[other] in trees[name] and other != name
                  for pid in tree}
        for pid, command in trees[name].items():
            if pid in theirs:
                continue
            role = name if pid == root else f"{name}_p2pd" if command == "p2pd" else f"{name}_dht"
            try:
                totals[role] = totals.get(role, 0.0) + cpu_seconds(pid)
            except OSError:
                pass
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[64])
    parser.add_argument("--steps", type=int, default=100, help="decode steps per session")
    parser.add_argument("--hidden-size", type=int, default=4096)
    args = parser.parse_args()

    import torch

    from client.remote import SwarmConnection, run_coroutine
    from client.session import InferenceSession
    from make_tiny_model import make_wide_model

    torch.set_num_threads(1)
    workdir = scratch_folder("bench-step-cost-")
    model_path = make_wide_model(workdir / "wide-llama", args.hidden_size, NUM_BLOCKS)
    result: dict = {"bench": "step_cost", "hidden_size": args.hidden_size, "nodes": NUM_BLOCKS, "steps": args.steps,
                    "results": {}}
    with LocalSwarm(workdir / "logs") as swarm:
        swarm.start_bootstrap()
        # one client sends more than the default 1000 steps/s per peer: the limit is not what is measured
        nodes = swarm.start_nodes(model_path, [(b, b + 1) for b in range(NUM_BLOCKS)], "--num-threads", "1",
                                  "--throughput", "1000", "--max-requests-per-peer", "1000000")
        connection = SwarmConnection(swarm.initial_peers)
        roots = {"client": os.getpid(), "bootstrap": swarm.processes[0].pid,
                 **{f"node{i}": node.pid for i, node in enumerate(nodes)}}
        hidden = torch.randn(1, 1, args.hidden_size) * 0.1

        async def decode(session: InferenceSession, steps: int) -> None:
            for _ in range(steps):
                await session.astep(hidden)

        async def decode_all(sessions: list[InferenceSession], steps: int) -> None:
            await asyncio.gather(*(decode(s, steps) for s in sessions))

        def node_stats() -> list[dict]:
            return [run_coroutine(connection.node_stats(node.peer_id)) for node in nodes]

        try:
            for n in [2] + args.sessions:  # the first, small run warms up streams and first calls
                sessions = [InferenceSession(connection, model_path.name, NUM_BLOCKS, args.steps + 4).__enter__()
                            for _ in range(n)]
                try:
                    run_coroutine(decode_all(sessions, 2))  # opens the push streams
                    stats_before, cpu_before = node_stats(), cpu_by_role(roots)
                    began = time.perf_counter()
                    run_coroutine(decode_all(sessions, args.steps))
                    elapsed = time.perf_counter() - began
                    cpu_after, stats_after = cpu_by_role(roots), node_stats()
                finally:
                    for session in sessions:
                        session.close()
                steps = n * args.steps
                cpu_us = {role: round(1e6 * (cpu_after[role] - cpu_before.get(role, 0.0)) / steps, 1)
                          for role in cpu_after if not role.startswith("bootstrap")}
                forward_us = {}
                for i, (before, after) in enumerate(zip(stats_before, stats_after)):
                    forward_us[f"node{i}"] = round(1e6 * (after["forward_s"] - before["forward_s"]) / steps, 1)
                    cpu_us[f"node{i}_less_forward"] = round(cpu_us[f"node{i}"] - forward_us[f"node{i}"], 1)
                    forward_us[f"node{i}_mean_batch"] = round(
                        (after["batched_tokens"] - before["batched_tokens"]) / max(1, after["forwards"] - before["forwards"]), 1)
                if n == 2:
                    continue
                result["results"][n] = {
                    "steps_per_s": round(steps / elapsed, 1),
                    "cpu_us_per_step": dict(sorted(cpu_us.items())),
                    "forward": forward_us,
                    "ceiling_steps_per_s": {role: round(1e6 / us) for role, us in cpu_us.items()
                                            if us > 0 and (role == "client" or role.endswith("_less_forward"))},
                }
        finally:
            connection.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
