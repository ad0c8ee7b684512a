"""Comparison of a kernel against the float64 reference, by DESIGN.md §6.

float32: relative error (by norm) at most 1e-5, or 1e-4 for long reductions
(gradients that sum over rows; where such a sum cancels badly, at most 2x the
error of the plain float32 PyTorch composition).
float16/bfloat16: error against the float64 reference at most 2x the error of
the plain PyTorch reference run in the same dtype (or 4 roundings of the dtype
where that PyTorch run itself is not finite). NaN never passes.

"The error of the plain PyTorch composition" is a random draw of its rounding
noise; one run can be a lucky draw (on an ill-conditioned quantity it scatters
by 10x and more between inputs one ulp apart). Where the one run does not clear the kernel, the
bar is the worst of that run and MOVED_RUNS runs on inputs moved by one ulp of
the dtype (each against its own float64 reference), so it cannot be a lucky draw.
An exactly-zero reference has no relative error: its error is the norm of what
the kernel returns (absolute), and a low-precision kernel is never held tighter
there than float32's 1e-5.
"""

from __future__ import annotations

import math

import torch

FP32_TOL = 1e-5
FP32_TOL_REDUCTION = 1e-4
MOVED_RUNS = 16


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


def _moved_one_ulp(t, dtype, up):
    """t (values of `dtype`) with every nonzero element moved one ulp of `dtype` (up where `up`, else down).

    Exact zeros stay: a zero gate or a pruned dimension is a different case, not a nearby input.
    """
    if t is None or not t.is_floating_point():
        return t
    low = t.detach().to(dtype)
    inf = torch.full_like(low, float("inf"))
    moved = torch.where(up.to(low.device), torch.nextafter(low, inf), torch.nextafter(low, -inf))
    moved = torch.where(low == 0, low, moved)
    return moved.to(t.dtype).requires_grad_(t.requires_grad)


class _PlainError:
    """The error against float64 of the plain PyTorch composition (ref_fn in `dtype`), per output name.

    `first(what)` is the one run on the given inputs; `worst(what)` adds MOVED_RUNS runs on inputs
    moved by one ulp (computed once, on first use), each compared with ref_fn in float64 on the same
    moved inputs. Non-finite errors are left out of `worst` (they would make any error pass).
    """

    def __init__(self, ref_fn, inputs, grad_out, dtype, first, names):
        self.ref_fn, self.inputs, self.grad_out, self.dtype, self.names = ref_fn, inputs, grad_out, dtype, names
        self._first = first
        self._moved = None

    def first(self, what):
        return self._first[what]

    def _outputs(self, out, grads):
        return {"output": out, **{f"grad of {self.names[i]}": grads[i] for i in grads}}

    def worst(self, what):
        if self._moved is None:
            self._moved = []
            gen = torch.Generator().manual_seed(int(torch.randint(2**62, ())))  # per-test seed, own stream
            for _ in range(MOVED_RUNS):
                ups = [None if t is None else torch.rand(t.shape, generator=gen) < 0.5 for t in self.inputs]
                inputs = [_moved_one_ulp(t, self.dtype, u) for t, u in zip(self.inputs, ups)]
                grad_out = _moved_one_ulp(self.grad_out, self.dtype, torch.rand(self.grad_out.shape, generator=gen) < 0.5)
                plain = self._outputs(*run(self.ref_fn, inputs, grad_out, self.dtype))
                exact = self._outputs(*run(self.ref_fn, inputs, grad_out.double(), torch.float64))
                self._moved.append({k: rel_err(plain[k], exact[k]) for k in plain if torch.isfinite(plain[k]).all()})
        errs = [self._first[what]] + [m[what] for m in self._moved if what in m]
        return max([e for e in errs if math.isfinite(e)], default=0.0)  # inf or NaN never sets a bar


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
    exact = {what: ref for what, _, ref, _ in pairs}
    plain = _PlainError(ref_fn, inputs, grad_out, dtype, {k: rel_err(v, exact[k]) for k, v in base.items()}, names)
    if dtype == torch.float32:
        for what, got, ref, idx in pairs:
            assert torch.isfinite(got).all(), f"{what}: non-finite values"
            tol = FP32_TOL_REDUCTION if idx in reduction_args else FP32_TOL
            err = rel_err(got, ref)
            if idx in reduction_args and err > tol:
                # A sum that cancels (e.g. a few rows of random sign) is ill-conditioned:
                # then the plain float32 composition sets the bar, as for low precision;
                # the worst of 1 + MOVED_RUNS runs, as one run can be a lucky draw of its noise.
                tol = max(tol, 2 * plain.worst(what))
            assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"
        return
    # Low precision: the plain PyTorch composition in the same dtype sets the bar.
    for what, got, ref, _ in pairs:
        assert torch.isfinite(got).all(), f"{what}: non-finite values"
        err, bar = rel_err(got, ref), plain.first(what)
        if not torch.isfinite(base[what]).all():
            # PyTorch itself overflows in this dtype (e.g. a variance of 0 with a
            # tiny eps in float16); hold the kernel to a few roundings instead.
            bar = 4 * torch.finfo(dtype).eps
        elif err > 2 * bar + 1e-6:
            # One PyTorch run can be a lucky draw of its rounding noise: the worst of 1 + MOVED_RUNS.
            bar = plain.worst(what)
        limit = 2 * bar + 1e-6
        if ref.norm() == 0:
            # An exactly-zero reference (e.g. d/dq with a single key) is judged by its norm, and
            # PyTorch can be exactly 0 there by structure: never tighter than float32's bar.
            limit = max(limit, FP32_TOL)
        assert err <= limit, f"{what}: error {err:.3g} > {limit:.3g} (2 x PyTorch {dtype} error {bar:.3g})"
