"""Throughput probe: how fast this node runs its span, measured on its real device and dtype.

Results are cached per (model, span, device, dtype) in a JSON file, so a restart announces at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from node.kv_cache import PagePool, SequenceCache
from node.span import Span
from swarm.protocol import DTYPE_NAMES

logger = logging.getLogger(__name__)

CACHE_PATH = Path(os.environ.get("SWARM_CACHE_DIR", "~/.cache/swarm-inference")).expanduser() / "throughput.json"


@dataclass(frozen=True)
class Throughput:
    decode: float  # tokens/s through the whole span, one sequence, one token per step
    prefill: float  # tokens/s through the whole span, one long chunk


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{platform.machine()}:{platform.processor() or 'cpu'}:{torch.get_num_threads()} threads"


def model_identity(model_name: str, config: PretrainedConfig) -> str:
    """The model's name and a digest of its architecture: the speed of a span depends on nothing else."""
    return f"{model_name}#{hashlib.blake2b(config.to_json_string().encode(), digest_size=6).hexdigest()}"


def cache_key(model: str, start: int, end: int, device: torch.device, dtype: torch.dtype) -> str:
    return f"{model}|{start}:{end}|{device_name(device)}|{DTYPE_NAMES[dtype]}"


def _load_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def cached_estimate(model: str, num_blocks: int, device: torch.device, dtype: torch.dtype,
                    path: Path = CACHE_PATH) -> float | None:
    """Decode throughput for a span of num_blocks, scaled from any cached span of this model on this device."""
    suffix = f"|{device_name(torch.device(device))}|{DTYPE_NAMES[dtype]}"
    for key, value in _load_cache(path).items():
        name, span, rest = key.split("|", 2)
        if name == model and f"|{rest}" == suffix:
            start, end = (int(b) for b in span.split(":"))
            return value["decode"] * (end - start) / num_blocks  # a token's time grows with the blocks it crosses
    return None


def measure(span: Span, pool: PagePool, prefill_tokens: int = 128, decode_steps: int = 16) -> Throughput:
    """Time a prefill and batch-1 decode steps through the span, using (and then returning) pool pages."""
    prefill_tokens = min(prefill_tokens, pool.num_pages * pool.page_size - decode_steps - 1)
    if prefill_tokens < 1:
        raise ValueError("the KV cache is too small to measure throughput; give it more memory")
    seq = SequenceCache()
    hidden = torch.randn(prefill_tokens + decode_steps, span.config.hidden_size, dtype=span.dtype,
                         device=span.device) * 0.1

    def run(rows: torch.Tensor) -> float:
        pool.reserve(seq, seq.length + len(rows))
        began = time.perf_counter()
        span.forward(pool, rows, [seq], [len(rows)])
        if span.device.type == "cuda":
            torch.cuda.synchronize(span.device)
        return time.perf_counter() - began

    try:
        run(hidden[:1])  # warm-up: first-call allocations and kernel choice
        pool.release(seq)
        prefill = prefill_tokens / run(hidden[:prefill_tokens])
        decode = decode_steps / sum(run(hidden[prefill_tokens + i:prefill_tokens + i + 1]) for i in range(decode_steps))
    finally:
        pool.release(seq)
    return Throughput(decode=decode, prefill=prefill)


def probe(span: Span, pool: PagePool, model_name: str, path: Path = CACHE_PATH) -> Throughput:
    """The span's throughput from the cache, else measured now and cached."""
    key = cache_key(model_identity(model_name, span.config), span.start, span.end, span.device, span.dtype)
    cache = _load_cache(path)
    if key in cache:
        result = Throughput(**cache[key])
        logger.info("throughput from %s: decode %.1f tokens/s, prefill %.1f tokens/s", path, result.decode, result.prefill)
        return result
    result = measure(span, pool)
    logger.info("measured throughput: decode %.1f tokens/s, prefill %.1f tokens/s", result.decode, result.prefill)
    cache[key] = asdict(result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: nodes starting at once must not read half a file
    except OSError as e:
        logger.warning("could not cache the throughput in %s: %s", path, e)
    return result
