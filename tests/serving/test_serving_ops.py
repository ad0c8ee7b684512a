"""The serving ops against their reference: cofi::varlen_attention and cofi::pruned_layer (CPU kernels).

Fresh random inputs (the per-test seed of tests/conftest.py); lengths include 1, the
longest, and two that differ by one token. float32: relative error (by norm) against
the float64 reference at most 1e-5; bfloat16: at most 2x that of the reference run in
bfloat16 (DESIGN §6). Forward only: these ops serve inference.
"""

from __future__ import annotations

import pytest
import torch

import cofi_kernels
from cofi_kernels import functional
from cofi_kernels.ops import reference

from tests.compare import FP32_TOL, rel_err

pytestmark = pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")

DTYPES = [torch.float32, torch.bfloat16]


def _lengths(batch: int, longest: int) -> torch.Tensor:
    """Random lengths in [1, longest] with 1, ``longest`` and a pair one apart among them."""
    lengths = torch.randint(1, longest + 1, (batch,))
    lengths[0], lengths[1] = 1, longest
    if batch > 3:
        lengths[3] = max(1, int(lengths[2]) - 1) if lengths[2] > 1 else 2
    return lengths


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def _check(got, exact, plain, dtype):
    """DESIGN §6 against the float64 ``exact``; ``plain`` is the reference run in ``dtype``."""
    assert got.dtype == dtype and torch.isfinite(got).all()
    err = rel_err(got, exact)
    limit = FP32_TOL if dtype == torch.float32 else 2 * rel_err(plain, exact) + 1e-6
    assert err <= limit, f"relative error {err:.3g} > {limit:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim", [(1, 64), (3, 32), (12, 64), (5, 16)])
@pytest.mark.parametrize("first_only", [False, True])
def test_varlen_attention_matches_reference(dtype, heads, head_dim, first_only):
    lengths = _lengths(6, 37)
    cu = _cu(lengths)
    qkv = torch.randn(int(cu[-1]), 3 * heads * head_dim) * 1.5
    args = (cu, heads, head_dim)
    exact = reference.varlen_attention(qkv.double(), *args, head_dim**-0.5, first_only)
    plain = reference.varlen_attention(qkv.to(dtype), *args, head_dim**-0.5, first_only)
    got = functional.varlen_attention(qkv.to(dtype), *args, first_only=first_only, backend="cpu")
    assert got.shape == (len(lengths) if first_only else int(cu[-1]), heads * head_dim)
    _check(got, exact, plain, dtype)


def test_varlen_attention_keeps_sequences_apart():
    """Changing one sequence's tokens leaves the other sequences' outputs bit for bit."""
    cu = _cu(torch.tensor([5, 9, 3]))
    qkv = torch.randn(17, 3 * 2 * 32)
    out = functional.varlen_attention(qkv, cu, 2, 32, backend="cpu")
    moved = qkv.clone()
    moved[5:14] = torch.randn(9, 3 * 2 * 32)
    again = functional.varlen_attention(moved, cu, 2, 32, backend="cpu")
    assert torch.equal(out[:5], again[:5]) and torch.equal(out[14:], again[14:])
    assert not torch.equal(out[5:14], again[5:14])


def _sublayer(kind: str, d: int, heads: int, head_dim: int, width: int, dtype) -> dict | None:
    if kind == "removed":
        return None
    t = {"out_bias": torch.randn(d) * 0.1, "ln_weight": 1 + 0.2 * torch.randn(d), "ln_bias": 0.1 * torch.randn(d)}
    if kind == "attention" and heads:
        t |= {"qkv_weight": torch.randn(3 * heads * head_dim, d) / d**0.5,
              "qkv_bias": 0.1 * torch.randn(3 * heads * head_dim),
              "out_weight": torch.randn(d, heads * head_dim) / (heads * head_dim) ** 0.5}
    if kind == "ffn" and width:
        t |= {"in_weight": torch.randn(width, d) / d**0.5, "in_bias": 0.1 * torch.randn(width),
              "out_weight": torch.randn(d, width) / width**0.5}
    return {k: v.to(dtype) for k, v in t.items()}


