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
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers) as model:
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


def test_sampling_penalties_and_eos_behave_as_local_generate(tiny_model, local_swarm):
    path = tiny_model("llama")
    local_swarm.start_nodes(path, [(0, 3), (3, 4)], "--model-name", "sampling-llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="sampling-llama") as model:
        # the client holds embeddings, final norm and lm head, no decoder layer
        assert {name.split(".")[1] for name, _ in model.named_parameters() if name.startswith("model.")} \
            == {"embed_tokens", "norm"}
        prompt = tokenizer(["The client routes every step", "A swarm"], return_tensors="pt", padding=True)
        sampling = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
                        repetition_penalty=1.3)
        torch.manual_seed(7)
        swarm_tokens = model.generate(**prompt, **sampling)
        torch.manual_seed(7)
        assert torch.equal(swarm_tokens, local.generate(**prompt, **sampling))

        greedy = local.generate(**prompt, max_new_tokens=8, do_sample=False)
        eos = greedy[0, prompt.input_ids.shape[1] + 2].item()  # row 0's third new token ends generation
        swarm_tokens = model.generate(**prompt, max_new_tokens=8, do_sample=False, eos_token_id=eos)
        local_tokens = local.generate(**prompt, max_new_tokens=8, do_sample=False, eos_token_id=eos)
        assert torch.equal(swarm_tokens, local_tokens)
        row0 = swarm_tokens[0, prompt.input_ids.shape[1]:].tolist()
        stop = row0.index(eos)  # row 0 stopped at its first EOS; the rest is padding
        assert stop <= 2 and set(row0[stop + 1:]) <= {tokenizer.pad_token_id}
