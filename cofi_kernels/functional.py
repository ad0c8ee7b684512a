"""Public functions of the fused CoFi ops, with argument checks and backend choice.

Each function runs a registered ``cofi::`` op (C++ on the CPU, CUDA C++ or
Triton on GPUs) or the PyTorch reference (``backend="reference"``): it checks
its arguments, describes them to :func:`cofi_kernels.ops.backends.resolve`
(device, dtype, head size), which picks the backend (see
:mod:`cofi_kernels.ops.backends`), and calls that backend's launcher from the
op's spec. Gradients flow to every tensor argument through the op's
registered autograd formula.
"""

from __future__ import annotations

import math

import torch

from .ops import _checks, backends, reference
from .ops.backends import Inputs
from .ops import gated_attention as _gated_attention_op
from .ops import gated_ffn as _gated_ffn_op
from .ops import gelu_gate as _gelu_gate_op
from .ops import masked_layer_norm as _mln_op
from .ops import packed_embeddings as _packed_embeddings_op
from .ops import pruned_layer as _pruned_layer_op
from .ops import varlen_attention as _varlen_attention_op

__all__ = ["attention", "ffn", "gated_attention", "gated_ffn", "gelu_gate", "layer_norm", "masked_layer_norm",
           "packed_embeddings", "pruned_layer", "varlen_attention"]


