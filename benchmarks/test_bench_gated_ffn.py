"""Microbenchmark: gated_ffn (Triton, fused epilogues) against cuBLAS + eager epilogue. GPU only.

BERT-base FFN sizes: rows = 32·128, D = 768, I = 3072, bfloat16. Variants:
``cofi triton`` = ``cofi_kernels.gated_ffn(backend="triton")``; ``eager``
(the baseline) = ``F.linear`` → ``F.gelu`` → ``· gate`` → ``F.linear`` (cuBLAS
GEMMs with their bias epilogues, PyTorch elementwise kernels). Each timed
round replays one CUDA graph of CALLS steps (so Python and launch overhead do
not hide the kernels; plain launches if capture fails, noted in the variant
name), cycling over SETS input sets (x and grad_out; the weights are shared,
as in a model). TFLOP/s count the GEMM work (forward 2 GEMMs of 2·rows·D·I
flops, backward 4 more) and are set against the peak measured in the same
run: a plain bf16 ``torch.matmul`` of the up-projection's size, replayed the
same way. Summary: benchmarks/results/gated_ffn_cuda_<device>.md.

    python -m pytest benchmarks/test_bench_gated_ffn.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cofi_kernels

ROWS, D, I = 32 * 128, 768, 3072
DTYPE = torch.bfloat16
SETS = 4  # x + grad_out: 12.6 MB a set
CALLS = 8  # steps per graph replay (one timed round)
ROUNDS = 50

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _weights():
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda") * scale).to(DTYPE).requires_grad_()

    w_in, b_in = rnd(I, D, scale=D**-0.5), rnd(I, scale=0.5)
    w_out, b_out = rnd(D, I, scale=I**-0.5), rnd(D, scale=0.5)
    gate = (torch.rand(I, device="cuda") + 0.05).to(DTYPE).requires_grad_()
    return w_in, b_in, w_out, b_out, gate


@pytest.fixture(scope="module")
def input_sets():
    return [(torch.randn(ROWS, D, device="cuda", dtype=DTYPE, requires_grad=True),
             torch.randn(ROWS, D, device="cuda", dtype=DTYPE)) for _ in range(SETS)]


def _eager(x, w_in, b_in, w_out, b_out, gate):
    return F.linear(F.gelu(F.linear(x, w_in, b_in)) * gate, w_out, b_out)


def _fused(x, w_in, b_in, w_out, b_out, gate):
    return cofi_kernels.gated_ffn(x, w_in, b_in, w_out, b_out, gate, backend="triton")


VARIANTS = {"cofi triton": _fused, "eager": _eager}


def _replayed(calls):
    """(function running the CALLS callables once each and syncing, timing mode); a CUDA graph if capture works."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compiles and autotunes the Triton kernels outside the capture
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - fall back to plain launches, and say so in the results
        torch.cuda.synchronize()

        def plain():
            for call in calls:
                call()
            torch.cuda.synchronize()

        return plain, f"plain launches ({type(exc).__name__})"

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    return replay, "CUDA graph"


@pytest.fixture(scope="module")
def matmul_peak_tflops():
    """bf16 torch.matmul [ROWS, D] @ [D, I], replayed as the variants are; median TFLOP/s."""
    a = [torch.randn(ROWS, D, device="cuda", dtype=DTYPE) for _ in range(SETS)]
    b = torch.randn(D, I, device="cuda", dtype=DTYPE)
    run, _ = _replayed([lambda a=a[k % SETS]: torch.matmul(a, b) for k in range(CALLS)])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(ROUNDS):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return CALLS * 2 * ROWS * D * I / times[len(times) // 2] / 1e12


@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gated_ffn(benchmark, matmul_peak_tflops, input_sets, variant, pass_):
    fn = VARIANTS[variant]
    weights = _weights()
    calls = []
    for k in range(CALLS):
        x, grad_out = input_sets[k % SETS]
        if pass_ == "forward":
            def call(x=x):
                with torch.no_grad():
                    fn(x, *weights)
        else:
            def call(x=x, grad_out=grad_out):
                torch.autograd.grad(fn(x, *weights), (x, *weights), grad_out)
        calls.append(call)
    run, mode = _replayed(calls)
    flops = CALLS * (4 if pass_ == "forward" else 12) * ROWS * D * I
    benchmark.group = (f"gated_ffn {pass_}, rows={ROWS} D={D} I={I} bf16, {CALLS} calls per round; "
                       f"peak = same-size bf16 matmul {matmul_peak_tflops:.0f} TFLOP/s")
    name = variant if mode == "CUDA graph" else f"{variant}, {mode}"
    benchmark.extra_info.update(
        suite="gated_ffn", device="cuda", variant=name, baseline=variant == "eager",
        flops=flops, peak_tflops=matmul_peak_tflops, calls_per_round=CALLS, timing=mode,
    )
    benchmark.pedantic(run, warmup_rounds=3, rounds=ROUNDS, iterations=1)

