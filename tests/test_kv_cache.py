import pytest
import torch

from node.kv_cache import OutOfPages, PagePool, SequenceCache


def test_reserve_is_all_or_nothing_and_release_returns_pages():
    pool = PagePool(num_layers=2, num_pages=4, page_size=4, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    a, b = SequenceCache(), SequenceCache()
    pool.reserve(a, 9)  # 3 pages
    assert len(a.pages) == 3 and pool.free_pages == 1
    with pytest.raises(OutOfPages):
        pool.reserve(b, 8)
    assert b.pages == [] and pool.free_pages == 1
    pool.release(a)
    assert pool.free_pages == 4 and a.pages == [] and a.length == 0


def test_slots_follow_the_block_table():
    pool = PagePool(num_layers=1, num_pages=4, page_size=4, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    seq = SequenceCache(pages=[2, 0])
    assert pool.slots(seq, 2, 6).tolist() == [10, 11, 0, 1]
