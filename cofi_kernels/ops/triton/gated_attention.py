"""Flash-style attention with a per-head gate: forward, and backward with the gate gradient.

Scores live in the log2 domain (``qk_scale = scale * log2(e)``) so the softmax
uses ``exp2``. A key is dropped by setting its score to ``-inf``; a batch row
whose keys are all padded attends uniformly to every in-range key (scores set
to 0 and not differentiated), which is what the additive ``finfo.min`` mask of
the reference computes. The running maximum starts at a finite ``_M_INIT``
instead of ``-inf`` so that a block whose keys are all dropped never computes
``-inf - (-inf)``.

``UPCAST`` (set under the interpreter) converts every load to float32, because
bf16 arithmetic is wrong in the interpreter; compiled kernels keep fp16/bf16
operands for ``tl.dot`` and accumulate in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

_M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _load(ptrs, mask, UPCAST: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _row_is_empty(Mask, mask_row, T, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """True when batch row ``mask_row`` attends to no key at all."""
    n_keep = 0
    if HAS_MASK:
        offs = tl.arange(0, BLOCK_N)
        for start in range(0, T, BLOCK_N):
            keep = tl.load(Mask + mask_row + start + offs, mask=start + offs < T, other=0)
            n_keep += tl.sum((keep != 0).to(tl.int32), axis=0)
    else:
        n_keep = 1
    return n_keep == 0


@triton.jit
def _scores(q, k, Mask, mask_row, offs_n, T, qk_scale, empty,
            HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] scores in the log2 domain with dropped keys at -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    valid = offs_n < T
    if HAS_MASK:
        keep = tl.load(Mask + mask_row + offs_n, mask=valid, other=0) != 0
        s = tl.where(keep[None, :], s, float("-inf"))
        s = tl.where(empty, 0.0, s)
    s = tl.where(valid[None, :], s, float("-inf"))
    return s


@triton.jit
def _program_head(H):
    """(tile index along T, batch·head index, batch row, head) of this program, as int64."""
    pid = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    return pid, bh, bh // H, bh % H


@triton.jit
def _tile(base, b, h, s_b, s_h, s_t, offs_t, offs_d):
    """Pointers to the [len(offs_t), HEAD_DIM] tile of batch row b, head h of a strided [B, H, T, D] tensor."""
    return base + b * s_b + h * s_h + offs_t[:, None] * s_t + offs_d[None, :]


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, Mask, mask_row, offs_n, T, qk_scale, empty,
                       HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputed probabilities P and score gradients dS = P (dO vᵀ - Delta) of one tile."""
    s = _scores(q, k, Mask, mask_row, offs_n, T, qk_scale, empty, HAS_MASK, PRECISION)
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_MASK:  # uniform attention of an all-padded row does not depend on q, k
        ds = tl.where(empty, 0.0, ds)
    return p, ds


@triton.jit
def _gate_value(Gate, h, HAS_GATE: tl.constexpr):
    g = 1.0
    if HAS_GATE:
        g = tl.load(Gate + h).to(tl.float32)
    return g


