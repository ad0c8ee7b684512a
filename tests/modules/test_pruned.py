"""The pruned sublayer modules: their forward against a float64 computation written out here."""

from __future__ import annotations

import math

import pytest
import torch

from cofi_kernels.modules.pruned import (
    ClassificationHead,
    PrunedAttention,
    PrunedEmbeddings,
    PrunedFFN,
    PrunedLayer,
)


def _ln(y, w, b, eps):
    mu = y.mean(-1, keepdim=True)
    var = ((y - mu) ** 2).mean(-1, keepdim=True)
    return (y - mu) / torch.sqrt(var + eps) * w + b


def _randomise(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _rel(a, b):
    assert torch.isfinite(a).all()
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("heads", [0, 1, 3])
def test_attention_against_float64(heads):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    d, dh, B, T = 20, 8, 3, 7
    att = _randomise(PrunedAttention(heads, dh, d, 1e-12), gen)
    h = torch.randn(B, T, d, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    with torch.no_grad():
        got = att(h, mask)
    h64 = h.double()
    p = {n: t.double() for n, t in att.named_parameters()}
    if heads:
        q, k, v = (h64 @ p["qkv_weight"].T + p["qkv_bias"]).view(B, T, 3, heads, dh).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(torch.float64).min)
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, heads * dh)
        out = ctx @ p["out_weight"].T + p["out_bias"]
    else:
        out = p["out_bias"]
    want = _ln(h64 + out, p["ln_weight"], p["ln_bias"], 1e-12)
    assert _rel(got, want) <= 1e-5


@pytest.mark.parametrize("width", [0, 5])
@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_new"])
def test_ffn_against_float64(width, activation):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ffn = _randomise(PrunedFFN(width, 12, activation, 1e-6), gen)
    h = torch.randn(4, 12, generator=gen)
    with torch.no_grad():
        got = ffn(h)
    p = {n: t.double() for n, t in ffn.named_parameters()}
    acts = {"gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))), "relu": torch.relu,
            "gelu_new": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))}
    h64 = h.double()
    out = acts[activation](h64 @ p["in_weight"].T + p["in_bias"]) @ p["out_weight"].T if width else 0
    want = _ln(h64 + out + p["out_bias"], p["ln_weight"], p["ln_bias"], 1e-6)
    assert _rel(got, want) <= 1e-5


def test_embeddings_head_and_layer():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    emb = _randomise(PrunedEmbeddings(30, 10, 2, 6, 1e-12), gen)
    ids = torch.randint(0, 30, (2, 5), generator=gen)
    types = torch.randint(0, 2, (2, 5), generator=gen)
    pos = torch.arange(5).expand(2, 5)
    p = {n: t.double() for n, t in emb.named_parameters()}
    want = _ln(p["word_embeddings"][ids] + p["token_type_embeddings"][types] + p["position_embeddings"][pos],
               p["ln_weight"], p["ln_bias"], 1e-12)
    with torch.no_grad():
        h = emb(ids, types, pos)
    assert _rel(h, want) <= 1e-5

    head = _randomise(ClassificationHead(6, 9, 3), gen)
    q = {n: t.double() for n, t in head.named_parameters()}
    want_logits = torch.tanh(h.double()[:, 0] @ q["dense_weight"].T + q["dense_bias"]) @ q["out_weight"].T + q["out_bias"]
    with torch.no_grad():
        assert _rel(head(h), want_logits) <= 1e-5
        layer = PrunedLayer(None, None)
        assert layer(h, None) is h  # both sublayers removed: the identity


def test_init_and_meta_construction():
    torch.manual_seed(0)
    att = PrunedAttention(12, 64, 768, 1e-12)
    assert abs(float(att.qkv_weight.std()) - 0.02) < 1e-3 and not att.qkv_bias.any()
    assert torch.equal(att.ln_weight, torch.ones(768)) and not att.ln_bias.any()
    assert not any(p.requires_grad for p in att.parameters())
    with torch.device("meta"):
        lazy = PrunedFFN(3072, 768, "gelu", 1e-12)
    assert lazy.in_weight.is_meta and tuple(lazy.out_weight.shape) == (768, 3072)
    with pytest.raises(ValueError, match="activation must be one of"):
        PrunedFFN(4, 8, "silu", 1e-12)
