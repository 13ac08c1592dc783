"""Aggregate decode throughput of concurrent sessions through a 2-node loopback swarm, and KV utilization.

    python scripts/bench/batching.py                    # tiny llama created here; 1, 4, 16, 32 sessions
    python scripts/bench/batching.py --sessions 1 8 --new-tokens 32 --model PATH

One client process opens N inference sessions and decodes them as N concurrent coroutines on its event
loop (InferenceSession.astep), each greedily generating --new-tokens after a --prompt-tokens prompt of its
own, with the model's embeddings, final norm and head (a llama-like checkpoint). Coroutines stepping their
sessions cost the client least per token, so the nodes' batching shows (concurrent generate() calls batch
their steps too, client/batching.py, but each also runs its own decode loop). Prints one
JSON line: decoded tokens/s over all sessions per concurrency (prefill excluded), the speedup over one
session, and the nodes' pages in use vs tokens held while every session still holds its cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from local_swarm import LocalSwarm, scratch_folder, split_blocks  # noqa: E402


async def decode(session, model, prompt, new_tokens: int, prefilled: asyncio.Barrier) -> None:
    import torch

    embed, norm, head = model.get_input_embeddings(), model.base_model.norm, model.get_output_embeddings()
    with torch.inference_mode():
        ids = prompt.tolist()
        out = await session.astep(embed(prompt)[None], token_ids=[ids])
        await prefilled.wait()
        for _ in range(new_tokens):
            token = head(norm(out[:, -1:])).argmax(-1)
            out = await session.astep(embed(token), token_ids=[token[0].tolist()])


def run_sessions(model, sessions: int, prompt_tokens: int, new_tokens: int, seed: int) -> tuple[float, list[dict]]:
    """Decode `sessions` sessions at once; returns the seconds the decoding took and the nodes' stats after it."""
    import torch

    from client.remote import run_coroutine
    from client.session import InferenceSession

    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, model.config.vocab_size, (prompt_tokens,), generator=generator) for _ in range(sessions)]
    opened = [InferenceSession(model.connection, model.swarm_model_name, model.num_blocks,
                               prompt_tokens + new_tokens + 1).__enter__() for _ in range(sessions)]
    try:
        async def decode_all() -> float:
            prefilled = asyncio.Barrier(sessions + 1)
            tasks = [asyncio.create_task(decode(s, model, p, new_tokens, prefilled)) for s, p in zip(opened, prompts)]
            await prefilled.wait()
            began = time.perf_counter()
            await asyncio.gather(*tasks)
            return time.perf_counter() - began

        elapsed = run_coroutine(decode_all())
        records = run_coroutine(model.connection.records(model.swarm_model_name))
        stats = [run_coroutine(model.connection.node_stats(r.peer_id)) for r in records]
    finally:
        for session in opened:
            session.close()
    return elapsed, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local transformers checkpoint (default: a tiny llama created here)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--prompt-tokens", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args()

    import torch

    from client import DistributedModelForCausalLM
    from make_tiny_model import make_tiny_model
    from swarm.checkpoint import load_config

    torch.set_num_threads(1)  # each process gets one core's worth of torch threads: the nodes get --num-threads 1
    workdir = scratch_folder("bench-batching-")
    model_path = Path(args.model) if args.model else make_tiny_model(workdir / "tiny-llama", "llama")
    result: dict = {"bench": "batching", "model": model_path.name, "nodes": 2, "prompt_tokens": args.prompt_tokens,
                    "new_tokens": args.new_tokens, "tokens_per_s": {}, "kv_utilization": {}, "pages_used": {},
                    "tokens_held": {}}
    with LocalSwarm(workdir / "logs") as swarm:
        swarm.start_bootstrap()
        swarm.start_nodes(model_path, split_blocks(load_config(model_path).num_hidden_layers, 2),
                          "--page-size", str(args.page_size), "--num-threads", "1",
                          "--max-requests-per-peer", "1000000")  # the one client may send over 1000 steps/s
        with DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.initial_peers) as model:
            run_sessions(model, 2, args.prompt_tokens, 4, seed=0)  # warm-up: streams, first-call overheads
            for n in args.sessions:
                elapsed, stats = run_sessions(model, n, args.prompt_tokens, args.new_tokens, seed=n)
                pages = sum(s["pages_used"] for s in stats)
                tokens = sum(s["tokens_held"] for s in stats)
                result["tokens_per_s"][n] = round(n * args.new_tokens / elapsed, 1)
                result["pages_used"][n], result["tokens_held"][n] = pages, tokens
                result["kv_utilization"][n] = round(tokens / (pages * args.page_size), 3)
    rates = result["tokens_per_s"]
    first = args.sessions[0]
    result["speedup_vs_%d_session" % first] = {n: round(rate / rates[first], 2) for n, rate in rates.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
