import pytest
import torch

from node.kv_cache import PagePool
from node.span import Span
from node.throughput import cached_estimate, model_identity, probe

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
def test_probe_measures_once_then_reads_the_cache(tiny_model, tmp_path, device):
    path = tiny_model("llama")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    span = Span(path, 1, 3, device, dtype)
    pool = PagePool(span.layer_count, 32, 16, span.kv_heads, span.head_dim, dtype, device)
    cache = tmp_path / "throughput.json"
    measured = probe(span, pool, "tiny", cache)
    assert measured.decode > 0 and measured.prefill > 0
    assert pool.free_pages == 32  # the probe gave its pages back
    assert probe(span, pool, "tiny", cache) == measured  # from the cache: same figures, no new measurement
    identity = model_identity("tiny", span.config)
    # a 4-block span crosses twice the blocks of the measured 2-block one: half the tokens/s
    assert cached_estimate(identity, 4, torch.device(device), dtype, cache) == pytest.approx(measured.decode / 2)
    assert cached_estimate(identity, 4, torch.device(device), torch.float16, cache) is None