@triton.jit
def gated_attention_fwd_kernel(
    Q, K, V, Gate, Mask, Out, Ungated, Lse,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    H, T, qk_scale,
    HAS_GATE: tl.constexpr, HAS_MASK: tl.constexpr, SAVE_UNGATED: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, bh, b, h = _program_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    mask_row = b * T
    q = _load(_tile(Q, b, h, sq_b, sq_h, sq_t, offs_m, offs_d), row_ok[:, None], UPCAST)
    empty = _row_is_empty(Mask, mask_row, T, HAS_MASK, BLOCK_N)

    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < T
        k = _load(_tile(K, b, h, sk_b, sk_h, sk_t, offs_n, offs_d), key_ok[:, None], UPCAST)
        v = _load(_tile(V, b, h, sv_b, sv_h, sv_t, offs_n, offs_d), key_ok[:, None], UPCAST)
        s = _scores(q, k, Mask, mask_row, offs_n, T, qk_scale, empty, HAS_MASK, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_offs = bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    gate = _gate_value(Gate, h, HAS_GATE)
    tl.store(Out + o_offs, (acc * gate).to(Out.dtype.element_ty), mask=row_ok[:, None])
    if SAVE_UNGATED:
        tl.store(Ungated + o_offs, acc.to(Ungated.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + bh * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def gated_attention_bwd_pre_kernel(
    DOut, sdo_b, sdo_h, sdo_t, O, Gate, Delta, GatePartial,
    H, T,
    HAS_GATE: tl.constexpr, GATE_GRAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta = rowsum(dO_ungated * O) per query, and the gate-gradient partial per program.

    ``O`` is the ungated output (float32); ``raw = rowsum(dOut * O)`` is the
    gate gradient of that row and ``Delta = gate * raw``.
    """
    pid_m, bh, b, h = _program_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    do = _load(_tile(DOut, b, h, sdo_b, sdo_h, sdo_t, offs_m, offs_d), row_ok[:, None], True)
    o = _load(O + bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], row_ok[:, None], True)
    raw = tl.sum(do * o, axis=1)
    tl.store(Delta + bh * T + offs_m, raw * _gate_value(Gate, h, HAS_GATE), mask=row_ok)
    if GATE_GRAD:
        tl.store(GatePartial + bh * tl.num_programs(0) + pid_m, tl.sum(raw, axis=0))


@triton.jit
def gated_attention_bwd_dkdv_kernel(
    Q, K, V, DOut, Mask, Gate, Lse, Delta, DK, DV,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
    H, T, qk_scale, scale,
    HAS_GATE: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n, bh, b, h = _program_head(H)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < T
    mask_row = b * T
    gate = _gate_value(Gate, h, HAS_GATE)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if gate != 0.0:  # a closed head passes no gradient to q, k, v
        k = _load(_tile(K, b, h, sk_b, sk_h, sk_t, offs_n, offs_d), key_ok[:, None], UPCAST)
        v = _load(_tile(V, b, h, sv_b, sv_h, sv_t, offs_n, offs_d), key_ok[:, None], UPCAST)
        empty = _row_is_empty(Mask, mask_row, T, HAS_MASK, BLOCK_N)
        for start_m in range(0, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            q = _load(_tile(Q, b, h, sq_b, sq_h, sq_t, offs_m, offs_d), row_ok[:, None], UPCAST)
            do = _load(_tile(DOut, b, h, sdo_b, sdo_h, sdo_t, offs_m, offs_d), row_ok[:, None], UPCAST)
            do = (do * gate).to(do.dtype)  # gradient w.r.t. the ungated output
            lse = tl.load(Lse + bh * T + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(Delta + bh * T + offs_m, mask=row_ok, other=0.0)
            p, ds = _probs_and_dscores(q, k, v, do, lse, delta, Mask, mask_row, offs_n, T, qk_scale, empty,
                                       HAS_MASK, PRECISION)
            p = tl.where(row_ok[:, None], p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out_offs = bh * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_offs, (dk * scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def gated_attention_bwd_dq_kernel(
    Q, K, V, DOut, Mask, Gate, Lse, Delta, DQ,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
    H, T, qk_scale, scale,
    HAS_GATE: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, bh, b, h = _program_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    mask_row = b * T
    gate = _gate_value(Gate, h, HAS_GATE)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if gate != 0.0:
        q = _load(_tile(Q, b, h, sq_b, sq_h, sq_t, offs_m, offs_d), row_ok[:, None], UPCAST)
        do = _load(_tile(DOut, b, h, sdo_b, sdo_h, sdo_t, offs_m, offs_d), row_ok[:, None], UPCAST)
        do = (do * gate).to(do.dtype)
        lse = tl.load(Lse + bh * T + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(Delta + bh * T + offs_m, mask=row_ok, other=0.0)
        empty = _row_is_empty(Mask, mask_row, T, HAS_MASK, BLOCK_N)
        for start_n in range(0, T, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_ok = offs_n < T
            k = _load(_tile(K, b, h, sk_b, sk_h, sk_t, offs_n, offs_d), key_ok[:, None], UPCAST)
            v = _load(_tile(V, b, h, sv_b, sv_h, sv_t, offs_n, offs_d), key_ok[:, None], UPCAST)
            _, ds = _probs_and_dscores(q, k, v, do, lse, delta, Mask, mask_row, offs_n, T, qk_scale, empty,
                                       HAS_MASK, PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    q_offs = bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + q_offs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
