"""Plain-PyTorch definitions of the CoFi operators (DESIGN.md §4).

Every kernel in this package is correct exactly when it computes what these
functions compute. They use only differentiable PyTorch ops, so autograd gives
every gradient and ``torch.autograd.gradcheck`` can check them in float64. They
are also the ``reference`` backend of the public functions.

Gate conventions: a gate tensor multiplies the quantity it governs; ``None``
means "all ones". A hidden dim ``k`` is *kept* where ``hidden_gate[k] != 0``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "gelu_gate",
    "masked_layer_norm",
    "gated_attention",
    "gated_ffn",
    "gated_embeddings",
    "attention",
    "ffn",
    "layer_norm",
    "varlen_attention",
    "pruned_layer",
    "LAYER_ACTIVATIONS",
]


def gelu_gate(x: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``GELU_erf(x + bias) * gate``; ``bias`` and ``gate`` have shape ``[x.shape[-1]]``."""
    out = F.gelu(x + bias)
    return out if gate is None else out * gate


def masked_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    layer_gate: torch.Tensor | None = None,
    hidden_gate: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Gated residual LayerNorm over the kept hidden dims.

    ``y = residual + x * layer_gate * hidden_gate``; mean and variance of ``y``
    are taken over the dims where ``hidden_gate != 0`` only (population
    variance, as LayerNorm); the normalised value of a dropped dim is defined
    as 0; ``out = (norm(y) * weight + bias) * hidden_gate``. With no kept dim
    at all the statistics are mean 0, variance 0 and the output is 0.
    ``layer_gate`` is a scalar (0-d or one element), ``hidden_gate`` has shape
    ``[D]`` with ``D = x.shape[-1]``.
    """
    y_delta = x
    if layer_gate is not None:
        y_delta = y_delta * layer_gate.reshape(())
    if hidden_gate is not None:
        y_delta = y_delta * hidden_gate
    y = residual + y_delta
    if hidden_gate is None:
        keep = torch.ones(x.shape[-1], dtype=y.dtype, device=y.device)
    else:
        keep = (hidden_gate != 0).to(y.dtype)
    n_kept = keep.sum().clamp_min(1)
    mean = (y * keep).sum(-1, keepdim=True) / n_kept
    centred = (y - mean) * keep
    var = (centred * centred).sum(-1, keepdim=True) / n_kept
    normed = centred * torch.rsqrt(var + eps)
    out = normed * weight + bias
    return out if hidden_gate is None else out * hidden_gate


def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_gate: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention core with a per-head gate.

    ``q, k, v``: ``[B, H, T, D]``; ``head_gate``: ``[H]``;
    ``key_padding_mask``: ``[B, T]`` bool, True = attend. Returns
    ``softmax(q kᵀ · scale + padding) v · head_gate[h]`` of shape ``[B, H, T, D]``;
    ``scale`` defaults to ``D ** -0.5``. A query whose keys are all padded
    attends uniformly to every key (the additive mask is finite), so it never
    gives NaN.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        neg = torch.finfo(scores.dtype).min
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], neg)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)
    if head_gate is not None:
        out = out * head_gate[None, :, None, None]
    return out


def gated_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    int_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(GELU_erf(x w_inᵀ + b_in) · int_gate) w_outᵀ + b_out`` with nn.Linear layouts.

    ``x``: ``[..., D]``; ``w_in``: ``[I, D]``; ``b_in``: ``[I]``; ``w_out``: ``[D, I]``;
    ``b_out``: ``[D]``; ``int_gate``: ``[I]``.
    """
    hidden = gelu_gate(F.linear(x, w_in), b_in, int_gate)
    return F.linear(hidden, w_out, b_out)


def gated_embeddings(
    input_ids: torch.Tensor,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    hidden_gate: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """BERT embeddings with the hidden-dim gate: ``LN_kept((word + pos + type) · z_hid) · z_hid``.

    ``input_ids``: ``[B, T]``; tables are ``[vocab, D]``, ``[max_pos, D]``,
    ``[n_types, D]``; ``token_type_ids`` defaults to zeros and ``position_ids``
    to ``0..T-1``. Returns ``[B, T, D]``.
    """
    seq_len = input_ids.shape[-1]
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=input_ids.device)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    summed = (
        F.embedding(input_ids, word_embeddings)
        + F.embedding(position_ids, position_embeddings)
        + F.embedding(token_type_ids, token_type_embeddings)
    )
    return masked_layer_norm(
        summed, torch.zeros_like(summed), ln_weight, ln_bias, None, hidden_gate, eps
    )


