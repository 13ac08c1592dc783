"""DistributedModelForCausalLM: a transformers model whose decoder layers run in the swarm.

The client builds the family's own CausalLM class with its decoder stack replaced by one ``SwarmLayers``
module, and loads only the weights outside the stack. The family's forward therefore computes everything
it computes outside its layers (embeddings and their scaling, learned positions, final norm, lm head,
logit softcapping) exactly as the local model would, and ``generate`` is transformers' own, or for plain
greedy and sampled decoding a shorter loop with the same results (client/generation.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface, GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from client.batching import StepBatcher
from client.generation import decode, lean_settings
from client.graphs import ClientGraphs
from client.remote import SwarmConnection, in_forward_thread, run_coroutine
from client.session import InferenceSession
from swarm.bootstrap import PUBLIC_INITIAL_PEERS
from swarm.checkpoint import (
    CheckpointError,
    build_empty_model,
    causal_lm_class,
    find_layers,
    layer_index,
    load_config,
    load_weights,
    meta_parameters,
    model_name,
    supports_attention_interface,
)

# The attention of a model whose decoder stack runs in the swarm. It has no mask function registered, so transformers
# builds no attention mask in the client, where no layer would read it (an eager mask cost ~0.2 ms per token).
REMOTE_ATTENTION = "swarm_remote"


def _remote_attention(*args, **kwargs):
    raise RuntimeError("the decoder layers run in the swarm: the client computes no attention")


AttentionInterface.register(REMOTE_ATTENTION, _remote_attention)


@dataclass
class _Run:
    """What the stack needs for the step in flight: the session and which rows are new."""

    session: InferenceSession
    new_lengths: list[int] | None = None
    token_ids: list[list[int]] | None = None


class SwarmLayers(nn.Module):
    """Stands in for the whole decoder stack inside the family's model.

    The open session is per thread (a context variable), so threads can generate with one model at once.
    """

    attention_type = "full_attention"  # some families read this to pick a layer's mask; ours is unused

    def __init__(self) -> None:
        super().__init__()
        self._run: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(f"swarm_run_{id(self)}", default=None)
        self.returns_tuple = False  # falcon-style stacks index the layer's output with [0]

    @property
    def run(self) -> _Run | None:
        return self._run.get()

    @contextlib.contextmanager
    def bind(self, session: InferenceSession) -> Iterator[None]:
        token = self._run.set(_Run(session))
        try:
            yield
        finally:
            self._run.reset(token)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        run = self.run
        out = hidden_states if run is None else run.session.step(hidden_states, run.new_lengths, run.token_ids)
        return (out,) if self.returns_tuple else out


class DistributedModelForCausalLM:
    """Mixed into the family's CausalLM class by from_pretrained."""

    connection: SwarmConnection
    swarm_model_name: str
    session_options: dict
    swarm_layers: SwarmLayers
    client_graphs: ClientGraphs | None
    step_batcher: StepBatcher

    @classmethod
    def from_pretrained(cls, path: str | Path, initial_peers: Sequence[str] = PUBLIC_INITIAL_PEERS, *,
                        model_name_in_swarm: str | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu",
                        allowed_nodes: Collection[str] | None = None, blocked_nodes: Collection[str] = (),
                        push: bool = True, step_timeout: float = 10.0, failover_deadline: float = 60.0,
                        compress: bool = False, swarm_key: str | Path | None = None,
                        cuda_graphs: bool = True) -> PreTrainedModel:
        """Load the client's part of the model at path (embeddings, final norm, lm head) and join the swarm.

        model_name_in_swarm defaults to the folder's name, as for `swarm node`. The client's part runs on device
        in dtype; hidden states travel in dtype, which must be the nodes' dtype. allowed_nodes / blocked_nodes
        (peer ids) restrict the nodes sessions use; push=False makes the client carry every hop's output
        itself instead of nodes sending it to the next node. step_timeout, failover_deadline and compress
        (hidden states compressed losslessly, for slow links): see InferenceSession. swarm_key: the key file
        of a private swarm. On a GPU, decode steps replay the client's part from CUDA graphs (client/graphs.py)
        unless cuda_graphs is False.
        """
        config = load_config(path)
        family = causal_lm_class(config)
        # Keep the family's class name and module: transformers keys checkpoint conversions (gpt_neox's embed_out)
        # by class name and skips them for classes defined outside transformers.
        model_class = type(family.__name__, (cls, family),
                           {"__module__": family.__module__, "__qualname__": f"Distributed{family.__name__}"})
        attention = REMOTE_ATTENTION if supports_attention_interface(config) else "eager"
        model = build_empty_model(config, dtype, attention, model_class)
        prefix, _ = find_layers(model)
        parent_name, _, attr = prefix.rpartition(".")
        model.swarm_layers = SwarmLayers()
        setattr(model.get_submodule(parent_name), attr, nn.ModuleList([model.swarm_layers]))
        load_weights(model, path, lambda name: layer_index(name, prefix) is None, torch.device(device), dtype,
                     "embeddings and head")
        model.tie_weights()
        missing = meta_parameters(model)
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks weights the client needs: {missing[:5]}")
        model.to(device)  # the buffers (rotary tables) were computed on the host
        if (Path(path) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(path))
        model.swarm_model_name = model_name_in_swarm or model_name(path)
        model.session_options = {"allowed_nodes": allowed_nodes, "blocked_nodes": blocked_nodes, "push": push,
                                 "step_timeout": step_timeout, "failover_deadline": failover_deadline,
                                 "compress": compress}
        model._detect_layer_output_convention()
        model.client_graphs = (ClientGraphs(model._family_forward, model.swarm_layers, config.hidden_size, dtype,
                                            model.device) if cuda_graphs and model.device.type == "cuda" else None)
        model.step_batcher = StepBatcher(model._family_forward, model.swarm_layers, model.client_graphs)
        model.connection = SwarmConnection(initial_peers, swarm_key=swarm_key)
        return model

    def _detect_layer_output_convention(self) -> None:
        """Learn whether the family's stack expects a tensor or a tuple from each layer, on a dummy batch."""
        ids = torch.zeros(2, 3, dtype=torch.long, device=self.device)
        for returns_tuple in (False, True):
            self.swarm_layers.returns_tuple = returns_tuple
            try:
                with torch.no_grad():
                    logits = super().forward(input_ids=ids, use_cache=False).logits
            except (IndexError, RuntimeError, ValueError):  # the wrong convention breaks shapes downstream
                continue
            if tuple(logits.shape[:2]) == (2, 3):
                return
        raise CheckpointError(f"cannot run {type(self).__name__}'s decoder stack remotely: unknown layer output convention")

    @property
    def num_blocks(self) -> int:
        return self.config.num_hidden_layers

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1) -> Iterator[InferenceSession]:
        """Open a session through the swarm; generate() calls inside it continue the same sequences.

        Pass generate the whole sequence so far: tokens the session already holds are skipped.
        """
        if self.swarm_layers.run is not None:
            raise RuntimeError("an inference session is already open on this model in this thread")
        with InferenceSession(self.connection, self.swarm_model_name, self.num_blocks, max_length, batch_size,
                              **self.session_options) as session:
            with self.swarm_layers.bind(session):
                yield session

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """transformers' generate(), through a session of its own unless one is open. Plain greedy and sampled
        decoding runs client/generation.py's shorter loop instead, with the same results, on the client's event
        loop (which then also calls the streamer and stopping criteria): there the decode steps of concurrent
        calls run as one batch (client/batching.py)."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        settings = None if args else lean_settings(self.generation_config, input_ids,
                                                   {k: v for k, v in kwargs.items() if k != "input_ids"})
        if self.swarm_layers.run is not None:
            session = contextlib.nullcontext()
        else:
            session = self.inference_session(max_length=self._generation_length(settings, input_ids, kwargs),
                                             batch_size=input_ids.shape[0])
        with session:
            if settings is not None:
                step = functools.partial(self._decode_step, self.swarm_layers.run.session)
                return run_coroutine(decode(step, input_ids, kwargs.get("attention_mask"), settings,
                                            kwargs.get("streamer"), kwargs.get("stopping_criteria")))
            # Nodes hold the cache; transformers passes the whole sequence each step and forward keeps only new tokens.
            return super().generate(inputs, *args, **{**kwargs, "use_cache": False})

    def _generation_length(self, settings: dict | None, input_ids: torch.Tensor, kwargs: dict) -> int:
        """The longest sequence a generate() call can reach: its session's max_length."""
        if settings is not None:
            return settings["max_length"]
        config = kwargs.get("generation_config") or self.generation_config
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        return (input_ids.shape[1] + max_new_tokens if max_new_tokens is not None
                else kwargs.get("max_length", config.max_length))

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs):
        """Run the tokens that the open session has not seen yet; returns their logits.

        attention_mask marks left padding; positions are counted per sequence from its first real token,
        as transformers does. position_ids is accepted for compatibility with generate() and recomputed.
        """
        run = self.swarm_layers.run
        if run is None:
            raise RuntimeError("open model.inference_session(...) or call generate() to run the swarm")
        if input_ids is None:
            raise ValueError("DistributedModelForCausalLM.forward needs input_ids")
        session = run.session
        new_lengths, positions, token_ids = self._new_tokens(session, input_ids, attention_mask)
        width = positions.shape[1]
        graphs = (self.client_graphs.get(len(new_lengths))
                  if self.client_graphs is not None and width == 1 and isinstance(logits_to_keep, int)
                  and logits_to_keep in (0, 1) and not torch.is_grad_enabled() else None)
        if graphs is not None:
            hidden = graphs.embed(input_ids[:, -1:], positions)
            return CausalLMOutputWithPast(logits=graphs.head(session.step(hidden, new_lengths, token_ids)))
        run.new_lengths, run.token_ids = new_lengths, token_ids
        return super().forward(input_ids=input_ids[:, -width:], position_ids=positions.to(input_ids.device),
                               use_cache=False, logits_to_keep=logits_to_keep)

    @staticmethod
    def _new_tokens(session: InferenceSession, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                    ) -> tuple[list[int], torch.Tensor, list[list[int]]]:
        """The tokens of input_ids that the session has not seen: how many per row, their positions [batch,
        width] (on the host; padding at position 0) and their ids."""
        # checked on the host: each check of a GPU tensor would wait for the device
        mask = attention_mask.cpu() if attention_mask is not None else torch.ones(input_ids.shape, dtype=torch.long)
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError("padding must be on the left (tokenizer.padding_side = 'left')")
        real = mask.sum(dim=1).tolist()
        new_lengths = [r - seen for r, seen in zip(real, session.lengths)]
        if any(n < 0 for n in new_lengths) or max(new_lengths) == 0:
            raise ValueError(f"input holds {real} tokens per sequence but the session already processed "
                             f"{session.lengths}: pass the whole sequence including new tokens")
        width = max(new_lengths)
        offsets = torch.arange(width)[None, :] - torch.tensor([width - n for n in new_lengths])[:, None]
        positions = (torch.tensor(session.lengths)[:, None] + offsets).clamp(min=0)
        token_ids = [row[width - n:] for row, n in zip(input_ids[:, -width:].tolist(), new_lengths)]
        return new_lengths, positions, token_ids

    def _forward_last_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A step of decode() in a forward thread: forward, which waits on the client's event loop for the swarm."""
        with torch.no_grad():
            return self(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1).logits[:, -1]

    async def _decode_step(self, session: InferenceSession, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
        """decode()'s step on the client's event loop, where the swarm's networking runs: a decode step joins
        the batch of concurrent calls' steps, which with client graphs runs without a hand-off between threads
        (they cost 0.6-0.9 ms of a ~10 ms token on an H200 host); other steps run forward in a worker thread."""
        new_lengths, positions, token_ids = self._new_tokens(session, input_ids, attention_mask)
        if positions.shape[1] > 1:
            return await in_forward_thread(self._forward_last_logits, input_ids, attention_mask)
        return await self.step_batcher.logits(session, input_ids[:, -1:], positions, new_lengths, token_ids)

    def _family_forward(self, **inputs) -> CausalLMOutputWithPast:
        """The family's own forward of one decode step, as client graphs capture it."""
        return super().forward(**inputs, use_cache=False, logits_to_keep=1)

    def shutdown(self) -> None:
        """Leave the swarm: stops this client's DHT peer and its libp2p daemon."""
        self.connection.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
