"""Where a decode step's time goes: when each stage of a step happens in the client and in every node.

    python scripts/bench/timeline.py                     # batch-1 steps of one session through 2 CPU nodes
    python scripts/bench/timeline.py -- python scripts/bench/gpu.py --contexts 128 --new-tokens 100 --sessions 1
    python scripts/bench/timeline.py --window 40 -- python scripts/bench/gpu.py --contexts 128 --sessions 64

Runs a command (by default step_cost.py with one session) whose processes, client and nodes alike, load
timeline_hook/sitecustomize.py: it stamps the stages below on one clock (CLOCK_MONOTONIC), in a file per process.
Stages, in a step's order: the client's ``step`` and ``push`` (its frame to the first node) and ``pushed``
(written); at each node ``frame`` (a push frame read and unpacked), ``submit`` (a step handed to the scheduler),
``forward``, ``launched`` (the span's kernels queued, or computed on a CPU), ``forward done`` (its outputs on the
host), ``push``/``pushed`` (to the next node) and ``output`` (to the client); the client's ``reply`` (a frame
from a node) and ``step done``. A step runs from the client's ``step`` to its ``step done``; the steps that passed
the most common sequence of stages give the median time between consecutive stages; steps of sessions that step
at the same time overlap and are left out. For many sessions, whose steps all overlap, it gives each node's median
forward and the gap between its forwards, and with --window every stamp of a stretch of the run, in time order,
and the share of that stretch in which no node had a forward on its way (nodes on one GPU: its idle time).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def read_stamps(folder: Path) -> list[tuple[int, int, str]]:
    """(ns, pid, stage) of every process, in time order."""
    stamps = []
    for path in folder.glob("*.txt"):
        pid = int(path.stem)
        for line in path.read_text().splitlines():
            ns, stage = line.split(" ", 1)
            stamps.append((int(ns), pid, stage))
    return sorted(stamps)


def name_processes(stamps: list[tuple[int, int, str]]) -> dict[int, str]:
    """'client' for processes that step sessions; node0, node1... for the others, in the order they first read a
    frame (their order in the chain, for a fixed chain)."""
    names = {pid: "client" for _, pid, stage in stamps if stage == "step"}
    nodes = [pid for _, pid, stage in stamps if stage == "frame" and pid not in names]
    for i, pid in enumerate(dict.fromkeys(nodes)):
        names[pid] = f"node{i}"
    return names


def stage_gaps(stamps: list[tuple[int, int, str]], skip: int) -> dict:
    """Median µs between consecutive stages over the steps that share the most common sequence of stages. A step
    is the stamps from a client's ``step`` to its ``step done``; steps that overlap others are left out."""
    names = name_processes(stamps)
    steps: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] | None = None
    open_steps = 0
    for ns, pid, stage in stamps:
        if pid not in names:
            continue
        stepping = names[pid] == "client" and stage == "step"
        if stepping:
            open_steps += 1
            current = [] if open_steps == 1 else None
        if current is not None:
            current.append((ns, f"{names[pid]}: {stage}"))
        if names[pid] == "client" and stage == "step done":
            open_steps = max(open_steps - 1, 0)
            if open_steps == 0 and current is not None:
                steps.append(current)
            current = None
    steps = steps[skip:]  # warm-up
    if not steps:
        raise SystemExit("no complete steps were stamped: did the command step a session?")
    sequences = collections.Counter(tuple(stage for _, stage in step) for step in steps)
    sequence, count = sequences.most_common(1)[0]
    same = [step for step in steps if tuple(stage for _, stage in step) == sequence]
    gaps = [[(b - a) / 1000 for (a, _), (b, _) in zip(step, step[1:])] for step in same]
    return {"steps": len(steps), "steps_in_sequence": count,
            "stages_us": [[f"{a} -> {b}", round(statistics.median(column), 1)]
                          for a, b, column in zip(sequence, sequence[1:], zip(*gaps))],
            "first_to_last_us": round(statistics.median((step[-1][0] - step[0][0]) / 1000 for step in same), 1)}


