"""The ``triton`` backend of varlen_attention against the reference (forward only, serving).

On a CPU-only machine the kernels run through the Triton interpreter
(``TRITON_INTERPRET=1``, set by tests/conftest.py), so the shapes are small; on a
GPU the same cases run compiled on ``cuda``, plus bigger shapes and float16.
Fresh random inputs each run; lengths include 1, the longest, and two one token
apart; float32: relative error (by norm) against the float64 reference at most
1e-5; bf16 / fp16: at most 2x that of the reference run in that dtype (DESIGN §6).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cofi_kernels import functional
from cofi_kernels.ops import backends, reference
from cofi_kernels.ops import varlen_attention as varlen_op
from cofi_kernels.ops.triton import support as _triton_support

from tests import REPO_ROOT
from tests.compare import FP32_TOL, rel_err
from tests.conftest import TRITON_DEVICE, needs_triton, requires_cuda

pytestmark = pytest.mark.skipif(not _triton_support.INSTALLED, reason="triton is not installed")



def _lengths(batch: int, longest: int) -> torch.Tensor:
    """Random lengths in [1, longest] with 1, ``longest`` and a pair one apart among them."""
    lengths = torch.randint(1, longest + 1, (batch,))
    lengths[0], lengths[1] = 1, longest
    if batch > 3:
        lengths[3] = lengths[2] - 1 if lengths[2] > 1 else 2
    return lengths[torch.randperm(batch)]  # the special lengths anywhere in the batch


def _cu(lengths: torch.Tensor, device) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device)


def _check(got, exact, plain, dtype):
    assert got.dtype == dtype and torch.isfinite(got).all()
    err = rel_err(got, exact)
    limit = FP32_TOL if dtype == torch.float32 else 2 * rel_err(plain, exact) + 1e-6
    assert err <= limit, f"relative error {err:.3g} > {limit:.3g}"


def _case(lengths, heads, head_dim, dtype, first_only, device, scale=None):
    cu = _cu(lengths, device)
    qkv = (torch.randn(int(lengths.sum()), 3 * heads * head_dim) * 1.5).to(device)
    s = head_dim**-0.5 if scale is None else scale
    cu_cpu = cu.cpu()
    exact = reference.varlen_attention(qkv.double().cpu(), cu_cpu, heads, head_dim, s, first_only)
    plain = reference.varlen_attention(qkv.to(dtype), cu, heads, head_dim, s, first_only)
    got = functional.varlen_attention(qkv.to(dtype), cu, heads, head_dim, scale=scale, first_only=first_only,
                                      backend="triton")
    assert got.shape == (len(lengths) if first_only else int(cu_cpu[-1]), heads * head_dim)
    assert got.device == qkv.device
    _check(got, exact, plain, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim", [(1, 64), (2, 32), (3, 64), (3, 32)])
@pytest.mark.parametrize("first_only", [False, True])
def test_triton_matches_the_reference(dtype, heads, head_dim, first_only):
    # Longest 37 > two 16-row tiles: sequences straddle row blocks and key blocks.
    _case(_lengths(5, 37), heads, head_dim, dtype, first_only, TRITON_DEVICE)


@needs_triton
@pytest.mark.parametrize("first_only", [False, True])
def test_odd_head_size_scale_and_a_single_sequence(first_only):
    # head size 8 < the 16-wide tile (masked loads), a non-default scale, one sequence alone.
    _case(torch.tensor([23]), 2, 8, torch.float32, first_only, TRITON_DEVICE, scale=0.3)
    _case(torch.tensor([1, 1, 1]), 1, 16, torch.float32, first_only, TRITON_DEVICE)


@needs_triton
def test_many_short_sequences_in_one_row_block():
    """Eight sequences of 1-3 tokens share 16-row blocks: each program loops over several sequences."""
    lengths = torch.randint(1, 4, (8,))
    _case(lengths, 2, 32, torch.float32, False, TRITON_DEVICE)


@needs_triton
def test_sequences_are_kept_apart():
    """Changing one sequence's tokens leaves the other sequences' outputs bit for bit."""
    cu = _cu(torch.tensor([5, 19, 3]), TRITON_DEVICE)
    qkv = torch.randn(27, 3 * 2 * 32, device=TRITON_DEVICE)
    out = functional.varlen_attention(qkv, cu, 2, 32, backend="triton")
    moved = qkv.clone()
    moved[5:24] = torch.randn(19, 3 * 2 * 32, device=TRITON_DEVICE)
    again = functional.varlen_attention(moved, cu, 2, 32, backend="triton")
    assert torch.equal(out[:5], again[:5]) and torch.equal(out[24:], again[24:])
    assert not torch.equal(out[5:24], again[5:24])


@needs_triton
def test_strided_rows_of_a_wider_projection():
    """qkv may be a column slice of a wider tensor (row stride > 3·H·D), as a fused projection gives."""
    heads, head_dim = 2, 16
    lengths = _lengths(4, 21)
    cu = _cu(lengths, TRITON_DEVICE)
    wide = torch.randn(int(lengths.sum()), 3 * heads * head_dim + 24, device=TRITON_DEVICE)
    qkv = wide[:, 8:8 + 3 * heads * head_dim]
    got = functional.varlen_attention(qkv, cu, heads, head_dim, backend="triton")
    want = reference.varlen_attention(qkv.double().cpu(), cu.cpu(), heads, head_dim, head_dim**-0.5)
    assert rel_err(got, want) <= FP32_TOL


def test_backend_choice_and_reasons():
    spec = varlen_op.SPEC
    assert "triton" in spec.names
    # auto: the C++ kernel on the CPU, Triton on CUDA; never the interpreter.
    assert [b.name for b in spec.auto_backends("cuda")] == ["triton"]
    assert backends.auto_choice(spec, backends.Inputs(torch.device("cpu"), torch.float32, 64)) != "triton"
    cuda = backends.Inputs(torch.device("cuda"), torch.bfloat16, 64)
    if _triton_support.INTERPRET:
        assert any("TRITON_INTERPRET" in r for r in backends.not_supported_reasons(spec, "triton", cuda))
    elif _triton_support.INSTALLED:
        assert backends.auto_choice(spec, cuda) == "triton"
    bad = backends.not_supported_reasons(spec, "triton", backends.Inputs(torch.device("cuda"), torch.float64, 512))
    assert any("float64" in r for r in bad) and any("head size 512" in r for r in bad)


@needs_triton
def test_forced_triton_states_its_reasons():
    qkv = torch.randn(6, 3 * 2 * 300, device=TRITON_DEVICE)
    cu = _cu(torch.tensor([2, 4]), TRITON_DEVICE)
    with pytest.raises(ValueError, match="head size 300 is not in 1..256"):
        functional.varlen_attention(qkv, cu, 2, 300, backend="triton")
    with pytest.raises(ValueError, match="forward only"):
        functional.varlen_attention(qkv[:, :192].clone().requires_grad_(), cu, 2, 32, backend="triton")


# ------------------------------------------------------------------------------------------ GPU


@requires_cuda
@pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="TRITON_INTERPRET=1 set: the kernels run on CPU tensors only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,head_dim", [(1, 64), (4, 64), (12, 64), (7, 32), (5, 128)])
@pytest.mark.parametrize("first_only", [False, True])
def test_cuda_bigger_shapes(dtype, heads, head_dim, first_only):
    # 24 sequences up to 300 tokens: many row and key blocks per sequence, boundaries inside blocks.
    _case(_lengths(24, 300), heads, head_dim, dtype, first_only, "cuda")


@requires_cuda
@pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="TRITON_INTERPRET=1 set: the kernels run on CPU tensors only")
def test_cuda_graph_capture_of_the_kernel():
    """The launch copies nothing to the host, so it can be captured and replayed on new values."""
    lengths = _lengths(8, 130)
    cu = _cu(lengths, "cuda")
    qkv = torch.randn(int(lengths.sum()), 3 * 3 * 64, device="cuda", dtype=torch.bfloat16)
    functional.varlen_attention(qkv, cu, 3, 64, backend="triton")  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = functional.varlen_attention(qkv, cu, 3, 64, backend="triton")
    qkv.copy_(torch.randn_like(qkv))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, functional.varlen_attention(qkv, cu, 3, 64, backend="triton"))


@pytest.mark.slow
def test_kernels_compile_for_gpus():
    """Both kernels compile for sm_80 / sm_90 with the tiles the launcher picks on a GPU (tests/triton_aot.py)."""
    code = (
        "import torch\n"
        "from tests import triton_aot\n"
        "from cofi_kernels.ops import varlen_attention as op\n"
        "from cofi_kernels.ops.triton import varlen_attention as k\n"
        "def run():\n"
        "    for dtype in (torch.bfloat16, torch.float16, torch.float32):\n"
        "        for d in (32, 64, 128):\n"
        "            qkv = torch.randn(41, 6 * d, dtype=dtype)\n"
        "            for first in (False, True):\n"
        "                op.varlen_attention_triton(qkv, torch.tensor([0, 5, 40, 41]), 2, d, d ** -0.5, first)\n"
        "print('\\n'.join(triton_aot.check(k, run)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for kernel in ("fwd", "first"):
        for cap in (80, 90):
            assert f"varlen_attention_{kernel}_kernel sm_{cap}" in res.stdout, res.stdout
