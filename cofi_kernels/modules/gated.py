"""Gated sublayers of a BERT-family encoder (DESIGN §4), computed on plain tensors.

The CoFi patch (:mod:`cofi_kernels.pruning.cofi.patch`) draws the gates and
calls these functions with them: a layer's gates and live indices
(:class:`LayerGates`), the hidden-dim gate (:class:`HiddenGates`) and the
key-padding mask. The weights are read through small views
(:class:`AttentionParts`, :class:`FFNParts`) that the architecture adapter of
:mod:`cofi_kernels.models.arch` builds from a Hugging Face layer.

Attention runs through :func:`cofi_kernels.functional.gated_attention` (the
FFN through :func:`~cofi_kernels.functional.gated_ffn`, the residual
LayerNorms through :func:`~cofi_kernels.functional.masked_layer_norm`);
attention-probability dropout, when the model trains with it, uses a plain
PyTorch core instead.

Live-only compute (a :class:`LiveLayer` plan): heads, FFN units, sublayers
and hidden dims whose gate is exactly 0 are not computed. The live rows and
columns are cut out of the full weights by ``index_select``, so gradients
land in the right entries of the full parameters and the dead ones get
exactly 0, as in the dense computation. Without a plan everything is computed
and multiplied by the gates, and a sublayer with layer gate 0 becomes the
identity through a ``torch.where`` (no host sync).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import gated_attention, gated_ffn, masked_layer_norm

__all__ = [
    "AttentionParts",
    "EmbeddingParts",
    "FFNParts",
    "HiddenGates",
    "LayerGates",
    "LiveLayer",
    "gated_attention_sublayer",
    "gated_embedding_norm",
    "gated_ffn_sublayer",
    "gated_layer",
    "head_rows",
    "live_index",
    "live_layer",
]


@dataclass(frozen=True)
class EmbeddingParts:
    """Where an encoder keeps its embedding tables and their LayerNorm."""

    word: nn.Embedding
    position: nn.Embedding
    token_type: nn.Embedding
    norm: nn.LayerNorm


@dataclass(frozen=True)
class AttentionParts:
    """The modules of one self-attention sublayer: projections, output, LayerNorm, dropouts."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    output: nn.Linear
    norm: nn.LayerNorm
    num_heads: int
    head_dim: int
    scaling: float
    probs_dropout: nn.Dropout
    output_dropout: nn.Dropout


@dataclass(frozen=True)
class FFNParts:
    """The modules of one FFN sublayer; ``erf_gelu`` when its activation is exact-erf GELU."""

    up: nn.Linear
    down: nn.Linear
    norm: nn.LayerNorm
    activation: Callable
    erf_gelu: bool
    output_dropout: nn.Dropout


@dataclass(frozen=True)
class LiveLayer:
    """What live-only compute runs in one layer, planned on the host from the drawn gates.

    ``head_idx`` / ``unit_idx`` are the live heads / units (None: all of them),
    ``head_rows`` the Q/K/V rows of the live heads.
    """

    mha_alive: bool
    n_heads: int
    head_idx: torch.Tensor | None
    head_rows: torch.Tensor | None
    ffn_alive: bool
    n_units: int
    unit_idx: torch.Tensor | None


@dataclass(frozen=True)
class LayerGates:
    """One layer's gates (``None`` = all ones) and, in live-only mode, its :class:`LiveLayer` plan
    (``live=None`` computes everything and multiplies by the gates)."""

    head: torch.Tensor | None
    mha: torch.Tensor | None
    int: torch.Tensor | None
    ffn: torch.Tensor | None
    live: LiveLayer | None = None


@dataclass(frozen=True)
class HiddenGates:
    """The hidden-dim gate of one forward: ``gate`` ``[D]`` (None = ones) and, in live-only mode,
    the kept dims ``kept`` (None = all) with their gate values ``kept_gate``."""

    gate: torch.Tensor | None
    kept: torch.Tensor | None = None
    kept_gate: torch.Tensor | None = None


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a ``[H·head_dim, ...]`` projection that belong to the heads ``heads`` (in order)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)[None, :]).flatten()


