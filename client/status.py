"""`swarm status`: a model's swarm as its records and nodes report it.

    swarm status tiny-llama --initial-peers MADDR...            # nodes, spans, per-block coverage
    swarm status tiny-llama --initial-peers MADDR... --sessions # and every open session's chain
"""

from __future__ import annotations

import argparse

from client.remote import SwarmConnection, run_coroutine
from swarm.balancing import block_throughputs
from swarm.bootstrap import PUBLIC_INITIAL_PEERS
from swarm.records import NodeRecord, NodeState


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_name", help="the model's name in the swarm (a node's --model-name, else its folder name)")
    parser.add_argument("--initial-peers", nargs="*", default=PUBLIC_INITIAL_PEERS, help="multiaddrs of peers in the swarm")
    parser.add_argument("--swarm-key", help="key file of a private swarm")
    parser.add_argument("--sessions", action="store_true", help="ask every node for its sessions and show their chains")


def describe_nodes(records: list[NodeRecord]) -> list[str]:
    lines = [f"{'node':<14} {'blocks':>8} {'state':<9} {'tokens/s':>9} {'sessions':>8} {'queued':>6} "
             f"{'free pages':>10}  reached"]
    for r in sorted(records, key=lambda r: (r.start, r.end, r.peer_id)):
        lines.append(f"{r.label:<14} {f'{r.start}:{r.end}':>8} {r.state.value:<9} {r.throughput:>9.1f} "
                     f"{r.sessions:>8} {r.queued:>6} {r.free_pages:>10}  {'via relay' if r.relayed else 'directly'}")
    return lines


def describe_coverage(records: list[NodeRecord]) -> list[str]:
    num_blocks = max((r.end for r in records), default=0)
    online = [r for r in records if r.state == NodeState.ONLINE]
    counts, totals = block_throughputs(online, num_blocks)
    lines = [f"block {b:>4}: {n} node{'s' if n != 1 else ''}, {t:.1f} tokens/s" for b, (n, t) in
             enumerate(zip(counts, totals))]
    missing = [b for b, n in enumerate(counts) if n == 0]
    if missing:
        lines.append(f"NOT SERVED: blocks {missing} (the model may have more blocks than the records show)")
    return lines


def describe_chains(stats: dict[str, dict], labels: dict[str, str]) -> list[str]:
    """Link each node's sessions through the (peer, session digest) their outputs were pushed to."""
    entries = {(peer, chain["session"]): chain for peer, s in stats.items() for chain in s.get("chains", [])}
    pushed_to = {(c["next"]["peer"], c["next"]["session"]) for c in entries.values() if c["next"]}
    lines = []
    for head in sorted(entries.keys() - pushed_to):
        key, hops, seen = head, [], set()
        while key in entries and key not in seen:
            seen.add(key)
            chain = entries[key]
            hops.append(f"{labels.get(key[0], key[0][-6:])}[{chain['start']}:{chain['end']}]")
            key = (chain["next"]["peer"], chain["next"]["session"]) if chain["next"] else None
        lines.append(f"client {entries[head]['client'][-6:]}: {' -> '.join(hops)}")
    return lines or ["no open sessions"]


def run(args: argparse.Namespace) -> None:
    connection = SwarmConnection(args.initial_peers, swarm_key=args.swarm_key)
    try:
        records = run_coroutine(connection.records(args.model_name))
        if not records:
            print(f"no node announces {args.model_name!r}")
            return
        print("\n".join(describe_nodes(records)), "", "\n".join(describe_coverage(records)), sep="\n")
        if args.sessions:
            stats = {}
            for r in records:
                try:
                    stats[r.peer_id] = run_coroutine(connection.node_stats(r.peer_id))
                except Exception as e:  # one unreachable node must not hide the others
                    print(f"node {r.label} did not answer: {e!r}")
            print("", "sessions (first hop -> ...):", *describe_chains(stats, {r.peer_id: r.label for r in records}),
                  sep="\n")
    finally:
        connection.shutdown()
