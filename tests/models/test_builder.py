"""The generic builder: kept index sets and scales → a PrunedModel that computes the gated model.

Checked against the independent DESIGN §4 forward of ``tests/cofi_model_ref.py``
with gates formed from the same index sets and scales (0 where removed).
"""

from __future__ import annotations

import pytest
import torch

from cofi_kernels.models import arch
from cofi_kernels.models.builder import KeptLayer, build_pruned_model
from tests.cofi_model_ref import cofi_reference_forward, cofi_reference_logits, padded_batch, small_model

L, H, I, D = 3, 4, 48, 32


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _random_structure(gen: torch.Generator, scaled: bool):
    """Random kept sets (a removed attention and FFN sublayer, one with no head, one with no unit)
    and the gate dict they stand for."""
    z = {"head": torch.zeros(L, H), "mha": torch.zeros(L), "int": torch.zeros(L, I), "ffn": torch.zeros(L),
         "hidden": torch.zeros(D)}

    def subset(n, k):
        return torch.randperm(n, generator=gen)[:k].sort().values

    def scale(n):
        return 0.2 + 0.8 * torch.rand(n, generator=gen, dtype=torch.float64) if scaled else None

    hidden = subset(D, 25)
    hidden_scale = scale(25)
    z["hidden"][hidden] = 1.0 if hidden_scale is None else hidden_scale.float()
    layers = []
    plan = [(3, 30), (None, 0), (0, None)]  # (heads, units) per layer; None = removed
    for i, (n_heads, n_units) in enumerate(plan):
        keep = KeptLayer(heads=None, units=None)
        if n_heads is not None:
            keep.heads, keep.head_scale, keep.attention_scale = subset(H, n_heads), scale(n_heads), scale(())
            z["mha"][i] = 1.0 if keep.attention_scale is None else float(keep.attention_scale)
            z["head"][i, keep.heads] = 1.0 if keep.head_scale is None else keep.head_scale.float()
        if n_units is not None:
            keep.units, keep.unit_scale, keep.ffn_scale = subset(I, n_units), scale(n_units), scale(())
            z["ffn"][i] = 1.0 if keep.ffn_scale is None else float(keep.ffn_scale)
            z["int"][i, keep.units] = 1.0 if keep.unit_scale is None else keep.unit_scale.float()
        layers.append(keep)
    return layers, hidden, hidden_scale, z


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("classifier", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_builder_computes_the_gated_model(kind, classifier, scaled):
    model = small_model(kind, classifier, layers=L, heads=H, hidden=D, inter=I, seed=_seed())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers, hidden, hidden_scale, z = _random_structure(torch.Generator().manual_seed(_seed()), scaled)
    pruned = build_pruned_model(model, layers, hidden=hidden, hidden_scale=hidden_scale)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not modified
    assert pruned.layer_shapes() == [{"heads": 3, "ffn_width": 30, "hidden": 25},
                                     {"heads": None, "ffn_width": 0, "hidden": 25},
                                     {"heads": 0, "ffn_width": None, "hidden": 25}]
    assert torch.equal(pruned.hidden_index, hidden)
    ids, mask, types = padded_batch(model, seed=_seed())
    with torch.no_grad():
        if classifier:
            got, want = pruned(ids, mask, types, backend="reference"), cofi_reference_logits(model, z, ids, mask, types)
        else:
            got = pruned.expand_hidden(pruned(ids, mask, types, backend="reference"))
            want = cofi_reference_forward(model, z, ids, mask, types)
    real = mask.bool() if not classifier else torch.ones(got.shape[0], dtype=torch.bool)
    err = (got[real] - want[real]).abs().max() / want[real].abs().max()
    assert torch.isfinite(got).all() and err <= 1e-5, float(err)


def test_builder_with_every_weight_kept_is_the_model():
    model = small_model("bert", True, layers=L, heads=H, hidden=D, inter=I, seed=_seed())
    full = [KeptLayer(heads=range(H), units=range(I)) for _ in range(L)]
    pruned = build_pruned_model(model, full)
    ids, mask, types = padded_batch(model, seed=_seed())
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = pruned(ids, mask, types, backend="reference")
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert pruned.sparsity == 0.0


@pytest.mark.parametrize(
    "layers, kw, match",
    [
        ([KeptLayer(range(4), range(48))] * 2, {}, r"one entry per encoder layer \(3\), got 2"),
        ([KeptLayer([0, 4], None)] + [KeptLayer(None, None)] * 2, {}, r"layers\[0\]\.heads must be indices in \[0, 4\)"),
        ([KeptLayer([2, 1], None)] + [KeptLayer(None, None)] * 2, {}, r"layers\[0\]\.heads must be strictly increasing"),
        ([KeptLayer(None, [[1, 2]])] + [KeptLayer(None, None)] * 2, {}, r"layers\[0\]\.units must be a 1-D"),
        ([KeptLayer([1], None, head_scale=torch.ones(2))] + [KeptLayer(None, None)] * 2, {},
         r"layers\[0\]\.head_scale must have shape \[1\], got \[2\]"),
        ([KeptLayer(None, [3], ffn_scale=torch.ones(2))] + [KeptLayer(None, None)] * 2, {},
         r"layers\[0\]\.ffn_scale must have shape \[\]"),
        ([KeptLayer(None, None)] * 3, {"hidden": []}, "hidden keeps no dim"),
        ([KeptLayer(None, None)] * 3, {"hidden": [0, 1], "hidden_scale": torch.tensor([1.0, float("nan")])},
         "hidden_scale has non-finite values"),
    ],
)
def test_builder_errors_name_the_argument(layers, kw, match):
    model = small_model("bert", layers=L, heads=H, hidden=D, inter=I)
    with pytest.raises(ValueError, match=match):
        build_pruned_model(model, layers, **kw)


def test_builder_refuses_unsupported_models_as_every_entry_point_does():
    model = small_model("bert", act="silu")
    with pytest.raises(arch.UnsupportedModelError) as builder_error:
        build_pruned_model(model, [KeptLayer(None, None)] * 3)
    with pytest.raises(arch.UnsupportedModelError) as adapter_error:
        arch.supported_model(model)
    assert str(builder_error.value) == str(adapter_error.value)