def live_index(gate_row: torch.Tensor) -> torch.Tensor | None:
    """Indices of the non-zero entries of ``gate_row``; None when every entry is live."""
    live = gate_row != 0
    return None if bool(live.all()) else live.nonzero().flatten()


def live_layer(head: torch.Tensor | None, mha: torch.Tensor | None, units: torch.Tensor | None,
               ffn: torch.Tensor | None, num_heads: int, head_dim: int, num_units: int,
               device: torch.device) -> LiveLayer:
    """The plan of one layer from host copies of its gates (``None`` = all ones)."""
    mha_alive = mha is None or bool(mha != 0)
    n_heads, head_idx, rows = num_heads, None, None
    if mha_alive and head is not None:
        idx = live_index(head)
        if idx is not None:
            n_heads, head_idx, rows = idx.numel(), idx.to(device), head_rows(idx, head_dim).to(device)
    ffn_alive = ffn is None or bool(ffn != 0)
    n_units, unit_idx = num_units, None
    if ffn_alive and units is not None:
        idx = live_index(units)
        if idx is not None:
            n_units, unit_idx = idx.numel(), idx.to(device)
    return LiveLayer(mha_alive, n_heads, head_idx, rows, ffn_alive, n_units, unit_idx)


def _take(w: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    # index_select (not a mask) so the backward scatters into the right rows and
    # columns of the full parameter and leaves exact zeros elsewhere.
    if rows is not None:
        w = w.index_select(0, rows)
    if cols is not None:
        w = w.index_select(-1, cols)
    return w


def _attention_core(parts: AttentionParts, q, k, v, head_gate, key_padding_mask) -> torch.Tensor:
    """Gated attention core; a plain PyTorch path only when attention-probability dropout is active."""
    if head_gate is not None and head_gate.dtype != q.dtype:
        head_gate = head_gate.to(q.dtype)
    dropout = parts.probs_dropout
    p = dropout.p if dropout.training else 0.0
    if p == 0.0:
        return gated_attention(q, k, v, head_gate, key_padding_mask, scale=parts.scaling)
    scores = torch.matmul(q, k.transpose(-1, -2)) * parts.scaling
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = F.dropout(torch.softmax(scores, dim=-1), p=p, training=True)
    out = torch.matmul(probs, v)
    return out if head_gate is None else out * head_gate[None, :, None, None]


def _gated_residual_norm(out, x, norm: nn.LayerNorm, hid, layer_gate, z_hid, *, dense: bool) -> torch.Tensor:
    """``LN_kept(x + out · layer_gate · z_hid) · z_hid``; in dense mode a layer gate of 0 keeps ``x`` (§4)."""
    y = masked_layer_norm(out, x, _take(norm.weight, hid, None), _take(norm.bias, hid, None), layer_gate, z_hid,
                          norm.eps, check_gates=False)
    if dense and layer_gate is not None:
        # Live-only mode skips a dead sublayer before computing it; dense mode selects without a host sync.
        y = torch.where(layer_gate == 0, x, y)
    return y


def gated_attention_sublayer(parts: AttentionParts, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
                             gates: LayerGates, hid: torch.Tensor | None, z_hid: torch.Tensor | None) -> torch.Tensor:
    """The gated attention sublayer on ``x`` ``[B, T, D]`` (or, with ``hid``, on the kept hidden dims only)."""
    plan = gates.live
    if plan is not None and not plan.mha_alive:
        return x
    dh, z_head = parts.head_dim, gates.head
    n, rows = parts.num_heads, None
    if plan is not None and plan.head_idx is not None:
        n, rows = plan.n_heads, plan.head_rows
        z_head = z_head.index_select(0, plan.head_idx)
    bo = _take(parts.output.bias, hid, None)
    batch, seq, _ = x.shape
    if n > 0:

        def proj(lin):
            w, b = _take(lin.weight, rows, hid), _take(lin.bias, rows, None)
            return F.linear(x, w, b).view(batch, seq, n, dh).transpose(1, 2)

        ctx = _attention_core(parts, proj(parts.query), proj(parts.key), proj(parts.value), z_head, key_padding_mask)
        out = F.linear(ctx.transpose(1, 2).reshape(batch, seq, n * dh), _take(parts.output.weight, hid, rows), bo)
    else:
        # No live head but a live layer gate: the sublayer still adds its bias and normalises (§4).
        out = bo.expand(batch, seq, bo.shape[0])
    return _gated_residual_norm(parts.output_dropout(out), x, parts.norm, hid, gates.mha, z_hid, dense=plan is None)


def gated_ffn_sublayer(parts: FFNParts, x: torch.Tensor, gates: LayerGates, hid: torch.Tensor | None,
                       z_hid: torch.Tensor | None) -> torch.Tensor:
    """The gated FFN sublayer on ``x`` (or, with ``hid``, on the kept hidden dims only)."""
    plan = gates.live
    if plan is not None and not plan.ffn_alive:
        return x
    z_int = gates.int
    n, units = parts.up.weight.shape[0], None
    if plan is not None and plan.unit_idx is not None:
        n, units = plan.n_units, plan.unit_idx
        z_int = z_int.index_select(0, units)
    b2 = _take(parts.down.bias, hid, None)
    if n > 0:
        w1, b1 = _take(parts.up.weight, units, hid), _take(parts.up.bias, units, None)
        w2 = _take(parts.down.weight, hid, units)
        if parts.erf_gelu:
            out = gated_ffn(x, w1, b1, w2, b2, z_int)
        else:
            act = parts.activation(F.linear(x, w1, b1))
            out = F.linear(act if z_int is None else act * z_int, w2, b2)
    else:
        out = b2.expand(*x.shape[:-1], b2.shape[0])
    return _gated_residual_norm(parts.output_dropout(out), x, parts.norm, hid, gates.ffn, z_hid, dense=plan is None)


def gated_layer(hidden_states: torch.Tensor, key_padding_mask: torch.Tensor | None, attention: AttentionParts,
                ffn: FFNParts, gates: LayerGates, hidden: HiddenGates) -> torch.Tensor:
    """One gated encoder layer (DESIGN §4): attention, then FFN sublayer; ``[B, T, D]`` in and out.

    In live-only mode (``gates.live`` set) dead sublayers are skipped and the
    layer works on the kept hidden dims only: the dropped dims of every hidden
    state are exactly 0 (trailing ·z_hid), so gathering them here and
    scattering back at the end loses nothing.
    """
    plan = gates.live
    if plan is not None and not (plan.mha_alive or plan.ffn_alive):
        return hidden_states
    hid = hidden.kept if plan is not None else None
    x = hidden_states if hid is None else hidden_states.index_select(-1, hid)
    z_hid = hidden.gate if hid is None else hidden.kept_gate
    h = gated_attention_sublayer(attention, x, key_padding_mask, gates, hid, z_hid)
    h = gated_ffn_sublayer(ffn, h, gates, hid, z_hid)
    if hid is not None:
        h = hidden_states.new_zeros(hidden_states.shape).index_copy(-1, hid, h)
    return h


def gated_embedding_norm(x: torch.Tensor, norm: nn.LayerNorm, hidden_gate: torch.Tensor | None) -> torch.Tensor:
    """The embeddings' LayerNorm with the hidden gate: ``LN_kept(e · z_hid) · z_hid`` (plain LN without one)."""
    if hidden_gate is None:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return masked_layer_norm(x, torch.zeros_like(x), norm.weight, norm.bias, None, hidden_gate, norm.eps,
                             check_gates=False)
