"""A :class:`PrunedModel` of given per-layer shapes with fresh weights (benchmarks, tests, scratch training).

The shapes are those a pruning run would produce (e.g. the BERT-base profiles
of ``benchmarks/profiles.json``): one reduced hidden size, and per layer a
head count and an FFN width, ``None`` where the sublayer is removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .arch import ARCHS
from .pruned_model import FORMAT, FORMAT_VERSION, PrunedModel
from .size import dense_encoder_size

__all__ = ["shaped_config", "shaped_model"]


def shaped_config(
    heads: Sequence[int | None],
    ffn_widths: Sequence[int | None],
    hidden_size: int,
    *,
    model_type: str = "bert",
    num_labels: int | None = 2,
    head_dim: int = 64,
    original_hidden_size: int = 768,
    original_num_heads: int = 12,
    original_intermediate_size: int = 3072,
    vocab_size: int = 30522,
    max_position_embeddings: int = 512,
    hidden_act: str = "gelu",
) -> dict:
    """The ``cofi_config.json`` dict of a pruned encoder with these shapes.

    ``heads[i]`` / ``ffn_widths[i]``: layer ``i``'s head count / FFN width, ``None``
    = that sublayer removed (0 keeps the sublayer with no head / unit: its output
    bias and LayerNorm). ``num_labels`` None = an encoder without classification head.
    Defaults are BERT-base's original sizes.
    """
    if len(heads) != len(ffn_widths):
        raise ValueError(f"shaped_config: heads and ffn_widths must have one entry per layer, got "
                         f"{len(heads)} and {len(ffn_widths)}")
    if model_type not in ARCHS:
        raise ValueError(f"shaped_config: model_type must be one of {sorted(ARCHS)}, got {model_type!r}")
    classifier = num_labels is not None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": model_type,
        "task": "sequence_classification" if classifier else "base",
        "hidden_size": hidden_size,
        "head_dim": head_dim,
        "num_layers": len(heads),
        "layers": [{"heads": h, "ffn_width": w} for h, w in zip(heads, ffn_widths)],
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "type_vocab_size": 1 if model_type == "roberta" else 2,
        "layer_norm_eps": 1e-5 if model_type == "roberta" else 1e-12,
        "pad_token_id": 1 if model_type == "roberta" else 0,
        "hidden_act": hidden_act,
        "num_labels": num_labels,
        "problem_type": "single_label_classification" if classifier else None,
        "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)} if classifier else None,
        "original_hidden_size": original_hidden_size,
        "original_num_heads": original_num_heads,
        "original_intermediate_size": original_intermediate_size,
        "original_size": dense_encoder_size(len(heads), original_num_heads, head_dim, original_intermediate_size,
                                            original_hidden_size),
    }


def shaped_model(*args, generator: torch.Generator | None = None, **kwargs) -> PrunedModel:
    """A :class:`PrunedModel` of :func:`shaped_config`'s shapes (same arguments), in eval mode.

    Weights are BERT's initialisation (normal(0, 0.02), zero biases, LayerNorm 1 / 0) when
    ``generator`` is None; with a ``generator`` every tensor is drawn from it instead
    (weights normal with variance 1 / fan-in, biases and LayerNorm shifts normal(0, 0.1),
    LayerNorm scales around 1), so that no parameter is trivially 0 or 1 (tests, benchmarks).
    """
    model = PrunedModel(shaped_config(*args, **kwargs)).eval()
    if generator is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("ln_weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
                elif p.dim() == 1:
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
        model.hidden_index.copy_(torch.arange(model.config["hidden_size"]))
    return model
