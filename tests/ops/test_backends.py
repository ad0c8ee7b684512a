"""Backend choice: keyword, COFI_BACKEND, auto; unavailable backends are errors."""

from __future__ import annotations

import subprocess
import sys
import warnings

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
    with pytest.raises(ValueError, match="backend 'cuda' cannot run these inputs: the tensors are on cpu but the cuda kernels need CUDA tensors"):
        cofi_kernels.gelu_gate(x, b, g, backend="cuda")


@needs_extension
def test_forced_backend_runs_that_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(gelu_gate_op, "gelu_gate_fwd", lambda *a: calls.append("cpu") or torch.zeros(1))
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


# ------------------------------------------------- backends that know their inputs
#
# The reasons are computed from a description of the inputs (backends.Inputs),
# so GPU decisions are checked here without CUDA tensors. `machine` pins what
# this process has (extension, kernels per device, Triton, interpreter) so that
# the expected reasons do not depend on where the suite runs.

from cofi_kernels.ops import _extension  # noqa: E402
from cofi_kernels.ops import gated_attention as attention_op  # noqa: E402
from cofi_kernels.ops import gated_ffn as ffn_op  # noqa: E402
from cofi_kernels.ops import masked_layer_norm as mln_op  # noqa: E402
from cofi_kernels.ops import reference  # noqa: E402
from cofi_kernels.ops.backends import Inputs  # noqa: E402
from cofi_kernels.ops.triton import support as triton_support  # noqa: E402

from tests.cases import masked_layer_norm_inputs  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ALL_KERNELS = frozenset((op, dev) for op in gelu_gate_op.KERNELS + mln_op.KERNELS for dev in ("cpu", "cuda"))
SPECS = {s.name: s for s in (gelu_gate_op.SPEC, mln_op.SPEC, ffn_op.SPEC, attention_op.SPEC)}

NOT_BUILT_FOR_CUDA = "cofi_kernels._C was built without CUDA kernels for {op}"
NO_INTERPRETER = ("Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 "
                  "before importing cofi_kernels (slow; meant for tests)")
INTERPRETER_ON = "TRITON_INTERPRET=1 was set when cofi_kernels was imported, so the kernels run on CPU tensors only"


def _dtype_reason(arg, backend, dtype=F64):
    return f"{arg} is {str(dtype).removeprefix('torch.')} but the {backend} kernel supports float32, float16 and bfloat16"


def _device_reason(backend, got):
    return f"the tensors are on {got} but the {backend} kernels need {backend.upper()} tensors"


@pytest.fixture
def machine(monkeypatch):
    """Sets what this process has; the default is everything built and Triton compiling for GPUs."""
    monkeypatch.delenv("COFI_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_warned", set())

    def set_(*, loaded=True, kernels=ALL_KERNELS, triton=True, interpret=False):
        monkeypatch.setattr(_extension, "_LOAD_ERROR", None if loaded else "ImportError: gone for the test")
        monkeypatch.setattr(_extension, "_KERNELS", frozenset(kernels) if loaded else frozenset())
        monkeypatch.setattr(triton_support, "INSTALLED", triton)
        monkeypatch.setattr(triton_support, "INTERPRET", interpret)

    set_()
    return set_


