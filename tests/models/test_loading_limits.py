"""What a saved model promises is checked before anything is allocated: sizes bounded by the
original model, the weights header against the config; the token limit of each architecture."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from cofi_kernels.models import arch
from cofi_kernels.models.pruned_model import CONFIG_NAME, PrunedModel
from cofi_kernels.pruning.cofi.fold import prune
from tests.cofi_model_ref import small_model


@pytest.fixture
def saved(tmp_path):
    model = small_model("bert", classifier=True, layers=2)
    d = tmp_path / "pruned"
    prune(model, None, {"head": torch.ones(2, 4)}).save_pretrained(d)
    return d


def _edit(d, fn):
    p = d / CONFIG_NAME
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail if a weights file is read beyond its header."""
    import safetensors.torch

    def refuse(*a, **kw):
        raise AssertionError("tensors were read before the config and header were checked")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["layers"][0].update(heads=10**9), r"layers\[0\]\.heads is 1000000000, more than .*original_num_heads 4"),
    (lambda c: c["layers"][1].update(ffn_width=10**9), r"layers\[1\]\.ffn_width is 1000000000, more than"),
    (lambda c: c.update(hidden_size=c["original_hidden_size"] + 1), r"'hidden_size' \d+ exceeds the original"),
    (lambda c: c.update(num_layers=-1), r"'num_layers' must be an integer >= 0"),
    (lambda c: c.update(layer_norm_eps=float("inf")), r"'layer_norm_eps' must be a positive number"),
    (lambda c: c.update(pad_token_id=True), r"'pad_token_id' must be an integer"),
], ids=["heads", "ffn", "hidden", "layers", "eps", "pad"])
def test_sizes_beyond_the_original_are_refused_from_the_config_alone(saved, no_tensor_reads, edit, message):
    _edit(saved, edit)
    with pytest.raises(ValueError, match=message):
        PrunedModel.read_config(saved)
    with pytest.raises(ValueError, match=message):
        PrunedModel.from_pretrained(saved)


def test_a_config_disagreeing_with_the_header_is_refused_before_tensors_are_read(saved, no_tensor_reads):
    _edit(saved, lambda c: c.update(vocab_size=10**9))
    assert PrunedModel.read_config(saved)["vocab_size"] == 10**9  # within the config's own rules
    with pytest.raises(ValueError, match=r"tensor 'embeddings\.word_embeddings' has the wrong shape.*1000000000"):
        PrunedModel.from_pretrained(saved)


def test_hidden_index_dtype_is_checked_in_the_header(saved, no_tensor_reads):
    w = saved / "model.safetensors"
    tensors = load_file(str(w))
    tensors["hidden_index"] = tensors["hidden_index"].int()
    save_file(tensors, str(w))
    with pytest.raises(ValueError, match="'hidden_index' must be int64, got I32"):
        PrunedModel.from_pretrained(saved)


@pytest.mark.parametrize("kind, positions, pad, limit", [("bert", 80, 0, 80), ("roberta", 514, 1, 512),
                                                         ("roberta", 40, 1, 38)])
def test_token_limit(kind, positions, pad, limit):
    assert arch.token_limit(kind, positions, pad) == limit


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_token_limit_is_the_longest_sequence_the_hf_model_takes(kind):
    common = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                  max_position_embeddings=20, pad_token_id=1)
    model = (tf.RobertaModel(tf.RobertaConfig(**common)) if kind == "roberta" else
             tf.BertModel(tf.BertConfig(**common))).eval()
    limit = arch.token_limit(kind, 20, 1)
    ids = torch.randint(3, 50, (1, limit + 1))
    with torch.no_grad():
        model(ids[:, :limit])  # fits
        with pytest.raises((IndexError, RuntimeError)):
            model(ids)  # one token more has no position embedding
