"""Triton gated_attention against the reference: output and every gradient.

On a CPU-only machine the Triton kernels run through the interpreter
(``TRITON_INTERPRET=1``, set by conftest.py), so the shapes here are small;
the same cases with bigger shapes and bf16 run on a GPU when one is present.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import cofi_kernels
from cofi_kernels.ops import backends, reference
from cofi_kernels.ops.triton import support as _triton_support
from cofi_kernels.ops import gated_attention as gated_attention_op

from tests.compare import check_against_reference
from tests.conftest import TRITON_DEVICE, needs_triton, requires_cuda

NAMES = ["q", "k", "v", "head_gate", "key_padding_mask"]

pytestmark = pytest.mark.skipif(
    not _triton_support.INSTALLED, reason="triton is not installed"
)



def head_gate(kind: str, h: int, device) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "random":
        return (torch.rand(h, device=device) + 0.1).requires_grad_()
    if kind == "zeros_and_ones":  # exact 0 and 1, both present whenever h >= 2
        g = (torch.rand(h, device=device) > 0.5).float()
        if h >= 2:
            g[0], g[1] = 0.0, 1.0
        return g.requires_grad_()
    if kind == "frozen":  # a gate that needs no gradient
        return torch.rand(h, device=device) + 0.1
    raise ValueError(kind)


def padding_mask(kind: str, b: int, t: int, device) -> torch.Tensor | None:
    if kind == "none":
        return None
    lengths = torch.randint(1, t + 1, (b,), device=device)
    mask = torch.arange(t, device=device)[None, :] < lengths[:, None]
    if kind == "padded":
        return mask
    if kind == "scattered":  # holes anywhere; one row all padded, one row with a single key
        mask = torch.rand(b, t, device=device) > 0.4
        mask[0] = False
        if b > 1:
            mask[1] = False
            mask[1, torch.randint(t, (1,)).item()] = True
        return mask
    raise ValueError(kind)


def attention_inputs(shape, gate_kind, mask_kind, device, strided=False):
    b, h, t, d = shape
    if strided:  # [B, T, H, D] storage seen as [B, H, T, D], as a Hugging Face model produces it
        qkv = [torch.randn(b, t, h, d, device=device).transpose(1, 2) for _ in range(3)]
    else:
        qkv = [torch.randn(b, h, t, d, device=device) for _ in range(3)]
    q, k, v = (x.requires_grad_() for x in qkv)
    return [q, k, v, head_gate(gate_kind, h, device), padding_mask(mask_kind, b, t, device)]


def _kernel(q, k, v, g, m):
    return cofi_kernels.gated_attention(q, k, v, g, m, backend="triton")


def _reference(q, k, v, g, m):
    return reference.gated_attention(q, k, v, g, m)


def _check(shape, gate_kind, mask_kind, dtype, device, strided=False):
    inputs = attention_inputs(shape, gate_kind, mask_kind, device, strided)
    grad_out = torch.randn(shape, device=device)
    # dk, dv and the gate gradient sum over queries (and batch, for the gate).
    check_against_reference(_kernel, _reference, inputs, dtype, grad_out, reduction_args=(1, 2, 3), names=NAMES)


CPU_CASES = [
    ((3, 3, 37, 32), "random", "scattered"),
    ((2, 3, 37, 32), "zeros_and_ones", "padded"),
    ((1, 1, 1, 16), "random", "none"),
    ((3, 1, 20, 16), "none", "padded"),
    ((3, 2, 16, 32), "frozen", "scattered"),
    ((2, 4, 9, 16), "zeros_and_ones", "none"),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,gate_kind,mask_kind", CPU_CASES, ids=str)
def test_matches_reference(shape, gate_kind, mask_kind, dtype):
    if TRITON_DEVICE == "cuda":
        pytest.skip("interpreter-sized case; the GPU runs test_matches_reference_gpu")
    _check(shape, gate_kind, mask_kind, dtype, "cpu")


@needs_triton
def test_strided_inputs_from_a_bthd_layout():
    _check((2, 3, 19, 16), "random", "padded", torch.float32, TRITON_DEVICE, strided=True)


@needs_triton
def test_zero_heads_gives_empty_output_and_grads():
    q, k, v, g, m = attention_inputs((2, 0, 7, 32), "random", "padded", TRITON_DEVICE)
    out = cofi_kernels.gated_attention(q, k, v, g, m, backend="triton")
    assert out.shape == (2, 0, 7, 32)
    grads = torch.autograd.grad(out.sum(), [q, k, v, g])
    assert [tuple(x.shape) for x in grads] == [(2, 0, 7, 32)] * 3 + [(0,)]


@needs_triton
def test_closed_head_gets_the_gate_gradient_of_its_ungated_output():
    # A gate of exactly 0 hides its head's output, yet d loss / d gate is
    # <dOut_h, O_h> of the ungated output (CoFi's log α needs it).
    q, k, v, _, m = attention_inputs((2, 2, 11, 16), "none", "padded", TRITON_DEVICE)
    gate = torch.tensor([0.0, 0.5], device=TRITON_DEVICE, requires_grad=True)
    grad_out = torch.randn(2, 2, 11, 16, device=TRITON_DEVICE)
    out = cofi_kernels.gated_attention(q, k, v, gate, m, backend="triton")
    (dgate, dq) = torch.autograd.grad(out, [gate, q], grad_out)
    ungated = reference.gated_attention(q.detach(), k.detach(), v.detach(), None, m)
    expected = (grad_out * ungated).sum(dim=(0, 2, 3))
    torch.testing.assert_close(dgate, expected, rtol=1e-5, atol=1e-5)
    assert dgate[0].abs() > 0
    assert torch.count_nonzero(dq[:, 0]) == 0 and torch.count_nonzero(dq[:, 1]) > 0


@needs_triton
def test_fully_padded_rows_are_finite():
    q, k, v, g, _ = attention_inputs((2, 2, 21, 16), "random", "none", TRITON_DEVICE)
    mask = torch.zeros(2, 21, dtype=torch.bool, device=TRITON_DEVICE)
    mask[1, 3] = True
    out = cofi_kernels.gated_attention(q, k, v, g, mask, backend="triton")
    grads = torch.autograd.grad(out.square().sum(), [q, k, v, g])
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    # Row 0 attends uniformly to every key: the mean of v, times the gate.
    torch.testing.assert_close(out[0], v[0].detach().mean(dim=1, keepdim=True).expand_as(out[0]) * g.detach()[:, None, None],
                               rtol=1e-5, atol=1e-5)


@needs_triton
def test_custom_scale():
    q, k, v, g, m = attention_inputs((1, 2, 17, 16), "random", "padded", TRITON_DEVICE)
    out = cofi_kernels.gated_attention(q, k, v, g, m, scale=0.3, backend="triton")
    torch.testing.assert_close(out, reference.gated_attention(q, k, v, g, m, scale=0.3), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("gate_kind,strided", [("random", False), ("none", False), ("random", True)])
def test_opcheck(gate_kind, strided):
    # Strided inputs: the fake kernels must report the contiguous layout the kernels write.
    q, k, v, g, m = attention_inputs((2, 2, 18, 16), gate_kind, "scattered", TRITON_DEVICE, strided)
    torch.library.opcheck(torch.ops.cofi.gated_attention_fwd.default, (q, k, v, g, m, 0.25, True))
    with torch.no_grad():
        out, ungated, lse = torch.ops.cofi.gated_attention_fwd(q, k, v, g, m, 0.25, True)
    grad = torch.randn_like(out)
    detached_gate = None if g is None else g.detach()
    args = (grad, q.detach(), k.detach(), v.detach(), ungated, lse, detached_gate, m, 0.25, g is not None)
    torch.library.opcheck(torch.ops.cofi.gated_attention_bwd.default, args)


def test_backward_of_a_forward_that_saved_nothing_is_an_error():
    if TRITON_DEVICE is None:
        pytest.skip("no GPU and not under TRITON_INTERPRET=1")
    q, k, v, g, m = attention_inputs((1, 2, 5, 16), "random", "none", TRITON_DEVICE)
    out, _, _ = torch.ops.cofi.gated_attention_fwd(q, k, v, g, m, 0.25, False)
    with pytest.raises(RuntimeError, match="save_ungated=False"):
        out.sum().backward()


@needs_triton
def test_compile_fullgraph():
    torch._dynamo.reset()
    inputs = attention_inputs((2, 2, 12, 16), "random", "padded", TRITON_DEVICE)

    def block(q, k, v, g, m):
        return cofi_kernels.gated_attention(q, k, v, g, m, backend="triton").square().sum()

    loss = torch.compile(block, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(loss, inputs[:4])
    leaves = [x.detach().requires_grad_() for x in inputs[:4]]
    ref_loss = _reference(*leaves, inputs[4]).square().sum()
    ref_grads = torch.autograd.grad(ref_loss, leaves)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- argument checks and backends


def _args(**over):
    q, k, v, g, m = attention_inputs((2, 3, 5, 16), "random", "padded", "cpu")
    args = dict(q=q, k=k, v=v, head_gate=g, key_padding_mask=m)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(q=torch.randn(2, 5, 16)), r"q must have shape \[B, H, T, D\]"),
        (dict(k=torch.randn(2, 3, 6, 16)), "k has shape"),
        (dict(v=torch.randn(2, 3, 5, 16, dtype=torch.float16)), "v has dtype"),
        (dict(head_gate=torch.rand(4)), r"head_gate must have shape \[3\] \(the head count"),
        (dict(key_padding_mask=torch.ones(2, 5)), "key_padding_mask must be a bool tensor"),
        (dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), r"key_padding_mask must have shape \[B, T\]"),
        (dict(q=torch.randn(2, 3, 0, 16), k=torch.randn(2, 3, 0, 16), v=torch.randn(2, 3, 0, 16)), "at least 1"),
    ],
)
def test_bad_arguments_name_the_argument(over, match):
    with pytest.raises(ValueError, match=match):
        cofi_kernels.gated_attention(**_args(**over), backend="reference")


def test_bad_scale():
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        cofi_kernels.gated_attention(**_args(), scale=float("nan"))


@needs_triton
def test_triton_needs_a_supported_head_size():
    q, k, v, g, m = attention_inputs((1, 2, 5, 24), "random", "padded", TRITON_DEVICE)
    with pytest.raises(ValueError, match="backend 'triton' cannot run these inputs: head size 24 not in 16, 32, 64, 128"):
        cofi_kernels.gated_attention(q, k, v, g, m, backend="triton")


def test_auto_on_cpu_runs_the_reference_without_warning(recwarn, monkeypatch):
    monkeypatch.delenv("COFI_BACKEND", raising=False)
    assert backends.resolve(gated_attention_op.SPEC, "auto", torch.device("cpu")) == "reference"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_no_cpu_backend():
    with pytest.raises(ValueError, match="gated_attention has no 'cpu' backend"):
        cofi_kernels.gated_attention(**_args(), backend="cpu")


def test_triton_on_cpu_without_the_interpreter_is_an_error():
    code = (
        "import torch, cofi_kernels\n"
        "q = torch.randn(1, 1, 4, 16)\n"
        "try:\n"
        "    cofi_kernels.gated_attention(q, q, q, backend='triton')\n"
        "except cofi_kernels.BackendUnavailableError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR gated_attention: backend 'triton' is not available" in res.stdout, res.stdout + res.stderr
    assert "TRITON_INTERPRET=1" in res.stdout


# ---------------------------------------------------------------- GPU


GPU_CASES = [
    ((4, 12, 128, 64), "random", "padded"),
    ((3, 12, 512, 64), "zeros_and_ones", "scattered"),
    ((3, 5, 197, 128), "random", "scattered"),
    ((2, 3, 77, 32), "none", "padded"),
    ((2, 1, 1, 64), "random", "none"),
    ((2, 4, 300, 64), "frozen", "padded"),
]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,gate_kind,mask_kind", GPU_CASES, ids=str)
def test_matches_reference_gpu(shape, gate_kind, mask_kind, dtype):
    if TRITON_DEVICE != "cuda":
        pytest.skip("Triton runs through the interpreter in this process")
    _check(shape, gate_kind, mask_kind, dtype, "cuda", strided=shape[2] == 128)


@requires_cuda
@pytest.mark.gpu
def test_auto_picks_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("COFI_BACKEND", raising=False)
    want = "triton" if TRITON_DEVICE == "cuda" else "reference"
    assert backends.resolve(gated_attention_op.SPEC, "auto", torch.device("cuda")) == want
