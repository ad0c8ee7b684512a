"""Compile the Triton kernels an op launches for a GPU target, without a GPU.

The interpreter, which runs the kernels on CPU-only machines, accepts code
the compiler rejects (globals that are not constexpr, type mismatches in
branches) and knows nothing of shared memory. This records the launches a
launcher makes (kernel, arguments, constexprs, options) with the kernels
swapped for recorders, then compiles each one with ``triton.compile`` for
sm_80 and sm_90 and checks its shared memory against the target's limit.

Must run in a process where ``TRITON_INTERPRET`` is unset, so that the
launchers pick their GPU tile sizes: ``python -m tests.triton_aot``.
"""

from __future__ import annotations

import os
import sys

import torch

# Largest dynamic shared memory per block (bytes).
SHARED_LIMIT = {80: 166912, 90: 232448}

_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
    torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records instead of launching."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type launch argument {value!r}")


def compile_call(kernel, args: tuple, kwargs: dict, capability: int):
    """triton.compile of one recorded launch for sm_<capability>; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    option_names = {"num_warps", "num_stages", "num_ctas", "maxnreg"}
    options = {k: v for k, v in kwargs.items() if k in option_names}
    constexprs = {k: v for k, v in kwargs.items() if k not in option_names}
    signature = {}
    for name, value in zip(kernel.arg_names, args):
        signature[name] = _arg_type(value)
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


def record(module, run) -> dict[str, Recorder]:
    """Swaps every kernel of ``module`` for a Recorder while ``run()`` calls the launchers."""
    import triton

    kernels = {n: k for n, k in vars(module).items() if isinstance(k, triton.runtime.jit.JITFunction)}
    recorders = {n: Recorder(k) for n, k in kernels.items()}
    for name, rec in recorders.items():
        setattr(module, name, rec)
    try:
        run()
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    return recorders


def check(module, run, capabilities=(80, 90)) -> list[str]:
    """Compiles every launch ``run()`` makes; returns one line per compiled kernel; raises on a problem."""
    lines = []
    for name, rec in record(module, run).items():
        seen = set()
        for args, kwargs in rec.calls:
            key = (tuple(_arg_type(a) for a in args), tuple(sorted(kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            for cap in capabilities:
                compiled = compile_call(rec.kernel, args, kwargs, cap)
                shared = compiled.metadata.shared
                what = f"{name} sm_{cap} {dict(sorted(kwargs.items()))} {key[0][:3]}"
                if shared > SHARED_LIMIT[cap]:
                    raise AssertionError(f"{what}: needs {shared} B of shared memory, sm_{cap} has {SHARED_LIMIT[cap]}")
                lines.append(f"{what}: ok, {shared} B shared")
    return lines


def gated_attention_launches(dtypes=(torch.bfloat16, torch.float32), head_dims=(64, 128)):
    """Calls the gated_attention launchers (forward and backward) with CPU tensors of each case."""
    import cofi_kernels  # noqa: F401  (registers the ops)

    def run():
        for dtype in dtypes:
            for d in head_dims:
                q, k, v = (torch.randn(2, 3, 40, d, dtype=dtype) for _ in range(3))
                gate = torch.rand(3)
                mask = torch.ones(2, 40, dtype=torch.bool)
                out, ungated, lse = torch.ops.cofi.gated_attention_fwd(q, k, v, gate, mask, 0.125, True)
                torch.ops.cofi.gated_attention_bwd(torch.randn_like(q), q, k, v, ungated, lse, gate, mask,
                                                   0.125, True)

    return run


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the launchers must pick their GPU configurations", file=sys.stderr)
        return 2
    from cofi_kernels.ops.triton import gated_attention

    for line in check(gated_attention, gated_attention_launches()):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
