"""Comparison of a kernel against the float64 reference, by DESIGN.md §6.

float32: relative error (by norm) at most 1e-5, or 1e-4 for long reductions
(gradients that sum over rows; where such a sum cancels badly, at most 2x the
error of the plain float32 PyTorch composition).
float16/bfloat16: error against the float64 reference at most 2x the error of
the plain PyTorch reference run in the same dtype (or 4 roundings of the dtype
where that PyTorch run itself is not finite). NaN never passes.
"""

from __future__ import annotations

import torch

FP32_TOL = 1e-5
FP32_TOL_REDUCTION = 1e-4


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    denom = ref.norm().item()
    diff = (got - ref).norm().item()
    return diff / denom if denom > 0 else diff


def run(fn, inputs: list[torch.Tensor | None], grad_out: torch.Tensor | None = None, dtype=None):
    """fn(*inputs) with fresh leaves (cast to dtype where floating); returns (out, grads by input index)."""
    leaves = []
    for t in inputs:
        if t is None:
            leaves.append(None)
            continue
        leaf = t.detach().clone()
        if dtype is not None and leaf.is_floating_point():
            leaf = leaf.to(dtype)
        leaf.requires_grad_(t.requires_grad)
        leaves.append(leaf)
    out = fn(*leaves)
    wrt = [(i, t) for i, t in enumerate(leaves) if t is not None and t.requires_grad]
    grads = {}
    if wrt:
        g = grad_out.to(out.dtype) if grad_out is not None else torch.ones_like(out)
        got = torch.autograd.grad(out, [t for _, t in wrt], g, allow_unused=True)
        grads = {i: (gi if gi is not None else torch.zeros_like(t)) for (i, t), gi in zip(wrt, got)}
    return out.detach(), grads


def _rounded(t, dtype):
    if t is None:
        return None
    return t.detach().to(dtype).to(t.dtype).requires_grad_(t.requires_grad)


def check_against_reference(kernel_fn, ref_fn, inputs, dtype, grad_out, *, reduction_args=(), names=None):
    """Outputs and every gradient of kernel_fn in `dtype` against ref_fn in float64.

    reduction_args: indices of inputs whose gradients are sums over rows (long reductions).
    """
    names = names or [f"input {i}" for i in range(len(inputs))]
    # All three runs see the same values: the inputs rounded to `dtype`.
    inputs = [_rounded(t, dtype) for t in inputs]
    grad_out = grad_out.to(dtype).to(grad_out.dtype)
    out, grads = run(kernel_fn, inputs, grad_out, dtype)
    ref_out, ref_grads = run(ref_fn, inputs, grad_out.double(), torch.float64)
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    pairs = [("output", out, ref_out, None)] + [
        (f"grad of {names[i]}", grads[i], ref_grads[i], i) for i in ref_grads
    ]
    base_out, base_grads = run(ref_fn, inputs, grad_out, dtype)
    base = {"output": base_out, **{f"grad of {names[i]}": base_grads[i] for i in base_grads}}
    if dtype == torch.float32:
        for what, got, ref, idx in pairs:
            assert torch.isfinite(got).all(), f"{what}: non-finite values"
            tol = FP32_TOL_REDUCTION if idx in reduction_args else FP32_TOL
            err = rel_err(got, ref)
            if idx in reduction_args and err > tol:
                # A sum that cancels (e.g. a few rows of random sign) is ill-conditioned:
                # then the plain float32 composition sets the bar, as for low precision.
                tol = max(tol, 2 * rel_err(base[what], ref))
            assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"
        return
    # Low precision: the plain PyTorch composition in the same dtype sets the bar.
    for what, got, ref, _ in pairs:
        assert torch.isfinite(got).all(), f"{what}: non-finite values"
        err, bar = rel_err(got, ref), rel_err(base[what], ref)
        if not torch.isfinite(base[what]).all():
            # PyTorch itself overflows in this dtype (e.g. a variance of 0 with a
            # tiny eps in float16); hold the kernel to a few roundings instead.
            bar = 4 * torch.finfo(dtype).eps
        assert err <= 2 * bar + 1e-6, f"{what}: error {err:.3g} > 2 x PyTorch {dtype} error {bar:.3g}"
