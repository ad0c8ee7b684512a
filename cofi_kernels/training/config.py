"""Run settings: the fields every training run shares, and how a setting is declared.

A setting is a dataclass field declared with :func:`setting`: its default and
its help text live in one place, from which the ``cofi`` command builds its
flag (:mod:`cofi_kernels.cli`) and :func:`documented` writes the class
docstring's attribute list. Every field of a method's config is therefore a
flag; none is silently unavailable.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .trainer import RunError

__all__ = ["MIN_MAX_LENGTH", "RunSettings", "check_device", "check_run_settings", "config_flag", "documented",
           "fraction", "setting", "settings_of"]

MIN_MAX_LENGTH = 8  # [CLS], [SEP] and a few words
SEED_LIMIT = 2**32  # seeds are mixed with step and epoch numbers into torch's 64-bit seeds


def setting(default, help: str, *, flag: str | None = None, flag_help: str | None = None, cli_type=None,
            required: bool = False, choices=None):
    """A config field with its help text.

    Args:
        default: the default value (immutable).
        help: one line for ``--help`` and the docstring.
        flag: the command-line flag when it is not ``--<name-with-dashes>`` (a
            bool that defaults to True needs one that turns it off, e.g.
            ``--train-embeddings`` for ``freeze_embeddings``).
        flag_help: the flag's help when it differs from the setting's (a flag that turns a setting off).
        cli_type: parses the flag's text (default: from the field's type).
        required: the command line must give it although the dataclass has a default.
        choices: the values a list-valued setting may hold.
    """
    meta = {"help": help, "flag": flag, "flag_help": flag_help, "cli_type": cli_type, "required": required,
            "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


def fraction(text: str) -> float:
    """Command-line text → a number in (0, 1) (``argparse.ArgumentTypeError`` otherwise)."""
    import argparse

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1) (e.g. 0.9 for 90%), got {text}")
    return v


def settings_of(config_class) -> list[dataclasses.Field]:
    """The fields of a config dataclass, in order."""
    return list(dataclasses.fields(config_class))


def config_flag(f: dataclasses.Field) -> str:
    """The command-line flag of a config field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def documented(cls):
    """Class decorator: append an ``Attributes:`` list built from the fields' help texts to the docstring."""
    lines = [f"        {f.name}: {f.metadata.get('help', '')} (default {f.default!r})." for f in dataclasses.fields(cls)]
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Attributes:\n" + "\n".join(lines) + "\n"
    return cls


@dataclass
class RunSettings:
    """Settings every training run has (batches, tokens, checkpoints, seed, device)."""

    batch_size: int = setting(32, "examples per optimizer step")
    max_length: int = setting(128, "tokens per example (longer texts are truncated; question answering splits "
                                   "long contexts into windows)")
    doc_stride: int = setting(64, "question answering: tokens each window of a long context shares with the next")
    checkpoint_every: int = setting(50, "steps between checkpoints")
    seed: int = setting(0, "seeds the data order, dropout, gate noise and new weights")
    device: str = setting("cpu", "cpu, or cuda / cuda:N")
    bf16: bool = setting(False, "bf16 autocast (GPU only)")


def _named(f: dataclasses.Field) -> str:
    flag = config_flag(f)
    return f.name if flag.lstrip("-").replace("-", "_") == f.name else f"{f.name} ({flag})"


def _type_problem(kind: str, v, choices) -> str | None:
    """What is wrong with the value ``v`` of a field declared as ``kind``, or None."""
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if kind == "int":
        return None if is_int(v) else "must be an integer"
    if kind == "float":
        if not (is_int(v) or isinstance(v, float)):
            return "must be a number"
        return None if math.isfinite(v) else "must be a finite number"
    if kind == "bool":
        return None if isinstance(v, bool) else "must be True or False"
    if kind == "str":
        return None if isinstance(v, str) else "must be a string"
    if kind == "list[int]|None":
        ok = v is None or (isinstance(v, (list, tuple)) and all(is_int(x) for x in v))
        return None if ok else "must be None or a list of integers"
    if kind == "tuple[str,...]":
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            return "must be a sequence of names"
        bad = [x for x in v if choices and x not in choices]
        return f"holds {bad!r}, not among {list(choices)}" if bad else None
    raise TypeError(f"a setting of type {kind!r} has no check; add one to _type_problem")


def check_device(device, where: str) -> torch.device:
    """``device`` names this machine's CPU or one of its CUDA GPUs (:class:`RunError` otherwise)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise RunError(f"{where}: device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):
        raise RunError(f"{where}: device must be cpu, cuda or cuda:N, got {device!r}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"{where}: device {device!r} was asked for, but no CUDA GPU is available; use cpu")
        count = torch.cuda.device_count()
        if d.index is not None and d.index >= count:
            raise RunError(f"{where}: device {device!r} was asked for, but this machine has {count} GPU(s) "
                           f"(cuda:0 to cuda:{count - 1})")
    return d


def check_run_settings(cfg, where: str) -> None:
    """Refuse bad settings of any run's config (:class:`RunError` naming the setting and its flag).

    Every field must hold a value of its declared type (numbers finite, no
    bools for numbers), whatever the method; then the shared ranges are
    checked: positive ``batch_size``, ``checkpoint_every``, ``max_length``
    of at least :data:`MIN_MAX_LENGTH` (its upper bound comes from the model),
    ``eval_every`` >= 0, a seed in ``[0, 2**32)``, a device this machine has,
    bf16 only on a GPU. A method checks its own ranges after this.
    """
    fields = {f.name: f for f in settings_of(type(cfg))}
    for f in fields.values():
        problem = _type_problem(str(f.type).replace(" ", ""), getattr(cfg, f.name), f.metadata.get("choices"))
        if problem:
            raise RunError(f"{where}: {_named(f)} {problem}, got {getattr(cfg, f.name)!r}")

    def at_least(name, low):
        if name in fields and getattr(cfg, name) < low:
            raise RunError(f"{where}: {_named(fields[name])} must be >= {low}, got {getattr(cfg, name)!r}")

    for name in ("batch_size", "checkpoint_every"):
        at_least(name, 1)
    at_least("max_length", MIN_MAX_LENGTH)
    at_least("eval_every", 0)
    at_least("seed", 0)
    if cfg.seed >= SEED_LIMIT:
        raise RunError(f"{where}: seed must be < 2**32, got {cfg.seed}")
    device = check_device(cfg.device, where)
    if cfg.bf16 and device.type != "cuda":
        raise RunError(f"{where}: bf16 autocast is for GPUs; drop --bf16 or use --device cuda")
