"""Run settings: the fields every training run shares, and how a setting is declared.

A setting is a dataclass field declared with :func:`setting`: its default and
its help text live in one place, from which the ``cofi`` command builds its
flag (:mod:`cofi_kernels.cli`) and :func:`documented` writes the class
docstring's attribute list. Every field of a method's config is therefore a
flag; none is silently unavailable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .trainer import RunError

__all__ = ["RunSettings", "check_run_settings", "documented", "fraction", "setting", "settings_of"]


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


def documented(cls):
    """Class decorator: append an ``Attributes:`` list built from the fields' help texts to the docstring."""
    lines = [f"        {f.name}: {f.metadata.get('help', '')} (default {f.default!r})." for f in dataclasses.fields(cls)]
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Attributes:\n" + "\n".join(lines) + "\n"
    return cls


@dataclass
class RunSettings:
    """Settings every training run has (batches, tokens, checkpoints, seed, device)."""

    batch_size: int = setting(32, "examples per optimizer step")
    max_length: int = setting(128, "tokens per example (longer texts are truncated)")
    checkpoint_every: int = setting(50, "steps between checkpoints")
    seed: int = setting(0, "seeds the data order, dropout, gate noise and new weights")
    device: str = setting("cpu", "cpu, or cuda / cuda:N")
    bf16: bool = setting(False, "bf16 autocast (GPU only)")


def check_run_settings(cfg, where: str) -> None:
    """Refuse bad shared settings (:class:`RunError` naming the setting); ``cfg`` also has ``eval_every``."""
    def positive(name, integer=True):
        v = getattr(cfg, name)
        if integer and (not isinstance(v, int) or isinstance(v, bool)):
            raise RunError(f"{where}: {name} must be an integer, got {v!r}")
        if not v > 0:
            raise RunError(f"{where}: {name} must be > 0, got {v!r}")

    for name in ("batch_size", "max_length", "checkpoint_every"):
        positive(name)
    if not isinstance(cfg.eval_every, int) or cfg.eval_every < 0:
        raise RunError(f"{where}: eval_every must be an integer >= 0, got {cfg.eval_every!r}")
    if cfg.max_length < 8:
        raise RunError(f"{where}: max_length must be >= 8, got {cfg.max_length}")
    device = torch.device(cfg.device)
    if device.type not in ("cpu", "cuda"):
        raise RunError(f"{where}: device must be 'cpu' or 'cuda[:N]', got {cfg.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"{where}: device {cfg.device!r} was asked for, but no CUDA GPU is available; use --device cpu")
    if cfg.bf16 and device.type != "cuda":
        raise RunError(f"{where}: bf16 autocast is for GPUs; drop --bf16 or use --device cuda")
