"""The span executor against the full transformers model, in process: every family, packed sequences."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from make_tiny_model import FAMILIES
from node.kv_cache import PagePool, SequenceCache
from conftest import reference_hidden_states
from node.span import Span, UnsupportedModel


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_spans_match_the_full_model_on_packed_chunked_sequences(family, tiny_model):
    path = tiny_model(family)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spans = [Span(path, 0, 2), Span(path, 2, 4)]
    pools = [PagePool(s.layer_count, 16, 4, s.kv_heads, s.head_dim, torch.float32, "cpu") for s in spans]
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (n,), generator=generator) for n in (13, 5, 9)]
    expected = [reference_hidden_states(reference, ids) for ids in prompts]
    caches = [[SequenceCache() for _ in prompts] for _ in spans]
    # A prefill chunk, then token by token; the sequences are packed together at every step.
    chunks = [[(0, 8)] + [(t, t + 1) for t in range(8, 13)], [(0, 5)], [(0, 3), (3, 9)]]
    worst = 0.0
    for step in range(max(len(c) for c in chunks)):
        active = [i for i in range(len(prompts)) if step < len(chunks[i])]
        lengths = [chunks[i][step][1] - chunks[i][step][0] for i in active]
        hidden = torch.cat([expected[i][0][slice(*chunks[i][step])] for i in active])
        for span, pool, seqs in zip(spans, pools, caches):
            for i, n in zip(active, lengths):
                pool.reserve(seqs[i], seqs[i].length + n)
            hidden = span.forward(pool, hidden, [seqs[i] for i in active], lengths)
        offset = 0
        for i, n in zip(active, lengths):
            worst = max(worst, (hidden[offset:offset + n] - expected[i][1][slice(*chunks[i][step])]).abs().max().item())
            offset += n
    assert worst < 1e-4


def test_alibi_families_are_refused_at_start(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match="ALiBi"):
        Span(tmp_path, 0, 2)