# The reasons of every backend of every op on a machine that has everything.
REASONS = [
    ("gelu_gate", "reference", Inputs(CUDA, F64), []),
    ("gelu_gate", "cpu", Inputs(CPU, BF16), []),
    ("gelu_gate", "cpu", Inputs(CPU, F64), [_dtype_reason("x", "cpu")]),
    ("gelu_gate", "cpu", Inputs(CUDA, F32), [_device_reason("cpu", "cuda")]),
    ("gelu_gate", "cuda", Inputs(CUDA, F16), []),
    ("gelu_gate", "cuda", Inputs(CPU, F64), [_device_reason("cuda", "cpu"), _dtype_reason("x", "cuda")]),
    ("masked_layer_norm", "reference", Inputs(CPU, F64), []),
    ("masked_layer_norm", "cpu", Inputs(CPU, F32), []),
    ("masked_layer_norm", "cpu", Inputs(CPU, F64), [_dtype_reason("x", "cpu")]),
    ("masked_layer_norm", "cuda", Inputs(CUDA, BF16), []),
    ("masked_layer_norm", "cuda", Inputs(CUDA, F64), [_dtype_reason("x", "cuda")]),
    ("masked_layer_norm", "cuda", Inputs(CPU, F32), [_device_reason("cuda", "cpu")]),
    ("gated_ffn", "reference", Inputs(CUDA, F64), []),
    ("gated_ffn", "cpu", Inputs(CPU, F16), []),
    ("gated_ffn", "cpu", Inputs(CPU, F64), [_dtype_reason("x", "cpu")]),
    ("gated_ffn", "triton", Inputs(CUDA, BF16), []),
    ("gated_ffn", "triton", Inputs(CUDA, F64), [_dtype_reason("x", "triton")]),
    ("gated_ffn", "triton", Inputs(CPU, F32), [NO_INTERPRETER]),
    ("gated_attention", "reference", Inputs(CUDA, F64, head_dim=48), []),
    ("gated_attention", "triton", Inputs(CUDA, BF16, head_dim=64), []),
    ("gated_attention", "triton", Inputs(CUDA, BF16, head_dim=48), ["head size 48 not in 16, 32, 64, 128"]),
    ("gated_attention", "triton", Inputs(CUDA, F64, head_dim=256),
     [_dtype_reason("q", "triton"), "head size 256 not in 16, 32, 64, 128"]),
    ("gated_attention", "triton", Inputs(CUDA, F32), ["the head size is not given (Inputs.head_dim is None)"]),
    ("gated_attention", "triton", Inputs(CPU, F16, head_dim=16), [NO_INTERPRETER]),
]