def gelu_gate(
    x: torch.Tensor,
    bias: torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused ``GELU_erf(x + bias) * gate`` (the FFN epilogue of CoFi, gate = z_int).

    Args:
        x: ``[..., N]`` activations, float32, float16 or bfloat16 (float64 on the
            reference backend only).
        bias: ``[N]``, dtype of ``x`` or float32.
        gate: ``[N]`` per-unit gate (z_int), dtype of ``x`` or float32; ``None`` = all ones.
        backend: ``"auto"``, ``"reference"``, ``"cpu"`` or ``"cuda"`` (see :mod:`cofi_kernels.ops.backends`;
            ``auto`` runs float64 on the reference).

    Returns:
        ``[..., N]`` in the dtype of ``x``; arithmetic in float32. Differentiable
        in ``x``, ``bias`` and ``gate``.
    """
    op = "gelu_gate"
    _checks.check_activation(op, "x", x, allow_float64=True)
    n = x.shape[-1]
    _checks.check_vector(op, "bias", bias, n, x)
    if gate is not None:
        _checks.check_vector(op, "gate", gate, n, x)
    spec = _gelu_gate_op.SPEC
    choice = backends.resolve(spec, backend, Inputs(x.device, x.dtype))
    return spec.launcher(choice)(x, bias, gate)


def masked_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    layer_gate: torch.Tensor | None = None,
    hidden_gate: torch.Tensor | None = None,
    eps: float = 1e-12,
    *,
    backend: str = "auto",
    check_gates: bool = True,
) -> torch.Tensor:
    """Fused gated residual LayerNorm over the kept hidden dims (CoFi's sublayer tail).

    Computes ``y = residual + x * layer_gate * hidden_gate``, normalises ``y``
    with mean and variance taken over the dims where ``hidden_gate != 0`` only,
    and returns ``(norm(y) * weight + bias) * hidden_gate``; dropped dims come
    out 0. With no kept dim at all the output is 0. A ``layer_gate`` of 0 still
    normalises ``residual`` (skipping a dead sublayer is the caller's choice).

    Args:
        x: ``[..., D]`` sublayer output (after its output projection), float32,
            float16 or bfloat16 (float64 on the reference backend only).
        residual: same shape, dtype and device as ``x``.
        weight, bias: ``[D]`` LayerNorm affine parameters, dtype of ``x`` or float32.
        layer_gate: scalar (``[]`` or ``[1]``) sublayer gate (z_mha or z_ffn); ``None`` = 1.
        hidden_gate: ``[D]`` hidden-dim gate (z_hid); ``None`` = all ones (plain LayerNorm).
        eps: added to the variance.
        backend: ``"auto"``, ``"reference"``, ``"cpu"`` or ``"cuda"`` (``auto`` runs
            float64 on the reference).
        check_gates: raise ``ValueError`` if ``hidden_gate`` holds NaN (which dims
            are kept would be undefined). It reads the gate, a device sync on
            CUDA; pass False in hot loops once the gates are known to be finite.
            Skipped while ``torch.compile`` traces.

    Returns:
        ``[..., D]`` in the dtype of ``x``; statistics in float32. Differentiable
        in every tensor argument. The gradient with respect to a hidden-gate
        entry that is exactly 0 is taken with the kept set held fixed.
    """
    op = "masked_layer_norm"
    _checks.check_activation(op, "x", x, allow_float64=True)
    _checks.check_like(op, "residual", residual, x, "x")
    d = x.shape[-1]
    _checks.check_vector(op, "weight", weight, d, x)
    _checks.check_vector(op, "bias", bias, d, x)
    if layer_gate is not None:
        _checks.check_scalar(op, "layer_gate", layer_gate, x)
    if hidden_gate is not None:
        _checks.check_vector(op, "hidden_gate", hidden_gate, d, x)
        if check_gates:
            _checks.check_no_nan(op, "hidden_gate", hidden_gate, "the kept dims (hidden_gate != 0) are undefined")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be a non-negative number, got {eps}")
    spec = _mln_op.SPEC
    choice = backends.resolve(spec, backend, Inputs(x.device, x.dtype))
    return spec.launcher(choice)(x, residual, weight, bias, layer_gate, hidden_gate, eps)


def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_gate: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention core with a per-head gate (CoFi's z_head), flash-style on GPUs.

    Computes ``softmax(q kᵀ · scale + padding) v · head_gate[h]`` per batch row
    and head, where padded keys get ``finfo.min`` added (Hugging Face's mask
    semantics): a query whose keys are all padded attends uniformly to every
    key, so it never gives NaN. The Triton kernels keep the T×T scores on chip,
    save the log-sum-exp for the backward and return the gate gradient
    ``Σ ⟨dOut_h, O_h⟩`` taken on the ungated output, so it is right for a gate
    of exactly 0 as well.

    Args:
        q, k, v: ``[B, H, T, D]``, float32, float16 or bfloat16 (float64 on the
            reference backend only); any strides. ``H`` may be 0 (empty
            output). The Triton backend needs ``D`` in 16, 32, 64, 128.
        head_gate: ``[H]`` per-head gate, dtype of ``q`` or float32; ``None`` = all ones.
        key_padding_mask: ``[B, T]`` bool, True = attend; ``None`` = attend to all.
        scale: multiplies ``q kᵀ``; defaults to ``D ** -0.5``.
        backend: ``"auto"`` (Triton on CUDA tensors when it takes the dtype and
            head size, else the reference; the reference on CPU),
            ``"reference"`` or ``"triton"`` (CPU tensors only under ``TRITON_INTERPRET=1``).

    Returns:
        ``[B, H, T, D]`` contiguous, in the dtype of ``q``; softmax and
        accumulation in float32. Differentiable in ``q``, ``k``, ``v`` and ``head_gate``.
    """
    op = "gated_attention"
    q = _checks.check_attention_inputs(op, q, k, v, allow_float64=True)
    head_dim = q.shape[-1]
    if head_gate is not None:
        _checks.check_vector(op, "head_gate", head_gate, q.shape[1], q, ref_name="q", what="the head count H = q.shape[1]")
    if key_padding_mask is not None:
        _checks.check_key_padding_mask(op, key_padding_mask, q)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{op}: scale must be a positive finite number, got {scale!r}")
    spec = _gated_attention_op.SPEC
    choice = backends.resolve(spec, backend, Inputs(q.device, q.dtype, head_dim=head_dim))
    # Contiguous whatever the backend, as the docstring promises (a no-op on the Triton output).
    return spec.launcher(choice)(q, k, v, head_gate, key_padding_mask, float(scale)).contiguous()


def gated_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    int_gate: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """CoFi's gated FFN: ``(GELU_erf(x w_inᵀ + b_in) · int_gate) w_outᵀ + b_out``.

    Weights have ``nn.Linear`` layouts. With ``I = 0`` (every unit pruned) the
    output is ``b_out`` broadcast over the rows.

    Args:
        x: ``[..., D]`` activations, any number of leading dims, float32,
            float16 or bfloat16 (float64 on the reference backend only).
        w_in: ``[I, D]`` up-projection weight, dtype of ``x``; ``I`` may be 0.
        b_in: ``[I]``, dtype of ``x`` or float32.
        w_out: ``[D, I]`` down-projection weight, dtype of ``x``.
        b_out: ``[D]``, dtype of ``x`` or float32.
        int_gate: ``[I]`` per-unit gate (z_int), dtype of ``x`` or float32; ``None`` = all ones.
        backend: ``"auto"`` (``"cpu"`` on CPU tensors, ``"triton"`` on CUDA; the
            reference for float64),
            ``"reference"``, ``"cpu"`` (torch GEMMs around the compiled
            gelu_gate op, in float32 for half types) or ``"triton"`` (the up-projection GEMM with the
            bias + GELU + gate epilogue fused, forward and backward; CPU
            tensors only under ``TRITON_INTERPRET=1``).

    Returns:
        ``[..., D]`` in the dtype of ``x``; GEMMs accumulate and the epilogue
        computes in float32. Differentiable in every tensor argument.
    """
    op = "gated_ffn"
    _checks.check_activation(op, "x", x, allow_float64=True)
    d = x.shape[-1]
    _checks.check_weight(op, "w_in", w_in, (None, d), x, f"[I, D] with D = {d} (the last dim of x)")
    i = w_in.shape[0]
    _checks.check_vector(op, "b_in", b_in, i, x, what="I = w_in.shape[0]")
    _checks.check_weight(op, "w_out", w_out, (d, i), x, f"[D, I] = [{d}, {i}] (D: last dim of x, I: w_in.shape[0])")
    _checks.check_vector(op, "b_out", b_out, d, x)
    if int_gate is not None:
        _checks.check_vector(op, "int_gate", int_gate, i, x, what="I = w_in.shape[0]")
    spec = _gated_ffn_op.SPEC
    choice = backends.resolve(spec, backend, Inputs(x.device, x.dtype))
    return spec.launcher(choice)(x, w_in, b_in, w_out, b_out, int_gate)


# ------------------------------------------------------------------ pruned model (serving)
#
# The sublayer ops of a PrunedModel. Today they run their PyTorch reference
# (``ops/reference.py``); the serving engine's kernels plug in here as backends.


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention core of a pruned model: ``softmax(q kᵀ · scale + padding) v``.

    Args:
        q, k, v: ``[B, H, T, D]``, one dtype and device; ``H`` is the layer's
            own head count.
        key_padding_mask: ``[B, T]`` bool, True = attend (padded keys get
            ``finfo.min`` added, as Hugging Face does); ``None`` = attend to all.
        scale: multiplies ``q kᵀ``; defaults to ``D ** -0.5``.

    Returns:
        ``[B, H, T, D]`` in the dtype of ``q``.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention: q, k, v must be [B, H, T, D] of one shape, got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    return reference.attention(q, k, v, key_padding_mask, scale)


def ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    activation,
) -> torch.Tensor:
    """FFN of a pruned model: ``activation(x w_inᵀ + b_in) w_outᵀ + b_out`` (nn.Linear layouts).

    Args:
        x: ``[..., d]``; w_in: ``[w, d]``; b_in: ``[w]``; w_out: ``[d, w]``;
            b_out: ``[d]``, with ``w`` the layer's FFN width.
        activation: the elementwise activation (a callable on tensors).
    """
    if w_in.shape[-1] != x.shape[-1] or w_out.shape != (x.shape[-1], w_in.shape[0]):
        raise ValueError(f"ffn: expected w_in [w, {x.shape[-1]}] and w_out [{x.shape[-1]}, w], got "
                         f"{list(w_in.shape)} and {list(w_out.shape)}")
    return reference.ffn(x, w_in, b_in, w_out, b_out, activation)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Residual LayerNorm of a pruned model: ``LayerNorm(residual + x)`` over the last dim.

    Args:
        x: ``[..., d]`` (or ``[d]``, e.g. the output bias of a sublayer with
            no head or unit left, broadcast against ``residual``).
        weight, bias: ``[d]``.
        eps: added to the variance.
        residual: broadcastable with ``x``; ``None`` = plain ``LayerNorm(x)``.
    """
    return reference.layer_norm(x, weight, bias, eps, residual)


def _check_packed(op: str, name: str, x: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{op}: {name} must be [tokens, features], got shape {list(x.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.long or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be a 1-d int64 tensor [batch + 1], got {cu_seqlens.dtype} "
                         f"of shape {list(cu_seqlens.shape)}")
    if cu_seqlens.device != x.device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but {name} is on {x.device}")


def _serving_backend(spec, backend: str, x: torch.Tensor, tensors, head_dim: int | None = None) -> str:
    """The backend of a forward-only serving op: ``auto`` takes the reference when a gradient is wanted."""
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if wants_grad and backends.requested(backend) == "auto":
        return "reference"
    choice = backends.resolve(spec, backend, Inputs(x.device, x.dtype, head_dim))
    if wants_grad and choice != "reference":
        raise ValueError(f"{spec.name}: backend {choice!r} is forward only but a gradient is wanted "
                         "(run under torch.no_grad() / inference_mode(), or backend='reference')")
    return choice


def varlen_attention(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    heads: int,
    head_dim: int,
    *,
    scale: float | None = None,
    first_only: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over packed variable-length sequences (FlashAttention's varlen interface).

    Args:
        qkv: ``[N, 3·heads·head_dim]``, the fused QKV projection of N packed tokens:
            the q heads, then the k heads, then the v heads; rows contiguous.
        cu_seqlens: ``[B + 1]`` int64 cumulative offsets: sequence ``b`` owns rows
            ``cu_seqlens[b]:cu_seqlens[b+1]``; from 0 to N, strictly increasing.
        heads, head_dim: the layer's head count (>= 1) and head size.
        scale: multiplies ``q kᵀ``; defaults to ``head_dim ** -0.5``.
        first_only: compute each sequence's first query only (a classification
            head's token); keys and values still span the whole sequence.
        backend: ``"auto"``, ``"reference"``, ``"cpu"`` (float32 / bfloat16, forward only)
            or ``"triton"`` (CUDA; float32 / float16 / bfloat16, head sizes up to 256,
            forward only, no device-to-host copy, so CUDA-graph safe); ``auto`` takes
            the reference when a gradient is wanted.

    Returns:
        ``[N, heads·head_dim]`` (``[B, heads·head_dim]`` with ``first_only``) in the dtype
        of ``qkv``: each token attends to the tokens of its own sequence only.
        Softmax in float32.
    """
    op = "varlen_attention"
    _check_packed(op, "qkv", qkv, cu_seqlens)
    if not (isinstance(heads, int) and heads >= 1 and isinstance(head_dim, int) and head_dim >= 1):
        raise ValueError(f"{op}: heads and head_dim must be integers >= 1, got {heads!r} and {head_dim!r}")
    if qkv.shape[1] != 3 * heads * head_dim:
        raise ValueError(f"{op}: qkv must be [tokens, {3 * heads * head_dim}] for {heads} heads of {head_dim}, "
                         f"got {list(qkv.shape)}")
    scale = head_dim**-0.5 if scale is None else float(scale)
    spec = _varlen_attention_op.SPEC
    choice = _serving_backend(spec, backend, qkv, (qkv,), head_dim)
    return spec.launcher(choice)(qkv, cu_seqlens, heads, head_dim, scale, first_only)


def pruned_layer(
    h: torch.Tensor,
    cu_seqlens: torch.Tensor,
    attention: dict | None,
    ffn: dict | None,
    *,
    heads: int,
    head_dim: int,
    activation: str,
    eps: float,
    first_only: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """One encoder layer of a pruned model over packed tokens, in one call on the CPU.

    Args:
        h: ``[N, d]`` packed tokens (see :func:`varlen_attention` for ``cu_seqlens``).
        attention: None (sublayer removed) or its weights by name: ``qkv_weight``
            ``[3·heads·head_dim, d]``, ``qkv_bias``, ``out_weight`` ``[d, heads·head_dim]``
            (these three absent when ``heads == 0``), ``out_bias``, ``ln_weight``,
            ``ln_bias`` ``[d]``.
        ffn: None or ``in_weight`` ``[w, d]``, ``in_bias``, ``out_weight`` ``[d, w]``
            (absent when no unit is left), ``out_bias``, ``ln_weight``, ``ln_bias``.
        heads, head_dim: the attention's head count (may be 0) and head size.
        activation: ``"gelu"`` (erf), ``"gelu_tanh"`` or ``"relu"``.
        eps: the LayerNorms' epsilon.
        first_only: return each sequence's first row only, ``[B, d]``: rows after the
            attention's output projection are computed for those tokens only.
        backend: ``"auto"``, ``"reference"`` or ``"cpu"`` (float32 / bfloat16, forward only).

    Returns:
        ``[N, d]`` (``[B, d]`` with ``first_only``): what
        :func:`cofi_kernels.ops.reference.pruned_layer` defines (post-LayerNorm BERT layer).
    """
    op = "pruned_layer"
    _check_packed(op, "h", h, cu_seqlens)
    if activation not in _pruned_layer_op.ACTIVATION_CODES:
        raise ValueError(f"{op}: activation must be one of {sorted(_pruned_layer_op.ACTIVATION_CODES)}, "
                         f"got {activation!r}")
    tensors = [*(attention or {}).values(), *(ffn or {}).values(), h]
    spec = _pruned_layer_op.SPEC
    choice = _serving_backend(spec, backend, h, tensors)
    return spec.launcher(choice)(h, cu_seqlens, first_only, attention, ffn, heads, head_dim, activation, eps)


def packed_embeddings(
    ids: torch.Tensor,
    positions: torch.Tensor,
    types: torch.Tensor,
    word: torch.Tensor,
    position_table: torch.Tensor,
    type_table: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    *,
    eps: float,
    backend: str = "auto",
) -> torch.Tensor:
    """The embedding layer of a (pruned) BERT over packed tokens, in one pass on the CPU.

    Args:
        ids, positions, types: ``[N]`` int64: each real token's word id, position and
            token type (the rows of a packed batch, see :func:`varlen_attention`).
        word, position_table, type_table: ``[rows, d]`` embedding tables.
        ln_weight, ln_bias: ``[d]``, the LayerNorm after the sum; ``eps`` its epsilon.
        backend: ``"auto"``, ``"reference"`` or ``"cpu"`` (float32 / bfloat16, forward only;
            ``auto`` takes the reference when a gradient is wanted).

    Returns:
        ``[N, d]``: ``LN(word[ids] + position_table[positions] + type_table[types])``, as
        :func:`cofi_kernels.ops.reference.packed_embeddings` defines it. An index outside its
        table is an error.
    """
    op = "packed_embeddings"
    for name, t in (("ids", ids), ("positions", positions), ("types", types)):
        if t.dim() != 1 or t.dtype != torch.long or t.shape[0] != ids.shape[0] or t.device != word.device:
            raise ValueError(f"{op}: {name} must be a 1-d int64 tensor of {ids.shape[0]} indices on {word.device} "
                             f"(as ids), got {t.dtype} {list(t.shape)} on {t.device}")
    for name, t in (("word", word), ("position_table", position_table), ("type_table", type_table)):
        if t.dim() != 2 or t.shape[1] != word.shape[-1]:
            raise ValueError(f"{op}: {name} must be [rows, {word.shape[-1]}], got {list(t.shape)}")
    tensors = (word, position_table, type_table, ln_weight, ln_bias)
    spec = _packed_embeddings_op.SPEC
    choice = _serving_backend(spec, backend, word, tensors)
    return spec.launcher(choice)(ids, positions, types, word, position_table, type_table, ln_weight, ln_bias, eps)
