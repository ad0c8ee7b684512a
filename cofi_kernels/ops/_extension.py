"""Loading of the compiled extension ``cofi_kernels._C`` and what it holds.

The package imports without the extension; the reference backend works then,
and ``python -m cofi_kernels.info`` says why the extension is missing.
"""

from __future__ import annotations

import functools
import json
import os

import torch

_LOAD_ERROR: str | None = None
try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.cofi.*)
except ImportError as exc:  # not built, or built against another torch
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def available() -> bool:
    """True when ``cofi_kernels._C`` loaded."""
    return _LOAD_ERROR is None


def load_error() -> str | None:
    """Why the extension did not load, or None when it did."""
    return _LOAD_ERROR


@functools.cache
def build_info() -> dict | None:
    """What setup.py recorded about the build (torch/CUDA versions, archs, ops), or None."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_build_info.json")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _registered_kernels() -> frozenset[tuple[str, str]]:
    """(op, device type) pairs with a compiled kernel, read once at import.

    A plain set keeps ``has_kernel`` traceable by torch.compile.
    """
    if not available():
        return frozenset()
    found = set()
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("cofi::"):
            continue
        for device_type, key in _DISPATCH_KEYS.items():
            if torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
                found.add((name.removeprefix("cofi::"), device_type))
    return frozenset(found)


_KERNELS = _registered_kernels()


def has_kernel(op: str, device_type: str) -> bool:
    """True when ``cofi::<op>`` has a compiled kernel for ``device_type`` ("cpu" or "cuda")."""
    return (op, device_type) in _KERNELS
