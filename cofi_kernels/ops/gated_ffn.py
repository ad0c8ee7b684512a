"""``gated_ffn``: ``(GELU_erf(x w_inᵀ + b_in) · int_gate) w_outᵀ + b_out`` (CoFi's FFN).

Backends:

- ``triton``: ``cofi::gated_ffn_fwd`` / ``cofi::gated_ffn_bwd``, Python
  ``torch.library.custom_op``s with fake kernels and registered autograd.
  The up-projection is a Triton GEMM with the bias + GELU + gate epilogue
  (:mod:`cofi_kernels.ops.triton.gated_ffn`); the down-projection is
  ``torch.addmm`` (cuBLAS with its fused bias epilogue; a Triton GEMM would
  fuse nothing more). Backward: ``dh = dy w_out`` is a Triton GEMM whose
  epilogue forms ``d_pre``, recomputes ``h`` and writes per-program partial
  sums for the int_gate and b_in gradients; the three plain GEMMs
  (``d_pre w_in``, ``d_preᵀ x``, ``dyᵀ h``) are ``torch.mm``.
  Saved for backward: ``x``, ``w_in``, ``w_out``, ``int_gate`` and the
  pre-activation ``pre`` (``[rows, I]``, float32 whatever x's dtype: from a
  rounded ``pre`` the int_gate and b_in gradients, sums of few rows when the
  batch is small, came out less accurate than plain PyTorch's); ``h`` and
  GELU are recomputed from ``pre``.
- ``cpu``: ``F.linear`` → the compiled ``cofi::gelu_gate_fwd`` → ``F.linear``
  (in float32 for half-precision inputs); autograd composes the ops' own
  backward formulas.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import gelu_gate as _gelu_gate_op
from . import reference
from .backends import OpSpec, compiled_backend, reference_backend, triton_backend
from .triton import support as _triton_support

if _triton_support.INSTALLED:
    # Imported with the package so that the kernels are compiled or interpreted
    # as _triton_support.INTERPRET says (both read TRITON_INTERPRET now).
    from .triton import gated_ffn as _kernels
else:  # pragma: no cover - torch builds without triton
    _kernels = None


# --------------------------------------------------------------------------- cpu

def gated_ffn_cpu(x, w_in, b_in, w_out, b_out, int_gate):
    """The ``cpu`` backend: torch GEMMs around the compiled gelu_gate op (inputs checked).

    float16/bfloat16 inputs are computed in float32 and the output rounded
    once, as the Triton kernels do: rounding ``x w_inᵀ`` and ``dy w_out`` to
    the half type made the int_gate and b_in gradients of narrow layers (few
    units, few rows) less accurate than plain PyTorch's now and then. CPUs
    rarely have fast half-precision GEMMs anyway.
    """
    dtype = x.dtype
    if dtype != torch.float32:
        x, w_in, b_in, w_out, b_out = (t.float() for t in (x, w_in, b_in, w_out, b_out))
        int_gate = None if int_gate is None else int_gate.float()
    hidden = _gelu_gate_op.gelu_gate_fwd(F.linear(x, w_in), b_in, int_gate)
    return F.linear(hidden, w_out, b_out).to(dtype)


# ------------------------------------------------------------------------ triton

def _kernel_flags(dtype: torch.dtype) -> dict:
    interpret = _triton_support.INTERPRET
    return {
        "UPCAST": interpret or dtype == torch.float32,
        "IEEE": interpret or dtype == torch.float32,
        "ROUND_BF16": interpret and dtype == torch.bfloat16,
    }


def _grid(m: int, n: int):
    return lambda meta: (_triton_support.cdiv(m, meta["BLOCK_M"]) * _triton_support.cdiv(n, meta["BLOCK_N"]),)


def _bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


def _pre_buffer(x, w_in, save_pre):
    """The saved pre-activation: float32 ``[rows, I]``, or empty when no backward follows."""
    if not save_pre:
        return x.new_empty(0)
    return x.new_empty((math.prod(x.shape[:-1]), w_in.shape[0]), dtype=torch.float32)


@torch.library.custom_op("cofi::gated_ffn_fwd", mutates_args=())
def gated_ffn_fwd(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    int_gate: torch.Tensor | None,
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [..., D], pre)``: ``pre`` = float32 ``[rows, I]`` when ``save_pre``, else ``[0]``; for the backward only."""
    if _kernels is None:
        raise RuntimeError("gated_ffn: the triton backend needs triton, which is not installed")
    d = x.shape[-1]
    i = w_in.shape[0]
    x2 = x.reshape(-1, d)
    m = x2.shape[0]
    pre = _pre_buffer(x, w_in, save_pre)
    if i == 0 or m == 0:
        out = b_out.to(x.dtype).expand(m, d).clone()
        return out.reshape(x.shape), pre
    h = x.new_empty((m, i))
    with _triton_support.device_guard(x):
        _kernels.ffn_up_fwd_kernel[_grid(m, i)](
            x2, w_in, b_in, int_gate if int_gate is not None else b_in, h, pre if save_pre else h,
            m, i, d, _bucket(m),
            x2.stride(0), x2.stride(1), w_in.stride(0), w_in.stride(1), h.stride(0),
            HAS_GATE=int_gate is not None, STORE_PRE=save_pre, **_kernel_flags(x.dtype),
        )
    out = torch.addmm(b_out.to(x.dtype), h, w_out.t())
    return out.reshape(x.shape), pre


