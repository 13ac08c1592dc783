"""Start a whole swarm on this machine and generate text through it.

    python scripts/local_swarm.py                 # tiny llama it creates, 2 nodes, greedy generation
    python scripts/local_swarm.py --nodes 3 --model PATH --prompt "Once upon a time"

Starts a bootstrap peer and N nodes on loopback (the layers split evenly), runs the client, prints the
text and tokens/s, and stops every process it started.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from swarm.cli import EXIT_WITH_PARENT  # noqa: E402

SWARM = [sys.executable, "-m", "swarm.cli"]


def scratch_folder(prefix: str) -> Path:
    """A temporary folder (models, logs) removed when this process exits."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


class LocalSwarm:
    """A bootstrap peer and nodes as child processes on 127.0.0.1; a context manager that stops them all.

    Should this process die without stopping them, they end too (swarm/cli.py EXIT_WITH_PARENT).
    """

    def __init__(self, log_dir: str | Path | None = None):
        self.log_dir = Path(log_dir or scratch_folder("swarm-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self.initial_peers: list[str] = []
        self.node_arguments: list[str] = []  # given to every node it starts

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, args: list[str], netns: str | None = None) -> subprocess.Popen:
        # the child ends with this process even when it is killed before it can stop its children
        env = {**os.environ, "PYTHONUNBUFFERED": "1", EXIT_WITH_PARENT: str(os.getpid())}
        log = open(self.log_dir / f"{name}.log", "w")
        args = ["ip", "netns", "exec", netns, *args] if netns else args
        # its own process group: killing a node must also end its DHT process and libp2p daemon
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
        process.name = name
        self.processes.append(process)
        return process

    def _wait_ready(self, process: subprocess.Popen, ready_marker: str, timeout: float) -> list[str]:
        """Read the child's stdout until ready_marker shows; returns the lines read."""
        lines, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if ready_marker in line:
                return lines
        log = self.log_dir / f"{process.name}.log"
        raise RuntimeError(f"{process.name} did not start; its output:\n" + "\n".join(lines)
                           + "\n" + log.read_text()[-3000:])

    def start_bootstrap(self, *extra: str, netns: str | None = None, timeout: float = 60) -> list[str]:
        """Start a bootstrap peer (on 127.0.0.1 unless extra says --host); returns its multiaddrs."""
        process = self._spawn("bootstrap", SWARM + ["bootstrap", "--host", "127.0.0.1", "--port", "0", *extra], netns)
        self.initial_peers = self._wait_ready(process, "/p2p/", timeout)[-1].split()
        return self.initial_peers

    def start_nodes(self, model: str | Path, spans: list[tuple[int, int] | None], *extra: str,
                    netns: str | None = None, timeout: float = 120) -> list[subprocess.Popen]:
        """Start one node per (start, end) span, all at once, and wait until every one serves. A span of None
        starts a node without --blocks: it picks its span itself. netns: a network namespace to run them in."""
        processes = [
            self._spawn(f"node-{len(self.processes)}-{f'{span[0]}-{span[1]}' if span else 'auto'}",
                        SWARM + ["node", "--model", str(model), *(["--blocks", f"{span[0]}:{span[1]}"] if span else []),
                                 "--initial-peers", *self.initial_peers, *self.node_arguments, *extra], netns)
            for span in spans
        ]
        for process in processes:
            ready = self._wait_ready(process, "node serving", timeout)[-1]
            process.peer_id = ready.rsplit("/p2p/", 1)[-1]
        for process, span in zip(processes, spans):
            process.span = span
        return processes

    def start_api(self, model: str | Path, port: int, *extra: str, timeout: float = 120) -> str:
        """Start `swarm api` for the model on 127.0.0.1:port; returns its base URL."""
        process = self._spawn("api", SWARM + ["api", "--model", str(model), "--port", str(port), *extra,
                                              "--initial-peers", *self.initial_peers])
        self._wait_ready(process, "serving", timeout)
        return f"http://127.0.0.1:{port}/v1"

    def node_process(self, peer_id: str) -> subprocess.Popen:
        return next(p for p in self.processes if getattr(p, "peer_id", None) == peer_id)

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        """End a child at once, as a crash or power cut would, with the processes it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self, timeout: float = 15) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            self.kill(process)  # whatever the child left behind in its group
        self.processes = []


def split_blocks(num_blocks: int, num_nodes: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / num_nodes) for i in range(num_nodes + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if a < b]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local transformers checkpoint (default: a tiny llama created here)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--prompt", default="A swarm of volunteer machines")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from client import DistributedModelForCausalLM
    from make_tiny_model import make_tiny_model
    from swarm.checkpoint import load_config

    workdir = scratch_folder("local-swarm-")
    model_path = Path(args.model) if args.model else make_tiny_model(workdir / "tiny-llama", "llama")
    num_blocks = load_config(model_path).num_hidden_layers
    with LocalSwarm(workdir / "logs") as swarm:
        swarm.start_bootstrap()
        spans = split_blocks(num_blocks, args.nodes)
        swarm.start_nodes(model_path, spans)
        print(f"{len(spans)} nodes up, serving blocks {', '.join(f'{a}:{b}' for a, b in spans)}")
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        with DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.initial_peers) as model:
            inputs = tokenizer(args.prompt, return_tensors="pt")
            model.generate(**inputs, max_new_tokens=2)  # warm-up: connections and first-call overheads
            began = time.perf_counter()
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            elapsed = time.perf_counter() - began
        new_tokens = output.shape[1] - inputs.input_ids.shape[1]
        print(f"prompt: {args.prompt!r}")
        print(f"generated: {tokenizer.decode(output[0, inputs.input_ids.shape[1]:])!r}")
        print(f"{new_tokens} tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} tokens/s through {args.nodes} nodes")


if __name__ == "__main__":
    main()
