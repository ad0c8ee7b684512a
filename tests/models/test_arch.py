"""The architecture adapters: one answer for what is supported, where weights live, gate shapes."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import cofi_kernels
from cofi_kernels.models import arch
from cofi_kernels.models.builder import build_pruned_model
from cofi_kernels.training import model_io
from cofi_kernels.training.trainer import RunError
from tests.cofi_model_ref import small_model

_SMALL = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)


def _cross_attention():
    model = tf.RobertaModel(tf.RobertaConfig(**_SMALL))
    model.config.add_cross_attention = True
    return model


_UNSUPPORTED = {
    "masked-lm head": lambda: tf.BertForMaskedLM(tf.BertConfig(**_SMALL)),
    "not a transformer": lambda: torch.nn.Linear(3, 3),
    "decoder": lambda: tf.BertModel(tf.BertConfig(**_SMALL, is_decoder=True)),
    "cross-attention": _cross_attention,
    "activation": lambda: small_model("bert", act="silu"),
}


def _error(fn, *args):
    with pytest.raises(arch.UnsupportedModelError) as info:
        fn(*args)
    return str(info.value)


@pytest.mark.parametrize("case", list(_UNSUPPORTED))
def test_every_entry_point_gives_the_same_error(case):
    model = _UNSUPPORTED[case]()
    messages = {
        "adapter": _error(arch.supported_model, model),
        "apply_cofi": _error(cofi_kernels.apply_cofi, model),
        "prune": _error(cofi_kernels.prune, model, None, {}),
        "build_pruned_model": _error(build_pruned_model, model, []),
    }
    assert len(set(messages.values())) == 1, messages
    message = messages["adapter"]
    assert message.startswith(f"unsupported model {type(model).__name__}: ")
    # Both a TypeError and a ValueError, so callers written against either keep working.
    assert isinstance(arch.UnsupportedModelError(message), TypeError)
    assert isinstance(arch.UnsupportedModelError(message), ValueError)


def test_a_model_directory_of_an_unsupported_model_is_refused_with_the_adapter_message(tmp_path):
    decoder = tf.BertForSequenceClassification(tf.BertConfig(**_SMALL, is_decoder=True))
    decoder.save_pretrained(tmp_path / "decoder")
    expected = _error(arch.supported_model, decoder)
    with pytest.raises(RunError) as info:
        model_io.load_task_model(str(tmp_path / "decoder"))
    assert str(info.value).endswith(expected)

    tf.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(RunError, match=r"unsupported model_type 'gpt2'.*'bert', 'roberta'"):
        model_io.load_task_model(str(tmp_path / "gpt2"))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("classifier", [False, True])
def test_adapter_finds_the_weights(kind, classifier):
    model = small_model(kind, classifier)
    adapter, task, encoder = arch.supported_model(model)
    assert adapter.model_type == kind
    assert task == ("sequence_classification" if classifier else "base")
    assert encoder is (model.base_model if classifier else model)
    layer = adapter.layers(encoder)[1]
    att = adapter.attention_parts(layer)
    assert att.query is layer.attention.self.query and att.output is layer.attention.output.dense
    assert (att.num_heads, att.head_dim) == (4, 8)
    ffn = adapter.ffn_parts(layer, encoder.config)
    assert ffn.up is layer.intermediate.dense and ffn.down is layer.output.dense and ffn.erf_gelu
    emb = adapter.embedding_parts(encoder)
    assert emb.word is encoder.embeddings.word_embeddings and emb.norm is encoder.embeddings.LayerNorm
    if classifier:
        dense, out = adapter.classification_head(model)
        assert out.out_features == 3 and dense.in_features == 32


def test_gate_shapes_and_dims_from_a_config():
    cfg = tf.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    assert arch.gate_shapes(cfg) == {"head": (12, 12), "mha": (12,), "int": (12, 3072), "ffn": (12,), "hidden": (768,)}
    assert arch.encoder_dims(cfg) == arch.EncoderDims(12, 12, 64, 3072, 768)
    with pytest.raises(ValueError, match="not a multiple"):
        arch.encoder_dims(tf.BertConfig(hidden_size=30, num_attention_heads=4))


def test_roberta_positions_count_from_the_pad_id():
    ids = torch.tensor([[0, 5, 6, 1, 1], [0, 7, 1, 1, 1]])
    assert arch.ARCHS["roberta"].position_ids(ids, 1).tolist() == [[2, 3, 4, 1, 1], [2, 3, 1, 1, 1]]
    assert arch.ARCHS["bert"].position_ids(ids, 0).tolist() == [[0, 1, 2, 3, 4]] * 2
