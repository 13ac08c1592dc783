"""Create a small random-initialized transformers model with a tokenizer, offline.

    python scripts/make_tiny_model.py models/tiny-llama --family llama

The tokenizer is a byte-level BPE trained here on a few sentences, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 512
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048)

# Tiny configs per family; sliding windows are short so that test prompts cross them.
FAMILIES: dict[str, dict] = {
    "llama": _SMALL,
    "mistral": {**_SMALL, "sliding_window": 8},
    "qwen2": {**_SMALL, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
    "qwen3": {**_SMALL, "head_dim": 16},
    "qwen3_moe": {**_SMALL, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "mixtral": {**_SMALL, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "gemma": {**_SMALL, "head_dim": 16},
    "gemma2": {**_SMALL, "head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 20.0,
               "final_logit_softcapping": 10.0},
    "gemma3_text": {**_SMALL, "head_dim": 16, "sliding_window": 8, "sliding_window_pattern": 2},
    "phi3": {**_SMALL, "pad_token_id": 0},
    "olmo2": _SMALL,
    "cohere": _SMALL,
    "starcoder2": {**_SMALL, "sliding_window": None},
    "gpt_oss": {**_SMALL, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8},
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=2048),
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=2048),
    "falcon": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                   new_decoder_architecture=True, num_kv_heads=2, alibi=False, max_position_embeddings=2048),
}

_CORPUS = [
    "A swarm of volunteer machines serves a language model too large for any one of them.",
    "Each node hosts a span of transformer blocks and keeps a paged cache of keys and values.",
    "The client routes every step through a chain of spans and recovers when a node leaves.",
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.",
] * 8


# Each turn: its role, a newline, its content, end of text; the open assistant turn has no end.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>{% endfor %}"
                 "{% if add_generation_prompt %}assistant\n{% endif %}")


def make_tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS, vocab_size=VOCAB, min_frequency=1, special_tokens=["<|endoftext|>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<pad>", chat_template=CHAT_TEMPLATE)


def make_tiny_model(path: str | Path, family: str = "llama", seed: int = 0, shard_size: str | None = None,
                    **config_overrides) -> Path:
    """Write a random model of the family and a tokenizer to path; shard_size (e.g. "50KB") shards the weights;
    config_overrides replace fields of the family's tiny config (num_hidden_layers=6, ...)."""
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    config = AutoConfig.for_model(family, **{**FAMILIES[family], **config_overrides}, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    tokenizer.save_pretrained(path)
    return path


def make_wide_model(path: str | Path, hidden_size: int, num_hidden_layers: int) -> Path:
    """A Llama of real width whose blocks cost almost no compute (one 16-wide head, a 16-wide MLP): for benchmarks
    of what moving hidden states through the swarm costs, not of computing them."""
    return make_tiny_model(path, "llama", hidden_size=hidden_size, intermediate_size=16,
                           num_hidden_layers=num_hidden_layers, num_attention_heads=1, num_key_value_heads=1,
                           head_dim=16, max_position_embeddings=16384)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="folder to write the model to")
    parser.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", help="shard the safetensors checkpoint, e.g. 50KB")
    args = parser.parse_args()
    print(make_tiny_model(args.path, args.family, args.seed, args.shard_size))


if __name__ == "__main__":
    main()