@gated_ffn_fwd.register_fake
def _fake(x, w_in, b_in, w_out, b_out, int_gate, save_pre):
    return x.new_empty(x.shape), _pre_buffer(x, w_in, save_pre)  # D of the output equals D of x


def _bwd_outputs(x, w_in, w_out, mask):
    """Gradients' shapes and dtypes: x, w_in, w_out in their own dtype; b_in, b_out, int_gate sums in float32."""
    d, i = x.shape[-1], w_in.shape[0]
    wanted = (
        (x.shape, x.dtype), (w_in.shape, w_in.dtype), ((i,), torch.float32),
        (w_out.shape, w_out.dtype), ((d,), torch.float32), ((i,), torch.float32),
    )
    return [x.new_empty(shape, dtype=dtype) if want else x.new_empty(0, dtype=dtype)
            for (shape, dtype), want in zip(wanted, mask)]


@torch.library.custom_op("cofi::gated_ffn_bwd", mutates_args=())
def gated_ffn_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    int_gate: torch.Tensor | None,
    pre: torch.Tensor,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for (x, w_in, b_in, w_out, b_out, int_gate); unwanted ones (mask False) are empty.

    ``pre`` is the forward's second output. The b_in, b_out and int_gate
    gradients are float32 (the autograd formula casts them to the inputs' dtypes).
    """
    if _kernels is None:
        raise RuntimeError("gated_ffn: the triton backend needs triton, which is not installed")
    want_dx, want_dw_in, want_db_in, want_dw_out, want_db_out, want_dgate = output_mask
    want_dgate = want_dgate and int_gate is not None
    d = x.shape[-1]
    i = w_in.shape[0]
    x2 = x.reshape(-1, d)
    m = x2.shape[0]
    dy = grad_out.reshape(m, d)
    grads = _bwd_outputs(x, w_in, w_out, [want_dx, want_dw_in, want_db_in, want_dw_out, want_db_out, want_dgate])
    if want_db_out:
        grads[4] = dy.sum(0, dtype=torch.float32)
    if i == 0 or m == 0:
        for k in (0, 1, 2, 3, 5):
            grads[k].zero_()
        return tuple(grads)
    want_dpre = want_dx or want_dw_in or want_db_in
    d_pre = x.new_empty((m, i)) if want_dpre else None
    h = x.new_empty((m, i)) if want_dw_out else None
    parts = _triton_support.cdiv(m, _kernels.MIN_BLOCK_M)
    gsum = torch.zeros((parts, i), dtype=torch.float32, device=x.device) if want_dgate else None
    bsum = torch.zeros((parts, i), dtype=torch.float32, device=x.device) if want_db_in else None
    if want_dpre or want_dw_out or want_dgate:
        dummy = pre
        # Not `pre`: the autotuner zeroes whatever is passed for the sums.
        no_sums = torch.zeros(1, dtype=torch.float32, device=x.device)
        with _triton_support.device_guard(x):
            _kernels.ffn_up_bwd_kernel[_grid(m, i)](
                dy, w_out, pre, int_gate if int_gate is not None else dummy,
                d_pre if d_pre is not None else dummy, h if h is not None else dummy,
                gsum if gsum is not None else no_sums, bsum if bsum is not None else no_sums,
                m, i, d, _bucket(m),
                dy.stride(0), dy.stride(1), w_out.stride(0), w_out.stride(1), pre.stride(0),
                HAS_GATE=int_gate is not None, STORE_DPRE=want_dpre, STORE_H=want_dw_out,
                GATE_SUMS=want_dgate, BIAS_SUMS=want_db_in, **_kernel_flags(x.dtype),
            )
    if want_dx:
        grads[0] = torch.mm(d_pre, w_in).reshape(x.shape)
    if want_dw_in:
        grads[1] = torch.mm(d_pre.t(), x2)
    if want_db_in:
        grads[2] = bsum.sum(0)  # fixed order over the row blocks
    if want_dw_out:
        grads[3] = torch.mm(dy.t(), h)
    if want_dgate:
        grads[5] = gsum.sum(0)
    return tuple(grads)


@gated_ffn_bwd.register_fake
def _fake_backward(grad_out, x, w_in, w_out, int_gate, pre, output_mask):
    mask = list(output_mask)
    mask[5] = mask[5] and int_gate is not None
    return tuple(_bwd_outputs(x, w_in, w_out, mask))


def _setup_context(ctx, inputs, output):
    x, w_in, b_in, w_out, b_out, int_gate, save_pre = inputs
    _, pre = output
    ctx.mark_non_differentiable(pre)
    ctx.save_for_backward(x, w_in, w_out, int_gate, pre)
    ctx.save_pre = save_pre
    ctx.grad_dtypes = (b_in.dtype, b_out.dtype, None if int_gate is None else int_gate.dtype)


def _backward(ctx, grad_out, _grad_pre):
    x, w_in, w_out, int_gate, pre = ctx.saved_tensors
    if not ctx.save_pre:
        raise RuntimeError("gated_ffn: the forward ran with save_pre=False, so it cannot be differentiated; "
                           "call it through cofi_kernels.gated_ffn")
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2], need[3], need[4], int_gate is not None and need[5]]
    grads = gated_ffn_bwd(grad_out, x, w_in, w_out, int_gate, pre, mask)
    b_in_dtype, b_out_dtype, gate_dtype = ctx.grad_dtypes
    dx, dw_in, db_in, dw_out, db_out, dgate = (g if want else None for g, want in zip(grads, mask))
    if db_in is not None:
        db_in = db_in.to(b_in_dtype)
    if db_out is not None:
        db_out = db_out.to(b_out_dtype)
    if dgate is not None:
        dgate = dgate.to(gate_dtype)
    return dx, dw_in, db_in, dw_out, db_out, dgate, None


gated_ffn_fwd.register_autograd(_backward, setup_context=_setup_context)


def gated_ffn_triton(x, w_in, b_in, w_out, b_out, int_gate):
    """The ``triton`` backend (inputs checked); saves ``pre`` only when a backward can follow."""
    save_pre = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_in, b_in, w_out, b_out, int_gate)
    )
    out, _ = gated_ffn_fwd(x, w_in, b_in, w_out, b_out, int_gate, save_pre)
    return out


SPEC = OpSpec(
    "gated_ffn",
    backends=(
        reference_backend(reference.gated_ffn),
        # The cpu backend's only compiled piece is the gelu_gate epilogue.
        compiled_backend("cpu", gated_ffn_cpu, op="gated_ffn", kernels=_gelu_gate_op.KERNELS),
        triton_backend(gated_ffn_triton),
    ),
    auto_order=("cpu", "triton"),
)
