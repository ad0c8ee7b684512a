"""Which implementation an op runs: ``reference``, ``cpu``, ``cuda`` or ``triton``.

Precedence: an explicit ``backend=`` keyword, then the ``COFI_BACKEND``
environment variable, then ``auto``. ``auto`` picks the compiled kernel for the
tensors' device and falls back to the reference only when no kernel is built
for that device, with a warning that says so (once per op and device). Asking
for a backend that is not available is an error, never a silent fallback.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from . import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "COFI_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend exists but cannot run here (not built, or no device)."""


@dataclass(frozen=True)
class OpSpec:
    """An op's name and the backends it implements (besides ``reference``)."""

    name: str
    compiled: tuple[str, ...] = ()  # compiled ops it needs, e.g. ("gelu_gate", "gelu_gate_backward")
    backends: tuple[str, ...] = ("reference", "cpu", "cuda")

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


def auto_choice(spec: OpSpec, device: torch.device) -> str:
    """What ``auto`` picks for ``spec`` on ``device``, and nothing else (no warning)."""
    if device.type in ("cpu", "cuda") and device.type in spec.backends and spec.compiled_for(device.type):
        return device.type
    return "reference"


def resolve(spec: OpSpec, backend: str, device: torch.device) -> str:
    """The backend ``spec`` runs with for tensors on ``device``; raises if it cannot run."""
    choice = requested(backend)
    if choice == "auto":
        choice = auto_choice(spec, device)
        if choice == "reference" and device.type in spec.backends and (spec.name, device.type) not in _warned:
            _warned.add((spec.name, device.type))
            if not torch.compiler.is_compiling():
                warnings.warn(
                    f"{spec.name}: using the slow reference implementation on {device.type} because "
                    f"{_why_not_compiled(spec, device.type)}; see `python -m cofi_kernels.info`",
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
    raise BackendUnavailableError(f"{spec.name}: backend {choice!r} is not available")