# ------------------------------------------------------------------ pruned model (serving)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q kᵀ · scale + padding) v`` through PyTorch's SDPA, as a pruned model computes it.

    ``q, k, v``: ``[B, H, T, D]``; ``key_padding_mask``: ``[B, T]`` bool, True =
    attend; padded keys get ``finfo(dtype).min`` added (Hugging Face's mask).
    """
    mask = None
    if key_padding_mask is not None:
        pad = ~key_padding_mask[:, None, None, :]
        mask = torch.zeros(pad.shape, dtype=q.dtype, device=q.device).masked_fill(pad, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    activation,
) -> torch.Tensor:
    """``activation(x w_inᵀ + b_in) w_outᵀ + b_out`` with nn.Linear layouts."""
    return F.linear(activation(F.linear(x, w_in, b_in)), w_out, b_out)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``LayerNorm(residual + x)`` over the last dim (``LayerNorm(x)`` without a residual)."""
    y = x if residual is None else residual + x
    return F.layer_norm(y, (y.shape[-1],), weight, bias, eps)


def varlen_attention(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    heads: int,
    head_dim: int,
    scale: float,
    first_only: bool = False,
) -> torch.Tensor:
    """Attention of packed sequences, each over its own tokens only (FlashAttention's varlen layout).

    ``qkv``: ``[N, 3·heads·head_dim]``, the fused projection of N packed tokens (q heads,
    then k heads, then v heads); sequence ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]``.
    Returns ``softmax(q kᵀ · scale) v`` per sequence and head, ``[N, heads·head_dim]``
    (heads side by side), or ``[B, heads·head_dim]`` for each sequence's first query
    only with ``first_only``.
    """
    out = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = qkv[start:end].view(end - start, 3, heads, head_dim).permute(1, 2, 0, 3).unbind(0)
        if first_only:
            q = q[:, :1]
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1).to(qkv.dtype)
        out.append((probs @ v).transpose(0, 1).reshape(q.shape[1], heads * head_dim))
    return torch.cat(out)


# The activations of pruned_layer by code (the C++ op takes the code).
LAYER_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def pruned_layer(
    h: torch.Tensor,
    cu_seqlens: torch.Tensor,
    first_only: bool,
    attention: dict | None,
    ffn: dict | None,
    heads: int,
    head_dim: int,
    activation: str,
    eps: float,
) -> torch.Tensor:
    """One post-LayerNorm encoder layer of a pruned model over packed tokens ``h`` ``[N, d]``.

    ``attention``: None (sublayer removed) or ``{"qkv_weight", "qkv_bias", "out_weight"}``
    (absent when ``heads == 0``) plus ``"out_bias", "ln_weight", "ln_bias"``: ``h ↦
    LN(h + varlen_attention(h W_qkvᵀ + b_qkv) W_outᵀ + b_out)``. ``ffn``: None or
    ``{"in_weight", "in_bias", "out_weight"}`` (absent with no unit left) plus ``"out_bias",
    "ln_weight", "ln_bias"``: ``h ↦ LN(h + act(h W_inᵀ + b_in) W_outᵀ + b_out)``. With
    ``first_only`` the result is each sequence's first row ``[B, d]`` (the attention's keys
    and values still read every row). ``activation``: a key of :data:`LAYER_ACTIVATIONS`.
    """
    d = h.shape[-1]
    firsts = cu_seqlens[:-1]
    if attention is not None:
        residual = h[firsts] if first_only else h
        y = residual + attention["out_bias"]
        if heads:
            qkv = F.linear(h, attention["qkv_weight"], attention["qkv_bias"])
            ctx = varlen_attention(qkv, cu_seqlens, heads, head_dim, head_dim**-0.5, first_only)
            y = y + F.linear(ctx, attention["out_weight"])
        h = F.layer_norm(y, (d,), attention["ln_weight"], attention["ln_bias"], eps)
    elif first_only:
        h = h[firsts]
    if ffn is not None:
        y = h + ffn["out_bias"]
        if "in_weight" in ffn:
            act = LAYER_ACTIVATIONS[activation](F.linear(h, ffn["in_weight"], ffn["in_bias"]))
            y = y + F.linear(act, ffn["out_weight"])
        h = F.layer_norm(y, (d,), ffn["ln_weight"], ffn["ln_bias"], eps)
    return h


def packed_embeddings(
    ids: torch.Tensor,
    positions: torch.Tensor,
    types: torch.Tensor,
    word: torch.Tensor,
    position_table: torch.Tensor,
    type_table: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """BERT's embedding layer over packed tokens: ``LN(word[ids] + position_table[positions] +
    type_table[types])`` with weight ``ln_weight`` and bias ``ln_bias``; ``[N]`` int64 indices
    each, tables ``[rows, d]`` → ``[N, d]``."""
    x = F.embedding(ids, word) + F.embedding(positions, position_table) + F.embedding(types, type_table)
    return F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
