"""cofi_kernels.data.text: reading CSV/JSONL, task inference, label spaces, held-out splits, batches, BBC News."""

from __future__ import annotations

import collections
import csv
import json
import math
import os
import re
import sys

import pytest
import torch

import cofi_kernels.data.text as data_module
from cofi_kernels.data.text import (
    DataError,
    LabelSpace,
    TextDataset,
    bbc_news,
    epoch_order,
    infer_task,
    read_examples,
    split_held_out,
)

from cofi_kernels.tasks.classification import Encoded
from tests.training_support import toy_rows, tokenizer, write_csv, write_jsonl


def _write_text(path, text: str) -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


def _write_bytes(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _dataset(labels, texts=None, pairs=None) -> TextDataset:
    texts = texts if texts is not None else [f"text number {i}" for i in range(len(labels))]
    return TextDataset(list(texts), pairs, list(labels), "test-data")


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


# ---------------------------------------------------------------------- reading


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "ndjson"])
def test_read_examples_round_trips_rows(tmp_path, fmt):
    rows = toy_rows(9, seed=3)
    if fmt == "csv":
        path = write_csv(tmp_path / "d.csv", rows)
    else:
        path = write_jsonl(tmp_path / f"d.{fmt}", rows)
    data = read_examples(path)
    assert len(data) == 9
    assert data.texts == [r["text"] for r in rows]
    assert data.labels == [r["label"] for r in rows]
    assert data.text_pairs is None
    assert data.source == path


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_read_examples_text_pair(tmp_path, fmt):
    rows = toy_rows(7, seed=5, pair=True)
    if fmt == "csv":
        path = write_csv(tmp_path / "d.csv", rows, columns=("text", "text_pair", "label"))
    else:
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = read_examples(path)
    assert data.texts == [r["text"] for r in rows]
    assert data.text_pairs == [r["text_pair"] for r in rows]
    assert data.labels == [r["label"] for r in rows]


def test_read_jsonl_keeps_numeric_labels_and_strips_string_labels(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "a b", "label": 0.25}, {"text": "c d", "label": 3}, {"text": "e f", "label": "  cat "},
    ])
    data = read_examples(path)
    assert data.labels == [0.25, 3, "cat"]
    assert isinstance(data.labels[1], int)


def test_jsonl_text_pair_missing_on_one_row_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "a b", "text_pair": "x", "label": "p"}, {"text": "c d", "label": "q"},
    ])
    with pytest.raises(DataError, match=r"d\.jsonl:2:.*text_pair"):
        read_examples(path)


def test_subset_and_to_jsonl_round_trip(tmp_path):
    rows = toy_rows(6, seed=1, pair=True)
    data = read_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    part = data.subset([4, 1, 3])
    assert part.texts == [rows[i]["text"] for i in (4, 1, 3)]
    assert part.text_pairs == [rows[i]["text_pair"] for i in (4, 1, 3)]
    assert part.labels == [rows[i]["label"] for i in (4, 1, 3)]
    out = tmp_path / "out.jsonl"
    part.to_jsonl(out)
    again = read_examples(out)
    assert (again.texts, again.text_pairs, again.labels) == (part.texts, part.text_pairs, part.labels)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "nope.csv")


def test_unknown_extension(tmp_path):
    path = _write_text(tmp_path / "d.tsv", "text\tlabel\nhello\ta\n")
    with pytest.raises(DataError, match=r"unknown data format '\.tsv'"):
        read_examples(path)


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl"])
def test_empty_file(tmp_path, name):
    path = _write_text(tmp_path / name, "")
    with pytest.raises(DataError, match="no examples"):
        read_examples(path)


def test_blank_lines_only_jsonl_has_no_examples(tmp_path):
    path = _write_text(tmp_path / "d.jsonl", "\n  \n\n")
    with pytest.raises(DataError, match="no examples"):
        read_examples(path)


def test_header_only_csv(tmp_path):
    path = write_csv(tmp_path / "d.csv", [])
    with pytest.raises(DataError, match="no examples"):
        read_examples(path)


@pytest.mark.parametrize("missing", ["text", "label"])
def test_csv_missing_column_is_named(tmp_path, missing):
    columns = ("sentence", "label") if missing == "text" else ("text", "category")
    path = _write_text(tmp_path / "d.csv", f"{columns[0]},{columns[1]}\nhello,a\n")
    with pytest.raises(DataError) as e:
        read_examples(path)
    msg = str(e.value)
    assert f"missing column(s) ['{missing}']" in msg
    assert "d.csv:1:" in msg


