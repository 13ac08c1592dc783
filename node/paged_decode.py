"""Decode attention that reads the paged KV cache in place: a Triton kernel (flash-decoding).

Each decode token attends to its own sequence's keys, found through the sequence's block table. The keys
of a sequence are split into partitions of PARTITION tokens, so a single long sequence still keeps many
streaming multiprocessors busy; one program handles one (sequence, KV head, partition) for every query
head of that KV head's group (GQA), and a second kernel merges the partitions by their softmax statistics.
Nothing is gathered into a dense copy, and nothing depends on host values, so the launch can be captured in
a CUDA graph: the grid is fixed by the block table's width, and programs past a sequence's end do nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PARTITION = 256  # keys per program
BLOCK_N = 64  # keys per inner iteration


@triton.jit
def _window_start(length, window):
    """The first key a sequence of length keys attends to: its sliding window's start (window 0: no window).
    Both kernels derive which partitions hold attended keys from it, so they agree on those the merge reads."""
    return tl.where(window > 0, tl.maximum(length - window, 0), 0)


@triton.jit
def _partition_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, max_ptr, sum_ptr,
                      scale, window, table_width,
                      stride_qb, stride_qh, stride_ks, stride_kh, stride_ob, stride_oh, stride_op,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                      PAGE: tl.constexpr,
                      PARTITION: tl.constexpr, BLOCK_N: tl.constexpr, NUM_PARTITIONS: tl.constexpr,
                      PRECISION: tl.constexpr):
    seq, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lens_ptr + seq)
    first = _window_start(length, window)
    lo = tl.maximum(part * PARTITION, first // BLOCK_N * BLOCK_N)
    hi = tl.minimum((part + 1) * PARTITION, length)

    group = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_PAD)
    heads = kv_head * GROUP + group
    rows = group[:, None] < GROUP
    # The grid spans the longest sequence a graph can hold; a partition outside this sequence's keys reads and
    # writes nothing, and the merge skips it.
    dims_used = tl.where(lo < hi, HEAD_DIM, 0)
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=rows & (dims[None, :] < dims_used), other=0.0)

    # a finite floor instead of -inf keeps exp(m - m_new) defined while a row has seen only masked keys
    m = tl.full([GROUP_PAD], -1e30, tl.float32)
    s = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    for start in tl.range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        valid = (keys >= first) & (keys < hi)
        page = tl.load(tables_ptr + seq * table_width + keys // PAGE, mask=valid, other=0)
        slots = page.to(tl.int64) * PAGE + keys % PAGE
        offsets = slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :]
        present = valid[:, None] & (dims[None, :] < HEAD_DIM)
        k = tl.load(k_ptr + offsets, mask=present, other=0.0)
        v = tl.load(v_ptr + offsets, mask=present, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        s = s * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    out = acc / tl.maximum(s, 1e-30)[:, None]
    row = seq * stride_ob + heads * stride_oh + part * stride_op
    tl.store(out_ptr + row[:, None] + dims[None, :], out, mask=rows & (dims[None, :] < dims_used))
    stat = (seq * tl.num_programs(1) * GROUP + heads) * NUM_PARTITIONS + part
    groups_used = tl.where(lo < hi, GROUP, 0)
    tl.store(max_ptr + stat, m, mask=group < groups_used)
    tl.store(sum_ptr + stat, s, mask=group < groups_used)


@triton.jit
def _merge_kernel(partial_ptr, max_ptr, sum_ptr, lens_ptr, out_ptr, window, stride_pb, stride_ph, stride_pp,
                  stride_ob, stride_oh,
                  HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, PARTITION: tl.constexpr, BLOCK_N: tl.constexpr,
                  NUM_PARTITIONS: tl.constexpr, PARTS_PAD: tl.constexpr):
    seq, head = tl.program_id(0), tl.program_id(1)
    parts = tl.arange(0, PARTS_PAD)
    dims = tl.arange(0, HEAD_PAD)
    stat = (seq * tl.num_programs(1) + head) * NUM_PARTITIONS + parts
    # the partitions that hold keys of this sequence: the partition kernel wrote only these
    length = tl.load(lens_ptr + seq)
    first = _window_start(length, window) // BLOCK_N * BLOCK_N
    in_range = (parts >= first // PARTITION) & (parts <= (length - 1) // PARTITION) & (parts < NUM_PARTITIONS)
    m = tl.load(max_ptr + stat, mask=in_range, other=-1e30)
    s = tl.load(sum_ptr + stat, mask=in_range, other=0.0)
    weight = s * tl.exp(m - tl.max(m, 0))
    partial = tl.load(partial_ptr + seq * stride_pb + head * stride_ph + parts[:, None] * stride_pp + dims[None, :],
                      mask=in_range[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(partial * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


# A custom op, so that torch.compile keeps the kernel launches as one opaque call while it fuses the layer's
# code around it (tracing into the launcher fails on its host-side arithmetic).
@torch.library.custom_op("swarm::paged_decode_attention", mutates_args=())
def paged_decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
                           lengths: torch.Tensor, page_size: int, scale: float, window: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over that sequence's cached keys and values.

    query [B, Hq, D]; keys/values [slots, Hkv, D] (one layer of the pool); block_tables [B, W] int32 page
    numbers; lengths [B] int32 keys per sequence, the new token's included; window: sliding window or None.
    Returns [B, Hq, D] in the query's dtype.
    """
    if query.stride(-1) != 1:
        query = query.contiguous()
    batch, heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    head_pad = max(16, triton.next_power_of_2(head_dim))  # tl.arange needs a power of two; tl.dot at least 16
    num_partitions = triton.cdiv(block_tables.shape[1] * page_size, PARTITION)
    partial = torch.empty(batch, heads, num_partitions, head_dim, dtype=torch.float32, device=query.device)
    maxes = torch.empty(batch, heads, num_partitions, dtype=torch.float32, device=query.device)
    sums = torch.empty_like(maxes)
    out = torch.empty_like(query)
    _partition_kernel[(batch, kv_heads, num_partitions)](
        query, keys, values, block_tables, lengths, partial, maxes, sums,
        scale, window or 0, block_tables.shape[1],
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_PAD=head_pad, PAGE=page_size,
        PARTITION=PARTITION, BLOCK_N=BLOCK_N, NUM_PARTITIONS=num_partitions,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32")
    _merge_kernel[(batch, heads)](
        partial, maxes, sums, lengths, out, window or 0, partial.stride(0), partial.stride(1), partial.stride(2),
        out.stride(0), out.stride(1), HEAD_DIM=head_dim, HEAD_PAD=head_pad, PARTITION=PARTITION, BLOCK_N=BLOCK_N,
        NUM_PARTITIONS=num_partitions, PARTS_PAD=triton.next_power_of_2(num_partitions))
    return out


@paged_decode_attention.register_fake
def _(query: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.empty_like(query)
