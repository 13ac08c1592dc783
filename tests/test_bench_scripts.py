"""Benchmarks under scripts/bench run end to end and print one JSON line of figures."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench"


def run_script(script: Path, *args: str, timeout: float = 300) -> dict:
    """Run a benchmark script; it must succeed and print exactly one JSON line, which is returned."""
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = result.stdout.strip().splitlines()
    return json.loads(line)


def test_batching_bench_prints_one_json_line():
    figures = run_script(BENCH / "batching.py", "--sessions", "1", "3", "--new-tokens", "6")
    assert set(figures["tokens_per_s"]) == {"1", "3"} and all(rate > 0 for rate in figures["tokens_per_s"].values())
    # each node holds every session's 20-token prompt and 6 decoded tokens: 26 tokens in 2 pages of 16
    assert figures["tokens_held"]["3"] == 3 * 2 * 26 and figures["pages_used"]["3"] == 3 * 2 * 2
    assert figures["kv_utilization"]["3"] == round(26 / 32, 3)


@pytest.mark.slow  # pushing itself is tests/test_formation.py's; this checks the script
def test_push_bench_prints_one_json_line():
    figures = run_script(BENCH / "push.py", "--hidden-size", "256", "--steps", "10")
    assert set(figures["per_token_ms"]) == {"push", "no_push", "one_node"}
    # every step ran forwards at the nodes, and took longer than them
    assert all(0 < figures["forward_ms"][name] < figures["per_token_ms"][name] for name in figures["per_token_ms"])
    assert figures["per_hop_overhead_ms"] > 0


def test_compression_bench_prints_one_json_line():
    figures = run_script(BENCH / "compression.py", "--hidden-size", "256", "--tokens", "1", "64", "--repeats", "2")
    results = figures["results"]
    assert set(results) == {f"{dtype}/{tokens}" for dtype in ("float32", "float16", "bfloat16") for tokens in (1, 64)}
    assert all(0 < r["compressed_fraction"] < 1 and r["break_even_mbit_s"] > 0 for r in results.values())


def test_timeline_stamps_a_step_through_the_chain_in_order():
    figures = run_script(BENCH / "timeline.py", "--skip", "5", "--window", "1000", "--", sys.executable,
                         str(BENCH / "step_cost.py"), "--sessions", "1", "--steps", "40")
    assert figures["command_output"]["bench"] == "step_cost" and figures["steps_in_sequence"] >= 10
    stages = [gap[0].split(" -> ")[0] for gap in figures["stages_us"]] + [figures["stages_us"][-1][0].split(" -> ")[1]]
    assert stages[0] == "client: step" and stages[-1] == "client: step done"
    # the client pushes to node0, which computes and pushes to node1, which computes and answers
    chain = ["client: push", "node0: frame", "node0: submit", "node0: forward", "node0: launched",
             "node0: forward done", "node0: push", "node1: frame", "node1: forward", "node1: forward done",
             "node1: output"]
    assert [stage for stage in stages if stage in chain] == chain
    assert all(us >= 0 for _, us in figures["stages_us"]) and figures["first_to_last_us"] > 0
    # every node's forwards, and a window of the run's stamps in time order
    assert all(figures["forwards"][node]["forwards"] >= 40 and figures["forwards"][node]["forward_us"] > 0
               for node in ("node0", "node1"))
    times = [ms for ms, _, _, _ in figures["window"]]
    assert times == sorted(times) and {"client: step", "node0: forward", "node1: output"} <= {
        f"{process}: {stage}" for _, process, stage, _ in figures["window"]}
    assert 0 <= figures["window_idle_share"] <= 1


def test_timeline_counts_the_time_no_node_had_a_forward_on_its_way():
    """Two nodes' forwards, from their kernels queued to their outputs on the host, overlap in 10-50 ns and one
    more runs in 60-70 ns: of a window of 100 ns, 50 had none on its way. A forward launched before the window
    counts from its start."""
    spec = importlib.util.spec_from_file_location("timeline", BENCH / "timeline.py")
    timeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timeline)
    client, node0, node1 = 1, 2, 3
    stamps = [(0, client, "step"), (0, node0, "frame"), (1, node0, "forward"), (10, node0, "launched"),
              (5, node1, "frame"), (15, node1, "forward"), (20, node1, "launched"), (30, node0, "forward done"),
              (50, node1, "forward done"), (55, node0, "forward"), (60, node0, "launched"),
              (70, node0, "forward done"), (80, client, "step done")]
    assert timeline.idle_share(sorted(stamps), 0, 100) == 0.5
    assert timeline.idle_share(sorted(stamps), 25, 125) == 0.65  # 25-50 and 60-70 busy


@pytest.mark.slow  # failover itself is tests/test_failover.py's; this checks the script
def test_failover_bench_prints_one_json_line():
    figures = run_script(BENCH / "failover.py", "--context", "300", "--rounds", "1")
    assert figures["failovers"] == 1 and len(figures["kill_to_next_token_s"]) == 1


def test_chaos_runner_completes_every_session_exactly():
    figures = run_script(BENCH.parent / "chaos.py", "--duration", "16", "--sessions", "4", "--replicas", "2",
                         "--interval", "4", timeout=400)
    assert figures["kills"] + figures["sigterms"] == 3
    assert figures["sessions_started"] == figures["sessions_completed"] == figures["exact"] > 0, figures


@pytest.mark.slow  # the server itself is tests/test_api.py's; this checks the script
def test_api_bench_prints_one_json_line():
    figures = run_script(BENCH / "api.py", "--concurrency", "1", "2", "--max-tokens", "6", "--requests-per-slot", "1",
                         "--long-tokens", "12")
    assert set(figures["tokens_per_s"]) == {"1", "2"} and all(rate > 0 for rate in figures["tokens_per_s"].values())
    assert 0 < figures["long_completion"]["tokens"] <= 12 and figures["long_completion"]["tokens_per_s"] > 0
