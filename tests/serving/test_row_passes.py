"""The CPU serving engine's row passes against their reference, in every instruction-set build.

cofi::packed_embeddings (gather + sum + LayerNorm of the embedding layer),
cofi::bias_activation_ and cofi::bias_residual_layer_norm_ (the pruned layer's
GEMM epilogues, also run inside cofi::pruned_layer). Each pass is built for
AVX2 and, on top, for AVX-512 (csrc/cpu/row_kernels.h) and chosen at run time
by ATen's CPU capability; ``ATEN_CPU_CAPABILITY=avx2`` narrows the choice, so
one AVX-512 machine checks both builds: the comparisons run once in this
process and once in a child process per other build. Fresh random inputs,
widths on and off the vector size (1, 15, 16, 17, 330, 757), DESIGN §6 tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cofi_kernels
from cofi_kernels import functional
from cofi_kernels.ops import pruned_layer as layer_op
from cofi_kernels.ops import reference
from cofi_kernels.ops.packed_embeddings import serving_cpu_isa

from tests.serving.test_serving_ops import DTYPES, _check

pytestmark = pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")

WIDTHS = [1, 15, 16, 17, 330, 757]
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _embedding_case(d: int, dtype):
    rows, vocab, max_pos, n_types = 41, 50, 64, 2
    tables = [torch.randn(vocab, d), torch.randn(max_pos, d) * 0.5, torch.randn(n_types, d) * 0.5,
              1 + 0.1 * torch.randn(d), 0.1 * torch.randn(d)]
    ids = torch.randint(0, vocab, (rows,))
    ids[0], ids[1] = 0, vocab - 1  # the tables' first and last rows
    positions = torch.randint(0, max_pos, (rows,))
    types = torch.randint(0, n_types, (rows,))
    return (ids, positions, types), tables


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", WIDTHS[1:])  # LayerNorm over one dim is 0/0-free but degenerate
def test_packed_embeddings_match_reference(dtype, d):
    idx, tables = _embedding_case(d, dtype)
    exact = reference.packed_embeddings(*idx, *[t.double() for t in tables], 1e-12)
    plain = reference.packed_embeddings(*idx, *[t.to(dtype) for t in tables], 1e-12)
    got = functional.packed_embeddings(*idx, *[t.to(dtype) for t in tables], eps=1e-12, backend="cpu")
    _check(got, exact, plain, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_bias_activation_matches_reference(dtype, d, activation):
    y, bias = torch.randn(29, d) * 2, torch.randn(d)
    exact = ACTIVATIONS[activation](y.double() + bias.double())
    plain = ACTIVATIONS[activation](y.to(dtype) + bias.to(dtype))
    got = y.to(dtype, copy=True)
    layer_op.bias_activation_(got, bias.to(dtype), activation)
    _check(got, exact, plain, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", WIDTHS[1:])
def test_bias_residual_layer_norm_matches_reference(dtype, d):
    y, residual = torch.randn(29, d), torch.randn(29, d) * 3 + 1  # a mean far from 0
    bias, w, b = torch.randn(d), 1 + 0.1 * torch.randn(d), 0.1 * torch.randn(d)

    def ref(dt):
        return F.layer_norm(y.to(dt) + bias.to(dt) + residual.to(dt), (d,), w.to(dt), b.to(dt), 1e-12)

    exact, plain = ref(torch.float64), ref(dtype)
    got = y.to(dtype, copy=True)
    layer_op.bias_residual_layer_norm_(got, residual.to(dtype), bias.to(dtype), w.to(dtype), b.to(dtype), 1e-12)
    _check(got, exact, plain, dtype)


def test_opcheck_row_passes():
    y, r, v = torch.randn(6, 20), torch.randn(6, 20), torch.randn(20)
    torch.library.opcheck(torch.ops.cofi.bias_activation_.default, (y.clone(), v, 0))
    torch.library.opcheck(torch.ops.cofi.bias_residual_layer_norm_.default, (y.clone(), r, v, v.abs() + 0.5, v, 1e-5))
    idx, tables = _embedding_case(20, torch.float32)
    torch.library.opcheck(torch.ops.cofi.packed_embeddings.default, (*idx, *tables, 1e-12))


def test_row_passes_refuse_bad_input():
    idx, tables = _embedding_case(8, torch.float32)
    ids, positions, types = idx
    bad_ids = ids.clone()
    bad_ids[5] = 50
    with pytest.raises(RuntimeError, match=r"ids\[5\] = 50 is outside word's 50 rows"):
        torch.ops.cofi.packed_embeddings(bad_ids, positions, types, *tables, 1e-12)
    with pytest.raises(RuntimeError, match="positions must be a 1-d int64"):
        torch.ops.cofi.packed_embeddings(ids, positions[:-1], types, *tables, 1e-12)
    with pytest.raises(RuntimeError, match="type_table must be a 2-d"):
        torch.ops.cofi.packed_embeddings(ids, positions, types, tables[0], tables[1], tables[2][:, :4], *tables[3:], 1e-12)
    with pytest.raises(ValueError, match="packed_embeddings: types must be a 1-d int64"):
        functional.packed_embeddings(ids, positions, types.int(), *tables, eps=1e-12)
    y = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"cofi::bias_activation_: bias must have shape \[8\]"):
        layer_op.bias_activation_(y, torch.randn(7), "gelu")
    with pytest.raises(RuntimeError, match="cofi::bias_activation_: y must be a contiguous 2-d"):
        layer_op.bias_activation_(y.t(), torch.randn(4), "gelu")
    with pytest.raises(RuntimeError, match=r"cofi::bias_residual_layer_norm_: residual must be a Float CPU tensor \(as y\)"):
        layer_op.bias_residual_layer_norm_(y, y.double(), *(torch.randn(8),) * 3, 1e-5)


def test_engine_embeddings_equal_the_module_forward():
    from cofi_kernels.models.shapes import shaped_model

    model = shaped_model([2, None], [None, 24], 40, num_labels=3, head_dim=16, vocab_size=90,
                         generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    emb = model.embeddings
    ids, types, pos = torch.randint(0, 90, (33,)), torch.randint(0, 2, (33,)), torch.randint(0, 30, (33,))
    with torch.no_grad():
        assert torch.allclose(emb.forward_packed(ids, types, pos), emb(ids, types, pos), rtol=1e-5, atol=1e-5)


def _builds() -> list[str]:
    """Every build of the row passes this CPU can run, widest first."""
    isa = serving_cpu_isa()
    return ["avx512", "avx2"] if isa == "avx512" else [isa]


@pytest.mark.parametrize("build", ["avx512", "avx2"])
def test_every_build_is_checked(build):
    """This module's comparisons in a child process narrowed to ``build``: each build of the
    passes meets the reference, not only the one this process happens to pick."""
    if build not in _builds():
        pytest.skip(f"this CPU runs the {serving_cpu_isa()} build only, not {build}")
    if build == serving_cpu_isa():
        assert os.environ.get("ATEN_CPU_CAPABILITY", "") in ("", build)  # the tests above ran it here
        return
    env = dict(os.environ, ATEN_CPU_CAPABILITY=build)
    code = ("import sys, pytest, torch, cofi_kernels; "
            "from cofi_kernels.ops.packed_embeddings import serving_cpu_isa; "
            f"assert serving_cpu_isa() == {build!r}, serving_cpu_isa(); "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'not every_build', "
            f"{os.path.abspath(__file__)!r}, 'tests/serving/test_engine.py']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
