"""`swarm generate` and `swarm chat`: the client library from a terminal, streaming tokens as they come.

    swarm generate --model /models/Llama-3.1-8B --initial-peers MADDR... "A swarm of GPUs"
    swarm chat --model /models/Llama-3.1-8B-Instruct --initial-peers MADDR...
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from swarm.bootstrap import add_initial_peers_argument
from swarm.devices import device_argument
from swarm.protocol import DTYPES

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="local folder of the model's checkpoint; the client loads only its embeddings, final "
                             "norm and head, and the tokenizer")
    parser.add_argument("--model-name", help="the model's name in the swarm (default: the folder's name)")
    add_initial_peers_argument(parser)
    parser.add_argument("--swarm-key", help="key file of a private swarm")
    parser.add_argument("--device", type=device_argument, default="cpu",
                        help="where the client's part runs (cpu, cuda, cuda:N)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="the client's dtype, which must be the nodes' (swarm status shows it)")
    parser.add_argument("--compress", action="store_true",
                        help="send hidden states compressed (lossless; ~28%% fewer bytes in bfloat16, ~14%% in "
                             "float16/float32): for links slower than ~50-150 Mbit/s")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 picks the most likely token (greedy)")
    parser.add_argument("--top-p", type=float, default=1.0)


def load_model(args: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from client import DistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = DistributedModelForCausalLM.from_pretrained(args.model, args.initial_peers, model_name_in_swarm=args.model_name,
                                                        dtype=DTYPES[args.dtype], device=args.device,
                                                        compress=args.compress, swarm_key=args.swarm_key)
    return model, tokenizer


def sampling_options(temperature: float, top_p: float) -> dict:
    """generate() options for OpenAI-style sampling: temperature 0 is greedy; no top-k cut."""
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser, 64)
    parser.add_argument("prompt", help="text to continue")


def generate(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args)
    with model, torch.inference_mode():
        inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tokenizer, skip_prompt=True,
                                                                                           skip_special_tokens=True),
                       **sampling_options(args.temperature, args.top_p))


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser, 512)
    parser.add_argument("--system", help="a system message to start the conversation with")
    parser.add_argument("--max-length", type=int,
                        help="tokens the whole conversation may take (default: the model's positions, at most 4096)")


def chat(args: argparse.Namespace) -> None:
    """A conversation in one inference session: each turn sends only its new tokens. Ctrl-D ends it."""
    model, tokenizer = load_model(args)
    if tokenizer.chat_template is None:
        raise SystemExit(f"{args.model}'s tokenizer has no chat template; use `swarm generate`")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    max_length = args.max_length or min(4096, getattr(model.config, "max_position_embeddings", None) or 4096)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages, ids = list(system), None
    with model, contextlib.ExitStack() as session, torch.inference_mode():
        while True:
            try:
                line = input("> " if sys.stdin.isatty() else "")
            except EOFError:
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            prompt = render(tokenizer, messages).to(model.device)
            if prompt.shape[1] + args.max_new_tokens > max_length:
                print(f"[the conversation would outgrow --max-length {max_length}; starting over]", flush=True)
                messages = [*system, messages[-1]]
                prompt, ids = render(tokenizer, messages).to(model.device), None
            # the session holds the conversation so far; a template that renders it differently needs a new one
            if ids is None or not torch.equal(prompt[:, :ids.shape[1]], ids):
                session.close()
                session.enter_context(model.inference_session(max_length=max_length))
            ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.max_new_tokens,
                                 streamer=streamer, **sampling_options(args.temperature, args.top_p))
            reply = tokenizer.decode(ids[0, prompt.shape[1]:], skip_special_tokens=True)
            messages.append({"role": "assistant", "content": reply})


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> torch.Tensor:
    """Token ids [1, T] of the conversation with the assistant's turn opened (the template adds special tokens)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