def forward_figures(stamps: list[tuple[int, int, str]]) -> dict:
    """Per node: its forwards, and the median µs of one (launch to outputs on the host) and of the gap after it, in
    which the node's loop serves streams (or waits for steps); negative where the next forward was queued before
    this one was done. With many sessions these show where a round goes."""
    names = name_processes(stamps)
    figures = {}
    for pid, name in sorted(names.items(), key=lambda item: item[1]):
        begun = [ns for ns, p, stage in stamps if p == pid and stage == "forward"]
        ended = [ns for ns, p, stage in stamps if p == pid and stage == "forward done"]
        pairs = list(zip(begun, ended))
        if len(pairs) > 1:
            gaps = [(a - b) / 1000 for (_, b), (a, _) in zip(pairs, pairs[1:])]
            figures[name] = {"forwards": len(pairs),
                             "forward_us": round(statistics.median((b - a) / 1000 for a, b in pairs), 1),
                             "gap_us": round(statistics.median(gaps), 1)}
    return figures


def window_start(stamps: list[tuple[int, int, str]], start: float) -> int | None:
    """The ns of the step that start (a fraction of the run's steps) into the run began; None without steps."""
    steps = [ns for ns, _, stage in stamps if stage == "step"]
    return steps[int(len(steps) * start)] if steps else None


def window(stamps: list[tuple[int, int, str]], began: int, ms: float) -> list[list]:
    """The stamps of every process in ms milliseconds from began, as [ms since then, process, stage, times]: a
    stage that a process stamps several times in a row is one entry."""
    names = name_processes(stamps)
    events = []
    for ns, pid, stage in stamps:
        if ns < began or pid not in names:
            continue
        if ns > began + ms * 1e6:
            break
        if events and events[-1][1:3] == [names[pid], stage]:
            events[-1][3] += 1
        else:
            events.append([round((ns - began) / 1e6, 3), names[pid], stage, 1])
    return events


def idle_share(stamps: list[tuple[int, int, str]], began: int, ended: int) -> float:
    """The share of [began, ended) ns in which no node had a forward on its way, from its kernels queued
    (``launched``) to its outputs on the host: where the nodes share one GPU, time it had no work of theirs."""
    names = name_processes(stamps)
    launching, on_the_way = collections.Counter(), collections.Counter()
    busy, busy_since = 0, None
    for ns, pid, stage in stamps:
        if names.get(pid, "client") == "client":
            continue
        ns = min(max(ns, began), ended)
        if stage == "forward":
            launching[pid] += 1
        elif stage == "launched" and launching[pid]:
            launching[pid] -= 1
            if not sum(on_the_way.values()):
                busy_since = ns
            on_the_way[pid] += 1
        elif stage == "forward done" and on_the_way[pid]:
            on_the_way[pid] -= 1
            if not sum(on_the_way.values()):
                busy += ns - busy_since
    if sum(on_the_way.values()):
        busy += ended - busy_since
    return round(1 - busy / (ended - began), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", type=int, default=10, help="first steps left out (warm-up)")
    parser.add_argument("--window", type=float, metavar="MS", help="also list every stamp of this many milliseconds "
                        "from 60%% into the run's steps: how the stages of many sessions' steps interleave, and the "
                        "share of that time in which no node had a forward on its way (on one shared GPU: the "
                        "device's idle time)")
    parser.add_argument("command", nargs="*", help="the command to stamp (after --)")
    args = parser.parse_args()
    command = args.command or [sys.executable, str(BENCH / "step_cost.py"), "--sessions", "1", "--steps", "200"]

    with tempfile.TemporaryDirectory(prefix="swarm-timeline-") as folder:
        env = {**os.environ, "SWARM_TIMELINE_DIR": folder,
               "PYTHONPATH": os.pathsep.join([str(BENCH / "timeline_hook"), *filter(None, [os.environ.get("PYTHONPATH")])])}
        result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
        if result.returncode:
            raise SystemExit(f"{command} failed with exit code {result.returncode}")
        lines = result.stdout.strip().splitlines()
        try:
            output = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            output = None
        stamps = read_stamps(Path(folder))
        try:
            gaps = stage_gaps(stamps, args.skip)
        except SystemExit:  # every step overlapped another: many sessions
            gaps = {"steps": 0}
        began = window_start(stamps, 0.6)
        seen = {"window": window(stamps, began, args.window),
                "window_idle_share": idle_share(stamps, began, began + int(args.window * 1e6))
                } if args.window and began is not None else {}
        print(json.dumps({"bench": "timeline", "command": command, **gaps, "forwards": forward_figures(stamps), **seen,
                          "command_output": output}))


if __name__ == "__main__":
    main()
