"""Microbenchmarks: the CPU serving engine's row passes against eager PyTorch's forward.

The passes (csrc/cpu/row_kernels.h): the FFN epilogue ``act(y + b)``, the
sublayer epilogue ``LN(y + b + r)`` (both in place on a GEMM's output inside
cofi::pruned_layer) and the packed embedding layer ``LN(word[i] + pos[p] +
type[t])``. Baselines: the eager compositions the reference forward runs
(``F.gelu(y + b)``, ``F.layer_norm(y + b + r)``, three ``F.embedding`` + two adds +
``F.layer_norm``). Shapes: the engine's own (demo model 4096 rows at hidden 330 /
FFN 276, s95 1024 rows at hidden 757 / FFN 230) and BERT-base's 1024 x 3072 / 768.

Each pass exists in an AVX2 build and an AVX-512 build chosen at run time like
ATen's kernels; run once as is and once with ``ATEN_CPU_CAPABILITY=avx2`` (which
narrows eager's kernels too: the AVX2-only CPU case on an AVX-512 machine):

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest benchmarks/test_bench_serving_rows.py
    ATEN_CPU_CAPABILITY=avx2 OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest benchmarks/test_bench_serving_rows.py

The summary lands in benchmarks/results/serving_rows_<isa>_cpu_<cpu>.md.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cofi_kernels
from cofi_kernels import functional
from cofi_kernels.ops import pruned_layer as layer_op
from cofi_kernels.ops import reference
from cofi_kernels.ops.packed_embeddings import serving_cpu_isa

pytestmark = pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")

# (rows, width) per pass: where the engine meets it.
SHAPES = {
    "bias_gelu": [(4096, 276), (1024, 230), (1024, 3072)],
    "bias_residual_layer_norm": [(4096, 330), (1024, 757), (1024, 768)],
    "embeddings": [(4096, 330), (1024, 757)],
}
DTYPES = [torch.float32, torch.bfloat16]


def _callables(op: str, rows: int, d: int, dtype):
    """(fused, eager, reset): the two variants, and what restores the inputs the fused pass
    overwrites (run before every round, untimed: a pass applied to its own output again and
    again would time denormals, not the pass)."""
    g = torch.Generator().manual_seed(rows * 7919 + d)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    if op in ("bias_gelu", "bias_residual_layer_norm"):
        y0, b = rand(rows, d), rand(d)
        y = y0.clone()

        def reset() -> None:  # pytest-benchmark reads a setup's return value as arguments
            y.copy_(y0)

        if op == "bias_gelu":
            return (lambda: layer_op.bias_activation_(y, b, "gelu")), (lambda: F.gelu(y + b)), reset
        r, w, beta = rand(rows, d), rand(d), rand(d)
        return ((lambda: layer_op.bias_residual_layer_norm_(y, r, b, w, beta, 1e-12)),
                (lambda: F.layer_norm(y + b + r, (d,), w, beta, 1e-12)), reset)
    tables = (rand(30522, d), rand(512, d), rand(2, d), rand(d), rand(d))
    ids, pos, types = (torch.randint(0, n, (rows,), generator=g) for n in (30522, 128, 2))
    return ((lambda: functional.packed_embeddings(ids, pos, types, *tables, eps=1e-12, backend="cpu")),
            (lambda: reference.packed_embeddings(ids, pos, types, *tables, 1e-12)), lambda: None)


CASES = [(op, rows, d, dtype) for op, shapes in SHAPES.items() for rows, d in shapes for dtype in DTYPES]


@pytest.mark.parametrize("variant", ["eager", "fused"])
@pytest.mark.parametrize("op,rows,d,dtype", CASES,
                         ids=[f"{op}-{r}x{d}-{str(t).removeprefix('torch.')}" for op, r, d, t in CASES])
def test_serving_row_pass(benchmark, op, rows, d, dtype, variant):
    fused, eager, reset = _callables(op, rows, d, dtype)
    isa = serving_cpu_isa()
    benchmark.group = f"{op} {rows}x{d} {str(dtype).removeprefix('torch.')} ({isa} build, ATen {torch.backends.cpu.get_cpu_capability()})"
    benchmark.extra_info.update(suite=f"serving_rows_{isa}", device="cpu", variant=variant)
    fn = fused if variant == "fused" else eager
    with torch.inference_mode():
        benchmark.pedantic(fn, setup=reset, warmup_rounds=3, rounds=40, iterations=1)
