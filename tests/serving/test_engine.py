"""The serving engine (``PrunedModel.forward(..., backend="engine")``) against the reference forward.

Fresh random pruned models of every sublayer kind (0 heads, 0 units, removed
sublayers, layers with no attention after the last one, none at all), BERT and
RoBERTa, with and without a classification head, and the ``cofi demo`` shapes;
padded batches with random lengths including 1, the full length and two rows
one token apart. float32: relative error (by norm) against the float64 reference
at most 1e-5; bfloat16: at most 2x that of the reference forward in bfloat16.
"""

from __future__ import annotations

import pytest
import torch

import cofi_kernels
from cofi_kernels import functional
from cofi_kernels.models.shapes import shaped_model
from cofi_kernels.serving import load_for_inference, quantize_int8

from tests.compare import FP32_TOL, rel_err

pytestmark = pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")

# int8 (weights per output channel, activations per call and tensor) on these random-weight models:
# 2-7% relative error of the logits over 60 seeds (tests/seed_sweep.py); a broken quantization
# (wrong scales, transposed weights) is off by O(1).
INT8_TOL = 0.15

SHAPES = {  # heads, ffn widths, hidden, head_dim
    "every_kind": ([3, 0, None, 2, 4, None], [50, 40, 30, 0, None, None], 48, 16),
    "demo": ([7, None, None, 2, 4, 4], [None, None, None, 222, 263, 276], 330, 32),
    "ffn_only_tail": ([2, 1, None, None], [20, 0, 30, 12], 40, 16),
    "no_attention": ([None, 0], [24, 16], 32, 16),
    "one_layer": ([1], [None], 24, 8),
}


def _model(shape: str, model_type: str = "bert", num_labels: int | None = 3, dtype=torch.float32):
    heads, ffn, hidden, head_dim = SHAPES[shape]
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    model = shaped_model(heads, ffn, hidden, head_dim=head_dim, model_type=model_type, num_labels=num_labels,
                         vocab_size=120, max_position_embeddings=80, original_hidden_size=max(hidden, 64),
                         original_intermediate_size=300, generator=gen)
    return model.to(dtype)


def _batch(model, batch: int = 7, seq: int = 23):
    """Right-padded ids and mask: lengths 1, ``seq``, two one apart, the rest random."""
    lengths = torch.randint(1, seq + 1, (batch,))
    lengths[0], lengths[1] = 1, seq
    lengths[3] = lengths[2] - 1 if lengths[2] > 1 else 2
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    pad = model.config["pad_token_id"]
    ids = torch.randint(3, model.config["vocab_size"], (batch, seq)).masked_fill(mask == 0, pad)
    types = torch.randint(0, model.config["type_vocab_size"], (batch, seq)) * mask
    return ids, mask, types


def _float64_twin(model):
    twin = shaped_model(*SHAPES_OF(model), **KW_OF(model))
    twin.load_state_dict(model.state_dict())
    return twin.double()


def SHAPES_OF(model):
    c = model.config
    return [l["heads"] for l in c["layers"]], [l["ffn_width"] for l in c["layers"]], c["hidden_size"]


def KW_OF(model):
    c = model.config
    return dict(head_dim=c["head_dim"], model_type=c["model_type"], num_labels=c["num_labels"],
                vocab_size=c["vocab_size"], max_position_embeddings=c["max_position_embeddings"],
                original_hidden_size=c["original_hidden_size"],
                original_intermediate_size=c["original_intermediate_size"])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_engine_logits_equal_the_reference(shape, model_type):
    model = _model(shape, model_type)
    ids, mask, types = _batch(model)
    with torch.inference_mode():
        got = model(ids, mask, types, backend="engine")
        plain = model(ids, mask, types, backend="reference")
        exact = _float64_twin(model)(ids, mask, types, backend="reference")
    assert got.shape == exact.shape == (ids.shape[0], 3) and torch.isfinite(got).all()
    assert rel_err(got, exact) <= FP32_TOL
    assert rel_err(got, plain) <= FP32_TOL


@pytest.mark.parametrize("shape", ["every_kind", "demo"])
def test_engine_hidden_states_at_real_tokens(shape):
    model = _model(shape, "roberta", num_labels=None)
    ids, mask, types = _batch(model)
    with torch.inference_mode():
        got = model(ids, mask, types, backend="engine")
        exact = _float64_twin(model)(ids, mask, types, backend="reference")
    real = mask.bool()
    assert got.shape == exact.shape
    assert rel_err(got[real], exact[real]) <= FP32_TOL
    assert (got[~real] == 0).all()  # padded positions are not computed


