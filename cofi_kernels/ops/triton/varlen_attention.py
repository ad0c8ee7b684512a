"""Forward attention over packed variable-length sequences (serving, DESIGN §7).

Layout: ``qkv`` ``[N, 3·H·D]`` rows (q heads, then k heads, then v heads),
sequence ``b`` owning rows ``cu[b]:cu[b+1]``; the output is ``[N, H·D]`` (heads
side by side) or, for each sequence's first query only, ``[B, H·D]``.

``varlen_attention_fwd_kernel``: one program per (block of ``BLOCK_M`` packed
rows, head). The grid depends on N and H only (shapes known on the host), so a
launch needs no device-to-host copy of ``cu_seqlens`` (no maximum length): it
can be captured in a CUDA graph. A row block can hold the tail of one sequence
and the heads of the next; the program finds the sequences its rows belong to
by counting offsets (``cu[s] <= first row`` and ``cu[s] < end of block``) and
runs one flash-attention pass per sequence, storing only that sequence's rows.
Over all blocks this costs at most one extra ``BLOCK_M`` × length pass per
sequence boundary.

``varlen_attention_first_kernel``: one program per (sequence, head), its first
query as a vector against key blocks (no ``tl.dot``: a single row).

Scores are in the log2 domain (``qk_scale = scale·log2(e)``, ``exp2``); the
running maximum starts at a finite ``_M_INIT`` so that a block with every key
out of range never computes ``-inf - (-inf)``. ``UPCAST`` (set under the
interpreter, where bf16 arithmetic is wrong) converts every load to float32;
compiled kernels keep fp16/bf16 operands for ``tl.dot`` with float32
accumulation. The head size is padded to ``BLOCK_D`` (a power of two, at least
16 for ``tl.dot``) with masked loads. Row offsets are int64 (``N·3·H·D`` can
exceed 2³¹).
"""

from __future__ import annotations

import triton
import triton.language as tl

# The masked load (upcast under the interpreter) and the running-max start of the training kernels.
from .gated_attention import _M_INIT, _load


@triton.jit
def varlen_attention_fwd_kernel(
    Qkv, Cu, Out,
    N, B, H, stride_row, out_stride_row, qk_scale,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    row0 = pid_m * BLOCK_M
    block_end = tl.minimum(row0 + BLOCK_M, N)

    # Sequences met by rows [row0, block_end): first = the last s with cu[s] <= row0,
    # last = the last s with cu[s] < block_end (cu[B] = N is never below either).
    n_le = 0
    n_lt = 0
    offs_b = tl.arange(0, BLOCK_B)
    for b0 in range(0, B, BLOCK_B):
        starts = tl.load(Cu + b0 + offs_b, mask=b0 + offs_b < B, other=N)
        n_le += tl.sum((starts <= row0).to(tl.int32), axis=0)
        n_lt += tl.sum((starts < block_end).to(tl.int32), axis=0)
    first = n_le - 1
    last = n_lt - 1

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_col = h * HEAD_DIM
    k_col = (H + h) * HEAD_DIM
    v_col = (2 * H + h) * HEAD_DIM
    q = _load(Qkv + offs_m[:, None] * stride_row + q_col + offs_d[None, :],
              (offs_m < N)[:, None] & d_ok[None, :], UPCAST)

    for s in range(first, last + 1):
        start = tl.load(Cu + s)
        end = tl.load(Cu + s + 1)
        m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_ok = offs_n < end
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = _load(Qkv + offs_n[:, None] * stride_row + k_col + offs_d[None, :], kv_mask, UPCAST)
            v = _load(Qkv + offs_n[:, None] * stride_row + v_col + offs_d[None, :], kv_mask, UPCAST)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        # l_i is 0 only for an empty sequence, whose rows are not stored.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        row_ok = (offs_m >= start) & (offs_m < end)
        tl.store(Out + offs_m[:, None] * out_stride_row + q_col + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def varlen_attention_first_kernel(
    Qkv, Cu, Out,
    H, stride_row, out_stride_row, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    start = tl.load(Cu + b)
    end = tl.load(Cu + b + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_col = h * HEAD_DIM
    k_col = (H + h) * HEAD_DIM
    v_col = (2 * H + h) * HEAD_DIM
    # A single row: float32 vector arithmetic throughout (no tl.dot, so no tile minimum).
    q = tl.load(Qkv + start * stride_row + q_col + offs_d, mask=d_ok & (start < end), other=0.0).to(tl.float32)

    m_i = tl.max(tl.full([BLOCK_N], _M_INIT, dtype=tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < end
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(Qkv + offs_n[:, None] * stride_row + k_col + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(Qkv + offs_n[:, None] * stride_row + v_col + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * qk_scale
        scores = tl.where(key_ok, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(Out + b * out_stride_row + q_col + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)
