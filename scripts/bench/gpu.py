"""GPU decode: an 8B-shaped Llama in bfloat16 served by 2 nodes on one GPU, against local transformers.

    python scripts/bench/gpu.py                          # 8B shape, 32 layers, 2 nodes of 16
    python scripts/bench/gpu.py --layers 4 --new-tokens 32 --sessions 1 4   # a quick check

The model (Llama 3 8B's shape) gets random weights created on the GPU and is saved to /dev/shm (or a
temporary folder), so the nodes load the same weights. In one run:
  - local transformers `generate` (eager, greedy, bfloat16, its default attention) and then the swarm's
    `generate` (client embeddings and head on the same GPU; nodes with paged KV cache and CUDA graphs) each
    decode --new-tokens tokens after prompts of each --contexts length; per-token latency is the median
    time between consecutive decode steps (a streamer stamps them after a device sync);
  - aggregate decode tokens/s of N concurrent sessions (--sessions), spread over --client-processes
    client processes: each session is a coroutine that decodes greedily, one token per step. In a
    deployment every user computes embeddings and the head on their own machine; here the users of one
    process share its client and GPU, so their head steps are batched (the sessions stay separate at the
    nodes, which batch their steps);
  - the roofline: bytes of weights a decode step reads (all blocks, final norm and lm head) divided by the
    GPU's measured copy bandwidth, and the fraction of it that batch-1 decoding reaches.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from local_swarm import LocalSwarm  # noqa: E402

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)


def make_model(path: Path, layers: int):
    """An 8B-shaped Llama with random bfloat16 weights made on the GPU, saved at path; returns the model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA_8B, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path, max_shard_size="4GB")
    return model


def weight_bytes_per_step(model) -> int:
    """Bytes every decode step reads: all parameters but the input embedding table (one row per token)."""
    embeddings = model.get_input_embeddings().weight
    tied = embeddings is model.get_output_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - (0 if tied else embeddings.numel() * embeddings.element_size())


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 2 GiB (read + write)."""
    source = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize()
    return 10 * 2 * source.numel() * source.element_size() / (time.perf_counter() - began)


class StepClock:
    """A streamer that stamps each new token after the device has finished it (the first put is the prompt)."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def median_ms(self) -> float:
        tokens = self.stamps[1:]
        return 1000 * statistics.median(b - a for a, b in zip(tokens, tokens[1:]))


def decode_latency_ms(model, context: int, new_tokens: int) -> tuple[float, list[int]]:
    """Median per-token latency of greedy generate after a random prompt of context tokens; and the tokens."""
    ids = torch.randint(3, 1000, (1, context), generator=torch.Generator().manual_seed(context)).to(model.device)
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up: first-time kernel choices
    clock = StepClock()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock)
    return clock.median_ms(), out[0, context:].tolist()


class HeadBatcher:
    """Final norm, lm head and embedding of the next token for every session that reaches them in the same
    event-loop turn, in one batch; the loop serves the sessions' streams while the GPU computes."""

    def __init__(self, model):
        self.norm, self.head, self.embed = model.base_model.norm, model.get_output_embeddings(), model.get_input_embeddings()
        self.pending: list[tuple[torch.Tensor, asyncio.Future]] = []

    def next_input(self, hidden: torch.Tensor) -> asyncio.Future:
        """hidden [1, 1, H] after the last block -> future of the next token's embedding [1, 1, H] (on the host)."""
        future = asyncio.get_running_loop().create_future()
        if not self.pending:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))
        self.pending.append((hidden, future))
        return future

    async def _flush(self) -> None:
        from node.scheduler import copy_to_host

        pending, self.pending = self.pending, []
        try:
            with torch.inference_mode():
                # one op per batch and none per decoding session: the client's loop serves all sessions
                last = torch.cat([h if h.shape[1] == 1 else h[:, -1:] for h, _ in pending]).view(len(pending), -1)
                hidden = last.pin_memory().to("cuda", non_blocking=True)
                embedded = self.embed(self.head(self.norm(hidden)).argmax(-1))
            host, copied = copy_to_host(embedded)
            while not copied.query():  # polled between the loop's turns, as the node's scheduler does
                await asyncio.sleep(0)
            rows = host.view(len(pending), 1, 1, -1).unbind()
        except Exception as e:  # fail the sessions instead of leaving them waiting
            for _, future in pending:
                future.set_exception(e)
            return
        for (_, future), row in zip(pending, rows):
            future.set_result(row)


