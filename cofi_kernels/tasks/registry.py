"""Tasks by name (:func:`get_task`) and the task a data file holds (:func:`task_of_file`)."""

from __future__ import annotations

import importlib
import json
import os

from ..data.text import DataError

# name -> module holding a ``TASK`` instance; imported on first use.
_MODULES = {
    "classification": "classification",
    "regression": "classification",
    "token_classification": "token_classification",
    "question_answering": "question_answering",
    "embedding": "embedding",
}
TASK_NAMES = tuple(_MODULES)


def get_task(name: str):
    """The :class:`~cofi_kernels.tasks.base.Task` registered under ``name`` (DataError naming the choices)."""
    if name not in _MODULES:
        raise DataError(f"task must be one of {', '.join(TASK_NAMES)}, got {name!r}")
    return importlib.import_module(f"{__package__}.{_MODULES[name]}").TASK


def task_of_data(data, forced: str | None = None):
    """``(task, forced name)``: the task ``forced`` names (``--task``), else the one whose data class
    ``data`` is (a text data set is classification; regression is told from its labels)."""
    if forced is not None:
        return get_task(forced), forced
    for name in ("token_classification", "question_answering"):
        task = get_task(name)
        if task.dataset_class is not None and isinstance(data, task.dataset_class):
            return task, None
    return get_task("classification"), None


def task_of_file(path: str) -> str:
    """The task a data file's format and columns say (``--task`` overrides it):

    - a JSON file whose top-level object has ``data`` (SQuAD), or records with ``question`` and
      ``context``: ``question_answering``;
    - records with ``tokens`` and ``tags``, or a CoNLL column file (``.conll``, ``.conllu``, ``.iob``,
      ``.bio`` or ``.txt`` whose lines are whitespace-separated columns): ``token_classification``;
    - anything else: ``classification`` (``regression`` is told from the labels), whose reader says
      what a file of texts and labels lacks.

    Embeddings are never inferred: texts without labels are asked for with ``--task embedding``.
    """
    columns = _columns(path)
    if columns is None:
        return "token_classification"
    for name in ("question_answering", "token_classification"):
        if get_task(name).matches(columns):
            return name
    return "classification"


def _columns(path: str) -> set[str] | None:
    """The keys of the file's first record, or None for a CoNLL column file."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".conll", ".conllu", ".iob", ".bio", ".txt"):
        return None
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("utf-8-sig", errors="replace")
    stripped = head.lstrip()
    if ext == ".json" or (stripped.startswith("{") and '"data"' in stripped[:200] and ext != ".jsonl"):
        try:
            with open(path, encoding="utf-8-sig") as f:
                obj = json.load(f)
            if isinstance(obj, dict) and "data" in obj:
                return {"question", "context", "answers"}
        except (ValueError, OSError):
            pass
    if ext == ".csv":
        return {c.strip() for c in stripped.splitlines()[0].split(",")} if stripped else set()
    for line in stripped.splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError:
                return set()
            return set(rec) if isinstance(rec, dict) else set()
    return set()
