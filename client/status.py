"""`swarm status`: the swarm's models, their nodes and per-block coverage, as records and nodes report them.

    swarm status --initial-peers MADDR...                        # every model served in the swarm
    swarm status tiny-llama --initial-peers MADDR... --sessions  # one model, and every open session's chain
    swarm status tiny-llama --initial-peers MADDR... --json      # the same figures as one JSON object
    swarm status --initial-peers MADDR... --watch 5              # redraw every 5 seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from itertools import groupby

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from client.remote import SwarmConnection, run_coroutine
from swarm.balancing import block_throughputs
from swarm.bootstrap import add_initial_peers_argument
from swarm.records import NodeRecord, NodeState

STATE_STYLES = {"online": "green", "joining": "yellow", "draining": "yellow", "offline": "red"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_name", nargs="?",
                        help="the model's name in the swarm (a node's --model-name, else its folder name); "
                             "default: every model the swarm serves")
    add_initial_peers_argument(parser)
    parser.add_argument("--swarm-key", help="key file of a private swarm")
    parser.add_argument("--sessions", action="store_true", help="ask every node for its sessions and show their chains")
    parser.add_argument("--json", action="store_true", help="print one JSON object (a line per refresh with --watch)")
    parser.add_argument("--watch", type=float, nargs="?", const=5.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 5) until interrupted")


def describe_node(r: NodeRecord) -> dict:
    return {"name": r.label, "peer_id": r.peer_id, "start": r.start, "end": r.end, "state": r.state.value,
            "throughput": r.throughput, "sessions": r.sessions, "queued": r.queued, "free_pages": r.free_pages,
            "free_cache_tokens": r.free_pages * r.page_size, "max_length": r.max_length, "dtype": r.dtype,
            "version": r.version, "relayed": r.relayed}


def describe_coverage(records: list[NodeRecord], num_blocks: int) -> list[dict]:
    """Per block: how many online nodes serve it and their tokens/s together."""
    online = [r for r in records if r.state == NodeState.ONLINE]
    counts, totals = block_throughputs(online, num_blocks)
    return [{"block": b, "nodes": n, "throughput": t} for b, (n, t) in enumerate(zip(counts, totals))]


def session_chains(stats: dict[str, dict]) -> list[dict]:
    """Link each node's sessions through the (peer, session digest) their outputs were pushed to."""
    entries = {(peer, chain["session"]): chain for peer, s in stats.items() for chain in s.get("chains", [])}
    pushed_to = {(c["next"]["peer"], c["next"]["session"]) for c in entries.values() if c["next"]}
    chains = []
    for head in sorted(entries.keys() - pushed_to):
        key, hops, seen = head, [], set()
        while key in entries and key not in seen:
            seen.add(key)
            chain = entries[key]
            hops.append({"peer_id": key[0], "start": chain["start"], "end": chain["end"]})
            key = (chain["next"]["peer"], chain["next"]["session"]) if chain["next"] else None
        chains.append({"client": entries[head]["client"], "hops": hops})
    return chains


async def snapshot(connection: SwarmConnection, model_name: str | None, sessions: bool) -> dict:
    """The swarm as one JSON-ready object: {"models": {name: blocks}, "swarms": [per model: nodes, coverage...]}."""
    models = await connection.models()
    swarms = []
    for name in [model_name] if model_name else sorted(models):
        records = sorted(await connection.records(name), key=lambda r: (r.start, r.end, r.peer_id))
        num_blocks = max([models.get(name, 0), *(max(r.num_blocks, r.end) for r in records)])
        coverage = describe_coverage(records, num_blocks)
        swarm = {"model": name, "num_blocks": num_blocks, "nodes": [describe_node(r) for r in records],
                 "coverage": coverage, "missing_blocks": [c["block"] for c in coverage if c["nodes"] == 0]}
        if sessions:
            answers = await asyncio.gather(*(connection.node_stats(r.peer_id) for r in records), return_exceptions=True)
            swarm["unreachable"] = [r.peer_id for r, a in zip(records, answers) if isinstance(a, BaseException)]
            swarm["sessions"] = session_chains({r.peer_id: a for r, a in zip(records, answers)
                                                if not isinstance(a, BaseException)})
        swarms.append(swarm)
    return {"models": models, "swarms": swarms}


