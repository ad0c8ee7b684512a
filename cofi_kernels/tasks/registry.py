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


def task_of_file(path: str) -> str:
    """The task a data file's format and columns say (``--task`` overrides it):

    - a JSON file whose top-level object has ``data`` (SQuAD), or records with ``question`` and
      ``context``: ``question_answering``;
    - records with ``tokens`` and ``tags``, or a CoNLL column file (``.conll``, ``.conllu``, ``.iob``,
      ``.bio`` or ``.txt`` whose lines are whitespace-separated columns): ``token_classification``;
    - records with ``text`` and ``label``: ``classification`` (``regression`` is told from the labels);
    - records with ``text`` only: ``embedding``.
    """
    columns = _columns(path)
    if columns is None:
        return "token_classification"
    for name in ("question_answering", "token_classification", "classification", "embedding"):
        if get_task(name).matches(columns):
            return name
    raise DataError(f"{path}: cannot tell the task from the columns {sorted(columns)}; give data with "
                    "text[+label], tokens+tags, question+context(+answers), or pass --task")


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
