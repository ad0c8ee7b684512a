"""A pruned model padded to aligned sizes, exactly (DESIGN §7, the GPU path's first step).

A pruned model's sizes are irregular (hidden 757, FFN widths 230, 179, ...);
tensor-core GEMMs want multiples of 8. :func:`aligned_copy` pads the hidden size
and every FFN width up to a multiple with zero rows and columns, and makes
every LayerNorm take its statistics over the real hidden dims only (a
``hidden_mask`` on each sublayer, run by ``functional.masked_layer_norm``), so the
padded model computes exactly what the original does: padded FFN units see
zero weights and bias (GELU(0) = ReLU(0) = 0) and meet zero output columns,
padded hidden dims stay 0 through every layer. Head counts need no padding
(the head size, 32 or 64, is aligned already).

``load_for_inference(..., device="cuda")`` applies it (multiple 8), and the
engine runs aligned copies on CUDA (sublayer by sublayer, masked LayerNorms);
on the CPU the compiled layer has no mask, so an aligned copy runs the
reference there. The CPU tests check the arithmetic: the padded model in
float64 equals the original, through the reference and through the packed
sublayer-by-sublayer path. No GPU has run it yet.
"""

from __future__ import annotations

import copy

import torch

from ..models.pruned_model import PrunedModel

__all__ = ["aligned_copy"]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@torch.no_grad()
def aligned_copy(model: PrunedModel, multiple: int = 8) -> PrunedModel:
    """A copy of ``model`` whose hidden size and FFN widths are multiples of ``multiple``.

    Same logits (and, over the first ``hidden_size`` dims, the same hidden states;
    the padded dims are 0). On the CPU the copy runs the reference forward (the CPU
    engine takes unpadded models), on CUDA the engine; it cannot be saved: save the original.
    """
    if not isinstance(model, PrunedModel):
        raise TypeError(f"aligned_copy: model must be a PrunedModel, got {type(model).__name__}")
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ValueError(f"aligned_copy: multiple must be an integer >= 1, got {multiple!r}")
    cfg = copy.deepcopy(model.config)
    d = cfg["hidden_size"]
    cfg["hidden_size"] = _round_up(d, multiple)
    for spec in cfg["layers"]:
        if spec["ffn_width"]:
            spec["ffn_width"] = _round_up(spec["ffn_width"], multiple)
    p = model.embeddings.word_embeddings
    with torch.device("meta"):
        padded = PrunedModel(cfg)
    padded = padded.to_empty(device=p.device).to(p.dtype)
    state = padded.state_dict()
    for name, src in model.state_dict().items():
        dst = state[name]
        if name == "hidden_index":
            dst.fill_(-1)  # a padded dim is no original dim
        else:
            dst.zero_()
        dst[tuple(slice(0, n) for n in src.shape)] = src
    mask = torch.zeros(cfg["hidden_size"], dtype=p.dtype, device=p.device)
    mask[:d] = 1
    subs = [padded.embeddings] + [s for l in padded.layers for s in (l.attention, l.ffn) if s is not None]
    for sub in subs:
        sub.register_buffer("hidden_mask", mask, persistent=False)
    padded.aligned_from = d
    return padded.eval()
