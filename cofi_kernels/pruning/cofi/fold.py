"""CoFi's fold: learned gates → kept index sets and scales → the generic builder (DESIGN §4 "Pruning").

:func:`prune` reads a BERT/RoBERTa encoder (optionally with its
sequence-classification head) and a gate dict and builds a
:class:`~cofi_kernels.models.pruned_model.PrunedModel` whose output equals
the gated model's output under those gates (fp32: within 1e-5 max abs).

The gates become the builder's inputs (:mod:`cofi_kernels.models.builder`,
which holds the folding rules): the hidden dims with ``z_hid != 0`` stay,
scaled by ``z_hid``; in a layer whose ``z_mha != 0`` the heads with
``z_head != 0`` stay, scaled by ``z_head``, and the sublayer's output by
``z_mha``; in a layer whose ``z_ffn != 0`` the units with ``z_int != 0``
stay, scaled by ``z_int``, and the output by ``z_ffn``. A sublayer whose
layer gate is 0 is removed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...models.arch import gate_shapes, supported_model
from ...models.builder import KeptLayer, build_pruned_model
from ...models.pruned_model import PrunedModel
from .gates import mismatch_with

__all__ = ["prune"]


def _resolve_gates(gates, z, cfg):
    shapes = gate_shapes(cfg)
    if gates is not None:
        why = mismatch_with(gates, cfg)
        if why is not None:
            raise ValueError(f"prune: the gates do not fit the model: {why}")
        if z is None:
            z = gates.fixed if gates.fixed is not None else gates.deterministic()
    elif z is None:
        raise ValueError("prune: give gates (a CoFiGates) or a gate dict z")
    if not isinstance(z, Mapping):
        raise ValueError(f"prune: z must be a dict gate type -> tensor, got {type(z).__name__}")
    unknown = [k for k in z if k not in shapes]
    if unknown:
        raise ValueError(f"prune: unknown gate key(s) {unknown}; known keys are {tuple(shapes)}")
    out = {}
    for t, s in shapes.items():
        v = z.get(t)
        if v is None:
            out[t] = torch.ones(s, dtype=torch.float64)
            continue
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"prune: gate '{t}' must be a torch.Tensor, got {type(v).__name__}")
        if tuple(v.shape) != s:
            raise ValueError(f"prune: gate '{t}' has the wrong shape for the model: expected {list(s)}, got {list(v.shape)}")
        v = v.detach().to("cpu", torch.float64)
        if not torch.isfinite(v).all():
            raise ValueError(f"prune: gate '{t}' has non-finite values")
        out[t] = v
    return out


@torch.no_grad()
def prune(model, gates=None, z: Mapping[str, torch.Tensor | None] | None = None) -> PrunedModel:
    """Build the compact model that computes what ``model`` gated by ``z`` computes (DESIGN §4).

    Args:
        model: ``BertModel``, ``RobertaModel``, ``BertForSequenceClassification``
            or ``RobertaForSequenceClassification`` (unpatched weights; not modified).
        gates: a :class:`~cofi_kernels.pruning.cofi.gates.CoFiGates` for this model's shapes, or None when ``z`` is given.
        z: gate dict (``head`` [L, H], ``mha`` [L], ``int`` [L, I], ``ffn`` [L],
            ``hidden`` [D]; missing / None = ones). Default: ``gates.fixed`` if
            fixed, else ``gates.deterministic()``.

    A gate is *kept* where it is non-zero (gates are expected in [0, 1], as
    :class:`CoFiGates` produces them); kept soft values are folded into the
    weights (see the module docstring for the exact rules). Returns a
    :class:`PrunedModel` in eval mode with the model's dtype on the CPU.

    Raises:
        UnsupportedModelError (a TypeError and ValueError): any other model class or an
            unsupported config (:mod:`cofi_kernels.models.arch`).
        ValueError: gates / z of the wrong shape (names the type, expected and got shape), or
            every hidden dim pruned.
    """
    _, _, enc = supported_model(model)
    g = _resolve_gates(gates, z, enc.config)
    kept_hidden = torch.nonzero(g["hidden"] != 0).flatten()
    if kept_hidden.numel() == 0:
        raise ValueError("prune: every hidden dim has gate 0; the pruned model would have hidden size 0")
    layers = []
    for i in range(g["mha"].shape[0]):
        keep = KeptLayer(heads=None, units=None)
        if g["mha"][i] != 0:
            keep.heads = torch.nonzero(g["head"][i] != 0).flatten()
            keep.head_scale, keep.attention_scale = g["head"][i][keep.heads], g["mha"][i]
        if g["ffn"][i] != 0:
            keep.units = torch.nonzero(g["int"][i] != 0).flatten()
            keep.unit_scale, keep.ffn_scale = g["int"][i][keep.units], g["ffn"][i]
        layers.append(keep)
    return build_pruned_model(model, layers, hidden=kept_hidden, hidden_scale=g["hidden"][kept_hidden])
