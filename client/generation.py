"""generate() for plain greedy and sampled decoding, in a short loop of our own.

transformers' generate() takes every step through its general machinery (input preparation, logits processors
and stopping criteria called through introspection, output bookkeeping), on each token's critical path. With the
swarm replaced by an instant stand-in a token cost 1.35-1.79 ms through it and 1.02-1.05 ms through this loop
(tiny model, 2-core machine); through a local swarm of 2 CPU nodes, medians of 4 alternating runs were ~10.7 ms
against ~11.9 ms per token. ``decode`` does what generate() does for the settings in LEAN_SETTINGS, token for
token and with the same random draws (tests compare the two); a call that sets anything else (beams, penalties,
its own processors or criteria, dict outputs, ...), itself or through the model's generation config, runs
transformers' generate().
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria, StoppingCriteriaList
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

LEAN_SETTINGS = frozenset({"max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k",
                           "top_p", "eos_token_id", "pad_token_id"})
# entries of a generation config that change nothing here (the nodes hold the cache whatever use_cache says)
_INERT = frozenset({"bos_token_id", "use_cache", "transformers_version", "_from_model_config"})
# values that switch a setting off; None and False do for every setting
_OFF = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "min_length": 0, "no_repeat_ngram_size": 0,
        "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "length_penalty": 1.0, "diversity_penalty": 0.0,
        "num_beam_groups": 1, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0}
# transformers' values for settings left unset
_DEFAULTS = {"max_length": 20, "max_new_tokens": None, "min_new_tokens": 0, "do_sample": False, "temperature": 1.0,
             "top_k": 50, "top_p": 1.0, "eos_token_id": None, "pad_token_id": None}


def lean_settings(generation_config: GenerationConfig, input_ids: torch.Tensor | None,
                  kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The settings of a generate(input_ids, **kwargs) call if ``decode`` can run it exactly, else None."""
    own = {name: value for name, value in generation_config.to_diff_dict().items()
           if name in LEAN_SETTINGS or not (value is None or value is False or _OFF.get(name, ...) == value)}
    calls = {name: value for name, value in kwargs.items()
             if name not in ("attention_mask", "streamer", "stopping_criteria", "use_cache")}
    if input_ids is None or not own.keys() <= LEAN_SETTINGS | _INERT or not calls.keys() <= LEAN_SETTINGS:
        return None
    if any(value is None for value in calls.values()):
        return None  # an explicit None switches a setting off in transformers, which unset ones are not
    settings = dict(_DEFAULTS)
    settings.update((name, value) for name, value in own.items() if name in LEAN_SETTINGS and value is not None)
    settings.update(calls)
    eos = settings["eos_token_id"]
    eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(eos, (list, tuple)) or not all(isinstance(token, int) for token in eos):
        return None
    settings["eos_token_id"] = list(eos)
    if settings["pad_token_id"] is None and eos:
        settings["pad_token_id"] = eos[0]  # as transformers does
    if settings["max_new_tokens"] is not None:
        settings["max_length"] = input_ids.shape[1] + settings["max_new_tokens"]
    if settings["max_length"] <= input_ids.shape[1]:
        return None  # transformers warns and decides what to return
    if kwargs.get("attention_mask") is None and settings["pad_token_id"] is not None \
            and bool((input_ids == settings["pad_token_id"]).any()):
        return None  # transformers infers an attention mask from the padding
    return settings


async def decode(last_logits: Callable[[torch.Tensor, torch.Tensor], Awaitable[torch.Tensor]],
                 input_ids: torch.Tensor, attention_mask: torch.Tensor | None, settings: dict[str, Any],
                 streamer: Any = None, stopping_criteria: list[StoppingCriteria] | None = None) -> torch.Tensor:
    """Greedy or sampled decoding of input_ids [batch, length], as transformers' generate() with these settings,
    streamer and extra stopping criteria; returns the prompts and their new tokens, where a model has an EOS
    token each row padded after it ended. last_logits(input_ids, attention_mask) runs the tokens the open
    session has not seen and returns the last position's logits [batch, vocab]: a coroutine, so that the loop
    runs on the client's event loop (client/model.py), where concurrent calls' steps are batched."""
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    eos = torch.tensor(settings["eos_token_id"], dtype=torch.long, device=device)
    warpers: list[LogitsProcessor] = []  # called directly: LogitsProcessorList inspects each one's signature per call
    if settings["do_sample"]:  # transformers' order
        if settings["temperature"] != 1.0:
            warpers.append(TemperatureLogitsWarper(settings["temperature"]))
        if settings["top_k"] != 0:
            warpers.append(TopKLogitsWarper(top_k=settings["top_k"], min_tokens_to_keep=1))
        if settings["top_p"] < 1.0:
            warpers.append(TopPLogitsWarper(top_p=settings["top_p"], min_tokens_to_keep=1))
    # on the host, where the client's forward reads it: a copy on the device would cost a sync per token
    attention_mask = attention_mask.cpu() if attention_mask is not None else torch.ones(input_ids.shape, dtype=torch.long)
    criteria = StoppingCriteriaList(stopping_criteria or [])
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    while input_ids.shape[1] < settings["max_length"]:
        scores = (await last_logits(input_ids, attention_mask)).float()
        if len(eos) and input_ids.shape[1] - prompt_length < settings["min_new_tokens"]:
            scores[:, eos] = float("-inf")
        if settings["do_sample"]:
            for warp in warpers:
                scores = warp(input_ids, scores)
            tokens = torch.multinomial(scores.softmax(-1), num_samples=1)[:, 0]
        else:
            tokens = scores.argmax(-1)
        if len(eos):
            tokens = torch.where(unfinished, tokens, settings["pad_token_id"])
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        if len(eos):
            unfinished &= ~torch.isin(tokens, eos)
        if criteria:
            unfinished &= ~criteria(input_ids, None)  # transformers hands them no scores unless it keeps them
        if (len(eos) or criteria) and not unfinished.any():
            break
    if streamer is not None:
        streamer.end()
    return input_ids