def test_engine_without_mask_and_unpadded_batches():
    model = _model("every_kind")
    ids, _, types = _batch(model)
    with torch.inference_mode():
        exact = _float64_twin(model)(ids, None, types, backend="reference")
        assert rel_err(model(ids, backend="engine", token_type_ids=types), exact) <= FP32_TOL
        ones = torch.ones_like(ids)
        assert rel_err(model(ids, ones, types, backend="engine"), exact) <= FP32_TOL


@pytest.mark.parametrize("shape", ["every_kind", "demo"])
def test_engine_bfloat16_within_twice_the_reference_error(shape):
    model = _model(shape)
    ids, mask, types = _batch(model, batch=9)
    with torch.inference_mode():
        exact = _float64_twin(model)(ids, mask, types, backend="reference")
        low = model.to(torch.bfloat16)
        got = low(ids, mask, types, backend="engine")
        plain = low(ids, mask, types, backend="reference")
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert rel_err(got, exact) <= 2 * rel_err(plain, exact) + 1e-3


def test_auto_runs_the_engine_in_inference_and_the_reference_in_training(monkeypatch):
    model = _model("every_kind")
    ids, mask, types = _batch(model)
    calls = []
    real_layer = functional.pruned_layer
    monkeypatch.setattr(functional, "pruned_layer", lambda *a, **k: calls.append(1) or real_layer(*a, **k))
    with torch.inference_mode():
        model(ids, mask, types)
    assert calls, "auto did not run the engine under inference_mode"
    calls.clear()
    with torch.no_grad():
        model(ids, mask, types)
    assert calls, "auto did not run the engine under no_grad"
    calls.clear()
    model.requires_grad_(True)
    logits = model(ids, mask, types)
    assert not calls and logits.requires_grad  # gradients wanted: the differentiable reference
    (g,) = torch.autograd.grad(logits.sum(), model.head.out_weight)
    assert torch.isfinite(g).all()


def test_left_padding_runs_the_reference_under_auto_and_is_refused_by_the_engine():
    model = _model("every_kind")
    ids, mask, types = _batch(model)
    left = mask.flip(1)
    with torch.inference_mode():
        assert torch.equal(model(ids, left, types), model(ids, left, types, backend="reference"))
        with pytest.raises(ValueError, match="first token to be real"):
            model(ids, left, types, backend="engine")
        with pytest.raises(ValueError, match="backend must be 'auto', 'reference' or 'engine'"):
            model(ids, mask, types, backend="fast")
        with pytest.raises(ValueError, match="does not return per-layer hidden states"):
            model(ids, mask, types, output_hidden_states=True, backend="engine")


def test_int8_dynamic_quantization_stays_close_to_fp32():
    model = _model("demo")
    ids, mask, types = _batch(model, batch=16)
    with torch.inference_mode():
        fp32 = model(ids, mask, types, backend="reference")
        quantize_int8(model)
        assert all(s.linear_overrides for s in model.linear_sublayers() if s.LINEARS)
        engine = model(ids, mask, types, backend="engine")
        ref = model(ids, mask, types, backend="reference")
    for got in (engine, ref):
        assert torch.isfinite(got).all()
        assert rel_err(got, fp32) < INT8_TOL
    assert not torch.equal(engine, fp32)


def test_int8_refuses_what_it_cannot_quantize():
    with pytest.raises(ValueError, match="must be float32 on the CPU"):
        quantize_int8(_model("one_layer", dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="must be a PrunedModel"):
        quantize_int8(torch.nn.Linear(2, 2))


def test_load_for_inference_in_each_precision(tmp_path):
    model = _model("every_kind")
    model.save_pretrained(tmp_path)
    ids, mask, types = _batch(model)
    with torch.inference_mode():
        want = model(ids, mask, types, backend="reference")
        for precision, dtype, tol in (("fp32", torch.float32, FP32_TOL), ("bf16", torch.bfloat16, 0.05),
                                      ("int8", torch.float32, INT8_TOL)):
            served = load_for_inference(tmp_path, precision=precision)
            assert served.embeddings.word_embeddings.dtype == dtype
            assert rel_err(served(ids, mask, types), want) <= tol, precision
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, int8"):
        load_for_inference(tmp_path, precision="fp8")
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16 on cpu"):
        load_for_inference(tmp_path, precision="fp16")