def _cast(weights, dtype):
    return None if weights is None else {k: v.to(dtype) for k, v in weights.items()}


LAYERS = [  # (attention, heads, ffn, width)
    ("attention", 4, "ffn", 96),
    ("attention", 1, "ffn", 7),
    ("attention", 0, "ffn", 96),  # no head left: LN(h + b_out)
    ("attention", 3, "ffn", 0),  # no unit left
    ("removed", 0, "ffn", 50),
    ("attention", 2, "removed", 0),
    ("removed", 0, "removed", 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first_only", [False, True])
@pytest.mark.parametrize("att_kind,heads,ffn_kind,width", LAYERS)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_pruned_layer_matches_reference(dtype, first_only, att_kind, heads, ffn_kind, width, activation):
    d, head_dim = 72, 32
    lengths = _lengths(5, 29)
    cu = _cu(lengths)
    h = torch.randn(int(cu[-1]), d)
    att = _sublayer(att_kind, d, heads, head_dim, 0, torch.float32)
    ffn = _sublayer(ffn_kind, d, 0, head_dim, width, torch.float32)
    kw = dict(heads=heads, head_dim=head_dim, activation=activation, eps=1e-5)

    def ref(x, dt):
        return reference.pruned_layer(x.to(dt), cu, first_only, _cast(att, dt), _cast(ffn, dt), heads, head_dim,
                                      activation, 1e-5)

    got = functional.pruned_layer(h.to(dtype), cu, _cast(att, dtype), _cast(ffn, dtype), first_only=first_only,
                                  backend="cpu", **kw)
    assert got.shape == (len(lengths) if first_only else int(cu[-1]), d)
    _check(got, ref(h, torch.float64), ref(h, dtype), dtype)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("lengths", [[9, 7, 8, 9, 1, 8, 6, 8], [60, 1, 2], [1, 1, 1, 1, 1, 1], [33]],
                         ids=["balanced", "one-long", "all-length-1", "one-sequence"])
@pytest.mark.parametrize("first_only", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pruned_layer_groups_of_sequences(threads, lengths, first_only, dtype):
    """With several threads the layer runs groups of whole sequences in parallel when their
    token counts are even (balanced, all-length-1), else every thread inside each op (one-long,
    one-sequence): both ways, and on one thread, it equals the reference."""
    d, heads, head_dim = 48, 3, 16
    cu = _cu(torch.tensor(lengths))
    h = torch.randn(int(cu[-1]), d)
    att = _sublayer("attention", d, heads, head_dim, 0, torch.float32)
    ffn = _sublayer("ffn", d, 0, head_dim, 40, torch.float32)

    def ref(dt):
        return reference.pruned_layer(h.to(dt), cu, first_only, _cast(att, dt), _cast(ffn, dt), heads, head_dim,
                                      "gelu", 1e-5)

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = functional.pruned_layer(h.to(dtype), cu, _cast(att, dtype), _cast(ffn, dtype), heads=heads,
                                          head_dim=head_dim, activation="gelu", eps=1e-5, first_only=first_only,
                                          backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert got.shape == (len(lengths) if first_only else int(cu[-1]), d)
    _check(got, ref(torch.float64), ref(dtype), dtype)


def test_opcheck_varlen_attention():
    cu = _cu(_lengths(4, 11))
    qkv = torch.randn(int(cu[-1]), 3 * 2 * 16)
    for first_only in (False, True):
        torch.library.opcheck(torch.ops.cofi.varlen_attention.default, (qkv, cu, 2, 16, 0.25, first_only))


def test_opcheck_pruned_layer():
    d = 24
    cu = _cu(_lengths(4, 9))
    h = torch.randn(int(cu[-1]), d)
    att = _sublayer("attention", d, 2, 8, 0, torch.float32)
    ffn = _sublayer("ffn", d, 0, 8, 40, torch.float32)
    order = ("qkv_weight", "qkv_bias", "out_weight", "out_bias", "ln_weight", "ln_bias")
    ffn_order = ("in_weight", "in_bias", "out_weight", "out_bias", "ln_weight", "ln_bias")
    for first_only in (False, True):
        args = (h, cu, first_only, *(att[k] for k in order), *(ffn[k] for k in ffn_order), 2, 8, 0, 1e-5)
        torch.library.opcheck(torch.ops.cofi.pruned_layer.default, args)


def test_compile_fullgraph_through_the_layer_op():
    torch._dynamo.reset()
    d = 16
    cu = _cu(torch.tensor([3, 5]))
    h = torch.randn(8, d)
    att, ffn = _sublayer("attention", d, 1, 8, 0, torch.float32), _sublayer("ffn", d, 0, 8, 12, torch.float32)

    def layer(x):
        return functional.pruned_layer(x, cu, att, ffn, heads=1, head_dim=8, activation="gelu", eps=1e-5)

    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True)(h), layer(h))


# ------------------------------------------------------------------ bad input


def test_kernel_errors_name_the_argument():
    qkv = torch.randn(6, 3 * 2 * 8)
    with pytest.raises(RuntimeError, match="cu_seqlens must run from 0 to the number of rows 6"):
        torch.ops.cofi.varlen_attention(qkv, torch.tensor([0, 2, 5]), 2, 8, 0.3, False)
    with pytest.raises(RuntimeError, match="sequence 1 is empty"):
        torch.ops.cofi.varlen_attention(qkv, torch.tensor([0, 3, 3, 6]), 2, 8, 0.3, False)
    with pytest.raises(RuntimeError, match="qkv must be float32 or bfloat16"):
        torch.ops.cofi.varlen_attention(qkv.half(), torch.tensor([0, 6]), 2, 8, 0.3, False)
    with pytest.raises(RuntimeError, match=r"qkv must be \[rows, 3 \* 3 \* 8\]"):
        torch.ops.cofi.varlen_attention(qkv, torch.tensor([0, 6]), 3, 8, 0.3, False)


def test_layer_kernel_checks_weight_shapes():
    d = 16
    att = _sublayer("attention", d, 2, 8, 0, torch.float32)
    att["qkv_weight"] = att["qkv_weight"][:, :-1]
    with pytest.raises(RuntimeError, match=r"qkv_weight must have shape \[48, 16\]"):
        functional.pruned_layer(torch.randn(5, d), torch.tensor([0, 5]), att, None, heads=2, head_dim=8,
                                activation="gelu", eps=1e-5, backend="cpu")


def test_public_functions_refuse_bad_arguments():
    qkv = torch.randn(6, 3 * 2 * 8)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-d int64"):
        functional.varlen_attention(qkv, torch.tensor([0, 6], dtype=torch.int32), 2, 8)
    with pytest.raises(ValueError, match=r"qkv must be \[tokens, 48\]"):
        functional.varlen_attention(qkv[:, :40], torch.tensor([0, 6]), 2, 8)
    with pytest.raises(ValueError, match="heads and head_dim must be integers >= 1"):
        functional.varlen_attention(qkv, torch.tensor([0, 6]), 0, 8)
    with pytest.raises(ValueError, match="activation must be one of"):
        functional.pruned_layer(torch.randn(6, 8), torch.tensor([0, 6]), None, None, heads=0, head_dim=8,
                                activation="swish", eps=1e-5)
    with pytest.raises(ValueError, match="float16 but the cpu kernel supports float32 and bfloat16"):
        functional.varlen_attention(qkv.half(), torch.tensor([0, 6]), 2, 8, backend="cpu")


def test_forward_only_kernels_leave_gradients_to_the_reference():
    qkv = torch.randn(6, 3 * 2 * 8, requires_grad=True)
    cu = torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match="forward only but a gradient is wanted"):
        functional.varlen_attention(qkv, cu, 2, 8, backend="cpu")
    out = functional.varlen_attention(qkv, cu, 2, 8)  # auto: the differentiable reference
    (g,) = torch.autograd.grad(out.square().sum(), qkv)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(functional.varlen_attention(qkv, cu, 2, 8), out, rtol=1e-5, atol=1e-6)
