"""Real swarms on loopback (bootstrap peer, node processes, libp2p, DHT) against local transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client import DistributedModelForCausalLM
from conftest import assert_same_tokens

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma", "gemma2", "gemma3_text", "phi3",
            "olmo2", "cohere", "starcoder2", "gpt_oss", "gpt_neox", "gpt2", "falcon"]


@pytest.mark.parametrize("family", FAMILIES)
def test_swarm_generates_what_the_local_model_generates(family, tiny_model, local_swarm):
    path = tiny_model(family)
    local_swarm.start_nodes(path, [(0, 2), (2, 4)])
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers)
    try:
        prompt = tokenizer("Each node hosts a span of transformer blocks and keeps a cache", return_tensors="pt")
        with torch.no_grad(), model.inference_session(max_length=64):
            swarm_logits = model(**prompt).logits
        with torch.no_grad():
            local_logits = local(**prompt).logits
        assert (swarm_logits - local_logits).abs().max().item() <= 1e-4

        greedy = dict(max_new_tokens=12, do_sample=False)
        assert_same_tokens(model.generate(**prompt, **greedy), local.generate(**prompt, **greedy), local)

        batch = tokenizer(["A swarm", "The quick brown fox jumps over the lazy dog", "Each node keeps"],
                          return_tensors="pt", padding=True)
        assert_same_tokens(model.generate(**batch, **greedy), local.generate(**batch, **greedy), local)
    finally:
        model.shutdown()
