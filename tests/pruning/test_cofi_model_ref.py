"""The test oracle tests/cofi_model_ref.py against the unpatched HF models."""

from __future__ import annotations

import pytest
import torch

from tests.cofi_model_ref import (
    cofi_reference_forward,
    cofi_reference_logits,
    encoder_of,
    minilm_model,
    padded_batch,
    random_gates,
    small_model,
)

TOL = 1e-5


def _hf_hidden(model, ids, mask, types):
    with torch.no_grad():
        return encoder_of(model)(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state


def _maxdiff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("z", ["none", "ones"])
def test_all_ones_matches_hf_small(kind, z):
    model = small_model(kind, classifier=True)
    cfg = model.config
    gates = None if z == "none" else {
        "head": torch.ones(cfg.num_hidden_layers, cfg.num_attention_heads),
        "mha": torch.ones(cfg.num_hidden_layers),
        "int": torch.ones(cfg.num_hidden_layers, cfg.intermediate_size),
        "ffn": torch.ones(cfg.num_hidden_layers),
        "hidden": torch.ones(cfg.hidden_size),
    }
    ids, mask, types = padded_batch(model)
    ref = cofi_reference_forward(model, gates, ids, mask, types)
    assert _maxdiff(ref, _hf_hidden(model, ids, mask, types)) <= TOL
    with torch.no_grad():
        hf_logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert _maxdiff(cofi_reference_logits(model, gates, ids, mask, types), hf_logits) <= TOL
    # No mask and no token types: HF defaults.
    ref2 = cofi_reference_forward(model, gates, ids[:1])
    with torch.no_grad():
        hf2 = encoder_of(model)(input_ids=ids[:1]).last_hidden_state
    assert _maxdiff(ref2, hf2) <= TOL


def test_all_ones_matches_hf_minilm():
    model = minilm_model()
    ids, mask, types = padded_batch(model, batch=3, seq=16)
    ref = cofi_reference_forward(model, None, ids, mask, types)
    assert _maxdiff(ref, _hf_hidden(model, ids, mask, types)) <= TOL


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_head_and_unit_gates_equal_scaled_output_columns(kind):
    # A head gate scales that head's columns of W_o, a unit gate that unit's column of W2:
    # an independent way to express the same function with the plain HF model.
    model = small_model(kind)
    cfg = model.config
    H = cfg.num_attention_heads
    dh = cfg.hidden_size // H
    z = random_gates(cfg, seed=3)
    z = {"head": z["head"], "int": z["int"]}
    ids, mask, types = padded_batch(model, seed=1)
    ref = cofi_reference_forward(model, z, ids, mask, types)
    with torch.no_grad():
        for i, layer in enumerate(model.encoder.layer):
            layer.attention.output.dense.weight.mul_(z["head"][i].repeat_interleave(dh)[None, :])
            layer.output.dense.weight.mul_(z["int"][i][None, :])
    assert _maxdiff(ref, _hf_hidden(model, ids, mask, types)) <= TOL


def test_pruned_hidden_dims_are_zero_and_dead_sublayers_are_identity():
    model = small_model("bert")
    cfg = model.config
    ids, mask, types = padded_batch(model)
    z = random_gates(cfg, seed=5)
    z["hidden"][[0, 7]] = 0.0
    out = cofi_reference_forward(model, z, ids, mask, types)
    assert (out[..., z["hidden"] == 0] == 0).all()
    assert torch.isfinite(out).all()
    # Every sublayer dead: the output is the gated embeddings.
    dead = dict(z, mha=torch.zeros(cfg.num_hidden_layers), ffn=torch.zeros(cfg.num_hidden_layers))
    only_emb = cofi_reference_forward(model, dead, ids, mask, types)
    emb = model.embeddings
    x = (emb.word_embeddings.weight[ids] + emb.token_type_embeddings.weight[types]
         + emb.position_embeddings.weight[torch.arange(ids.shape[1])]) * z["hidden"]
    kept = z["hidden"] != 0
    xs = x[..., kept]
    mu = xs.mean(-1, keepdim=True)
    var = ((xs - mu) ** 2).mean(-1, keepdim=True)
    want = torch.zeros_like(x)
    want[..., kept] = ((xs - mu) / torch.sqrt(var + cfg.layer_norm_eps)) * emb.LayerNorm.weight[kept] + emb.LayerNorm.bias[kept]
    want = want * z["hidden"]
    assert _maxdiff(only_emb, want) <= TOL


def test_agrees_with_package_reference_ops():
    # Cross-check with cofi_kernels.reference (a different implementation of the same text).
    from cofi_kernels.ops import reference as R

    model = small_model("bert")
    cfg = model.config
    ids, mask, types = padded_batch(model, seed=2)
    z = random_gates(cfg, seed=7)
    z["mha"][0] = 1.0
    z["ffn"][0] = 0.7
    ours = cofi_reference_forward(model, z, ids, mask, types)
    emb = model.embeddings
    h = R.gated_embeddings(ids, emb.word_embeddings.weight, emb.position_embeddings.weight,
                           emb.token_type_embeddings.weight, emb.LayerNorm.weight, emb.LayerNorm.bias,
                           types, hidden_gate=z["hidden"], eps=cfg.layer_norm_eps)
    B, T = ids.shape
    H = cfg.num_attention_heads
    dh = cfg.hidden_size // H
    with torch.no_grad():
        for i, layer in enumerate(model.encoder.layer):
            if z["mha"][i] != 0:
                sa, so = layer.attention.self, layer.attention.output
                q, k, v = (lin(h).view(B, T, H, dh).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
                ctx = R.gated_attention(q, k, v, z["head"][i], mask.bool()).transpose(1, 2).reshape(B, T, -1)
                h = R.masked_layer_norm(so.dense(ctx), h, so.LayerNorm.weight, so.LayerNorm.bias,
                                        z["mha"][i], z["hidden"], cfg.layer_norm_eps)
            if z["ffn"][i] != 0:
                o = R.gated_ffn(h, layer.intermediate.dense.weight, layer.intermediate.dense.bias,
                                layer.output.dense.weight, layer.output.dense.bias, z["int"][i])
                h = R.masked_layer_norm(o, h, layer.output.LayerNorm.weight, layer.output.LayerNorm.bias,
                                        z["ffn"][i], z["hidden"], cfg.layer_norm_eps)
    assert _maxdiff(ours, h) <= TOL
