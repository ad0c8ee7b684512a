"""The registry of pruning methods: each subpackage of :mod:`cofi_kernels.pruning` registers one.

A method is a name, a config dataclass (every field a setting of
:mod:`cofi_kernels.training.config`, so the ``cofi prune`` command builds its
flags from it), the model directories and switches it takes besides its
config, and an entry function that runs it on the one trainer and returns
its :class:`~cofi_kernels.training.trainer.RunResult` (the output directory
holds a :class:`~cofi_kernels.models.pruned_model.PrunedModel`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LABELLED_TASKS", "MethodArgument", "PruningMethod", "get_method", "labelled_task", "method_names",
           "register_method"]

# The tasks trained on labels; the embedding task's targets are the teacher's outputs, which only CoFi's loop computes.
LABELLED_TASKS = ("classification", "regression", "token_classification", "question_answering")
NOT_LABELLED = ("its loss needs labels, and an embedding's targets are the teacher's outputs, which only CoFi's loop "
                "computes")


def labelled_task(saved: dict, settings, method: str):
    """``(task, spec with the run's settings)`` of a model directory's task (``saved``:
    :func:`~cofi_kernels.training.model_io.read_task`) for a method that trains on labels;
    :class:`~cofi_kernels.training.trainer.RunError` (one line) for a task without labels."""
    from ..training.trainer import RunError

    handler = saved["handler"]
    if handler.name not in LABELLED_TASKS:
        raise RunError(f"--method {method} does not run the {handler.name} task: {NOT_LABELLED}; use --method cofi")
    return handler, handler.with_settings(saved["spec"], settings)


@dataclass(frozen=True)
class MethodArgument:
    """An input of a method that is not a setting: a model directory, or a switch.

    ``flag`` is the command-line flag (``--teacher``); the entry function
    receives it as the keyword ``flag`` without dashes, with ``-`` as ``_``.
    """

    flag: str
    help: str
    required: bool = False
    switch: bool = False

    @property
    def name(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class PruningMethod:
    """A registered method.

    ``run(train, eval_data, out, config, *, resume, progress, stop_at, task, **arguments)``
    runs it, where ``arguments`` are the :class:`MethodArgument` values by name
    (``resume`` and ``stop_at`` as in :class:`~cofi_kernels.training.trainer.Trainer`) and
    ``task`` is the name given with ``--task`` (None: the teacher's or the data's).
    ``tasks`` are the tasks (:mod:`cofi_kernels.tasks`) it runs; ``why_not`` says in one
    line why it does not run the others.
    """

    name: str
    summary: str
    config: type
    run: Callable
    arguments: tuple[MethodArgument, ...] = ()
    tasks: tuple[str, ...] = ("classification", "regression")
    why_not: str = "it is built for sentence classification and regression only"

    def check_task(self, task: str) -> None:
        """``ValueError`` (one line) when this method does not run ``task``."""
        if task not in self.tasks:
            raise ValueError(f"--method {self.name} does not run the {task} task: {self.why_not}; "
                             f"use --method cofi")


_METHODS: dict[str, PruningMethod] = {}
_DISCOVERED = False


def register_method(method: PruningMethod) -> PruningMethod:
    """Add ``method`` under its name (an error when the name is taken by another method)."""
    old = _METHODS.get(method.name)
    if old is not None and old != method:
        raise ValueError(f"a pruning method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def _discover() -> None:
    # Every subpackage registers its method when imported; adding a method is adding a folder.
    global _DISCOVERED
    if _DISCOVERED:
        return
    from .. import pruning

    for info in pkgutil.iter_modules(pruning.__path__):
        if info.ispkg:
            importlib.import_module(f"{pruning.__name__}.{info.name}")
    _DISCOVERED = True


def method_names() -> list[str]:
    """The registered methods' names, sorted."""
    _discover()
    return sorted(_METHODS)


def get_method(name: str) -> PruningMethod:
    """The method registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    _discover()
    if name not in _METHODS:
        raise ValueError(f"unknown pruning method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
