"""Argument checks of the public functions: each error names the op and the argument."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_activation(op: str, name: str, t: object, *, allow_float64: bool = False) -> torch.Tensor:
    """The tensor that fixes an op's dtype and device."""
    t = check_tensor(op, name, t)
    allowed = SUPPORTED_DTYPES + ((torch.float64,) if allow_float64 else ())
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{op}: {name} must have dtype {names}; got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{op}: {name} must have at least one dimension, got a scalar")
    return t


def check_same_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def check_like(op: str, name: str, t: object, ref: torch.Tensor, ref_name: str) -> None:
    """Same shape, dtype and device as ``ref``."""
    t = check_tensor(op, name, t)
    check_same_device(op, name, t, ref, ref_name)
    if t.shape != ref.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def _check_param_dtype(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str = "x") -> None:
    if t.dtype not in (ref.dtype, torch.float32):
        raise ValueError(f"{op}: {name} must have dtype {ref.dtype} (as {ref_name}) or float32, got {t.dtype}")


def check_vector(op: str, name: str, t: object, n: int, ref: torch.Tensor, *,
                 ref_name: str = "x", what: str | None = None) -> None:
    """A per-feature parameter or gate: shape [n], ref's device, ref's dtype or float32."""
    t = check_tensor(op, name, t)
    check_same_device(op, name, t, ref, ref_name)
    if t.dim() != 1 or t.shape[0] != n:
        what = what or f"the last dim of {ref_name}"
        raise ValueError(f"{op}: {name} must have shape [{n}] ({what}), got {list(t.shape)}")
    _check_param_dtype(op, name, t, ref, ref_name)


def check_scalar(op: str, name: str, t: object, ref: torch.Tensor) -> None:
    """A gate that is one number: shape [] or [1]."""
    t = check_tensor(op, name, t)
    check_same_device(op, name, t, ref, "x")
    if t.numel() != 1 or t.dim() > 1:
        raise ValueError(f"{op}: {name} must be a scalar tensor (shape [] or [1]), got {list(t.shape)}")
    _check_param_dtype(op, name, t, ref)


def check_no_nan(op: str, name: str, t: torch.Tensor, why: str) -> None:
    """Data-dependent, so skipped while torch.compile traces (and a device sync on CUDA)."""
    if torch.compiler.is_compiling():
        return
    if torch.isnan(t).any():
        raise ValueError(f"{op}: {name} contains NaN; {why}")


def check_attention_inputs(op: str, q: object, k: object, v: object, *, allow_float64: bool = False) -> torch.Tensor:
    """q, k, v: [B, H, T, D] of one supported dtype and device, k and v shaped like q."""
    q = check_activation(op, "q", q, allow_float64=allow_float64)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must have shape [B, H, T, D], got {list(q.shape)}")
    if q.shape[2] < 1:
        raise ValueError(f"{op}: the sequence length T (q.shape[2]) must be at least 1, got 0")
    check_like(op, "k", k, q, "q")
    check_like(op, "v", v, q, "q")
    return q


def check_key_padding_mask(op: str, mask: object, q: torch.Tensor) -> None:
    """[B, T] bool on q's device, True = attend."""
    mask = check_tensor(op, "key_padding_mask", mask)
    check_same_device(op, "key_padding_mask", mask, q, "q")
    want = [q.shape[0], q.shape[2]]
    if mask.dtype != torch.bool:
        raise ValueError(f"{op}: key_padding_mask must be a bool tensor (True = attend), got {mask.dtype}")
    if list(mask.shape) != want:
        raise ValueError(f"{op}: key_padding_mask must have shape [B, T] = {want}, got {list(mask.shape)}")


def check_weight(op: str, name: str, t: object, shape: tuple, ref: torch.Tensor, what: str) -> torch.Tensor:
    """A weight matrix: 2-D, ref's device and dtype; ``shape`` entries of None match any size."""
    t = check_tensor(op, name, t)
    check_same_device(op, name, t, ref, "x")
    if t.dim() != 2 or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        raise ValueError(f"{op}: {name} must have shape {what}, got {list(t.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{op}: {name} must have the dtype of x ({ref.dtype}), got {t.dtype}")
    return t

