"""The reference ops: float64 gradcheck, and agreement with plain PyTorch where they coincide."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cofi_kernels.ops import reference


def _f64(*shape, low=None):
    t = torch.randn(*shape, dtype=torch.float64)
    if low is not None:
        t = t.abs() + low
    return t.requires_grad_()


def test_gradcheck_gelu_gate():
    assert torch.autograd.gradcheck(reference.gelu_gate, (_f64(3, 7), _f64(7), _f64(7)))


def test_gradcheck_masked_layer_norm_all_inputs():
    # Gates without exact zeros: the kept set does not move under perturbation.
    args = (_f64(2, 3, 9), _f64(2, 3, 9), _f64(9), _f64(9), _f64((), low=0.2), _f64(9, low=0.1))
    assert torch.autograd.gradcheck(lambda *a: reference.masked_layer_norm(*a, eps=1e-5), args)


def test_gradcheck_masked_layer_norm_with_pruned_dims():
    hidden_gate = torch.rand(9, dtype=torch.float64) + 0.1
    hidden_gate[[1, 4, 5]] = 0.0
    args = (_f64(4, 9), _f64(4, 9), _f64(9), _f64(9), _f64((), low=0.2))
    assert torch.autograd.gradcheck(lambda *a: reference.masked_layer_norm(*a, hidden_gate, eps=1e-5), args)


def test_gradcheck_gated_attention():
    q, k, v = _f64(2, 3, 5, 4), _f64(2, 3, 5, 4), _f64(2, 3, 5, 4)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    assert torch.autograd.gradcheck(
        lambda *a: reference.gated_attention(*a, key_padding_mask=mask), (q, k, v, _f64(3))
    )


def test_gradcheck_gated_ffn():
    args = (_f64(2, 3, 6), _f64(5, 6), _f64(5), _f64(6, 5), _f64(6), _f64(5))
    assert torch.autograd.gradcheck(reference.gated_ffn, args)


def test_gradcheck_gated_embeddings():
    ids = torch.randint(0, 11, (2, 5))
    types = torch.randint(0, 2, (2, 5))
    hidden_gate = torch.rand(6, dtype=torch.float64) + 0.1
    hidden_gate[2] = 0.0
    tables = (_f64(11, 6), _f64(8, 6), _f64(2, 6), _f64(6), _f64(6))
    assert torch.autograd.gradcheck(
        lambda *t: reference.gated_embeddings(ids, *t, token_type_ids=types, hidden_gate=hidden_gate), tables
    )


def test_masked_layer_norm_without_gates_is_layer_norm():
    x, r, w, b = torch.randn(4, 10), torch.randn(4, 10), torch.randn(10), torch.randn(10)
    torch.testing.assert_close(reference.masked_layer_norm(x, r, w, b, eps=1e-5),
                               F.layer_norm(x + r, (10,), w, b, eps=1e-5))


def test_masked_layer_norm_no_kept_dims_gives_zeros():
    x, r, w, b = torch.randn(4, 10), torch.randn(4, 10), torch.randn(10), torch.randn(10)
    out = reference.masked_layer_norm(x, r, w, b, torch.tensor(0.5), torch.zeros(10))
    assert torch.equal(out, torch.zeros(4, 10))


def test_gated_attention_matches_sdpa_times_gate():
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    gate = torch.rand(4)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    ref = reference.gated_attention(q, k, v, gate, mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]) * gate[None, :, None, None]
    torch.testing.assert_close(ref, sdpa, rtol=1e-5, atol=1e-5)


def test_gated_attention_fully_padded_row_is_finite():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    out = reference.gated_attention(q, k, v, None, torch.zeros(1, 4, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_gated_ffn_matches_linear_layers():
    x = torch.randn(3, 6)
    l1, l2 = torch.nn.Linear(6, 5), torch.nn.Linear(5, 6)
    gate = torch.rand(5)
    want = l2(F.gelu(l1(x)) * gate)
    torch.testing.assert_close(reference.gated_ffn(x, l1.weight, l1.bias, l2.weight, l2.bias, gate), want)


# float64 and float32: in bfloat16 the reference computes its statistics in
# bfloat16 (it is the plain same-dtype baseline of the tolerance rule), while
# F.layer_norm upcasts, so the two legitimately differ by more than any fixed
# tolerance on some inputs (1 in ~1000 seeds at 2e-2).
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gated_embeddings_without_gate_is_bert_embeddings(dtype):
    ids, types = torch.randint(0, 11, (2, 5)), torch.randint(0, 2, (2, 5))
    word, pos, typ = torch.randn(11, 6, dtype=dtype), torch.randn(8, 6, dtype=dtype), torch.randn(2, 6, dtype=dtype)
    w, b = torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype)
    want = F.layer_norm(word[ids] + pos[:5] + typ[types], (6,), w, b, eps=1e-12)
    got = reference.gated_embeddings(ids, word, pos, typ, w, b, token_type_ids=types)
    torch.testing.assert_close(got, want)