async def node_counters(model) -> dict[str, float]:
    """Forward passes, tokens, forward seconds and CPU seconds summed over the nodes; and how many nodes."""
    records = await model.connection.records(model.swarm_model_name)
    stats = [await model.connection.node_stats(r.peer_id) for r in records]
    return {"nodes": len(stats), **{key: sum(s.get(key, 0) for s in stats)
                                    for key in ("forwards", "batched_tokens", "forward_s", "cpu_s")}}


async def decode_sessions(model, sessions: int, context: int, new_tokens: int, seed: int, ready,
                          go) -> tuple[float, float, float]:
    """Open and prefill sessions (random prompts), wait at the barriers, then decode new_tokens greedy tokens
    in each; returns when decoding began and ended (time.monotonic, comparable between processes) and the
    CPU seconds this process spent meanwhile."""
    from client.session import InferenceSession

    batcher = HeadBatcher(model)
    generator = torch.Generator().manual_seed(seed)
    prefilled, started, done = [asyncio.Event() for _ in range(sessions)], asyncio.Event(), []

    async def one_session(prefilled: asyncio.Event) -> None:
        prompt = torch.randint(3, 1000, (context,), generator=generator)
        async with InferenceSession(model.connection, model.swarm_model_name, model.num_blocks,
                                    context + new_tokens + 1) as session:
            with torch.inference_mode():
                out = await session.astep(model.get_input_embeddings()(prompt.to("cuda"))[None].cpu())
                hidden = await batcher.next_input(out)
                prefilled.set()
                await started.wait()
                for _ in range(new_tokens):
                    out = await session.astep(hidden)
                    hidden = await batcher.next_input(out)
            done.append(time.monotonic())

    tasks = [asyncio.create_task(one_session(event)) for event in prefilled]
    await asyncio.gather(*(event.wait() for event in prefilled))
    await asyncio.to_thread(ready.wait)
    await asyncio.to_thread(go.wait)
    began, cpu = time.monotonic(), time.process_time()
    started.set()
    await asyncio.gather(*tasks)
    return began, max(done), time.process_time() - cpu


def client_process(model_path: Path, initial_peers: list[str], sessions: int, context: int, new_tokens: int,
                   seed: int, ready, go, results) -> None:
    """One process of users: its own client (DHT peer, embeddings and head on the GPU) and sessions."""
    from client import DistributedModelForCausalLM
    from client.remote import run_coroutine

    # its host work is small copies between the loop's turns: threads of torch's CPU ops would spin on the cores
    # that the nodes and this loop need (one process of 64 sessions kept 10.7 cores busy with them, on an H100 host)
    torch.set_num_threads(1)
    with DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=initial_peers, dtype=torch.bfloat16,
                                                     device="cuda") as model:
        results.put(run_coroutine(decode_sessions(model, sessions, context, new_tokens, seed, ready, go)))


