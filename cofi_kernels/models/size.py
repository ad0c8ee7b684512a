"""The size model of DESIGN §4: the one place that counts an encoder's weights.

The count covers the weights that pruning removes: Q, K, V and the attention
output projection (``4·d_head·D`` per head) and the FFN's two matrices
(``2·D`` per unit). Embeddings, biases, LayerNorms, the pooler and the
classifier are not counted. The same function gives the expected size under
keep probabilities (tensors, differentiable), the realised size of a gate
dict or a pruned model (integers), and the dense size ``M``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["encoder_size", "dense_encoder_size"]

Count = int | float | torch.Tensor


def _total(per_layer: Sequence[Count] | torch.Tensor) -> Count:
    return per_layer.sum() if isinstance(per_layer, torch.Tensor) else sum(per_layer)


def encoder_size(heads: Sequence[Count] | torch.Tensor, units: Sequence[Count] | torch.Tensor,
                 hidden: Count, head_dim: int) -> Count:
    """``(4·d_head·Σ_i heads_i + 2·Σ_i units_i) · hidden``.

    Args:
        heads: per layer, the number of attention heads (0 for a removed
            attention sublayer), or their expected number (a tensor ``[L]``).
        units: per layer, the number of FFN units (0 for a removed FFN), or
            their expected number.
        hidden: the number of kept hidden dims, or their expected number.
        head_dim: size of one head.

    Returns:
        An ``int`` for integer counts, a 0-d tensor (differentiable) for tensors.
    """
    return (4 * head_dim * _total(heads) + 2 * _total(units)) * hidden


def dense_encoder_size(num_layers: int, num_heads: int, head_dim: int, intermediate_size: int,
                       hidden_size: int) -> int:
    """``M``: the count of the unpruned encoder (BERT-base: 84,934,656)."""
    return encoder_size([num_heads] * num_layers, [intermediate_size] * num_layers, hidden_size, head_dim)
