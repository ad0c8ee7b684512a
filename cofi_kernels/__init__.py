"""cofi_kernels: fused kernels for CoFi structured pruning of BERT-family encoders.

Public functions (see each docstring for shapes and semantics):

- :func:`gated_attention` — ``softmax(q kᵀ · scale + padding) v · head_gate[h]`` (Triton on GPUs)
- :func:`gated_ffn` — ``(GELU_erf(x w_inᵀ + b_in) · int_gate) w_outᵀ + b_out`` (Triton on GPUs)
- :func:`gelu_gate` — ``GELU_erf(x + bias) * gate``
- :func:`masked_layer_norm` — gated residual LayerNorm over the kept hidden dims

CoFi on Hugging Face models (imported on first use):

- :func:`apply_cofi` — patch a BERT/RoBERTa model in place with CoFi gates
- :class:`CoFiGates` — the L0 hard-concrete gates, expected sparsity, Lagrangian
- :func:`prune` / :class:`PrunedModel` — the compact model, save and load
- :func:`finetune` / :func:`cofi_prune` with :class:`FinetuneConfig` /
  :class:`PruneConfig` — the training loop (also the ``cofi`` command)

:mod:`cofi_kernels.reference` (``ops/reference.py``) holds the PyTorch
definitions every kernel is tested against. ``python -m cofi_kernels.info``
shows what was built and which backend each op uses here. The subpackages are
the layers of DESIGN.md §2: ``ops`` → ``functional`` → ``modules`` →
``models`` → ``training`` → ``pruning`` → ``cli``.
"""

from __future__ import annotations

import os as _os
import sys as _sys

INTERRUPTED_STATUS = 130  # what a shell reports for a command ended by Ctrl-C (128 + SIGINT)


def _running_the_cofi_command() -> bool:
    """Whether this process is the ``cofi`` command: its console script, or ``python -m cofi_kernels.cli``."""
    script = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
    argv = list(getattr(_sys, "orig_argv", []))
    as_module = any(argv[i:i + 2] == ["-m", "cofi_kernels.cli"] for i in range(len(argv)))
    return as_module or script in ("cofi", "cofi.exe", "cofi-script.py")


def command_interrupted(command: str | None = None, hint: str = "") -> int:
    """Say on stderr, in one line, that the ``cofi`` command (``cofi <command>``) was interrupted, with
    ``hint`` after it; returns the exit status the command then ends with."""
    print(f"cofi{'' if command is None else ' ' + command}: interrupted{hint}", file=_sys.stderr)
    return INTERRUPTED_STATUS


# The `cofi` command spends its first seconds here, importing torch; a Ctrl-C then is one line, not a
# traceback through the import machinery (the command's own handler takes over in cli.main).
# Imported as a library, the interrupt propagates as usual.
try:
    import torch  # noqa: F401  (loads libtorch before the extension)

    from . import ops as _ops  # noqa: F401  (registers fake kernels and autograd)
    from .ops import _extension, backends, reference
    from .ops.backends import BackendUnavailableError
    from .functional import gated_attention, gated_ffn, gelu_gate, masked_layer_norm
except KeyboardInterrupt:
    if not _running_the_cofi_command():
        raise
    raise SystemExit(command_interrupted()) from None

__version__ = "0.1.0"


def extension_available() -> bool:
    """True when the compiled extension ``cofi_kernels._C`` is loaded."""
    return _extension.available()


# The model-level API sits above the ops; it is imported when first used.
_LAZY = {
    "apply_cofi": "pruning.cofi.patch",
    "CoFiGates": "pruning.cofi.gates",
    "prune": "pruning.cofi.fold",
    "PrunedModel": "models.pruned_model",
    "finetune": "training.finetune",
    "cofi_prune": "pruning.cofi.loop",
    "FinetuneConfig": "training.finetune",
    "PruneConfig": "pruning.cofi.loop",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cofi_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BackendUnavailableError",
    "CoFiGates",
    "FinetuneConfig",
    "PruneConfig",
    "PrunedModel",
    "apply_cofi",
    "backends",
    "cofi_prune",
    "extension_available",
    "finetune",
    "gated_attention",
    "gated_ffn",
    "gelu_gate",
    "masked_layer_norm",
    "prune",
    "reference",
    "__version__",
]
