"""gated_ffn: the Triton kernels (through the interpreter on CPU) and the cpu
backend against the float64 reference; the registered ops (opcheck, compile);
argument errors; Triton availability."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import cofi_kernels
from cofi_kernels.ops import backends, reference
from cofi_kernels.ops.triton import support as _triton_support
from cofi_kernels.ops import gated_ffn as gated_ffn_op

from tests import REPO_ROOT
from tests.cases import gate_vector
from tests.compare import check_against_reference
from tests.conftest import requires_cuda

NAMES = ["x", "w_in", "b_in", "w_out", "b_out", "int_gate"]
# Weight, bias and gate gradients are sums over all rows.
REDUCTIONS = (1, 2, 3, 4, 5)

TRITON_ON_CPU = _triton_support.unavailable_reason(torch.device("cpu")) is None
requires_triton_cpu = pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton runs on CPU only with TRITON_INTERPRET=1")
requires_extension = pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")


def ffn_inputs(shape, width, gate_kind="random", device="cpu", requires_grad=True):
    """Fresh random x [..., D], w_in [I, D], b_in [I], w_out [D, I], b_out [D], int_gate [I] or None."""
    d = shape[-1]
    x = torch.randn(shape, device=device)
    w_in = torch.randn(width, d, device=device) * (2.0 / d**0.5)  # pre-activations of size ~2
    b_in = torch.randn(width, device=device) * 0.5
    w_out = torch.randn(d, width, device=device) / max(width, 1) ** 0.5
    b_out = torch.randn(d, device=device) * 0.5
    gate = gate_vector(gate_kind, width, device)
    args = [x, w_in, b_in, w_out, b_out, gate]
    return [t if t is None else t.requires_grad_(requires_grad) for t in args]


def _check(backend, shape, width, gate_kind, dtype, device="cpu"):
    inputs = ffn_inputs(shape, width, gate_kind, device)
    grad_out = torch.randn(shape, device=device)
    check_against_reference(
        lambda *a: cofi_kernels.gated_ffn(*a, backend=backend),
        reference.gated_ffn,
        inputs,
        dtype,
        grad_out,
        reduction_args=REDUCTIONS,
        names=NAMES,
    )


# (x shape, I, int_gate kind): I not a multiple of 16 (137, 1), I = 0, a
# multiple of 16; odd row counts, 3-D and 4-D x, D = 40 and 33.
CPU_CASES = [
    ((13, 40), 137, "random"),
    ((3, 5, 33), 1, "zeros_and_ones"),
    ((2, 7, 40), 0, "random"),
    ((2, 7, 40), 0, "none"),
    ((9, 33), 32, "none"),
    ((2, 3, 3, 40), 48, "all_zero"),
    ((35, 24), 137, "zeros_and_ones"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@requires_triton_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,width,gate_kind", CPU_CASES)
def test_triton_matches_reference(shape, width, gate_kind, dtype):
    _check("triton", shape, width, gate_kind, dtype)


@requires_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,width,gate_kind", CPU_CASES[:5])
def test_cpu_backend_matches_reference(shape, width, gate_kind, dtype):
    _check("cpu", shape, width, gate_kind, dtype)


@requires_triton_cpu
def test_triton_strided_x_and_float32_params():
    # x a transposed view; bf16 x with float32 biases and gate.
    x, w_in, b_in, w_out, b_out, gate = ffn_inputs((5, 3, 40), 50)
    x_t = x.detach().transpose(0, 1).requires_grad_()
    grad_out = torch.randn(3, 5, 40)
    check_against_reference(lambda *a: cofi_kernels.gated_ffn(*a, backend="triton"), reference.gated_ffn,
                            [x_t, w_in, b_in, w_out, b_out, gate], torch.float32, grad_out,
                            reduction_args=REDUCTIONS, names=NAMES)
    args = [t.detach().to(torch.bfloat16).requires_grad_() for t in (x, w_in, w_out)]
    params = [t.detach().clone().requires_grad_() for t in (b_in, b_out, gate)]
    out = cofi_kernels.gated_ffn(args[0], args[1], params[0], args[2], params[1], params[2], backend="triton")
    grads = torch.autograd.grad(out, args + params, torch.randn_like(out))
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3 + [torch.float32] * 3
    ref = reference.gated_ffn(*[t.detach().double() for t in (x, w_in, b_in, w_out, b_out, gate)])
    assert (out.double() - ref).norm() / ref.norm() < 2e-2


@requires_triton_cpu
@pytest.mark.parametrize("frozen", ["weights", "all_but_gate", "no_grad"])
def test_triton_partial_gradients(frozen):
    inputs = ffn_inputs((11, 40), 70, "random")
    if frozen == "weights":
        for k in (1, 2, 3, 4):
            inputs[k].requires_grad_(False)
    elif frozen == "all_but_gate":
        for k in range(5):
            inputs[k].requires_grad_(False)
    ref = reference.gated_ffn(*[t.detach().double() for t in inputs])
    if frozen == "no_grad":
        with torch.no_grad():
            out = cofi_kernels.gated_ffn(*inputs, backend="triton")
        assert not out.requires_grad
        assert (out.double() - ref).norm() / ref.norm() < 1e-5
        return
    check_against_reference(lambda *a: cofi_kernels.gated_ffn(*a, backend="triton"), reference.gated_ffn,
                            inputs, torch.float32, torch.randn(11, 40), reduction_args=REDUCTIONS, names=NAMES)


@requires_triton_cpu
def test_triton_backward_is_deterministic():
    inputs = ffn_inputs((45, 40), 70, "random")
    grad_out = torch.randn(45, 40)
    runs = [torch.autograd.grad(cofi_kernels.gated_ffn(*inputs, backend="triton"), inputs, grad_out)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@requires_triton_cpu
def test_empty_width_gives_bias_and_gradients():
    x, w_in, b_in, w_out, b_out, gate = ffn_inputs((2, 5, 40), 0, "random")
    out = cofi_kernels.gated_ffn(x, w_in, b_in, w_out, b_out, gate, backend="triton")
    assert torch.equal(out, b_out.detach().expand(2, 5, 40))
    grad_out = torch.randn(2, 5, 40)
    dx, dw_in, db_in, dw_out, db_out, dgate = torch.autograd.grad(out, [x, w_in, b_in, w_out, b_out, gate], grad_out)
    assert torch.equal(dx, torch.zeros_like(x))
    assert dw_in.shape == (0, 40) and db_in.shape == (0,) and dw_out.shape == (40, 0) and dgate.shape == (0,)
    torch.testing.assert_close(db_out, grad_out.sum((0, 1)))


# ------------------------------------------------------------------ registration

@pytest.mark.skipif(not TRITON_ON_CPU and not torch.cuda.is_available(), reason="no device for the Triton kernels")
@pytest.mark.parametrize("gate_kind", ["random", "none"])
@pytest.mark.parametrize("width", [37, 0])
def test_opcheck(gate_kind, width):
    device = "cpu" if TRITON_ON_CPU else "cuda"
    args = ffn_inputs((2, 5, 24), width, gate_kind, device)
    torch.library.opcheck(torch.ops.cofi.gated_ffn_fwd.default, (*args, True))
    detached = [None if t is None else t.detach() for t in args]
    torch.library.opcheck(torch.ops.cofi.gated_ffn_fwd.default, (*detached, False))
    x, w_in, b_in, w_out, b_out, gate = detached
    _, pre = torch.ops.cofi.gated_ffn_fwd(*detached, True)
    grad = torch.randn_like(x)
    for mask in ([True] * 6, [False, True, False, True, False, True], [True, False, False, False, True, False]):
        torch.library.opcheck(torch.ops.cofi.gated_ffn_bwd.default, (grad, x, w_in, w_out, gate, pre, mask))


@requires_triton_cpu
def test_compile_fullgraph():
    torch._dynamo.reset()
    inputs = ffn_inputs((2, 5, 32), 40, "random")

    def block(x, w_in, b_in, w_out, b_out, gate):
        return cofi_kernels.gated_ffn(x, w_in, b_in, w_out, b_out, gate, backend="triton")

    compiled = torch.compile(block, fullgraph=True)
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    ref = reference.gated_ffn(*inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ GPU compile

_AOT_SCRIPT = """
import torch
import cofi_kernels
from cofi_kernels.ops.triton import gated_ffn as K
from tests.triton_aot import SHARED_LIMIT, compile_call

