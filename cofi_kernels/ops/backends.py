"""Which implementation an op runs: ``reference``, ``cpu``, ``cuda`` or ``triton``.

Precedence: an explicit ``backend=`` keyword, then the ``COFI_BACKEND``
environment variable, then ``auto``. ``auto`` picks the first backend of the
op's ``auto_order`` that can run on the tensors' device (compiled C++/CUDA
kernels, or Triton on CUDA devices) and falls back to the reference only when
none can, with a warning that says so (once per op and device) if the op has
a kernel meant for that device. ``auto`` never picks the Triton interpreter.
Asking for a backend that is not available is an error, never a silent
fallback.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from . import _extension
from .triton import support as _triton_support

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "COFI_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend exists but cannot run here (not built, or no device)."""


@dataclass(frozen=True)
class OpSpec:
    """An op's name, the backends it implements and the order ``auto`` tries them in."""

    name: str
    compiled: tuple[str, ...] = ()  # compiled ops it needs, e.g. ("gelu_gate_fwd", "gelu_gate_bwd")
    backends: tuple[str, ...] = ("reference", "cpu", "cuda")
    auto_order: tuple[str, ...] = ("cpu", "cuda")  # tried first to last; "reference" is the fallback

    def compiled_for(self, device_type: str) -> bool:
        return bool(self.compiled) and all(_extension.has_kernel(op, device_type) for op in self.compiled)


_warned: set[tuple[str, str]] = set()


def requested(backend: str) -> str:
    """The backend asked for: the keyword unless it is ``auto``, else ``COFI_BACKEND``, else ``auto``."""
    choice = backend
    if choice == "auto":
        choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice != "auto" and choice not in BACKENDS:
        src = f"{ENV_VAR}={choice!r}" if backend == "auto" else f"backend={choice!r}"
        raise ValueError(f"{src} is not a backend; choose one of auto, {', '.join(BACKENDS)}")
    return choice


def _why_not_compiled(spec: OpSpec, device_type: str) -> str:
    if not _extension.available():
        return f"the compiled extension cofi_kernels._C did not load ({_extension.load_error()})"
    return f"cofi_kernels._C was built without {device_type.upper()} kernels for {spec.name}"


# The device type each non-reference backend's kernels are meant for.
_TARGET_DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}


def _runs_on(spec: OpSpec, backend: str, device: torch.device) -> bool:
    if backend not in spec.backends or _TARGET_DEVICE.get(backend) != device.type:
        return False
    if backend == "triton":
        return _triton_support.unavailable_reason(device) is None
    return spec.compiled_for(backend)


def auto_choice(spec: OpSpec, device: torch.device) -> str:
    """What ``auto`` picks for ``spec`` on ``device``, and nothing else (no warning)."""
    for backend in spec.auto_order:
        if _runs_on(spec, backend, device):
            return backend
    return "reference"


def _has_kernel_meant_for(spec: OpSpec, device_type: str) -> bool:
    return any(_TARGET_DEVICE.get(b) == device_type for b in spec.backends)


def _why_no_kernel(spec: OpSpec, device: torch.device) -> str:
    if "triton" in spec.backends and device.type == "cuda":
        return _triton_support.unavailable_reason(device) or "no kernel was chosen"
    return _why_not_compiled(spec, device.type)


def resolve(spec: OpSpec, backend: str, device: torch.device) -> str:
    """The backend ``spec`` runs with for tensors on ``device``; raises if it cannot run."""
    choice = requested(backend)
    if choice == "auto":
        choice = auto_choice(spec, device)
        key = (spec.name, device.type)
        if choice == "reference" and _has_kernel_meant_for(spec, device.type) and key not in _warned:
            _warned.add(key)
            if not torch.compiler.is_compiling():
                warnings.warn(
                    f"{spec.name}: using the slow reference implementation on {device.type} because "
                    f"{_why_no_kernel(spec, device)}; see `python -m cofi_kernels.info`",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return choice
    if choice not in spec.backends:
        raise ValueError(f"{spec.name} has no {choice!r} backend; it has {', '.join(spec.backends)}")
    if choice == "reference":
        return choice
    if choice in ("cpu", "cuda"):
        if device.type != choice:
            raise ValueError(f"{spec.name}: backend {choice!r} needs {choice.upper()} tensors, got tensors on {device}")
        if not spec.compiled_for(choice):
            raise BackendUnavailableError(f"{spec.name}: backend {choice!r} is not available: "
                                          f"{_why_not_compiled(spec, choice)}")
        return choice
    why = _triton_support.unavailable_reason(device)
    if why is not None:
        raise BackendUnavailableError(f"{spec.name}: backend 'triton' is not available: {why}")
    return choice
