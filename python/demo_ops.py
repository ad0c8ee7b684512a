"""A short CPU demonstration of the fused ops, as a user would call them.

Runs gelu_gate and masked_layer_norm at BERT-base sizes with CoFi-style gates,
checks them against the reference, times them against the eager PyTorch
composition, and prints what was built (`python -m cofi_kernels.info`).

    python python/demo_ops.py
"""

from __future__ import annotations

import statistics
import time

import torch

import cofi_kernels
from cofi_kernels import info
from cofi_kernels.ops import reference


def median_ms(fns, repeats: int = 21) -> list[float]:
    """Median wall time of each function, run interleaved so that a noisy
    neighbour on a shared machine slows all of them alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [1e3 * statistics.median(ts) for ts in times]


def main() -> None:
    torch.manual_seed(0)
    rows, hidden, inner = 8 * 128, 768, 3072
    # CoFi gates: some FFN units and hidden dims pruned, the rest soft.
    int_gate = torch.rand(inner) * (torch.rand(inner) > 0.3)
    hidden_gate = torch.rand(hidden) * (torch.rand(hidden) > 0.1)
    layer_gate = torch.tensor(0.9)

    x_ffn = torch.randn(rows, inner, requires_grad=True)
    b_ffn = torch.randn(inner, requires_grad=True)
    x = torch.randn(rows, hidden, requires_grad=True)
    residual = torch.randn(rows, hidden, requires_grad=True)
    w, b = torch.ones(hidden, requires_grad=True), torch.zeros(hidden, requires_grad=True)

    cases = {
        "gelu_gate": (lambda f: f.gelu_gate(x_ffn, b_ffn, int_gate), (x_ffn, b_ffn)),
        "masked_layer_norm": (lambda f: f.masked_layer_norm(x, residual, w, b, layer_gate, hidden_gate),
                              (x, residual, w, b)),
    }
    print(f"{'op':<20} {'max |fused - reference|':>24} {'fused fwd+bwd (ms)':>20} {'eager (ms)':>12} {'speed-up':>9}")
    for name, (call, leaves) in cases.items():
        fused, ref = call(cofi_kernels), call(reference)
        err = (fused - ref).abs().max().item()
        grad = torch.randn_like(fused)

        def step(module, call=call, leaves=leaves, grad=grad):
            torch.autograd.grad(call(module), leaves, grad)

        t_fused, t_eager = median_ms([lambda: step(cofi_kernels), lambda: step(reference)])
        print(f"{name:<20} {err:>24.2e} {t_fused:>20.2f} {t_eager:>12.2f} {t_eager / t_fused:>8.2f}x")
    print()
    print(info.report())


if __name__ == "__main__":
    main()
