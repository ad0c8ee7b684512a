"""A sequence classifier whose head reads the mean of the last hidden state over the real tokens
(PrunedModel config ``"pooling": "mean"``, what SMP's head reads by default): the reference and the
engine against the gated model computed from the Hugging Face weights, save / load, ONNX, refusals."""

from __future__ import annotations

import pytest
import torch

import cofi_kernels
from cofi_kernels.models.builder import KeptLayer, build_pruned_model
from cofi_kernels.models.pruned_model import PrunedModel
from tests.cofi_model_ref import cofi_reference_logits, small_model
from tests.compare import FP32_TOL, rel_err
from tests.models.test_builder import _random_structure
from tests.models.test_task_heads import (
    _double_copy,
    _edit_config,
    assert_served_close_to_fp32,
    batch,
    float64_twin,
)

needs_engine = pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def mean_classifier(kind: str, *, scaled: bool = True):
    """(HF classifier, its mean-pooled PrunedModel, the gates it stands for): a random structure with a
    removed attention and FFN sublayer, pruned hidden dims and soft scales."""
    model = small_model(kind, classifier=True, num_labels=5, seed=_seed())
    layers, hidden, hidden_scale, z = _random_structure(torch.Generator().manual_seed(_seed()), scaled)
    return model, build_pruned_model(model, layers, hidden=hidden, hidden_scale=hidden_scale, pooling="mean"), z


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("scaled", [False, True])
def test_reference_is_the_gated_models_mean_pooled_head(kind, scaled):
    model, pruned, z = mean_classifier(kind, scaled=scaled)
    assert pruned.config["pooling"] == "mean" and pruned.mean_pooled_head
    ids, mask, types = batch(model, batch_size=6, seq=12)
    with torch.no_grad():
        want = cofi_reference_logits(_double_copy(model), z, ids, mask, types, pooling="mean")
        got = pruned(ids, mask, types, backend="reference")
        first = cofi_reference_logits(_double_copy(model), z, ids, mask, types, pooling="cls")
    assert got.shape == (6, 5) and torch.isfinite(got).all()
    assert rel_err(got, want) <= FP32_TOL
    assert rel_err(got, first) > 1e-2  # it is not the first token's head


@needs_engine
@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("lengths, seq", [(None, 13), ([9, 9, 9], 9), ([1, 1], 1), ([4], 7)],
                         ids=["ragged", "unpadded", "T1", "B1pad"])
def test_engine_equals_the_reference(kind, lengths, seq):
    _, pruned, _ = mean_classifier(kind)
    ids, mask, types = batch(pruned, batch_size=7, seq=seq, lengths=lengths)
    twin = float64_twin(pruned)
    with torch.inference_mode():
        for m in (mask, None) if lengths is not None and len(set(lengths)) == 1 and lengths[0] == seq else (mask,):
            got = pruned(ids, m, types, backend="engine")
            assert torch.equal(got, pruned(ids, m, types))  # "auto" runs the engine
            want = twin(ids, m, types, backend="reference")
            assert got.shape == want.shape and torch.isfinite(got).all()
            assert rel_err(got, want) <= FP32_TOL


def test_every_weight_kept_with_cls_pooling_is_the_hf_model_and_mean_differs():
    model = small_model("bert", classifier=True, num_labels=5, seed=_seed())
    cfg = model.config
    keep = [KeptLayer(heads=torch.arange(cfg.num_attention_heads), units=torch.arange(cfg.intermediate_size))
            for _ in range(cfg.num_hidden_layers)]
    cls, mean = (build_pruned_model(model, keep, pooling=p) for p in ("cls", "mean"))
    assert "pooling" not in cls.config  # a first-token classifier's config is as before
    ids, mask, types = batch(model, batch_size=4, seq=10)
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        assert rel_err(cls(ids, mask, types, backend="reference"), hf) <= FP32_TOL
        assert rel_err(mean(ids, mask, types, backend="reference"), hf) > 1e-2


def test_save_load_round_trip_and_summary(tmp_path):
    _, pruned, _ = mean_classifier("roberta")
    pruned.save_pretrained(tmp_path)
    loaded = PrunedModel.from_pretrained(tmp_path)
    assert loaded.config["pooling"] == "mean" and loaded.mean_pooled_head
    ids, mask, types = batch(pruned)
    with torch.no_grad():
        for backend in ("reference", "auto"):
            assert torch.equal(loaded(ids, mask, types, backend=backend), pruned(ids, mask, types, backend=backend))
    assert "mean pooling" in loaded.summary().splitlines()[0]


@pytest.mark.parametrize("value", ["max", "sum", None])
def test_a_bad_pooling_in_the_config_is_refused_naming_the_file(tmp_path, value):
    _, pruned, _ = mean_classifier("bert")
    pruned.save_pretrained(tmp_path)
    path = _edit_config(tmp_path, pooling=value)
    with pytest.raises(ValueError, match="'pooling' of a sequence classifier must be one of 'cls', 'mean'") as info:
        PrunedModel.from_pretrained(tmp_path)
    assert str(info.value).startswith(path)


def test_builder_refuses_pooling_it_cannot_give():
    keep = [KeptLayer(heads=torch.arange(4), units=torch.arange(48))] * 3
    with pytest.raises(ValueError, match="build_pruned_model: pooling must be one of 'cls', 'mean', got 'max'"):
        build_pruned_model(small_model("bert", classifier=True), keep, pooling="max")
    with pytest.raises(ValueError, match="pooling= is for a sequence classifier, got a model with task 'base'"):
        build_pruned_model(small_model("bert"), keep, pooling="mean")


def test_cuda_graphs_refuse_a_mean_pooled_classifier():
    from cofi_kernels.serving.cuda_graphs import GraphedPrunedModel

    _, pruned, _ = mean_classifier("bert")
    with pytest.raises(ValueError, match="mean-pooled sequence_classification model is not captured yet"):
        GraphedPrunedModel(pruned)


def test_onnx_export_computes_the_mean_pooled_logits(tmp_path):
    import onnxruntime as ort
    import onnxscript  # noqa: F401  (a test requirement)

    _, pruned, _ = mean_classifier("bert")
    path = str(tmp_path / "model.onnx")
    pruned.export_onnx(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for b, t in ((2, 7), (5, 19)):
        ids, mask, types = batch(pruned, batch_size=b, seq=t)
        [got] = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                   "token_type_ids": types.numpy()})
        with torch.no_grad():
            want = float64_twin(pruned)(ids, mask, types, backend="reference")
        got = torch.from_numpy(got)
        assert got.shape == want.shape and torch.isfinite(got).all() and rel_err(got, want) <= FP32_TOL


@needs_engine
def test_int8_and_bf16_serve_it_close_to_fp32(tmp_path):
    _, pruned, _ = mean_classifier("bert")
    for _, served in assert_served_close_to_fp32(tmp_path, pruned, token_rows=False):
        assert served.mean_pooled_head
