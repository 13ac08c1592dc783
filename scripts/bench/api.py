"""`swarm api` throughput: completion tokens/s through the OpenAI-compatible server on a 2-node loopback swarm.

    python scripts/bench/api.py                          # tiny llama created here
    python scripts/bench/api.py --concurrency 1 16 --long-tokens 1000 --model PATH

Starts a bootstrap peer, 2 nodes and `swarm api` as processes on this machine; the requests come from this
process through the openai package, greedy (temperature 0), each with a prompt of its own. Prints one JSON
line: tokens/s of one long completion (--long-tokens), and aggregate completion tokens/s of N requests at
once (--requests-per-slot rounds of --max-tokens each) for each --concurrency.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from local_swarm import LocalSwarm, scratch_folder, split_blocks  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local transformers checkpoint (default: a tiny llama created here)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=48, help="per request of the concurrent rounds")
    parser.add_argument("--requests-per-slot", type=int, default=2)
    parser.add_argument("--long-tokens", type=int, default=400)
    args = parser.parse_args()

    import openai

    from make_tiny_model import make_tiny_model
    from swarm.checkpoint import load_config

    workdir = scratch_folder("bench-api-")
    model_path = Path(args.model) if args.model else make_tiny_model(workdir / "tiny-llama", "llama")
    result: dict = {"bench": "api", "model": model_path.name, "nodes": 2, "max_tokens": args.max_tokens,
                    "tokens_per_s": {}}
    with LocalSwarm(workdir / "logs") as swarm, contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        swarm.start_bootstrap()
        swarm.start_nodes(model_path, split_blocks(load_config(model_path).num_hidden_layers, 2),
                          "--max-requests-per-peer", "1000000")
        api = openai.OpenAI(base_url=swarm.start_api(model_path, free_port(), "--max-concurrency",
                                                     str(max(args.concurrency))),
                            api_key="unused", max_retries=0, timeout=600)

        def complete(prompt: str, max_tokens: int) -> int:
            # min_tokens would need an extension of the API; a tiny random model rarely picks its end token
            return api.completions.create(model=model_path.name, prompt=prompt, max_tokens=max_tokens,
                                          temperature=0).usage.completion_tokens

        complete("warm-up", 8)
        began = time.perf_counter()
        tokens = complete("A long completion", args.long_tokens)
        result["long_completion"] = {"tokens": tokens, "tokens_per_s": round(tokens / (time.perf_counter() - began), 1)}
        for n in args.concurrency:
            began = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                tokens = sum(pool.map(lambda i: complete(f"Request {i} says", args.max_tokens),
                                      range(n * args.requests_per_slot)))
            result["tokens_per_s"][n] = round(tokens / (time.perf_counter() - began), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
