"""A node's decode step on the GPU, per layer: eager, replayed from CUDA graphs, and compiled then replayed.

    python scripts/bench/decode_step.py                       # 8 layers, batch 1 8 64, contexts 128 2048
    python scripts/bench/decode_step.py --modes graph compiled --batches 1 --contexts 128

Layers of Llama 3 8B's shape get random bfloat16 weights made on the GPU, saved to /dev/shm (or a temporary
folder) and loaded by a Span as a node loads them. For each batch size and context, a step's time is the
median over rounds of the mean of many steps, divided by the layers. "matmuls" replays a CUDA graph of only
the layers' linear layers (cuBLAS): the floor that fusing the other kernels can approach. The roofline is
a layer's weight bytes over the measured copy bandwidth; "roofline" gives the fraction reached at batch 1.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpu import LLAMA_8B, copy_bandwidth  # noqa: E402
from node.attention import DecodeBatch, PagedCache  # noqa: E402
from node.cuda_graphs import DecodeGraphs  # noqa: E402
from node.kv_cache import PagePool, SequenceCache  # noqa: E402
from node.span import Span  # noqa: E402


def make_layers(path: Path, layers: int) -> None:
    """Save an 8B-shaped Llama of `layers` layers with random bfloat16 weights (made on the GPU) at path."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**LLAMA_8B, "vocab_size": 256}, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(path, max_shard_size="4GB")


def time_ms(step, rounds: int = 5, steps: int = 50) -> float:
    """Median over rounds of the mean time of one step (ms), measured with CUDA events."""
    step()
    times = []
    for _ in range(rounds):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / steps)
    return statistics.median(times)


def matmul_graph(span: Span, batch: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of every linear layer of the span at this batch size, weights only (no bias, no epilogue)."""
    linears = [m for layer in span.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(batch, m.in_features, dtype=span.dtype, device="cuda") for m in linears}
    for m in linears:  # cuBLAS picks its kernels outside the capture
        torch.nn.functional.linear(inputs[m.in_features], m.weight)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for m in linears:
            torch.nn.functional.linear(inputs[m.in_features], m.weight)
    return graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--modes", nargs="+", default=["eager", "graph", "compiled", "matmuls"],
                        choices=["eager", "graph", "compiled", "matmuls"])
    parser.add_argument("--max-batch-size", type=int, default=64, help="largest graph bucket, as a node's")
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        make_layers(folder, args.layers)
        torch.cuda.empty_cache()
        span = Span(folder, 0, args.layers, "cuda", torch.bfloat16)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    layer_bytes = sum(p.numel() * p.element_size() for p in span.layers[0].parameters())
    bandwidth = copy_bandwidth()
    floor_ms = 1000 * layer_bytes / bandwidth
    max_context = max(args.contexts)
    pool = PagePool(args.layers, max(args.batches) * -(-max_context // args.page_size), args.page_size, span.kv_heads,
                    span.head_dim, torch.bfloat16, "cuda")
    hidden = torch.randn(max(args.batches), span.config.hidden_size, dtype=torch.bfloat16, device="cuda")

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
              "copy_bandwidth_GBps": round(bandwidth / 1e9), "layer_MB": round(layer_bytes / 1e6, 1),
              "floor_ms_per_layer": round(floor_ms, 4), "capture_s": {}, "ms_per_layer": {}, "roofline": {}}
    for mode in args.modes:
        graphs = None
        if mode in ("graph", "compiled"):
            began = time.perf_counter()
            graphs = DecodeGraphs(span, pool, args.max_batch_size, max_context, compile=mode == "compiled")
            result["capture_s"][mode] = round(time.perf_counter() - began, 1)
        times = result["ms_per_layer"][mode] = {}
        for batch in args.batches:
            matmuls = matmul_graph(span, batch) if mode == "matmuls" else None
            for context in args.contexts:
                seqs = [SequenceCache() for _ in range(batch)]
                for seq in seqs:
                    pool.reserve(seq, context)
                    seq.length = context - 1  # the step writes and attends to the last token
                if mode == "eager":
                    cache = PagedCache(pool, DecodeBatch.build(seqs, pool.page_size, "cuda"), 0)
                    with torch.inference_mode():
                        ms = time_ms(lambda: span.run_blocks(hidden[:batch], cache, 0, args.layers))
                elif mode == "matmuls":
                    ms = time_ms(matmuls.replay)
                else:
                    graphs.run(hidden[:batch], seqs)  # fills the static inputs
                    bucket = next(b for b in graphs.buckets if b >= batch)
                    ms = time_ms(graphs.graphs[bucket].replay)
                for seq in seqs:
                    pool.release(seq)
                times[f"b{batch}_c{context}"] = round(ms / args.layers, 4)
                if batch == 1:
                    result["roofline"][f"{mode}_c{context}"] = round(floor_ms * args.layers / ms, 3)
        del graphs
        torch.cuda.empty_cache()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
