"""Triton kernels of ``gated_ffn``: the FFN up-projection GEMM with its CoFi epilogue.

Forward (``ffn_up_fwd_kernel``): ``pre = x w_inᵀ + b_in`` tile by tile in a
float32 accumulator, then in the epilogue ``h = GELU_erf(pre) · int_gate``;
stores ``h`` (x's dtype) and, when a backward will follow, ``pre`` in float32.

Backward (``ffn_up_bwd_kernel``): ``dh = dy w_out`` tile by tile, then in the
epilogue (with ``pre`` reloaded and GELU recomputed from it)
``d_pre = dh · int_gate · GELU'(pre)``, the recomputed ``h`` (for
``grad w_out = dyᵀ h``), and per-program partial column sums over the
program's rows of ``dh · GELU(pre)`` (the int_gate gradient) and of ``d_pre``
(the b_in gradient). The partial sums go to ``[programs along M, I]`` float32
buffers that the launcher reduces in a fixed order: no atomics, deterministic.

Rules these kernels keep (DESIGN.md §3): program ids are int64 before any
offset arithmetic; every epilogue load is upcast to float32 right after it is
loaded; GEMM operands are upcast too under the interpreter (``UPCAST``), while
on GPUs float16/bfloat16 operands go to ``tl.dot`` as they are (tensor cores,
float32 accumulation); float32 operands use ``input_precision="ieee"``.
The interpreter converts float32 to bfloat16 by truncation, so under it
bfloat16 stores are rounded to nearest-even by hand first (``ROUND_BF16``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .support import INTERPRET

# constexpr: the compiler rejects plain globals in @triton.jit code (the interpreter does not).
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def _configs():
    if INTERPRET:
        # One config: the autotuner fails under the interpreter with more.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


CONFIGS = _configs()
# The partial-sum buffers are sized for the smallest BLOCK_M any config may pick.
MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in CONFIGS)
# M is bucketed (next power of 2) so that a new batch shape does not re-tune.
_KEY = ["M_BUCKET", "N", "K"]


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering of the output tiles (GROUP_M row tiles share column tiles in L2)."""
    pid = tl.program_id(0).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _matmul_tile(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n,
                 UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 ``A[rows of pid_m, :] @ B[:, cols of pid_n]``; rows/cols past M/N read row/col 0."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows and columns load valid data (masked at the store), so
    # only the K tail needs a load mask.
    offs_am = tl.where(offs_m < M, offs_m, 0)
    offs_bn = tl.where(offs_n < N, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _round_bf16(x):
    """float32 -> nearest bfloat16 value (even on ties), still as float32 (finite x)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = bits & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store(ptrs, val, mask, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        val = _round_bf16(val)
    tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=mask)


@triton.autotune(configs=CONFIGS, key=_KEY + ["HAS_GATE", "STORE_PRE"])
@triton.jit
def ffn_up_fwd_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, h_ptr, pre_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm,
    HAS_GATE: tl.constexpr, STORE_PRE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """h = GELU(x w_inᵀ + b_in) · gate (and pre = x w_inᵀ + b_in); x [M, K], w_in [N, K], h/pre [M, N] rows of stride_hm."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _matmul_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn, pid_m, pid_n,
                       UPCAST, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    mask = (offs_m[:, None] < M) & col_ok[None, :]
    bias = tl.load(b_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
    pre = acc + bias[None, :]
    out_offs = offs_m[:, None] * stride_hm + offs_n[None, :]
    if STORE_PRE:  # float32: the backward's GELU and gate/bias sums see pre unrounded
        tl.store(pre_ptr + out_offs, pre, mask=mask)
    h = pre * (0.5 + 0.5 * tl.math.erf(pre * _SQRT1_2))
    if HAS_GATE:
        gate = tl.load(g_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
        h = h * gate[None, :]
    _store(h_ptr + out_offs, h, mask, ROUND_BF16)


# The sum buffers have rows for the smallest BLOCK_M; the rows a config does not
# write must stay 0, so they are zeroed before each config's trial run.
@triton.autotune(configs=CONFIGS, key=_KEY + ["HAS_GATE", "STORE_DPRE", "STORE_H", "GATE_SUMS", "BIAS_SUMS"],
                 reset_to_zero=["gsum_ptr", "bsum_ptr"])
@triton.jit
def ffn_up_bwd_kernel(
    dy_ptr, w_ptr, pre_ptr, g_ptr, dpre_ptr, h_ptr, gsum_ptr, bsum_ptr,
    M, N, K, M_BUCKET,
    stride_dym, stride_dyk, stride_wk, stride_wn, stride_pm,
    HAS_GATE: tl.constexpr, STORE_DPRE: tl.constexpr, STORE_H: tl.constexpr,
    GATE_SUMS: tl.constexpr, BIAS_SUMS: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dh = dy w_out; d_pre = dh · gate · GELU'(pre); h = GELU(pre) · gate; partial sums of dh·GELU(pre) and d_pre.

    dy [M, K], w_out [K, N] (K = D, N = I), pre/d_pre/h [M, N] with row stride
    stride_pm, gsum/bsum [cdiv(M, BLOCK_M) or more, N] float32, contiguous.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dh = _matmul_tile(dy_ptr, w_ptr, M, N, K, stride_dym, stride_dyk, stride_wk, stride_wn, pid_m, pid_n,
                      UPCAST, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    mask = (offs_m[:, None] < M) & col_ok[None, :]
    offs = offs_m[:, None] * stride_pm + offs_n[None, :]
    pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 + 0.5 * tl.math.erf(pre * _SQRT1_2)
    gelu = pre * cdf
    dgelu = cdf + pre * (_INV_SQRT_2PI * tl.exp(-0.5 * pre * pre))
    if HAS_GATE:
        gate = tl.load(g_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)
        d_pre = dh * gate[None, :] * dgelu
        h = gelu * gate[None, :]
    else:
        d_pre = dh * dgelu
        h = gelu
    if STORE_DPRE:
        _store(dpre_ptr + offs, d_pre, mask, ROUND_BF16)
    if STORE_H:
        _store(h_ptr + offs, h, mask, ROUND_BF16)
    # Rows past M hold copies of row 0 (see _matmul_tile): leave them out of the sums.
    sum_offs = pid_m * N + offs_n
    if GATE_SUMS:
        tl.store(gsum_ptr + sum_offs, tl.sum(tl.where(mask, dh * gelu, 0.0), axis=0), mask=col_ok)
    if BIAS_SUMS:
        tl.store(bsum_ptr + sum_offs, tl.sum(tl.where(mask, d_pre, 0.0), axis=0), mask=col_ok)
