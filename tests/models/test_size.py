"""The size model (DESIGN §4) against weight matrices counted one by one."""

from __future__ import annotations

import pytest
import torch

import cofi_kernels
from cofi_kernels.models.size import dense_encoder_size, encoder_size
from tests.cofi_model_ref import random_gates, small_model


_HF = ("query.weight", "key.weight", "value.weight", "attention.output.dense.weight", "intermediate.dense.weight")
_PRUNED = ("attention.qkv_weight", "attention.out_weight", "ffn.in_weight", "ffn.out_weight")


def _counted_weights(model) -> int:
    """Entries of every Q, K, V, O, W1, W2 matrix of an HF encoder or a PrunedModel, counted one by one."""
    total = 0
    for name, p in model.named_parameters():
        hf_ffn_out = name.endswith("output.dense.weight") and ".attention." not in name
        if name.endswith(_HF) or name.endswith(_PRUNED) or hf_ffn_out:
            total += p.numel()
    return total


def test_bert_base_dense_count():
    assert dense_encoder_size(12, 12, 64, 3072, 768) == 84_934_656


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_dense_count_equals_the_matrices_of_the_model(kind):
    model = small_model(kind, layers=3, heads=4, hidden=32, inter=48)
    assert dense_encoder_size(3, 4, 8, 48, 32) == _counted_weights(model) == 3 * (4 * 32 * 32 + 2 * 48 * 32)


@pytest.mark.parametrize("seed", range(4))
def test_realised_size_equals_the_pruned_matrices(seed):
    model = small_model("bert", True, seed=seed)
    gates = cofi_kernels.apply_cofi(model)
    z = random_gates(model.config, seed=seed, p_zero=0.4)
    gates.fix(z)
    pruned = cofi_kernels.prune(model, gates)
    counted = _counted_weights(pruned)
    assert pruned.encoder_size == counted
    assert gates.realised_size(z) == counted
    assert pruned.sparsity == pytest.approx(1 - counted / dense_encoder_size(3, 4, 8, 48, 32), abs=0)


def test_expected_size_is_differentiable_and_matches_the_formula():
    heads = torch.tensor([3.5, 1.25], dtype=torch.float64, requires_grad=True)
    units = torch.tensor([10.0, 0.5], dtype=torch.float64, requires_grad=True)
    hidden = torch.tensor(20.5, dtype=torch.float64, requires_grad=True)
    size = encoder_size(heads, units, hidden, 16)
    assert size.item() == pytest.approx((4 * 16 * 4.75 + 2 * 10.5) * 20.5, rel=1e-15)
    size.backward()
    assert torch.equal(heads.grad, torch.full((2,), 4 * 16 * 20.5, dtype=torch.float64))
    assert torch.equal(units.grad, torch.full((2,), 2 * 20.5, dtype=torch.float64))
    assert hidden.grad.item() == 4 * 16 * 4.75 + 2 * 10.5


def test_integer_counts_give_an_int():
    size = encoder_size([2, 0, 5], [7, 3, 0], 30, 8)
    assert isinstance(size, int) and size == (4 * 8 * 7 + 2 * 10) * 30
