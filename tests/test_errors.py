"""Bad input gives a ValueError/RuntimeError that names the argument."""

from __future__ import annotations

import pytest
import torch

import cofi_kernels

from .cases import gelu_gate_inputs, masked_layer_norm_inputs

BACKENDS = ["reference"] + (["cpu"] if cofi_kernels.extension_available() else [])


def _mln(device="cpu", shape=(4, 16)):
    return [None if t is None else t.detach() for t in masked_layer_norm_inputs(shape, "random_with_zeros",
                                                                                  "random", device)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.__setitem__(1, torch.randn(15)), "bias must have shape \\[16\\]"),
        (lambda a: a.__setitem__(2, torch.rand(3)), "gate must have shape \\[16\\]"),
        (lambda a: a.__setitem__(2, torch.rand(16, dtype=torch.float16)), "gate must have dtype"),
        (lambda a: a.__setitem__(1, torch.randn(1, 16)), "bias must have shape"),
        (lambda a: a.__setitem__(0, torch.randn(4, 16, dtype=torch.float64)), "the cpu kernel supports float32.*x is float64"),
        (lambda a: a.__setitem__(0, torch.randint(0, 3, (4, 16))), "x must have dtype"),
        (lambda a: a.__setitem__(0, torch.tensor(1.0)), "x must have at least one dimension"),
    ],
)
def test_gelu_gate_rejects(backend, change, match):
    args = [t.detach() for t in gelu_gate_inputs((4, 16), "random")]
    change(args)
    if backend == "reference" and "float64" in str(args[0].dtype):
        pytest.skip("float64 is the reference backend's own dtype")
    with pytest.raises(ValueError, match=f"gelu_gate: {match}"):
        cofi_kernels.gelu_gate(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "index,value,match",
    [
        (1, torch.randn(4, 15), "residual has shape"),
        (1, torch.randn(4, 16, dtype=torch.bfloat16), "residual has dtype"),
        (2, torch.randn(17), "weight must have shape \\[16\\]"),
        (3, torch.randn(16, dtype=torch.float16), "bias must have dtype"),
        (4, torch.rand(2), "layer_gate must be a scalar"),
        (5, torch.rand(8), "hidden_gate must have shape \\[16\\]"),
        (5, torch.tensor([float("nan")] + [1.0] * 15), "hidden_gate contains NaN"),
    ],
)
def test_masked_layer_norm_rejects(backend, index, value, match):
    args = _mln()
    args[index] = value
    with pytest.raises(ValueError, match=f"masked_layer_norm: {match}"):
        cofi_kernels.masked_layer_norm(*args, backend=backend)


def test_masked_layer_norm_rejects_negative_eps():
    with pytest.raises(ValueError, match="eps must be a non-negative"):
        cofi_kernels.masked_layer_norm(*_mln(), eps=-1.0)


@pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")
def test_compiled_kernel_reports_nan_hidden_gate_itself():
    # Direct callers of the registered op get the kernel's own check.
    args = _mln()
    args[5][3] = float("nan")
    with pytest.raises(RuntimeError, match="hidden_gate contains NaN"):
        torch.ops.cofi.masked_layer_norm(*args, 1e-12)


@pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")
def test_compiled_ops_name_arguments_when_called_directly():
    x, b, g = [t.detach() for t in gelu_gate_inputs((4, 16), "random")]
    with pytest.raises(RuntimeError, match="gate must have shape \\[16\\]"):
        torch.ops.cofi.gelu_gate(x, b, g[:5])
    args = _mln()
    with pytest.raises(RuntimeError, match="residual has shape"):
        torch.ops.cofi.masked_layer_norm(args[0], args[1][:, :8], *args[2:], 1e-12)


def test_nan_in_a_gate_that_only_scales_propagates():
    # NaN in gelu_gate's gate (or layer_gate) is ordinary arithmetic, not an error.
    x, b, g = [t.detach() for t in gelu_gate_inputs((2, 8), "random")]
    g[0] = float("nan")
    out = cofi_kernels.gelu_gate(x, b, g)
    assert out[:, 0].isnan().all() and not out[:, 1:].isnan().any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_cuda_mix_is_rejected():
    x, b, g = [t.detach() for t in gelu_gate_inputs((4, 16), "random")]
    with pytest.raises(ValueError, match="gelu_gate: bias is on cuda:0 but x is on cpu"):
        cofi_kernels.gelu_gate(x, b.cuda(), g)
    args = _mln()
    args[5] = args[5].cuda()
    with pytest.raises(ValueError, match="masked_layer_norm: hidden_gate is on cuda:0 but x is on cpu"):
        cofi_kernels.masked_layer_norm(*args)


def test_cpu_meta_mix_is_rejected():
    # Runs everywhere: a second device type without a GPU.
    x, b, g = [t.detach() for t in gelu_gate_inputs((4, 16), "random")]
    with pytest.raises(ValueError, match="gelu_gate: gate is on meta but x is on cpu"):
        cofi_kernels.gelu_gate(x, b, g.to("meta"))
    args = _mln()
    args[1] = args[1].to("meta")
    with pytest.raises(ValueError, match="masked_layer_norm: residual is on meta but x is on cpu"):
        cofi_kernels.masked_layer_norm(*args)