def aggregate_tokens_per_s(model, model_path: Path, initial_peers: list[str], sessions: int, processes: int,
                           context: int, new_tokens: int) -> tuple[float, dict]:
    """Decode tokens/s of concurrent sessions spread over client processes; and the nodes' mean decode batch,
    the share of the time a node spent in forward passes, and the CPU cores a node and a client process kept
    busy."""
    import multiprocessing

    from client.remote import run_coroutine

    spawn = multiprocessing.get_context("spawn")  # CUDA does not survive fork
    processes = min(processes, sessions)
    ready, go, results = spawn.Barrier(processes + 1), spawn.Barrier(processes + 1), spawn.Queue()
    workers = [spawn.Process(target=client_process, args=(model_path, initial_peers, share, context, new_tokens,
                                                          seed, ready, go, results))
               for seed, share in enumerate(sessions // processes + (i < sessions % processes) for i in range(processes))]
    for worker in workers:
        worker.start()
    ready.wait(timeout=600)
    before = run_coroutine(node_counters(model))
    go.wait(timeout=60)
    spans = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    after = run_coroutine(node_counters(model))
    elapsed = max(end for _, end, _ in spans) - min(began for began, _, _ in spans)
    forwards = after["forwards"] - before["forwards"]
    return sessions * new_tokens / elapsed, {
        "mean_batch": round((after["batched_tokens"] - before["batched_tokens"]) / forwards, 1),
        "node_busy": round((after["forward_s"] - before["forward_s"]) / after["nodes"] / elapsed, 2),
        "node_cpu_cores": round((after["cpu_s"] - before["cpu_s"]) / after["nodes"] / elapsed, 2),
        "client_cpu_cores": round(sum(cpu for _, _, cpu in spans) / processes / elapsed, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (split evenly over the nodes)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--new-tokens", type=int, default=128, help="decode steps timed per latency figure")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--session-tokens", type=int, default=64, help="tokens each concurrent session decodes")
    parser.add_argument("--session-context", type=int, default=128)
    parser.add_argument("--client-processes", type=int, default=1, help="processes the concurrent sessions are "
                        "spread over (one client process of many users is bound by its own event loop)")
    parser.add_argument("--kv-cache-gb", type=float, default=4.0, help="per node")
    parser.add_argument("--node-max-batch-size", type=int, help="the nodes' --max-batch-size (default: theirs)")
    args = parser.parse_args()

    from client import DistributedModelForCausalLM
    from local_swarm import split_blocks

    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-", dir=shm if shm.is_dir() else None))
    try:
        model_path = workdir / "llama-8b-shape"
        local = make_model(model_path, args.layers)
        weight_bytes = weight_bytes_per_step(local)
        bandwidth = copy_bandwidth()
        local_ms, local_tokens, local_no_cudnn_ms = {}, {}, {}
        for context in args.contexts:
            local_ms[context], local_tokens[context] = decode_latency_ms(local, context, args.new_tokens)
        # transformers' default SDPA may pick cuDNN attention, which builds a plan for every new key length
        torch.backends.cuda.enable_cudnn_sdp(False)
        for context in args.contexts:
            local_no_cudnn_ms[context], _ = decode_latency_ms(local, context, args.new_tokens)
        torch.backends.cuda.enable_cudnn_sdp(True)
        del local
        torch.cuda.empty_cache()

        swarm_ms, same_tokens, aggregate, batching = {}, {}, {}, {}
        with LocalSwarm(workdir / "logs") as swarm:
            swarm.start_bootstrap()
            swarm.start_nodes(model_path, split_blocks(args.layers, args.nodes), "--device", "cuda", "--dtype",
                              "bfloat16", "--kv-cache-gb", str(args.kv_cache_gb), "--throughput", "100",
                              "--max-sessions-per-peer", "1024", "--max-requests-per-peer", "1000000",
                              *(["--max-batch-size", str(args.node_max_batch_size)] if args.node_max_batch_size else []),
                              timeout=600)
            with DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.initial_peers,
                                                             dtype=torch.bfloat16, device="cuda") as model:
                for context in args.contexts:
                    swarm_ms[context], tokens = decode_latency_ms(model, context, args.new_tokens)
                    same_tokens[context] = next((i for i, (a, b) in enumerate(zip(tokens, local_tokens[context]))
                                                 if a != b), len(tokens))
                for sessions in args.sessions:
                    aggregate[sessions], batching[sessions] = aggregate_tokens_per_s(
                        model, model_path, swarm.initial_peers, sessions, args.client_processes, args.session_context,
                        args.session_tokens)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    floor_ms = 1000 * weight_bytes / bandwidth
    first = args.contexts[0]
    print(json.dumps({
        "bench": "gpu", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
        "nodes": args.nodes, "client_processes": args.client_processes, "dtype": "bfloat16", "new_tokens": args.new_tokens,
        "node_max_batch_size": args.node_max_batch_size,
        "per_token_ms": {"swarm": {c: round(v, 3) for c, v in swarm_ms.items()},
                         "local_generate": {c: round(v, 3) for c, v in local_ms.items()},
                         "local_generate_without_cudnn_sdpa": {c: round(v, 3) for c, v in local_no_cudnn_ms.items()}},
        "swarm_vs_local": {c: round(swarm_ms[c] / local_ms[c], 3) for c in args.contexts},
        "same_greedy_tokens_as_local": same_tokens,
        "aggregate_tokens_s": {n: round(v, 1) for n, v in aggregate.items()},
        "aggregate_vs_single_session": {n: round(v / aggregate[args.sessions[0]], 2) for n, v in aggregate.items()},
        "node_batching": batching,
        "roofline": {"weight_gb_per_step": round(weight_bytes / 1e9, 3), "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3),
                     "floor_ms": round(floor_ms, 3), "swarm_fraction": round(floor_ms / swarm_ms[first], 3),
                     "local_fraction": round(floor_ms / local_ms[first], 3)},
    }))


if __name__ == "__main__":
    main()
