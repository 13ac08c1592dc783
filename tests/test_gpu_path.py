"""The GPU decode path: decode tokens attend in place through the paged kernel and replay CUDA graphs.

Needs CUDA. Without a GPU, TRITON_INTERPRET=1 runs the in-place decode path (not the graphs) on CPU in
Triton's interpreter, for families whose spans use it.
"""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_same_tokens, reference_hidden_states
from make_tiny_model import FAMILIES
from node.kv_cache import PagePool, SequenceCache
from node.span import Span, block_cache_bytes_per_token

CUDA = torch.cuda.is_available()
INTERPRETED = not CUDA and os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA and not INTERPRETED, reason="needs CUDA")]
DEVICE = "cuda" if CUDA else "cpu"
IN_PLACE_FAMILIES = sorted(set(FAMILIES) - {"gemma2", "gpt_oss", "falcon"})  # softcap, sinks, own attention


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decode_steps_match_the_full_model(family, tiny_model):
    """Three sequences prefill, then decode together (a batch of 3 runs in the graph of 4, one padding row)
    across page boundaries, through graphs of compiled layers where torch.compile handles the family; every
    output equals the float32 model's within rounding."""
    path = tiny_model(family)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spans = [Span(path, 0, 2, DEVICE), Span(path, 2, 4, DEVICE)]
    pools = [PagePool(s.layer_count, 32, 4, s.kv_heads, s.head_dim, torch.float32, DEVICE) for s in spans]
    for span, pool in zip(spans, pools):
        assert span.decodes_in_place == (CUDA and family in IN_PLACE_FAMILIES)
        if CUDA:
            span.capture_graphs(pool, max_batch_size=8, max_length=64, compile=True)
        elif family in IN_PLACE_FAMILIES:
            span.decodes_in_place = True  # the interpreter runs the kernel on CPU tensors
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (n,), generator=generator) for n in (22, 8, 9)]
    expected = [reference_hidden_states(reference, ids) for ids in prompts]
    caches = [[SequenceCache() for _ in prompts] for _ in spans]
    prefill = [n - 6 for n in (22, 8, 9)]
    steps = [prefill] + [[1, 1, 1]] * 6
    done = [0, 0, 0]
    worst = 0.0
    for lengths in steps:
        hidden = torch.cat([expected[i][0][done[i]:done[i] + n] for i, n in enumerate(lengths)]).to(DEVICE)
        for span, pool, seqs in zip(spans, pools, caches):
            for seq, n in zip(seqs, lengths):
                pool.reserve(seq, seq.length + n)
            hidden = span.forward(pool, hidden, seqs, lengths)
        offset = 0
        for i, n in enumerate(lengths):
            got = hidden[offset:offset + n].cpu()
            worst = max(worst, (got - expected[i][1][done[i]:done[i] + n]).abs().max().item())
            offset += n
            done[i] += n
    assert worst < 1e-4
    if CUDA and family in ("llama", "mistral", "qwen3", "gemma3_text"):
        assert all(span.graphs is not None and span.graphs.compiled for span in spans)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_a_decode_step_queued_behind_another_gets_its_own_outputs(tiny_model):
    """A GPU node queues a forward while the previous one computes: two decode steps of different sequences,
    replayed from the same graph while the device is still busy with earlier work (neither step's inputs uploaded
    yet), each give their own sequences' outputs."""
    path = tiny_model("llama")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    span = Span(path, 0, 4, DEVICE)
    pool = PagePool(span.layer_count, 32, 4, span.kv_heads, span.head_dim, torch.float32, DEVICE)
    span.capture_graphs(pool, max_batch_size=4, max_length=32)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 500, (n,), generator=generator) for n in (7, 10, 5, 12)]
    expected = [reference_hidden_states(reference, ids) for ids in prompts]
    seqs = [SequenceCache() for _ in prompts]
    for seq, (inputs, _) in zip(seqs, expected):  # prefill all but the last token, eagerly
        pool.reserve(seq, len(inputs) - 1)
        span.forward(pool, inputs[:-1].to(DEVICE), [seq], [len(inputs) - 1])
    for seq in seqs:
        pool.reserve(seq, seq.length + 1)
    last = [inputs[-1:] for inputs, _ in expected]
    torch.cuda._sleep(100_000_000)  # tens of ms of device work ahead of both steps
    first = span.forward(pool, torch.cat(last[:2]), seqs[:2], [1, 1])
    second = span.forward(pool, torch.cat(last[2:]), seqs[2:], [1, 1])
    got = torch.cat([first, second]).cpu()
    want = torch.cat([outputs[-1:] for _, outputs in expected])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_bfloat16_swarm_matches_local_transformers(family, tiny_model, local_swarm):
    """GPU nodes and client in bfloat16 against the local bfloat16 model on the same GPU: several sessions
    decode together through the graphs; each chosen token is the local model's choice up to bf16 rounding."""
    from transformers import AutoTokenizer

    from client import DistributedModelForCausalLM

    path = tiny_model(family)
    local_swarm.start_nodes(path, [(0, 2), (2, 4)], "--device", "cuda", "--dtype", "bfloat16", "--kv-cache-gb", "1",
                            "--model-name", f"gpu-{family}")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm=f"gpu-{family}", dtype=torch.bfloat16,
                                                     device="cuda") as model:
        batch = tokenizer(["A swarm", "The quick brown fox jumps over the lazy dog", "Each node keeps"],
                          return_tensors="pt", padding=True).to("cuda")
        out = model.generate(**batch, max_new_tokens=24, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        swarm_logits = torch.stack(out.logits, dim=1).float()  # [B, new tokens, vocab]
        mask = torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, batch["input_ids"].shape[1]:])], 1)
        with torch.no_grad():
            local_logits = local(out.sequences, attention_mask=mask).logits[:, batch["input_ids"].shape[1] - 1:-1].float()
        scale = local_logits.abs().max().item()
        assert (swarm_logits - local_logits).abs().max().item() <= 0.05 * scale
        chosen = out.sequences[:, batch["input_ids"].shape[1]:]
        shortfall = local_logits.max(-1).values - local_logits.gather(-1, chosen[..., None])[..., 0]
        assert shortfall.max().item() <= 0.02 * scale, "a chosen token is not the local model's choice"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_a_gpu_node_sizes_its_kv_cache_from_free_memory(tiny_model, local_swarm):
    """Without --kv-cache-gb a GPU node's cache takes most of the memory its span leaves free (GPU_CACHE_SHARE
    less GPU_RESERVE_BYTES), and the node serves from it: greedy tokens as the local model's."""
    from client import DistributedModelForCausalLM
    from client.remote import run_coroutine

    path = tiny_model("llama")
    free_before = torch.cuda.mem_get_info()[0]
    (node,) = local_swarm.start_nodes(path, [(0, 4)], "--device", "cuda", "--dtype", "float32",
                                      "--model-name", "gpu-auto-cache")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="gpu-auto-cache", device="cuda") as model:
        stats = run_coroutine(model.connection.node_stats(node.peer_id))
        page_bytes = 4 * 16 * block_cache_bytes_per_token(path, torch.float32)  # 4 blocks, 16-token pages
        assert stats["pages_total"] * page_bytes > 0.8 * free_before - 2**30
        ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0)).to("cuda")
        swarm_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert_same_tokens(swarm_tokens, local.generate(ids, max_new_tokens=8, do_sample=False), local)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_client_graphs_give_the_eager_clients_tokens_and_logits(family, tiny_model, local_swarm):
    """A client on the GPU replays its part of decode steps (embeddings; final norm, softcapping and lm head)
    from CUDA graphs: through transformers' generate and the lean loop, a batch with left padding decodes the
    tokens and logits of a client that runs them eagerly."""
    from client import DistributedModelForCausalLM

    path = tiny_model(family)
    # the client's graphs are under test: the node's layers need not be compiled, which takes a while
    local_swarm.start_nodes(path, [(0, 4)], "--model-name", f"graphs-{family}", "--no-compile")
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(0)).to("cuda")
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    results = {}
    for cuda_graphs in (True, False):
        with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                         model_name_in_swarm=f"graphs-{family}", device="cuda",
                                                         cuda_graphs=cuda_graphs) as model:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            lean = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
            if cuda_graphs:
                assert set(model.client_graphs.graphs) == {2} and not model.client_graphs.failed
            results[cuda_graphs] = out.sequences, torch.stack(out.logits, dim=1), lean
    (sequences, logits, lean), (eager_sequences, eager_logits, eager_lean) = results[True], results[False]
    assert torch.equal(sequences, eager_sequences) and torch.equal(lean, eager_lean)
    torch.testing.assert_close(logits, eager_logits)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_a_client_whose_forward_waits_for_the_host_decodes_eagerly(family, tiny_model, local_swarm):
    """A client forward that reads a value back from the device (llama, with a hook on the embeddings added) or
    copies one from pageable host memory (falcon's eager attention mask) cannot be captured in a CUDA graph:
    the client gives up its graphs and decodes eagerly the local model's tokens."""
    from client import DistributedModelForCausalLM

    path = tiny_model(family)
    local_swarm.start_nodes(path, [(0, 4)], "--model-name", f"graphs-fallback-{family}", "--no-compile")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    ids = torch.randint(3, 500, (1, 10), generator=torch.Generator().manual_seed(0)).to("cuda")
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm=f"graphs-fallback-{family}",
                                                     device="cuda") as model:
        if family == "llama":
            def read_back(module, args, out):
                out.isfinite().all().item()

            model.get_input_embeddings().register_forward_hook(read_back)
        tokens = model.generate(ids, max_new_tokens=10, do_sample=False)
        assert model.client_graphs.failed and not model.client_graphs.graphs
    assert_same_tokens(tokens, local.generate(ids, max_new_tokens=10, do_sample=False), local)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_concurrent_generate_calls_share_the_client_graphs(tiny_model, local_swarm):
    """generate() calls at once run their decode steps through the client's graphs together, a batch of three
    rows padded to the graphs of four: each call decodes the local model's tokens."""
    from concurrent.futures import ThreadPoolExecutor

    from client import DistributedModelForCausalLM

    path = tiny_model("llama")
    local_swarm.start_nodes(path, [(0, 4)], "--model-name", "graphs-concurrent", "--no-compile")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    prompts = [torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(n)).to("cuda") for n in (5, 9, 13)]

    def greedy(model, ids):
        return model.generate(ids, max_new_tokens=12, do_sample=False)

    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="graphs-concurrent", device="cuda") as model:
        with ThreadPoolExecutor(len(prompts)) as pool:
            outputs = list(pool.map(lambda ids: greedy(model, ids), prompts))
        batcher = model.step_batcher
        assert batcher.rows == 3 * 11 and batcher.forwards < batcher.rows and 4 in model.client_graphs.graphs
    for ids, tokens in zip(prompts, outputs):
        assert_same_tokens(tokens, greedy(local, ids), local)
