"""A node's span: decoder layers [start, end) of one model, run as transformers defines them over the page pool."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from node.attention import ATTENTION_NAME, DecodeBatch, PackedBatch, PagedCache
from node.cuda_graphs import DecodeGraphs
from node.kv_cache import PagePool, SequenceCache
from swarm.checkpoint import (
    CheckpointError,
    build_empty_model,
    find_layers,
    layer_index,
    load_config,
    load_weights,
    meta_parameters,
    supports_attention_interface,
)

logger = logging.getLogger(__name__)

_PER_BATCH_ROPE = {"dynamic", "longrope"}  # these scale RoPE by the longest sequence in the batch


class UnsupportedModel(CheckpointError):
    """The family cannot be run correctly by this node; refused at start, never run wrong."""


class Span:
    def __init__(self, model_path: str | Path, start: int, end: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.config = load_config(model_path)
        self.num_blocks = self.config.num_hidden_layers
        if not 0 <= start < end <= self.num_blocks:
            raise ValueError(f"blocks {start}:{end} are outside the model's {self.num_blocks} layers")
        self.start, self.end = start, end
        self.device, self.dtype = torch.device(device), dtype
        if self.device.type == "cuda":
            # cuDNN attention builds a plan for every new query/key length, which every prefill chunk has:
            # a 512-token chunk through 8 8B-shaped layers took 0.5-0.7 s with it and 7-13 ms without (H200).
            torch.backends.cuda.enable_cudnn_sdp(False)
        self._refuse_unsupported()

        # Families that bypass the interface run their own eager math over our cache and mask.
        attention = ATTENTION_NAME if supports_attention_interface(self.config) else "eager"
        model = build_empty_model(self.config, dtype, attention)
        prefix, all_layers = find_layers(model)

        def in_span(tensor_name: str) -> bool:
            block = layer_index(tensor_name, prefix)
            return block is not None and start <= block < end

        load_weights(model, model_path, in_span, self.device, dtype, f"blocks {start}:{end}")
        self.layers = [all_layers[i] for i in range(start, end)]
        missing = [f"{prefix}.{start + i}.{name}" for i, layer in enumerate(self.layers) for name in meta_parameters(layer)]
        if missing:
            raise CheckpointError(f"checkpoint {model_path} lacks weights of blocks {start}:{end}: {missing[:5]}")
        self.rotary = next((m for n, m in model.base_model.named_children() if "rotary" in n), None)
        if self.rotary is not None:
            self.rotary.to(self.device)
        self._rotary_by_layer_type = self.rotary is not None and "layer_type" in inspect.signature(self.rotary.forward).parameters
        del model  # everything outside the span stays on meta and is dropped here

        params = inspect.signature(self.layers[0].forward).parameters
        # transformers 5.24 renamed past_key_values to cache; some families that bypass the interface say layer_past
        self._cache_arg = next((name for name in ("cache", "past_key_values") if name in params), "layer_past")
        self._wants_rotary = "position_embeddings" in params
        self._no_alibi = {"alibi": None} if "alibi" in params else {}  # ALiBi configs were refused above
        self.kv_heads, self.head_dim, bypass = self._probe()
        # Decode tokens attend in place through the paged kernel (Triton, CUDA) unless the family computes
        # attention itself or needs math the kernel lacks (softcap: gemma2; sinks: gpt-oss).
        family_math = getattr(self.config, "attn_logit_softcapping", None) or any(
            getattr(module, "sinks", None) is not None for layer in self.layers for module in layer.modules())
        self.decodes_in_place = self.device.type == "cuda" and not bypass and not family_math
        self.graphs: DecodeGraphs | None = None

    def _refuse_unsupported(self) -> None:
        config = self.config
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedModel(f"{config.model_type} is an encoder-decoder model; only decoder-only models are served")
        uses_alibi = getattr(config, "alibi", config.model_type in ("bloom", "mpt"))
        if uses_alibi:
            raise UnsupportedModel(f"{config.model_type} uses ALiBi position biases, which nodes cannot run yet")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in _PER_BATCH_ROPE:
            raise UnsupportedModel(f"{config.model_type} uses {rope.get('rope_type', rope.get('type'))} RoPE scaling, "
                                   "which depends on the batch's longest sequence and would change packed results")

    def layer_type(self, block: int) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[block] if types else "full_attention"

    @property
    def layer_count(self) -> int:
        return self.end - self.start

    def _probe(self) -> tuple[int, int, list[int]]:
        """Run one token through the span to learn K/V shapes and check every layer uses our cache and mask;
        returns the K/V heads, the head size and the blocks that bypass the attention interface."""
        shapes: list[tuple[int, int]] = []

        class ShapeProbe(PagedCache):
            def update(probe, key_states, value_states, layer_idx, *args, **kwargs):
                probe.batch.cache_updates[layer_idx - probe.first_layer] += 1
                shapes.append(tuple(key_states.shape[1::2]))
                return key_states, value_states

        batch = PackedBatch.build([SequenceCache(pages=[0])], [1], 1, self.layer_count, self.dtype, self.device)
        hidden = torch.zeros(1, self.config.hidden_size, dtype=self.dtype, device=self.device)
        self.run_blocks(hidden, ShapeProbe(None, batch, self.start), self.start, self.end)
        for i, (updates, calls) in enumerate(zip(batch.cache_updates, batch.attention_calls)):
            block = self.start + i
            if updates != 1:
                raise UnsupportedModel(f"block {block} of {self.config.model_type} does not use a transformers Cache "
                                       "for its keys and values; it cannot run over the paged KV cache")
            sliding = getattr(self.config, "sliding_window", None) and self.layer_type(block) != "full_attention"
            if calls == 0 and sliding:
                raise UnsupportedModel(f"block {block} of {self.config.model_type} computes sliding-window attention "
                                       "outside transformers' attention interface; it cannot be run correctly")
        if len(set(shapes)) != 1:
            raise UnsupportedModel(f"{self.config.model_type} layers have different K/V shapes {set(shapes)}")
        bypass = [self.start + i for i, calls in enumerate(batch.attention_calls) if calls == 0]
        if bypass:
            logger.info("blocks %s compute attention in their own code over the paged cache and the full causal mask", bypass)
        return *shapes[0], bypass

    def capture_graphs(self, pool: PagePool, max_batch_size: int, max_length: int, compile: bool = False) -> None:
        """Replay decode steps through the whole span from CUDA graphs (node/cuda_graphs.py), of layers
        compiled by torch.compile if compile is set and that works for the family."""
        if not self.decodes_in_place:
            return
        if compile:
            try:
                self.graphs = DecodeGraphs(self, pool, max_batch_size, max_length, compile=True)
                return
            except Exception as e:  # torch.compile fails on the family's code, or the graph capture does
                torch.cuda.synchronize(self.device)
                logger.warning("compiled decode steps of %s cannot be captured; trying without compiling: %s",
                               self.config.model_type, str(e).splitlines()[0] if str(e) else type(e).__name__)
        try:
            self.graphs = DecodeGraphs(self, pool, max_batch_size, max_length)
        except RuntimeError as e:  # the family's layers sync with the host (MoE routing) or copy from it
            torch.cuda.synchronize(self.device)
            logger.warning("decode steps of %s cannot be captured in a CUDA graph; they run eagerly: %s",
                           self.config.model_type, str(e).splitlines()[0])

    def run_blocks(self, hidden: torch.Tensor, cache: PagedCache, start: int, end: int,
                   layers: list[Callable] | None = None) -> torch.Tensor:
        """hidden [T, hidden_size] through blocks [start, end) over cache.batch; no bookkeeping.
        layers: the span's layers or compiled versions of them (node/cuda_graphs.py), default the layers."""
        batch = cache.batch
        h = hidden.to(self.device, self.dtype)[None]
        position_ids = batch.positions[None]
        rotary = {}
        if self.rotary is not None and self._wants_rotary:
            if self._rotary_by_layer_type:
                for kind in {self.layer_type(b) for b in range(start, end)}:
                    rotary[kind] = self.rotary(h, position_ids, kind)
            else:
                rotary[None] = self.rotary(h, position_ids)
        decode = isinstance(batch, DecodeBatch)
        mask = None if decode else batch.mask()
        layers = layers or self.layers
        for block in range(start, end):
            local = block - self.start
            kwargs = {self._cache_arg: cache, "paged_cache": cache, "attention_mask": mask,
                      "position_ids": position_ids, "use_cache": True, **self._no_alibi}
            if decode:
                kwargs["paged_kv"] = cache.pool.layer(local)
            if rotary:
                kwargs["position_embeddings"] = rotary[self.layer_type(block) if self._rotary_by_layer_type else None]
            out = layers[local](h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return h[0]

    @torch.inference_mode()
    def forward(self, pool: PagePool, hidden: torch.Tensor, seqs: list[SequenceCache], new_lengths: list[int],
                start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Run new tokens of several sequences, packed as hidden [sum(new_lengths), hidden_size], through
        blocks [start, end) of the span (all of it by default).

        The sequences must already have pages for their new lengths (PagePool.reserve).
        """
        start, end = start if start is not None else self.start, end if end is not None else self.end
        decode = self.decodes_in_place and all(n == 1 for n in new_lengths)
        graphs = self.graphs
        if (decode and graphs is not None and graphs.pool is pool and (start, end) == (self.start, self.end)
                and len(seqs) <= graphs.max_batch_size):
            out = graphs.run(hidden, seqs)
        else:
            batch = (DecodeBatch.build(seqs, pool.page_size, self.device) if decode else
                     PackedBatch.build(seqs, new_lengths, pool.page_size, self.layer_count, self.dtype, self.device))
            out = self.run_blocks(hidden, PagedCache(pool, batch, self.start), start, end)
        for seq, n in zip(seqs, new_lengths):
            seq.length += n
        return out


def block_bytes(model_path: str | Path, dtype: torch.dtype) -> int:
    """Memory for one decoder block's weights: its parameters counted on the meta device, nothing loaded."""
    model = build_empty_model(load_config(model_path), dtype, "eager")
    _, layers = find_layers(model)
    return max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers)


def block_cache_bytes_per_token(model_path: str | Path, dtype: torch.dtype) -> int:
    """One block's KV cache per token, from the config before anything is loaded. Where the config names no K/V
    heads this counts every attention head, which over-counts for grouped-query families, never under."""
    config = load_config(model_path)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return PagePool.page_bytes(1, 1, kv_heads, head_dim, dtype)
