"""Which implementation an op runs: ``reference``, ``cpu``, ``cuda`` or ``triton``.

Every op has an :class:`OpSpec`: its :class:`Backend` s, each with its
launcher and the reasons it cannot run given inputs (as xformers'
``not_supported_reasons``), and the order ``auto`` tries them in. The reasons
are computed from :class:`Inputs`, a light description of a call (device,
dtype, head size), never from tensor values, so the choice is cheap, traceable
by ``torch.compile`` and can be checked for a GPU on a machine without one.

A backend's reasons come in two kinds: *unavailable* (this machine: the
extension is not built or not loaded, Triton is not installed, the
interpreter is or is not on) and *unsupported* (these inputs: device type,
dtype, shape limits such as the head size).

Precedence: an explicit ``backend=`` keyword, then the ``COFI_BACKEND``
environment variable, then ``auto``.

- ``auto`` takes the first backend of the op's ``auto_order`` that is meant
  for the inputs' device type and states no reason, else ``reference``. When
  the op has a kernel meant for that device it warns (once per op and device
  type) that it fell back to the slow reference, listing the reasons.
  ``auto`` never picks the Triton interpreter (Triton is meant for CUDA).
- A forced backend that states reasons raises, listing all of them: a
  ``ValueError`` when any reason is about the inputs (a device mismatch, a
  dtype or shape the kernel does not take: no machine would run them), else
  :class:`BackendUnavailableError`. Never a silent fallback.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import _extension
from .triton import support as _triton_support

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "COFI_BACKEND"

# What the compiled and Triton kernels take; float64 is the reference's alone.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """The requested backend exists but cannot run here (not built, not installed, or no device)."""


@dataclass(frozen=True)
class Inputs:
    """A light description of one call's inputs: all a backend needs to say whether it can run them.

    Args:
        device: where the tensors are.
        dtype: the dtype of the activation that fixes the op's dtype (``x``, or ``q`` for attention).
        head_dim: ``q.shape[-1]`` for attention ops; None for the others.
    """

    device: torch.device
    dtype: torch.dtype = torch.float32
    head_dim: int | None = None


def _no_reasons(inputs: Inputs) -> list[str]:
    return []


@dataclass(frozen=True)
class Backend:
    """One implementation of an op: its launcher and the reasons it cannot run given inputs.

    Args:
        name: one of :data:`BACKENDS`.
        launcher: called with the op's checked arguments when this backend is chosen.
        meant_for: the device type its kernels are written for; ``auto`` considers
            it there only. None (the reference) = any device.
        unavailable: ``Inputs -> reasons`` about this machine (build, install, interpreter).
        unsupported: ``Inputs -> reasons`` about the inputs (device, dtype, shape limits).
    """

    name: str
    launcher: Callable
    meant_for: str | None = None
    unavailable: Callable[[Inputs], list[str]] = _no_reasons
    unsupported: Callable[[Inputs], list[str]] = _no_reasons

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        """Every reason this backend cannot run ``inputs`` here; empty when it can."""
        return self.unsupported(inputs) + self.unavailable(inputs)


@dataclass(frozen=True)
class OpSpec:
    """An op's name, its backends (the reference among them) and the order ``auto`` tries them in.

    ``usual_inputs(device)`` describes the op's usual inputs on a device (what
    ``python -m cofi_kernels.info`` reports the ``auto`` choice for).
    """

    name: str
    backends: tuple[Backend, ...]
    auto_order: tuple[str, ...] = ()  # tried first to last; "reference" is the fallback
    usual_inputs: Callable[[torch.device], Inputs] = Inputs

    def __post_init__(self):
        names = [b.name for b in self.backends]
        if "reference" not in names or len(set(names)) != len(names) or not set(self.auto_order) <= set(names):
            raise ValueError(f"{self.name}: backends {names} need one reference, no repeats and every name of "
                             f"auto_order {self.auto_order}")
        # resolve runs on every op call: the backends auto tries per device type are looked up once here.
        tried = [self.backend(name) for name in self.auto_order]
        by_device = {b.meant_for: tuple(t for t in tried if t.meant_for == b.meant_for) for b in tried}
        object.__setattr__(self, "_auto_for", by_device)

    def auto_backends(self, device_type: str) -> tuple[Backend, ...]:
        """The backends ``auto`` tries for ``device_type``, in order: those of ``auto_order`` meant for it."""
        return self._auto_for.get(device_type, ())

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the backends this op has."""
        return tuple(b.name for b in self.backends)

    def backend(self, name: str) -> Backend:
        """The backend called ``name``; ValueError if the op has none of that name."""
        for b in self.backends:
            if b.name == name:
                return b
        raise ValueError(f"{self.name} has no {name!r} backend; it has {', '.join(self.names)}")

    def launcher(self, name: str) -> Callable:
        """The launcher of backend ``name`` (as :meth:`backend`)."""
        return self.backend(name).launcher


# ------------------------------------------------------------ reasons shared by the ops

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def extension_reasons(op: str, kernels: tuple[str, ...], device_type: str) -> list[str]:
    """Why the compiled ``kernels`` (registered op names) cannot run on ``device_type``; [] when they can."""
    if not _extension.available():
        return [f"the compiled extension cofi_kernels._C did not load ({_extension.load_error()})"]
    if not all(_extension.has_kernel(k, device_type) for k in kernels):
        return [f"cofi_kernels._C was built without {device_type.upper()} kernels for {op}"]
    return []


