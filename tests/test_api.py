"""The top-level API: every name exported before the package was split into layers still resolves."""

from __future__ import annotations

import importlib

import pytest

import cofi_kernels

# cofi_kernels.__all__ at eb4eee1, before the layers.
NAMES_BEFORE = [
    "BackendUnavailableError", "CoFiGates", "FinetuneConfig", "PruneConfig", "PrunedModel", "apply_cofi", "backends",
    "cofi_prune", "extension_available", "finetune", "gated_attention", "gated_ffn", "gelu_gate", "masked_layer_norm",
    "prune", "reference", "__version__",
]


@pytest.mark.parametrize("name", NAMES_BEFORE)
def test_top_level_name_resolves(name):
    assert name in cofi_kernels.__all__ and name in dir(cofi_kernels)
    assert getattr(cofi_kernels, name) is not None


def test_names_point_into_their_layers():
    assert cofi_kernels.PrunedModel.__module__ == "cofi_kernels.models.pruned_model"
    assert cofi_kernels.apply_cofi.__module__ == "cofi_kernels.pruning.cofi.patch"
    assert cofi_kernels.finetune.__module__ == "cofi_kernels.training.finetune"
    assert cofi_kernels.reference is importlib.import_module("cofi_kernels.ops.reference")
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        cofi_kernels.nonexistent  # noqa: B018