def _coverage_table(swarm: dict) -> Table:
    """Runs of consecutive blocks with the same coverage, one row each; blocks nobody serves in red."""
    table = Table(title="coverage", title_justify="left")
    for column in ("blocks", "nodes", "tokens/s"):
        table.add_column(column, justify="right")
    for (nodes, throughput), run in groupby(swarm["coverage"], lambda c: (c["nodes"], round(c["throughput"], 1))):
        blocks = _ranges([c["block"] for c in run])
        if nodes == 0:
            table.add_row(Text(blocks, style="bold red"), Text("NOT SERVED", style="bold red"), "")
        else:
            table.add_row(blocks, str(nodes), f"{throughput:.1f}")
    return table


def render(view: dict) -> Group:
    parts: list = []
    models = Table(title="models served", title_justify="left")
    for column, justify in (("model", "left"), ("blocks", "right"), ("nodes", "right"), ("missing blocks", "left")):
        models.add_column(column, justify=justify)
    for swarm in view["swarms"]:
        missing = swarm["missing_blocks"]
        models.add_row(swarm["model"], str(swarm["num_blocks"]), str(len(swarm["nodes"])),
                       Text(_ranges(missing), style="bold red") if missing else Text("none", style="green"))
    parts.append(models)
    for swarm in view["swarms"]:
        labels = {n["peer_id"]: n["name"] for n in swarm["nodes"]}
        nodes = Table(title=f"{swarm['model']}: nodes", title_justify="left")
        for column, justify in (("name", "left"), ("peer id", "left"), ("blocks", "right"), ("state", "left"),
                                ("tokens/s", "right"), ("sessions", "right"), ("queued", "right"),
                                ("free cache", "right"), ("version", "left"), ("reached", "left")):
            nodes.add_column(column, justify=justify)
        for n in swarm["nodes"]:
            nodes.add_row(n["name"], n["peer_id"], f"{n['start']}:{n['end']}",
                          Text(n["state"], style=STATE_STYLES.get(n["state"], "")), f"{n['throughput']:.1f}",
                          str(n["sessions"]), str(n["queued"]), f"{n['free_cache_tokens']} tokens", n["version"],
                          "via relay" if n["relayed"] else "directly")
        if not swarm["nodes"]:
            parts.append(Text(f"no node announces {swarm['model']!r}", style="yellow"))
            continue
        parts += [nodes, _coverage_table(swarm)]
        if "sessions" in swarm:
            lines = [f"client {c['client'][-6:]}: " + " -> ".join(
                f"{labels.get(h['peer_id'], h['peer_id'][-6:])}[{h['start']}:{h['end']}]" for h in c["hops"])
                for c in swarm["sessions"]] or ["no open sessions"]
            lines += [f"node {labels.get(p, p[-6:])} did not answer" for p in swarm["unreachable"]]
            parts.append(Text("sessions (first hop -> ...):\n" + "\n".join(lines)))
    if not view["swarms"]:
        parts.append(Text("no node announces a model", style="yellow"))
    return Group(*parts)


def _ranges(blocks: list[int]) -> str:
    """Ascending block numbers as runs of consecutive ones: [0, 1, 2, 5] -> "0-2, 5"."""
    runs = [[b for _, b in run] for _, run in groupby(enumerate(blocks), lambda ib: ib[1] - ib[0])]
    return ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def run(args: argparse.Namespace) -> None:
    connection = SwarmConnection(args.initial_peers, swarm_key=args.swarm_key)

    def view() -> dict:
        return run_coroutine(snapshot(connection, args.model_name, args.sessions))

    try:
        if args.json:
            while True:
                print(json.dumps(view()), flush=True)
                if args.watch is None:
                    return
                time.sleep(args.watch)
        elif args.watch is None:
            Console().print(render(view()))
        else:
            with Live(render(view()), auto_refresh=False) as live:
                while True:
                    time.sleep(args.watch)
                    live.update(render(view()), refresh=True)
    finally:
        connection.shutdown()
