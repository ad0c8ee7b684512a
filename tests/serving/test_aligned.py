"""serving.aligned_copy: padding hidden and FFN sizes to multiples changes nothing (float64, CPU)."""

from __future__ import annotations

import pytest
import torch

from cofi_kernels.serving import aligned_copy

from tests.compare import FP32_TOL, rel_err
from tests.serving.test_engine import SHAPES, _batch, _model

# float64 runs masked_layer_norm's reference (its kernels take fp32 / fp16 / bf16), which says so.
pytestmark = pytest.mark.filterwarnings("ignore:masked_layer_norm. using the slow reference:RuntimeWarning")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("num_labels", [3, None])
def test_padded_model_in_float64_equals_the_original(shape, model_type, num_labels):
    model = _model(shape, model_type, num_labels=num_labels).double()
    padded = aligned_copy(model, multiple=8)
    d = model.config["hidden_size"]
    assert padded.config["hidden_size"] % 8 == 0 and padded.config["hidden_size"] >= d
    assert all(l["ffn_width"] is None or l["ffn_width"] % 8 == 0 for l in padded.config["layers"])
    ids, mask, types = _batch(model)
    with torch.no_grad():
        want = model(ids, mask, types, backend="reference")
        got = padded(ids, mask, types)  # auto: the reference (the engine takes unpadded models)
    if num_labels is None:
        assert (got[..., d:] == 0).all()
        got = got[..., :d]
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_the_copy_is_a_serving_artifact():
    model = _model("demo")
    padded = aligned_copy(model, multiple=16)
    assert padded.config["hidden_size"] == 336 and padded.aligned_from == 330
    assert [l["ffn_width"] for l in padded.config["layers"]] == [None, None, None, 224, 272, 288]
    assert model.config["hidden_size"] == 330  # the original is untouched
    ids, mask, types = _batch(model)
    with pytest.raises(ValueError, match="runs unpadded models"):
        padded(ids, mask, types, backend="engine")
    with pytest.raises(ValueError, match="aligned copy"):
        padded.save_pretrained("unused")
    with pytest.raises(ValueError, match="multiple must be an integer >= 1"):
        aligned_copy(model, multiple=0)


def test_padded_model_in_float32_within_the_fp32_bar():
    model = _model("every_kind")
    ids, mask, types = _batch(model)
    with torch.no_grad():
        exact = model.double()(ids, mask, types, backend="reference")
        got = aligned_copy(model.float())(ids, mask, types)
    assert got.dtype == torch.float32 and rel_err(got, exact) <= FP32_TOL