m, i, d, dtype = 300, 137, 40, torch.bfloat16
x, w = torch.empty(m, d, dtype=dtype), torch.empty(i, d, dtype=dtype)
vec, h, pre, sums = torch.empty(i), torch.empty(m, i, dtype=dtype), torch.empty(m, i), torch.empty(10, i)
flags = dict(UPCAST=False, IEEE=False, ROUND_BF16=False)
launches = [
    (K.ffn_up_fwd_kernel, (x, w, vec, vec, h, pre, m, i, d, 512, d, 1, d, 1, i),
     dict(HAS_GATE=True, STORE_PRE=True, **flags)),
    (K.ffn_up_bwd_kernel, (x, w, pre, vec, h, h, sums, sums, m, i, d, 512, d, 1, i, 1, i),
     dict(HAS_GATE=True, STORE_DPRE=True, STORE_H=True, GATE_SUMS=True, BIAS_SUMS=True, **flags)),
]
for tuner, args, kw in launches:
    cfg = tuner.configs[0]
    kwargs = dict(kw, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    shared = compile_call(tuner.fn, args, kwargs, 90).metadata.shared
    assert shared <= SHARED_LIMIT[90], (tuner.fn.__name__, shared)
    print(tuner.fn.__name__, "sm_90 ok", shared)
"""


@pytest.mark.slow
@pytest.mark.skipif(not _triton_support.INSTALLED, reason="triton not installed")
def test_kernels_compile_for_sm90():
    # The interpreter accepts code the compiler rejects (e.g. non-constexpr globals):
    # compile both kernels with their first GPU config for sm_90, without a GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = REPO_ROOT
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, cwd=root, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "ffn_up_fwd_kernel sm_90 ok" in result.stdout and "ffn_up_bwd_kernel sm_90 ok" in result.stdout


# ------------------------------------------------------------------ backends

@requires_extension
def test_auto_picks_cpu_on_cpu(monkeypatch):
    monkeypatch.delenv("COFI_BACKEND", raising=False)
    assert backends.resolve(gated_ffn_op.SPEC, "auto", torch.device("cpu")) == "cpu"
    assert backends.auto_choice(gated_ffn_op.SPEC, torch.device("cpu")) == "cpu"


def test_triton_on_cpu_without_interpreter_is_an_error():
    script = (
        "import os, torch\n"
        "assert 'TRITON_INTERPRET' not in os.environ\n"
        "import cofi_kernels\n"
        "from tests.ops.test_gated_ffn import ffn_inputs\n"
        "args = ffn_inputs((3, 16), 20)\n"
        "try:\n"
        "    cofi_kernels.gated_ffn(*args, backend='triton')\n"
        "except cofi_kernels.BackendUnavailableError as e:\n"
        "    assert 'gated_ffn' in str(e) and 'TRITON_INTERPRET=1' in str(e), str(e)\n"
        "    print('raised as expected')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COFI_BACKEND")}
    env["COFI_TEST_NO_INTERPRET"] = "1"
    root = REPO_ROOT
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env,
                            timeout=300)
    assert result.returncode == 0 and "raised as expected" in result.stdout, (result.returncode, result.stderr[-2000:])


# ------------------------------------------------------------------ errors

ERROR_BACKENDS = ["reference"] + (["cpu"] if cofi_kernels.extension_available() else []) + (
    ["triton"] if TRITON_ON_CPU else [])


@pytest.mark.parametrize("backend", ERROR_BACKENDS)
@pytest.mark.parametrize(
    "index,value,match",
    [
        (0, torch.randint(0, 3, (4, 16)), "x must have dtype"),
        (0, torch.tensor(1.0), "x must have at least one dimension"),
        (1, torch.randn(20, 15), "w_in must have shape \\[I, D\\] with D = 16"),
        (1, torch.randn(20), "w_in must have shape"),
        (1, torch.randn(20, 16, dtype=torch.float16), "w_in must have the dtype of x"),
        (2, torch.randn(19), "b_in must have shape \\[20\\]"),
        (2, torch.randn(20, dtype=torch.bfloat16), "b_in must have dtype"),
        (3, torch.randn(16, 19), "w_out must have shape \\[D, I\\] = \\[16, 20\\]"),
        (3, torch.randn(20, 16), "w_out must have shape"),
        (4, torch.randn(15), "b_out must have shape \\[16\\]"),
        (5, torch.rand(3), "int_gate must have shape \\[20\\]"),
        (5, torch.rand(20, dtype=torch.float16), "int_gate must have dtype"),
        (5, [1.0] * 20, "int_gate must be a torch.Tensor"),
    ],
)
def test_rejects_bad_arguments(backend, index, value, match):
    args = [t.detach() for t in ffn_inputs((4, 16), 20)]
    args[index] = value
    error = TypeError if "torch.Tensor" in match else ValueError
    with pytest.raises(error, match=f"gated_ffn: {match}"):
        cofi_kernels.gated_ffn(*args, backend=backend)


@pytest.mark.parametrize("backend", [b for b in ERROR_BACKENDS if b != "reference"])
def test_rejects_float64_outside_reference(backend):
    args = [t.detach().double() for t in ffn_inputs((4, 16), 20)]
    with pytest.raises(ValueError, match=f"gated_ffn: backend '{backend}' cannot run these inputs: x is float64 but the {backend} kernel "
                                         "supports float32, float16 and bfloat16"):
        cofi_kernels.gated_ffn(*args, backend=backend)


def test_backend_it_does_not_have():
    args = [t.detach() for t in ffn_inputs((4, 16), 20)]
    with pytest.raises(ValueError, match="gated_ffn has no 'cuda' backend"):
        cofi_kernels.gated_ffn(*args, backend="cuda")


# ------------------------------------------------------------------ GPU

GPU_CASES = [
    ((4, 100, 256), 1000, "random"),
    ((3, 77, 200), 137, "zeros_and_ones"),
    ((515, 256), 512, "none"),
    ((2, 64, 128), 1, "all_zero"),
    ((2, 64, 128), 0, "random"),
]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,width,gate_kind", GPU_CASES)
def test_triton_matches_reference_cuda(shape, width, gate_kind, dtype):
    _check("triton", shape, width, gate_kind, dtype, device="cuda")


@requires_cuda
def test_auto_picks_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("COFI_BACKEND", raising=False)
    if _triton_support.unavailable_reason(torch.device("cuda")) is not None:
        pytest.skip(_triton_support.unavailable_reason(torch.device("cuda")))
    assert backends.resolve(gated_ffn_op.SPEC, "auto", torch.device("cuda")) == "triton"


@requires_cuda
def test_triton_backward_is_deterministic_cuda():
    inputs = ffn_inputs((8, 128, 256), 1000, "random", "cuda")
    inputs = [t.detach().bfloat16().requires_grad_() for t in inputs]
    grad_out = torch.randn(8, 128, 256, device="cuda", dtype=torch.bfloat16)
    runs = [torch.autograd.grad(cofi_kernels.gated_ffn(*inputs, backend="triton"), inputs, grad_out)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
