"""Lossless compression of hidden states on the wire (InferenceSession(compress=True)): bytes saved and CPU cost.

    python scripts/bench/compression.py
    python scripts/bench/compression.py --hidden-size 8192 --tokens 1 512

The hidden states are those after the second block of a random-initialized Llama (4096 wide by default; two
blocks with a narrow MLP, so it builds in seconds), one decode row and a prefill of --tokens rows, in each
wire dtype. For each: the compressed size as a fraction of the raw bytes, and the sender's (encode) and
receiver's (decode) time per step. "break_even_mbit_s" is the link speed below which compressing pays:
there, the saved bytes take longer to send than encoding and decoding them take. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from swarm.protocol import DTYPES, decode_tensor, encode_tensor  # noqa: E402


def hidden_states(hidden_size: int, tokens: int) -> torch.Tensor:
    """[tokens, hidden_size] float32 outputs of block 2 of a random Llama, for random token ids."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    heads = hidden_size // 128
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden_size, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=min(8, heads), max_position_embeddings=tokens)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        return model(torch.randint(0, 1024, (1, tokens)), output_hidden_states=True).hidden_states[2][0]


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2048], help="rows per step")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a node or client encodes on its event loop's thread
    states = hidden_states(args.hidden_size, max(args.tokens))
    result: dict = {"bench": "compression", "hidden_size": args.hidden_size, "results": {}}
    for name, dtype in DTYPES.items():
        for tokens in args.tokens:
            hidden = states[-tokens:].to(dtype).contiguous()
            raw = len(encode_tensor(hidden)["data"])
            encoded = encode_tensor(hidden, compress=True)
            assert torch.equal(decode_tensor(encoded).view(torch.uint8), hidden.view(torch.uint8))
            encode_s = median_seconds(lambda: encode_tensor(hidden, compress=True), args.repeats)
            decode_s = median_seconds(lambda: decode_tensor(encoded), args.repeats)
            saved = raw - len(encoded["data"])
            result["results"][f"{name}/{tokens}"] = {
                "raw_bytes": raw,
                "compressed_fraction": round(len(encoded["data"]) / raw, 3),
                "encode_ms": round(1e3 * encode_s, 3),
                "decode_ms": round(1e3 * decode_s, 3),
                "break_even_mbit_s": round(8 * saved / (encode_s + decode_s) / 1e6, 1),
            }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