def device_reasons(backend: str, device_type: str, inputs: Inputs) -> list[str]:
    """A compiled backend runs on its own device type only."""
    if inputs.device.type != device_type:
        return [f"the tensors are on {inputs.device} but the {backend} kernels need {device_type.upper()} tensors"]
    return []


def dtype_reasons(backend: str, arg: str, inputs: Inputs) -> list[str]:
    """The compiled and Triton kernels take :data:`KERNEL_DTYPES` only."""
    if inputs.dtype not in KERNEL_DTYPES:
        names = ", ".join(map(_dtype_name, KERNEL_DTYPES[:-1])) + f" and {_dtype_name(KERNEL_DTYPES[-1])}"
        return [f"{arg} is {_dtype_name(inputs.dtype)} but the {backend} kernel supports {names}"]
    return []


def triton_reasons(inputs: Inputs) -> list[str]:
    """Triton not installed, or the interpreter setting does not match the device."""
    why = _triton_support.unavailable_reason(inputs.device)
    return [] if why is None else [why]


# ---------------------------------------------------------------- backend factories

def reference_backend(launcher: Callable) -> Backend:
    """The PyTorch reference: runs any input on any device."""
    return Backend("reference", launcher)


def compiled_backend(device_type: str, launcher: Callable, *, op: str, kernels: tuple[str, ...],
                     arg: str = "x") -> Backend:
    """A backend of compiled kernels (``cpu`` or ``cuda``) that needs the registered ops ``kernels``.

    ``arg`` names the activation whose dtype the kernels check.
    """

    def unavailable(inputs: Inputs) -> list[str]:
        return extension_reasons(op, kernels, device_type)

    def unsupported(inputs: Inputs) -> list[str]:
        return device_reasons(device_type, device_type, inputs) + dtype_reasons(device_type, arg, inputs)

    return Backend(device_type, launcher, meant_for=device_type, unavailable=unavailable, unsupported=unsupported)


def triton_backend(launcher: Callable, *, arg: str = "x",
                   limits: Callable[[Inputs], list[str]] = _no_reasons) -> Backend:
    """A Triton backend: meant for CUDA, and for CPU tensors under the interpreter when forced.

    ``limits`` states the op's own input limits (e.g. head sizes).
    """

    def unsupported(inputs: Inputs) -> list[str]:
        return dtype_reasons("triton", arg, inputs) + limits(inputs)

    return Backend("triton", launcher, meant_for="cuda", unavailable=triton_reasons, unsupported=unsupported)


# ------------------------------------------------------------------------- choice

_warned: set[tuple[str, str, str]] = set()


def requested(backend: str) -> str:
    """The backend asked for: the keyword unless it is ``auto``, else ``COFI_BACKEND``, else ``auto``."""
    choice = backend
    if choice == "auto":
        choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice != "auto" and choice not in BACKENDS:
        src = f"{ENV_VAR}={choice!r}" if backend == "auto" else f"backend={choice!r}"
        raise ValueError(f"{src} is not a backend; choose one of auto, {', '.join(BACKENDS)}")
    return choice


def _as_inputs(spec: OpSpec, inputs: Inputs | torch.device) -> Inputs:
    # A bare device stands for the op's usual inputs there (info, quick checks).
    return spec.usual_inputs(inputs) if isinstance(inputs, torch.device) else inputs


def not_supported_reasons(spec: OpSpec, backend: str, inputs: Inputs | torch.device) -> list[str]:
    """Why ``spec``'s backend ``backend`` cannot run ``inputs`` here; empty when it can."""
    return spec.backend(backend).not_supported_reasons(_as_inputs(spec, inputs))


def auto_choice(spec: OpSpec, inputs: Inputs | torch.device) -> str:
    """What ``auto`` picks for ``spec`` and ``inputs`` (a device = the op's usual inputs there); no warning."""
    inputs = _as_inputs(spec, inputs)
    for b in spec.auto_backends(inputs.device.type):
        if not b.not_supported_reasons(inputs):
            return b.name
    return "reference"


def _warn_reference(spec: OpSpec, inputs: Inputs) -> None:
    kernels = spec.auto_backends(inputs.device.type)
    if not kernels:
        return
    why = "; ".join(f"backend {b.name!r}: {'; '.join(b.not_supported_reasons(inputs))}" for b in kernels)
    # Once per op, device type and set of reasons: a float64 call must not silence a missing build.
    key = (spec.name, inputs.device.type, why)
    if key in _warned:
        return
    _warned.add(key)
    if torch.compiler.is_compiling():
        return
    warnings.warn(
        f"{spec.name}: using the slow reference implementation on {inputs.device.type} because no kernel "
        f"for it can run these inputs here ({why}); see `python -m cofi_kernels.info`",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve(spec: OpSpec, backend: str, inputs: Inputs | torch.device) -> str:
    """The backend ``spec`` runs for ``inputs`` (a device = the op's usual inputs there); raises if forced and it cannot."""
    choice = requested(backend)
    inputs = _as_inputs(spec, inputs)
    if choice == "auto":
        choice = auto_choice(spec, inputs)
        if choice == "reference":
            _warn_reference(spec, inputs)
        return choice
    b = spec.backend(choice)
    unsupported = b.unsupported(inputs)
    unavailable = b.unavailable(inputs)
    if unsupported:
        raise ValueError(f"{spec.name}: backend {choice!r} cannot run these inputs: "
                         f"{'; '.join(unsupported + unavailable)} (backend='reference' runs any input)")
    if unavailable:
        raise BackendUnavailableError(f"{spec.name}: backend {choice!r} is not available: {'; '.join(unavailable)}")
    return choice
