"""Bad input gives a ValueError/RuntimeError that names the argument."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import cofi_kernels

from tests import REPO_ROOT
from tests.cases import gelu_gate_inputs, masked_layer_norm_inputs

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
        (lambda a: a.__setitem__(0, torch.randn(4, 16, dtype=torch.float64)), "backend 'cpu' cannot run these inputs: x is float64 but the cpu kernel supports float32"),
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


# Direct callers of the registered ops get the kernels' own checks. These run in
# a child interpreter: on one lent GPU image (torch 2.11.0+cu130, g++ 13.3) any
# extension's C++ exception kills the process, a 5-line load_inline extension
# included, and that must show as a failed test, not a crashed session.
DIRECT_CALL_ERRORS = {
    "nan_hidden_gate": (
        "a = _mln(); a[5][3] = float('nan'); torch.ops.cofi.masked_layer_norm_fwd(*a, 1e-12)",
        "hidden_gate contains NaN",
    ),
    "gelu_gate_gate_shape": (
        "x, b, g = [t.detach() for t in gelu_gate_inputs((4, 16), 'random')]; torch.ops.cofi.gelu_gate_fwd(x, b, g[:5])",
        "gate must have shape \\[16\\]",
    ),
    "residual_shape": (
        "a = _mln(); torch.ops.cofi.masked_layer_norm_fwd(a[0], a[1][:, :8], *a[2:], 1e-12)",
        "residual has shape",
    ),
}


@pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")
@pytest.mark.parametrize("case", list(DIRECT_CALL_ERRORS))
def test_compiled_ops_name_arguments_when_called_directly(case):
    code, match = DIRECT_CALL_ERRORS[case]
    script = (
        "import re, torch\n"
        "from tests.ops.test_errors import _mln, gelu_gate_inputs\n"
        "try:\n"
        f"    {code}\n"
        "except RuntimeError as e:\n"
        f"    assert re.search({match!r}, str(e)), str(e)\n"
        "    print('raised as expected')\n"
    )
    root = REPO_ROOT
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=300)
    assert result.returncode == 0 and "raised as expected" in result.stdout, (result.returncode, result.stderr[-2000:])


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
