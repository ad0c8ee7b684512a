"""Whether the Triton kernels can run, and on which device.

``triton.jit`` decides at decoration time whether a kernel is compiled or
interpreted, so ``TRITON_INTERPRET`` is read once, when this package is
imported; setting it later has no effect on kernels already defined.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INSTALLED = importlib.util.find_spec("triton") is not None


def version() -> str | None:
    """The installed Triton version, or None."""
    if not INSTALLED:
        return None
    import triton

    return triton.__version__


def unavailable_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on tensors on ``device``; None when they can."""
    if not INSTALLED:
        return "triton is not installed (it comes with the CUDA builds of torch)"
    if device.type == "cuda":
        if INTERPRET:
            return "TRITON_INTERPRET=1 was set when cofi_kernels was imported, so the kernels run on CPU tensors only"
        return None
    if device.type == "cpu":
        if INTERPRET:
            return None
        return ("Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 "
                "before importing cofi_kernels (slow; meant for tests)")
    return f"Triton kernels do not run on {device.type} tensors"


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids (without importing triton)."""
    return -(-a // b)


def device_guard(t: torch.Tensor):
    """Makes ``t``'s GPU the current device while kernels launch: Triton launches on the current device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