@pytest.mark.parametrize("missing", ["text", "label"])
def test_jsonl_missing_key_is_named_with_its_line(tmp_path, missing):
    bad = {"label": "a"} if missing == "text" else {"text": "hello"}
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": "a"}, {"text": "ok", "label": "b"}, bad])
    with pytest.raises(DataError) as e:
        read_examples(path)
    msg = str(e.value)
    assert f"missing column(s) ['{missing}']" in msg
    assert "d.jsonl:3:" in msg


def test_csv_empty_text_reports_its_line(tmp_path):
    rows = toy_rows(5, seed=2)
    rows[3]["text"] = "   "
    path = write_csv(tmp_path / "d.csv", rows)
    # Header is line 1, so row index 3 is on line 5.
    with pytest.raises(DataError, match=r"d\.csv:5: 'text' is empty"):
        read_examples(path)


def test_csv_line_numbers_follow_quoted_newlines(tmp_path):
    # Row 1 spans lines 2-3 (quoted newline); the row with the empty label starts on line 4.
    path = _write_text(tmp_path / "d.csv", 'text,label\n"multi\nline",a\nsecond,\n')
    with pytest.raises(DataError, match=r"d\.csv:4: 'label' is empty"):
        read_examples(path)


def test_csv_line_numbers_after_blank_line(tmp_path):
    # Line 3 is blank; the row with the empty text is on line 4.
    path = _write_text(tmp_path / "d.csv", "text,label\nhello,a\n\n,b\n")
    with pytest.raises(DataError, match=r"d\.csv:4: 'text' is empty"):
        read_examples(path)


@pytest.mark.parametrize("label", ["", "   "])
def test_csv_empty_label(tmp_path, label):
    path = write_csv(tmp_path / "d.csv", [{"text": "a b", "label": "x"}, {"text": "c d", "label": label}])
    with pytest.raises(DataError, match=r"d\.csv:3: 'label' is empty"):
        read_examples(path)


def test_csv_short_row_is_refused_with_both_counts(tmp_path):
    # Was read as an empty label; a narrower row is now refused as such.
    path = _write_text(tmp_path / "d.csv", "text,label\nhello,a\nonly text\n")
    with pytest.raises(DataError, match=r"d\.csv:3: the row has 1 field\(s\) but the header \(line 1\) has 2"):
        read_examples(path)


