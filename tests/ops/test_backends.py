"""Backend choice: keyword, COFI_BACKEND, auto; unavailable backends are errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import cofi_kernels
from cofi_kernels.ops import backends
from cofi_kernels.ops import gelu_gate as gelu_gate_op

from tests.cases import gelu_gate_inputs

needs_extension = pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")


@needs_extension
def test_auto_picks_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv("COFI_BACKEND", raising=False)
    assert backends.resolve(gelu_gate_op.SPEC, "auto", torch.device("cpu")) == "cpu"


def test_keyword_beats_environment(monkeypatch):
    monkeypatch.setenv("COFI_BACKEND", "cpu")
    assert backends.resolve(gelu_gate_op.SPEC, "reference", torch.device("cpu")) == "reference"


def test_environment_forces_reference(monkeypatch):
    monkeypatch.setenv("COFI_BACKEND", "reference")
    assert backends.resolve(gelu_gate_op.SPEC, "auto", torch.device("cpu")) == "reference"


def test_unknown_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="backend='tpu' is not a backend"):
        backends.resolve(gelu_gate_op.SPEC, "tpu", torch.device("cpu"))
    monkeypatch.setenv("COFI_BACKEND", "fast")
    with pytest.raises(ValueError, match="COFI_BACKEND='fast' is not a backend"):
        backends.resolve(gelu_gate_op.SPEC, "auto", torch.device("cpu"))


def test_backend_the_op_does_not_have():
    with pytest.raises(ValueError, match="gelu_gate has no 'triton' backend"):
        backends.resolve(gelu_gate_op.SPEC, "triton", torch.device("cpu"))


def test_device_backend_mismatch_is_an_error_not_a_fallback():
    x, b, g = [t.detach() for t in gelu_gate_inputs((2, 8), "random")]
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        cofi_kernels.gelu_gate(x, b, g, backend="cuda")


@needs_extension
def test_forced_backend_runs_that_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(gelu_gate_op, "gelu_gate_op", lambda *a: calls.append("cpu") or torch.zeros(1))
    x, b, g = [t.detach() for t in gelu_gate_inputs((2, 8), "random")]
    cofi_kernels.gelu_gate(x, b, g, backend="cpu")
    assert calls == ["cpu"]
    monkeypatch.setenv("COFI_BACKEND", "reference")
    cofi_kernels.gelu_gate(x, b, g)
    assert calls == ["cpu"]


def _run_without_extension(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter where importing cofi_kernels._C fails."""
    prelude = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'cofi_kernels._C':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300)


def test_package_works_and_explains_itself_without_extension():
    result = _run_without_extension(
        "import warnings, torch, cofi_kernels\n"
        "assert not cofi_kernels.extension_available()\n"
        "x, b = torch.randn(3, 4), torch.randn(4)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    out = cofi_kernels.gelu_gate(x, b)\n"
        "assert torch.allclose(out, torch.nn.functional.gelu(x + b))\n"
        "assert any('reference implementation' in str(m.message) for m in w), [str(m.message) for m in w]\n"
        "try:\n"
        "    cofi_kernels.gelu_gate(x, b, backend='cpu')\n"
        "except cofi_kernels.BackendUnavailableError as e:\n"
        "    print('ERROR:', e)\n"
        "import cofi_kernels.info\n"
        "print(cofi_kernels.info.report())\n"
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR: gelu_gate: backend 'cpu' is not available: the compiled extension cofi_kernels._C did not load" \
        in result.stdout
    assert "extension cofi_kernels._C: NOT LOADED (ImportError: blocked for the test)" in result.stdout
    assert "gelu_gate            cpu -> reference" in result.stdout


@needs_extension
def test_info_reports_build_and_choices():
    result = subprocess.run([sys.executable, "-m", "cofi_kernels.info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "extension cofi_kernels._C: loaded" in text
    assert "C++ CPU ops: gelu_gate_fwd, gelu_gate_bwd, masked_layer_norm_fwd, masked_layer_norm_bwd" in text
    assert "masked_layer_norm    cpu -> cpu" in text
    info = cofi_kernels.ops._extension.build_info()
    assert info is not None and info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda_built"]:
        assert f"archs {info['cuda_archs']}" in text
        assert all(cofi_kernels.ops._extension.has_kernel(op, "cuda") for op in info["cuda_ops"])
