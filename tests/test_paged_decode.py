"""The paged decode attention kernel against a float32 reference over densely gathered keys and values.

Runs on CUDA; without a GPU it runs in Triton's interpreter when TRITON_INTERPRET=1 (float32 only).
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not INTERPRETED:
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)

from node.paged_decode import paged_decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] if INTERPRETED else [torch.float32, torch.bfloat16, torch.float16]
pytestmark = pytest.mark.gpu if not INTERPRETED else []


def reference(query, keys, values, tables, lengths, page_size, scale, window):
    """float32 softmax attention of each sequence's last position over its gathered keys."""
    group = query.shape[1] // keys.shape[1]
    out = []
    for b, length in enumerate(lengths.tolist()):
        positions = torch.arange(length, device=keys.device)
        slots = tables[b, positions // page_size].long() * page_size + positions % page_size
        k = keys[slots].float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = values[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", query[b].float(), k) * scale
        if window:
            scores[:, positions < length - window] = float("-inf")
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,window", [(8, 2, 64, None), (4, 4, 32, None), (6, 2, 80, 40),
                                                            (32, 8, 128, None)])
def test_kernel_matches_reference(dtype, heads, kv_heads, head_dim, window):
    torch.manual_seed(0)
    page_size, num_pages = 16, 96
    lengths = torch.tensor([1, 15, 16, 17, 300, 700], dtype=torch.int32, device=DEVICE)
    width = 48  # pages per table row: 768 tokens, three partitions
    tables = torch.stack([torch.randperm(num_pages, device=DEVICE)[:width] for _ in lengths]).int()
    keys = torch.randn(num_pages * page_size, kv_heads, head_dim, device=DEVICE).to(dtype)
    values = torch.randn_like(keys)
    query = torch.randn(len(lengths), heads, head_dim, device=DEVICE).to(dtype)
    scale = head_dim ** -0.5

    out = paged_decode_attention(query, keys, values, tables, lengths, page_size, scale, window)
    expected = reference(query, keys, values, tables, lengths, page_size, scale, window)
    assert out.dtype == dtype and out.shape == query.shape
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


def test_strided_query_and_unused_table_entries():
    """HF hands queries as a transposed view; table entries past a sequence's length must never be read."""
    torch.manual_seed(1)
    page_size, kv_heads, head_dim = 16, 2, 64
    keys = torch.randn(8 * page_size, kv_heads, head_dim, device=DEVICE)
    values = torch.randn_like(keys)
    query = torch.randn(4, 3, head_dim, device=DEVICE).transpose(0, 1)[:, :]  # [3, 4, D], not contiguous
    lengths = torch.tensor([5, 20, 33], dtype=torch.int32, device=DEVICE)
    tables = torch.tensor([[2, -1, -1], [0, 7, -1], [3, 4, 5]], dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(query, keys, values, tables, lengths, page_size, 0.125)
    torch.testing.assert_close(out, reference(query, keys, values, tables, lengths, page_size, 0.125, None),
                               atol=1e-4, rtol=1e-4)
