"""The size model of DESIGN §4: the one place that counts an encoder's weights.

The count covers the weights that pruning removes: Q, K, V and the attention
output projection (``4·d_head·D`` per head) and the FFN's two matrices
(``2·D`` per unit). Embeddings, biases, LayerNorms, the pooler and the
classifier are not counted. The same function gives the expected size under
keep probabilities (tensors, differentiable), the realised size of a gate
dict or a pruned model (integers), and the dense size ``M``.

The forward FLOPs per token (:func:`encoder_flops_per_token`) build on the same
count: every counted weight is one multiply-add per token, plus attention's two
products against the sequence's keys and values. Scratch-B's budget (DESIGN §8)
is the ratio of the dense and the pruned count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["dense_encoder_flops_per_token", "dense_encoder_size", "encoder_flops_per_token", "encoder_size"]

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


def encoder_flops_per_token(heads: Sequence[int], units: Sequence[int], hidden: int, head_dim: int,
                            seq_len: int) -> int:
    """Forward FLOPs per token of the encoder's matrix products at ``seq_len`` tokens per sequence.

    ``2·encoder_size(heads, units, hidden, head_dim) + 4·seq_len·head_dim·Σ_i heads_i``:
    a multiply-add counts 2 FLOPs; the Q, K, V and output projections and the FFN's
    two matrices use each counted weight once per token (:func:`encoder_size`), and
    each head computes ``q·kᵀ`` against ``seq_len`` keys and the context ``a·v`` over
    ``seq_len`` values (``2·seq_len·head_dim`` each). Embeddings, biases, LayerNorms,
    softmax, activations and the classification head are not counted (as in
    :func:`encoder_size`); a backward pass costs about twice the forward for every
    model alike, so ratios of these counts are ratios of training cost.

    Args:
        heads: per layer, the number of attention heads (0 for a removed sublayer).
        units: per layer, the number of FFN units (0 for a removed sublayer).
        hidden: the (reduced) hidden size.
        head_dim: size of one head.
        seq_len: tokens per sequence (the run's ``max_length``).
    """
    return 2 * encoder_size(heads, units, hidden, head_dim) + 4 * seq_len * head_dim * sum(heads)


def dense_encoder_flops_per_token(num_layers: int, num_heads: int, head_dim: int, intermediate_size: int,
                                  hidden_size: int, seq_len: int) -> int:
    """:func:`encoder_flops_per_token` of the unpruned encoder."""
    return encoder_flops_per_token([num_heads] * num_layers, [intermediate_size] * num_layers, hidden_size,
                                   head_dim, seq_len)