@pytest.mark.parametrize("op,backend,inputs,want", REASONS, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_reasons_of_each_backend_for_inputs(machine, op, backend, inputs, want):
    assert backends.not_supported_reasons(SPECS[op], backend, inputs) == want
    assert SPECS[op].backend(backend).not_supported_reasons(inputs) == want


def test_reasons_about_the_machine(machine):
    ffn, attn, mln = SPECS["gated_ffn"], SPECS["gated_attention"], SPECS["masked_layer_norm"]
    machine(kernels={k for k in ALL_KERNELS if k[1] == "cpu"})
    assert backends.not_supported_reasons(mln, "cuda", Inputs(CUDA, F16)) == [
        NOT_BUILT_FOR_CUDA.format(op="masked_layer_norm")]
    assert backends.not_supported_reasons(mln, "cpu", Inputs(CPU, F16)) == []
    # gated_ffn's cpu backend needs the compiled gelu_gate kernels and nothing else.
    machine(kernels={k for k in ALL_KERNELS if k[0].startswith("gelu_gate")})
    assert backends.not_supported_reasons(ffn, "cpu", Inputs(CPU, F32)) == []
    assert backends.not_supported_reasons(mln, "cpu", Inputs(CPU, F32)) == [
        "cofi_kernels._C was built without CPU kernels for masked_layer_norm"]
    machine(loaded=False)
    assert backends.not_supported_reasons(ffn, "cpu", Inputs(CPU, F64)) == [
        _dtype_reason("x", "cpu"), "the compiled extension cofi_kernels._C did not load (ImportError: gone for the test)"]
    machine(triton=False)
    assert backends.not_supported_reasons(attn, "triton", Inputs(CUDA, F16, head_dim=32)) == [
        "triton is not installed (it comes with the CUDA builds of torch)"]
    machine(interpret=True)
    assert backends.not_supported_reasons(attn, "triton", Inputs(CUDA, F16, head_dim=32)) == [INTERPRETER_ON]
    assert backends.not_supported_reasons(attn, "triton", Inputs(CPU, F16, head_dim=32)) == []


@pytest.mark.parametrize("op,device,dtype,head_dim,want", [
    ("gelu_gate", CPU, F32, None, "cpu"),
    ("gelu_gate", CPU, F64, None, "reference"),
    ("gelu_gate", CUDA, BF16, None, "cuda"),
    ("gelu_gate", CUDA, F64, None, "reference"),
    ("masked_layer_norm", CPU, F16, None, "cpu"),
    ("masked_layer_norm", CPU, F64, None, "reference"),
    ("masked_layer_norm", CUDA, F32, None, "cuda"),
    ("gated_ffn", CPU, BF16, None, "cpu"),
    ("gated_ffn", CPU, F64, None, "reference"),
    ("gated_ffn", CUDA, F16, None, "triton"),
    ("gated_ffn", CUDA, F64, None, "reference"),
    ("gated_attention", CUDA, BF16, 64, "triton"),
    ("gated_attention", CUDA, BF16, 48, "reference"),
    ("gated_attention", CUDA, F64, 64, "reference"),
    ("gated_attention", CPU, F32, 64, "reference"),
])
def test_auto_takes_the_first_backend_without_reasons(machine, recwarn, op, device, dtype, head_dim, want):
    inputs = Inputs(device, dtype, head_dim=head_dim)
    assert backends.auto_choice(SPECS[op], inputs) == want
    assert backends.resolve(SPECS[op], "auto", inputs) == want


def test_auto_never_picks_the_interpreter(machine, recwarn):
    machine(interpret=True)
    assert backends.auto_choice(SPECS["gated_attention"], Inputs(CPU, F32, head_dim=64)) == "reference"
    assert backends.auto_choice(SPECS["gated_ffn"], Inputs(CUDA, F32)) == "reference"


def test_attention_head_size_48_on_a_gpu_runs_the_reference_with_a_warning(machine):
    spec = SPECS["gated_attention"]
    with pytest.warns(RuntimeWarning) as record:
        assert backends.resolve(spec, "auto", Inputs(CUDA, BF16, head_dim=48)) == "reference"
    (message,) = [str(w.message) for w in record]
    assert message.startswith("gated_attention: using the slow reference implementation on cuda")
    assert "backend 'triton': head size 48 not in 16, 32, 64, 128" in message
    # Once per (op, device type, reasons): the same reasons again stay quiet, others are reported.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve(spec, "auto", Inputs(CUDA, BF16, head_dim=48)) == "reference"
    with pytest.warns(RuntimeWarning, match="head size 40 not in"):
        assert backends.resolve(spec, "auto", Inputs(CUDA, BF16, head_dim=40)) == "reference"


def test_forced_backend_lists_every_reason(machine, monkeypatch):
    spec = SPECS["gelu_gate"]
    machine(kernels={k for k in ALL_KERNELS if k[1] == "cpu"})
    with pytest.raises(ValueError) as err:
        backends.resolve(spec, "cuda", Inputs(CPU, F64))
    assert str(err.value) == (
        "gelu_gate: backend 'cuda' cannot run these inputs: " + "; ".join(
            [_device_reason("cuda", "cpu"), _dtype_reason("x", "cuda"), NOT_BUILT_FOR_CUDA.format(op="gelu_gate")])
        + " (backend='reference' runs any input)")
    # Only the machine in the way: the error says the backend is not available here.
    with pytest.raises(cofi_kernels.BackendUnavailableError,
                       match="^gelu_gate: backend 'cuda' is not available: cofi_kernels._C was built without CUDA"):
        backends.resolve(spec, "cuda", Inputs(CUDA, F16))
    machine(interpret=True)
    with pytest.raises(cofi_kernels.BackendUnavailableError, match="backend 'triton' is not available: TRITON_INTERPRET"):
        backends.resolve(SPECS["gated_attention"], "triton", Inputs(CUDA, F16, head_dim=64))
    # Forced through the environment: the same error.
    monkeypatch.setenv("COFI_BACKEND", "triton")
    with pytest.raises(ValueError, match="backend 'triton' cannot run these inputs: head size 48 not in"):
        backends.resolve(SPECS["gated_attention"], "auto", Inputs(CPU, F32, head_dim=48))


def _no_compiled_kernel(*args):
    raise AssertionError("a compiled kernel ran although auto should have chosen the reference")


def _float64_case(op):
    if op == "gelu_gate":
        args = [t.detach().double() for t in gelu_gate_inputs((3, 24), "random")]
        return cofi_kernels.gelu_gate, reference.gelu_gate, args
    if op == "masked_layer_norm":
        args = [t.detach().double() for t in masked_layer_norm_inputs((3, 24), "random_with_zeros")]
        return cofi_kernels.masked_layer_norm, reference.masked_layer_norm, args
    d, i = 16, 40
    args = [torch.randn(3, d), torch.randn(i, d) / d**0.5, torch.randn(i), torch.randn(d, i) / i**0.5,
            torch.randn(d), torch.rand(i) + 0.1]
    return cofi_kernels.gated_ffn, reference.gated_ffn, [a.double() for a in args]


@needs_extension
@pytest.mark.parametrize("op", ["gelu_gate", "masked_layer_norm", "gated_ffn"])
def test_auto_runs_float64_on_the_reference(monkeypatch, op):
    monkeypatch.delenv("COFI_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_warned", set())
    assert backends.auto_choice(SPECS[op], Inputs(CPU, F32)) == "cpu"  # the kernel exists for float32
    monkeypatch.setattr(gelu_gate_op, "gelu_gate_fwd", _no_compiled_kernel)
    monkeypatch.setattr(mln_op, "_forward_out", _no_compiled_kernel)
    fn, ref, args = _float64_case(op)
    with pytest.warns(RuntimeWarning, match=f"{op}: using the slow reference .*backend 'cpu': x is float64"):
        out = fn(*args)
    assert out.dtype == F64 and not out.isnan().any() and out.abs().max() > 0.1
    assert torch.equal(out, ref(*args))


@needs_extension
def test_forced_cpu_with_float64_raises_listing_its_reason(monkeypatch):
    monkeypatch.delenv("COFI_BACKEND", raising=False)
    x, b, g = [t.detach().double() for t in gelu_gate_inputs((2, 8), "random")]
    with pytest.raises(ValueError, match="^gelu_gate: backend 'cpu' cannot run these inputs: x is float64 but the "
                                         "cpu kernel supports float32, float16 and bfloat16 \\(backend='reference'"):
        cofi_kernels.gelu_gate(x, b, g, backend="cpu")


@pytest.mark.skipif(not triton_support.INTERPRET, reason="needs TRITON_INTERPRET=1 in this process")
def test_forced_triton_with_head_size_48_raises_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("COFI_BACKEND", raising=False)
    q, k, v = (torch.randn(1, 2, 5, 48) for _ in range(3))
    with pytest.raises(ValueError, match="^gated_attention: backend 'triton' cannot run these inputs: "
                                         "head size 48 not in 16, 32, 64, 128 \\(backend='reference'"):
        cofi_kernels.gated_attention(q, k, v, backend="triton")
    out = cofi_kernels.gated_attention(q, k, v)  # auto on CPU tensors: the reference takes any head size
    torch.testing.assert_close(out, reference.gated_attention(q, k, v, None, None, 48**-0.5))


def test_resolve_with_reasons_traces_under_compile(monkeypatch):
    monkeypatch.delenv("COFI_BACKEND", raising=False)
    torch._dynamo.reset()
    x, b, g = [t.detach().double() for t in gelu_gate_inputs((4, 32), "random")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = torch.compile(cofi_kernels.gelu_gate, fullgraph=True)(x, b, g)
    torch.testing.assert_close(out, reference.gelu_gate(x, b, g), rtol=1e-12, atol=1e-12)


def test_a_spec_must_name_backends_it_has():
    ref = backends.reference_backend(reference.gelu_gate)
    with pytest.raises(ValueError, match="every name of auto_order \\('cpu',\\)"):
        backends.OpSpec("toy", backends=(ref,), auto_order=("cpu",))
    with pytest.raises(ValueError, match="need one reference"):
        backends.OpSpec("toy", backends=(gelu_gate_op.SPEC.backend("cpu"),))