@pytest.mark.parametrize("text", ["", "  \t", 5, None])
def test_jsonl_empty_or_non_string_text(tmp_path, text):
    # Line 2 is blank and still counted.
    path = _write_text(tmp_path / "d.jsonl", json.dumps({"text": "ok", "label": "a"}) + "\n\n"
                       + json.dumps({"text": text, "label": "b"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:3: 'text' is empty"):
        read_examples(path)


@pytest.mark.parametrize("label", [None, "", " ", [], {}, True])
def test_jsonl_empty_or_invalid_label(tmp_path, label):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok", "label": "a"}, {"text": "fine", "label": label}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: 'label' is empty"):
        read_examples(path)


def test_jsonl_invalid_json_line(tmp_path):
    path = _write_text(tmp_path / "d.jsonl", '{"text": "ok", "label": "a"}\n{"text": "broken", "label": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        read_examples(path)


@pytest.mark.parametrize("line, kind", [('["a", "b"]', "list"), ('"just text"', "str"), ("3", "int")])
def test_jsonl_non_object_line(tmp_path, line, kind):
    path = _write_text(tmp_path / "d.jsonl", '{"text": "ok", "label": "a"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"d\.jsonl:2: each line must be a JSON object, got {kind}"):
        read_examples(path)


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl"])
def test_non_utf8_bytes(tmp_path, name):
    if name.endswith(".csv"):
        data = b"text,label\ncaf\xe9 au lait,a\n"
    else:
        data = b'{"text": "caf\xe9", "label": "a"}\n'
    path = _write_bytes(tmp_path / name, data)
    with pytest.raises(DataError, match="not UTF-8"):
        read_examples(path)


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl"])
def test_utf8_with_byte_order_mark(tmp_path, name):
    body = "text,label\nhello,a\nbye,b\n" if name.endswith(".csv") else (
        '{"text": "hello", "label": "a"}\n{"text": "bye", "label": "b"}\n')
    path = _write_bytes(tmp_path / name, b"\xef\xbb\xbf" + body.encode("utf-8"))
    data = read_examples(path)
    assert data.texts == ["hello", "bye"] and data.labels == ["a", "b"]


# ---------------------------------------------------------------------- reading: what is refused
# Every refusal is one DataError with a one-line message "{path}:{line}: ..." (or "{path}: ..."
# for the whole file), never another exception type and never a silent misread.


def _refused(path, pattern: str) -> str:
    """The DataError message of reading ``path``; it matches ``pattern`` and is one line."""
    with pytest.raises(DataError) as e:
        read_examples(path)
    msg = str(e.value)
    assert re.search(pattern, msg), msg
    assert len(msg.splitlines()) == 1 and "\n" not in msg and "\r" not in msg, msg
    return msg


def _read(path) -> tuple:
    data = read_examples(path)
    return data.texts, data.text_pairs, data.labels


def test_csv_field_of_200000_chars_reads_like_jsonl(tmp_path):
    long = "word, \"quoted\" and more\n" * 8500 + "end"  # 204,003 chars with commas, quotes, newlines
    assert len(long) > 200_000
    rows = [{"text": long, "label": "a"}, {"text": "short", "label": "b"}]
    from_csv = _read(write_csv(tmp_path / "d.csv", rows))
    from_jsonl = _read(write_jsonl(tmp_path / "d.jsonl", rows))
    assert from_csv == from_jsonl == ([long, "short"], None, ["a", "b"])
    assert csv.field_size_limit() == 131072  # restored after reading


def test_csv_unbalanced_quote_that_swallows_rows_is_refused(tmp_path):
    # The stray quote on line 2 pairs with the literal one on line 3: 3 rows would read as 2 examples.
    path = _write_text(tmp_path / "bad.csv", 'text,label\n"great movie,pos\nbad movie",neg\nokay movie,pos\n')
    msg = _refused(path, r"bad\.csv:2: a quote opened on line 2 runs to line 3 and swallows lines that read as rows")
    assert '("")' in msg


def test_csv_quote_swallowing_a_row_whose_label_is_seen_nowhere_else_is_refused(tmp_path):
    # 'money' is no other row's label, but shaped like one ('sport', 'music'): 4 rows would read as 3.
    path = _write_text(tmp_path / "bad.csv", 'text,label\ngoal match team,sport\n"bank market price,money\n'
                       'song album band",music\npiano tour record,music\n')
    _refused(path, r"bad\.csv:3: a quote opened on line 3 runs to line 4 and swallows lines that read as rows "
                   r"\(lines 3, 4\)")


def test_csv_unbalanced_quote_swallowing_regression_rows_is_refused(tmp_path):
    path = _write_text(tmp_path / "bad.csv", 'label,text\n0.5,"nice\n1.25,poor\n2.75,fine"\n3.5,ok\n')
    _refused(path, r"bad\.csv:2: a quote opened on line 2 runs to line 4 and swallows lines that read as rows")


PARAGRAPHS = [
    "Dear team,\nthanks, really.\nBest, Ann",  # commas followed by a space, as in prose
    "Hello, world\nBye",  # the first line splits in two fields
    "However, it was fine\nYes, I agree\nWell, maybe",  # 'However' is shaped like a label
    "It sold 1,500\ncopies, up from 1,200",  # digits: only a known label counts
    "a\n\nb\r\nc\rd",  # blank line, CRLF and a lone CR inside the text
    'He said "fine",\nthen left',
]


@pytest.mark.parametrize("labels", [["pos", "neg"], ["0", "1"]])
@pytest.mark.parametrize("label_first", [False, True])
@pytest.mark.parametrize("quoting", [csv.QUOTE_MINIMAL, csv.QUOTE_ALL])
def test_csv_multi_line_paragraphs_with_commas_are_accepted(tmp_path, labels, label_first, quoting):
    rows = [(t, labels[i % 2]) for i, t in enumerate(PARAGRAPHS)]
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=quoting)
        w.writerow(["label", "text"] if label_first else ["text", "label"])
        w.writerows([(lab, t) if label_first else (t, lab) for t, lab in rows])
    assert _read(tmp_path / "d.csv") == (PARAGRAPHS, None, [lab for _, lab in rows])


def test_csv_line_numbers_follow_a_lone_cr_in_a_quoted_field(tmp_path):
    # Lines end at CR; the row with the empty label starts on line 3 and spans lines 3-4.
    path = _write_text(tmp_path / "d.csv", 'text,label\rok,a\r"multi\rline",\rlast,b\r')
    _refused(path, r"d\.csv:3: 'label' is empty")


@pytest.mark.parametrize("header, names", [
    pytest.param("text,label,text", r"column 'text' appears twice in the header \(columns 1 and 3\)", id="same"),
    pytest.param("text,label,Text", r"columns 'text' and 'Text' differ only in case or surrounding spaces",
                 id="case"),
    pytest.param("label,text, TEXT ", r"columns 'text' and ' TEXT ' differ only in case", id="case-and-spaces"),
])
def test_csv_repeated_column_names_are_refused(tmp_path, header, names):
    path = _write_text(tmp_path / "bad.csv", f"{header}\nhello,a,x\n")
    _refused(path, r"bad\.csv:1: " + names)


def test_csv_header_is_the_first_non_blank_line(tmp_path):
    path = _write_text(tmp_path / "bad.csv", "\n\ntext,label,TEXT\nhello,a,x\n")
    _refused(path, r"bad\.csv:3: columns 'text' and 'TEXT'")


@pytest.mark.parametrize("row, width", [pytest.param("hello,a,extra", 3, id="wider"),
                                        pytest.param("only text", 1, id="narrower")])
def test_csv_row_wider_or_narrower_than_header(tmp_path, row, width):
    path = _write_text(tmp_path / "bad.csv", f"text,label\nfine,a\n\n{row}\nlater,b\n")
    _refused(path, rf"bad\.csv:4: the row has {width} field\(s\) but the header \(line 1\) has 2; ")


def test_csv_text_after_closing_quote(tmp_path):
    path = _write_text(tmp_path / "bad.csv", 'text,label\nfine,a\n"Best movie" ever,b\n')
    _refused(path, r"bad\.csv:3: text after a closing quote; ")


def test_csv_text_after_closing_quote_on_a_later_line_names_both(tmp_path):
    path = _write_text(tmp_path / "bad.csv", 'text,label\n"two\nlines"x,a\n')
    _refused(path, r"bad\.csv:2: text after a closing quote \(on line 3\)")


def test_csv_quote_open_at_end_of_file(tmp_path):
    path = _write_text(tmp_path / "bad.csv", 'text,label\nfine,a\n"never closed,b\nmore,a\n')
    _refused(path, r"bad\.csv:3: a quote opened in the row that starts here is never closed")


def test_csv_whitespace_only_line_is_blank(tmp_path):
    path = _write_text(tmp_path / "d.csv", "text,label\nhello,a\n   \nbye,b\n")
    assert _read(path) == (["hello", "bye"], None, ["a", "b"])


@pytest.mark.parametrize("name", ["bad.csv", "bad.jsonl"])
@pytest.mark.parametrize("encoding, bits", [("utf-16-le", "16"), ("utf-16-be", "16"), ("utf-32-le", "32"),
                                            ("utf-32-be", "32")])
def test_utf16_or_utf32_with_byte_order_mark(tmp_path, name, encoding, bits):
    body = "text,label\nhello,a\n" if name.endswith(".csv") else '{"text": "hello", "label": "a"}\n'
    path = _write_bytes(tmp_path / name, "\ufeff".encode(encoding) + body.encode(encoding))
    _refused(path, rf"bad\.(csv|jsonl): the file is UTF-{bits} text .*re-save it as UTF-8")


@pytest.mark.parametrize("name", ["bad.csv", "bad.jsonl"])
def test_latin1_byte_is_named_with_its_line_and_offset(tmp_path, name):
    rows = ["text,label", "hello,a", "caf\xe9,b"] if name.endswith(".csv") else [
        '{"text": "hello", "label": "a"}', "", '{"text": "caf\xe9", "label": "b"}']
    data = "\r\n".join(rows).encode("latin-1")
    offset = data.index(b"\xe9")
    _refused(_write_bytes(tmp_path / name, data),
             rf"bad\.(csv|jsonl):3: not UTF-8 text \(byte 0xe9 at byte offset {offset}: ")


@pytest.mark.parametrize("name", ["bad.csv", "bad.jsonl"])
def test_nul_byte_is_named_with_its_line(tmp_path, name):
    data = b"text,label\nhello,a\nbye\0,b\n" if name.endswith(".csv") else (
        b'{"text": "hello", "label": "a"}\n{"text": "b\0ye", "label": "b"}\n')
    _refused(_write_bytes(tmp_path / name, data), r"bad\.(csv|jsonl):[23]: NUL byte .*binary file")


def test_utf16_without_byte_order_mark_is_a_nul_byte(tmp_path):
    path = _write_bytes(tmp_path / "bad.csv", "text,label\nhello,a\n".encode("utf-16-le"))
    _refused(path, r"bad\.csv:1: NUL byte at byte offset 1; .*UTF-16")


def _no_open(*args, **kwargs):
    raise AssertionError("the reader opened a path it should have refused")


def test_directory_as_path(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "open", _no_open, raising=False)
    (tmp_path / "dir.csv").mkdir()
    _refused(tmp_path / "dir.csv", r"data file '.*dir\.csv' is a directory, not a regular file")


def test_fifo_as_path_is_refused_without_opening_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "open", _no_open, raising=False)
    os.mkfifo(tmp_path / "pipe.csv")
    _refused(tmp_path / "pipe.csv", r"data file '.*pipe\.csv' is a FIFO")


def test_empty_path():
    _refused("", r"the data file path is empty")


def test_unreadable_file(tmp_path, monkeypatch):
    # Tests run as root, who may read anything: simulate the permission check failing.
    path = _write_text(tmp_path / "d.csv", "text,label\nhello,a\nbye,b\n")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == path else real_access(p, mode))
    _refused(path, r"data file '.*d\.csv' is not readable \(permission denied\)")


def test_error_while_opening_becomes_data_error(tmp_path, monkeypatch):
    path = _write_text(tmp_path / "d.csv", "text,label\nhello,a\nbye,b\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(data_module, "open", denied, raising=False)
    _refused(path, r"^cannot read data file '.*d\.csv' \(Permission denied\)$")


def _jsonl_line(line: str) -> str:
    return '{"text": "fine", "label": "a"}\n' + line + "\n"


JSONL_REFUSALS = [  # (id, line 2 of the file, what the message says)
    ("duplicate-key", '{"text": "x", "label": "a", "text": "y"}', r"key 'text' appears twice in one object"),
    ("duplicate-nested-key", '{"text": "x", "label": "b", "meta": {"k": 1, "k": 2}}', r"key 'k' appears twice"),
    ("nan", '{"text": "x", "label": NaN}', r"NaN is not a number this reader takes"),
    ("infinity", '{"text": "x", "label": Infinity}', r"Infinity is not a number"),
    ("minus-infinity", '{"text": "x", "label": -Infinity}', r"-Infinity is not a number"),
    ("1e999", '{"text": "x", "label": 1e999}', r"the number '1e999' overflows to infinity"),
    ("minus-1.5e400", '{"text": "x", "label": -1.5e400}', r"the number '-1.5e400' overflows to infinity"),
    ("5000-digit-int", '{"text": "x", "label": ' + "7" * 5000 + "}", r"an integer of 5000 digits is too long"),
    ("nesting-100000-deep", '{"text": "x", "label": "a", "d": ' + "[" * 100_000 + "]" * 100_000 + "}",
     r"nested too deeply"),
    ("surrogate-in-text", '{"text": "x\\ud800y", "label": "a"}', r"the string 'x\\ud800y' holds an unpaired UTF-16"),
    ("surrogate-in-key", '{"text": "x", "label": "a", "\\ud800": 1}', r"surrogate \(\\ud800 at character 1\)"),
    ("surrogate-nested", '{"text": "x", "label": "a", "m": {"n": "\\ud83d!"}}', r"unpaired UTF-16 surrogate"),
    ("extra-data", '{"text": "x", "label": "a"} {"text": "y"}', r"not valid JSON \(Extra data at column 29\)"),
]


@pytest.mark.parametrize("line, pattern", [c[1:] for c in JSONL_REFUSALS], ids=[c[0] for c in JSONL_REFUSALS])
def test_jsonl_refusals_name_the_line(tmp_path, line, pattern):
    old_limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(4300)  # Python's default; the 5,000-digit case relies on it
    try:
        _refused(_write_text(tmp_path / "bad.jsonl", _jsonl_line(line)), r"bad\.jsonl:2: .*" + pattern)
    finally:
        sys.set_int_max_str_digits(old_limit)


def test_jsonl_paired_surrogate_escape_and_big_numbers_are_read(tmp_path):
    path = _write_text(tmp_path / "d.jsonl", '{"text": "smile \\ud83d\\ude00", "label": 1e308}\n'
                       '{"text": "big", "label": ' + "9" * 400 + "}\n")
    assert _read(path) == (["smile \U0001F600", "big"], None, [1e308, int("9" * 400)])
    assert infer_task([1e308, int("9" * 400)]) == "classification"  # no OverflowError on the 400-digit int


def test_long_user_text_in_a_message_is_cut(tmp_path):
    key = "k" * 500
    msg = _refused(_write_text(tmp_path / "bad.jsonl", _jsonl_line(f'{{"{key}": 1, "{key}": 2}}')), r"bad\.jsonl:2: ")
    assert f"'{'k' * 40}'..." in msg and len(msg) < 200



# ---------------------------------------------------------------------- task and labels


@pytest.mark.parametrize("labels, task", [
    (["pos", "neg", "pos"], "classification"),
    ([0, 1, 2, 1], "classification"),
    (["0", "1", "2"], "classification"),
    ([1.0, 2.0, 3.0], "classification"),
    ([0.5, 1, 2], "regression"),
    (["0.5", "1", "3.25"], "regression"),
    ([1.5, "x"], "classification"),  # not all numbers
])
def test_infer_task(labels, task):
    assert infer_task(labels) == task


def test_label_space_class_order_and_encode():
    ls = LabelSpace.from_labels(["pear", "apple", "fig", "apple", "pear"])
    assert ls.task == "classification"
    assert ls.names == ["apple", "fig", "pear"]
    assert ls.num_labels == 3
    t = ls.encode(_dataset(["fig", "pear", "apple", "apple"]))
    assert t.dtype == torch.long
    assert t.tolist() == [1, 2, 0, 0]


def test_label_space_numeric_names_sorted_numerically():
    ls = LabelSpace.from_labels(["10", "2", "9", "1", "-3"])
    assert ls.names == ["-3", "1", "2", "9", "10"]
    ls2 = LabelSpace.from_labels([10, 2, 9, 1])
    assert ls2.names == ["1", "2", "9", "10"]
    assert ls2.encode(_dataset([10, 1, 9])).tolist() == [3, 0, 2]


def test_label_space_int_float_and_string_are_one_class():
    ls = LabelSpace.from_labels([1, 1.0, "1", 2, "2", 2.0])
    assert ls.names == ["1", "2"]
    assert ls.encode(_dataset([1, 1.0, "1", 2.0, "2", 2])).tolist() == [0, 0, 0, 1, 1, 1]


def test_label_space_encode_unknown_label_names_it_and_the_classes():
    ls = LabelSpace.from_labels(["apple", "fig"])
    with pytest.raises(DataError) as e:
        ls.encode(_dataset(["fig", "banana"]))
    msg = str(e.value)
    assert "'banana'" in msg and "example 2" in msg
    assert "['apple', 'fig']" in msg
    assert msg == ("test-data: label 'banana' (example 2) is not one of the classes ['apple', 'fig'] "
                   "(from the training labels); give data labelled with those classes")


def test_label_space_origin_names_where_the_classes_come_from():
    trained = LabelSpace.from_labels(["apple", "fig"], source="train.csv")
    assert trained.origin == "the training labels of train.csv"
    with pytest.raises(DataError, match=r"is not one of the classes \['apple', 'fig'\] "
                                        r"\(from the training labels of train\.csv\); give data labelled"):
        trained.encode(_dataset(["kiwi"]))
    loaded = LabelSpace.from_json(trained.to_json(), "teacher/cofi_task.json")
    assert loaded.origin == "the classes in teacher/cofi_task.json"
    with pytest.raises(DataError, match=r"\(from the classes in teacher/cofi_task\.json\)"):
        loaded.encode(_dataset(["kiwi"]))
    # origin is for messages only: not compared, not saved in the task file.
    assert loaded == trained == LabelSpace("classification", ["apple", "fig"])
    assert trained.to_json() == {"task": "classification", "labels": ["apple", "fig"]}
    with pytest.raises(DataError, match="at least 2 classes, the training labels of train.csv have"):
        LabelSpace.from_labels(["only"], source="train.csv")


def test_label_space_regression_encode():
    ls = LabelSpace.from_labels([0.5, 1.25, 3])
    assert ls.task == "regression" and ls.names == [] and ls.num_labels == 1
    t = ls.encode(_dataset([0.5, "2.75", -1, 4.0]))
    assert t.dtype == torch.float32
    assert t.tolist() == [0.5, 2.75, -1.0, 4.0]


@pytest.mark.parametrize("bad", ["abc", float("nan"), "nan", float("inf"), None])
def test_label_space_regression_rejects_non_numbers(bad):
    ls = LabelSpace("regression", [])
    with pytest.raises(DataError, match=r"example 2\) is not a finite number"):
        ls.encode(_dataset([1.5, bad, 2.0]))


def test_label_space_forced_task_and_errors():
    assert LabelSpace.from_labels([1, 2, 3], task="regression").task == "regression"
    with pytest.raises(DataError, match="at least 2 classes"):
        LabelSpace.from_labels(["only", "only", "only"])
    with pytest.raises(DataError, match="at least 2 classes"):
        LabelSpace.from_labels([1, 1.0, "1"])
    with pytest.raises(DataError, match="task must be one of"):
        LabelSpace.from_labels(["a", "b"], task="ranking")


def test_label_space_json_round_trip():
    for ls in (LabelSpace.from_labels(["b", "a", "c"]), LabelSpace.from_labels([3, 1, 2]),
               LabelSpace.from_labels([0.5, 1.5])):
        obj = json.loads(json.dumps(ls.to_json()))
        back = LabelSpace.from_json(obj, "model/labels.json")
        assert back == ls
    assert LabelSpace.from_labels(["b", "a"]).to_json() == {"task": "classification", "labels": ["a", "b"]}
    for bad in ({"task": "classification"}, {"task": "x", "labels": []}, ["a"], {"task": "regression", "labels": 3}):
        with pytest.raises(DataError, match="model/labels.json"):
            LabelSpace.from_json(bad, "model/labels.json")


# ---------------------------------------------------------------------- splits


def _numbered(n: int) -> TextDataset:
    return _dataset([f"c{i % 3}" for i in range(n)], texts=[f"t{i}" for i in range(n)])


def _ids(part: TextDataset) -> list[int]:
    return [int(t[1:]) for t in part.texts]


@pytest.mark.parametrize("n, fraction", [(50, 0.2), (37, 0.1), (10, 0.5), (9, 0.25), (5, 0.5), (101, 0.33)])
def test_split_held_out_sizes_disjoint_covering_ordered(n, fraction):
    data = _numbered(n)
    rest, held = split_held_out(data, fraction, seed=7)
    k = round(fraction * n)
    assert len(held) == k and len(rest) == n - k
    r, h = _ids(rest), _ids(held)
    assert not set(r) & set(h)
    assert sorted(r + h) == list(range(n))
    assert r == sorted(r) and h == sorted(h)  # both keep file order
    # labels travel with their texts
    assert held.labels == [f"c{i % 3}" for i in h]
    assert rest.labels == [f"c{i % 3}" for i in r]


def test_split_held_out_seeded():
    data = _numbered(60)
    a = split_held_out(data, 0.25, seed=3)
    b = split_held_out(data, 0.25, seed=3)
    c = split_held_out(data, 0.25, seed=4)
    assert _ids(a[1]) == _ids(b[1]) and _ids(a[0]) == _ids(b[0])
    assert _ids(a[1]) != _ids(c[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_held_out_fraction_out_of_range(fraction):
    with pytest.raises(DataError, match=r"must be in \(0, 1\)"):
        split_held_out(_numbered(20), fraction, seed=0)


@pytest.mark.parametrize("n, fraction", [(1, 0.5), (3, 0.1), (2, 0.9), (4, 0.95)])
def test_split_held_out_too_little_data(n, fraction):
    with pytest.raises(DataError, match="too few"):
        split_held_out(_numbered(n), fraction, seed=0)


# ---------------------------------------------------------------------- batches


def test_encoded_batch_pads_to_longest_in_batch(tok):
    texts = ["short", "a somewhat longer sentence with more words in it", "two words", "x " * 30]
    data = _dataset(["a", "b", "a", "b"], texts=texts)
    labels = LabelSpace.from_labels(data.labels)
    enc = Encoded(data, labels, tok, max_length=64)
    assert len(enc) == 4
    assert enc.pad_id == tok.pad_token_id
    ref = [tok(t)["input_ids"] for t in texts]
    for index in ([0, 2], [1, 0, 2], [3, 1], [2]):
        b = enc.batch(index)
        T = max(len(ref[i]) for i in index)
        assert b["input_ids"].shape == (len(index), T)
        assert b["attention_mask"].shape == b["token_type_ids"].shape == (len(index), T)
        assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
        for r, i in enumerate(index):
            n = len(ref[i])
            assert b["input_ids"][r, :n].tolist() == ref[i]
            assert (b["input_ids"][r, n:] == tok.pad_token_id).all()
            assert b["attention_mask"][r].tolist() == [1] * n + [0] * (T - n)
            assert (b["token_type_ids"][r] == 0).all()
        assert b["labels"].dtype == torch.long
        assert b["labels"].tolist() == [labels.names.index(data.labels[i]) for i in index]


def test_encoded_truncates_to_max_length(tok):
    long_text = " ".join(f"word{i}" for i in range(80))
    data = _dataset(["a", "b"], texts=[long_text, "tiny"])
    enc = Encoded(data, LabelSpace.from_labels(data.labels), tok, max_length=12)
    full = tok(long_text)["input_ids"]
    assert len(full) > 12
    assert enc.input_ids[0] == full[:11] + [tok.sep_token_id]
    assert enc.input_ids[1] == tok("tiny")["input_ids"]
    b = enc.batch([1, 0])
    assert b["input_ids"].shape == (2, 12)
    assert b["attention_mask"].sum(1).tolist() == [len(enc.input_ids[1]), 12]


def test_encoded_pairs_and_regression_targets(tok):
    texts = ["the first segment here", "another one"]
    pairs = ["second", "and the second segment is longer"]
    data = _dataset(["0.5", "1.75"], texts=texts, pairs=pairs)
    labels = LabelSpace.from_labels(data.labels)
    assert labels.task == "regression"
    enc = Encoded(data, labels, tok, max_length=64)
    b = enc.batch([0, 1])
    assert b["labels"].dtype == torch.float32
    assert b["labels"].tolist() == [0.5, 1.75]
    for r in range(2):
        first = tok(texts[r])["input_ids"]  # [CLS] a [SEP]
        second = tok(pairs[r])["input_ids"][1:]  # b [SEP]
        n = len(first) + len(second)
        assert b["input_ids"][r, :n].tolist() == first + second
        assert b["token_type_ids"][r, :n].tolist() == [0] * len(first) + [1] * len(second)
        assert b["attention_mask"][r].sum().item() == n


def test_encoded_in_order_covers_all():
    class _Tok:
        pad_token_id = 0

        def __call__(self, texts, pairs, **kw):
            return {"input_ids": [[1, 2]] * len(texts), "token_type_ids": [[0, 0]] * len(texts)}

    data = _numbered(11)
    enc = Encoded(data, LabelSpace.from_labels(data.labels), _Tok(), max_length=8)
    batches = list(enc.in_order(4))
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


def test_encoded_needs_pad_token():
    class _NoPad:
        pad_token_id = None

    data = _numbered(4)
    with pytest.raises(DataError, match="no padding token"):
        Encoded(data, LabelSpace.from_labels(data.labels), _NoPad(), max_length=8)


@pytest.mark.parametrize("n, bs", [(23, 5), (20, 5), (7, 10), (1, 3)])
def test_epoch_order(n, bs):
    order = epoch_order(n, bs, seed=11, epoch=2)
    assert order == epoch_order(n, bs, seed=11, epoch=2)  # pure function of its arguments
    flat = [i for b in order for i in b]
    assert sorted(flat) == list(range(n))
    assert len(order) == math.ceil(n / bs)
    assert all(len(b) == bs for b in order[:-1])
    assert len(order[-1]) == n - bs * (len(order) - 1)
    if n >= 10:
        assert epoch_order(n, bs, seed=11, epoch=3) != order
        assert epoch_order(n, bs, seed=12, epoch=2) != order
        assert flat != list(range(n))  # shuffled


def test_epoch_order_independent_of_global_rng():
    torch.manual_seed(1)
    a = epoch_order(40, 8, seed=5, epoch=0)
    torch.rand(100)
    torch.manual_seed(2)
    assert epoch_order(40, 8, seed=5, epoch=0) == a


# ---------------------------------------------------------------------- BBC News


def test_bbc_news():
    data = bbc_news()
    assert len(data) == 2225
    assert data.text_pairs is None
    assert collections.Counter(data.labels) == {
        "business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401,
    }
    assert all(isinstance(t, str) and t.strip() for t in data.texts)
    assert LabelSpace.from_labels(data.labels).names == ["business", "entertainment", "politics", "sports", "tech"]
    again = bbc_news()
    assert again.texts == data.texts and again.labels == data.labels
