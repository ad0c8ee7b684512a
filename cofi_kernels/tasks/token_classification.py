"""Token classification (named entities, chunks, POS): a tag per word.

Data: JSONL records ``{"tokens": [...], "tags": [...]}`` (data to predict on may give
``{"text": "..."}`` instead: its words are the whitespace-separated runs, and their character
offsets in the original text are kept), or CoNLL column files (whitespace-separated columns,
the word first and its tag last, a blank line between sentences). The head classifies every
token; a word's tag is learned and predicted on its first sub-token only (other sub-tokens,
special tokens and padding carry the label -100 and are never read). The loss is the
cross-entropy averaged over each example's labelled tokens; CoFi distils with the per-token
KL divergence at temperature T, times T², on the same positions; the metric is entity-level
micro F1 with conlleval chunking (as seqeval's default mode); a prediction is the entities
found, with character offsets into the example's text, and the tag of every word.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.paths import check_input_file
from ..data.text import DataError, _decode, _quote, _read_bytes, _shown, json_records
from .base import Features, Task, reduce_examples
from .classification import model_outputs

__all__ = ["TASK", "TagSpace", "TokenClassificationTask", "TokenDataset", "TokenFeatures", "entities",
           "entity_scores", "read_tokens", "word_tokenizer"]

#: the label of positions that carry no target (non-first sub-tokens, special tokens, padding)
IGNORE = -100
#: extensions read as CoNLL column files (any other non-JSON file is too)
CONLL_EXTENSIONS = (".conll", ".conllu", ".iob", ".bio", ".txt")
JSON_EXTENSIONS = (".jsonl", ".ndjson", ".json")
_WORD = re.compile(r"\S+")
# Tags quoted in one message at most (a tag set can be large).
_SHOWN_TAGS = 20


# ---------------------------------------------------------------------- data


@dataclass
class TokenDataset:
    """Sentences of words and their tags, in file order.

    Attributes:
        tokens: the words of each example (non-empty lists of non-empty strings).
        tags: one tag per word of each example, or ``None`` for data read unlabelled.
        source: where the examples came from (for messages).
        raw_texts: per example, the original text when it was read from ``{"text": ...}``, else
            ``None`` (then the text is the words joined by single spaces); ``None`` for all.
        lines: per example, the file line where it starts (for messages); not compared.
    """

    tokens: list[list[str]]
    tags: list[list[str]] | None
    source: str
    raw_texts: list[str | None] | None = None
    lines: list[int] | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, index: Sequence[int], source: str | None = None) -> "TokenDataset":
        """The examples at ``index``, in that order."""
        index = list(index)
        return TokenDataset(
            tokens=[self.tokens[i] for i in index],
            tags=None if self.tags is None else [self.tags[i] for i in index],
            source=source or self.source,
            raw_texts=None if self.raw_texts is None else [self.raw_texts[i] for i in index],
            lines=None if self.lines is None else [self.lines[i] for i in index],
        )

    def rows(self) -> Iterator[dict]:
        """``{"tokens": [...], "tags": [...] or None}`` per example, plus ``"text"`` when read from one
        (what a run's fingerprint hashes)."""
        for i in range(len(self)):
            row = {"tokens": self.tokens[i], "tags": None if self.tags is None else self.tags[i]}
            if self.raw_texts is not None and self.raw_texts[i] is not None:
                row["text"] = self.raw_texts[i]
            yield row

    @property
    def texts(self) -> list[str]:
        """Each example's text: the original text when read from ``{"text": ...}``, else its words
        joined by single spaces."""
        return [self.text(i) for i in range(len(self))]

    def text(self, i: int) -> str:
        """The text of example ``i`` (see :attr:`texts`)."""
        if self.raw_texts is not None and self.raw_texts[i] is not None:
            return self.raw_texts[i]
        return " ".join(self.tokens[i])

    def spans(self, i: int) -> list[tuple[int, int]]:
        """``(start, end)`` character offsets of each word of example ``i`` in :meth:`text` (end exclusive)."""
        if self.raw_texts is not None and self.raw_texts[i] is not None:
            return [m.span() for m in _WORD.finditer(self.raw_texts[i])]
        out, at = [], 0
        for w in self.tokens[i]:
            out.append((at, at + len(w)))
            at += len(w) + 1
        return out

    def where(self, i: int) -> str:
        """``"example i+1 (line L)"`` for messages."""
        line = f", line {self.lines[i]}" if self.lines is not None else ""
        return f"example {i + 1}{line}"


def read_tokens(path: str | os.PathLike, *, labelled: bool = True) -> TokenDataset:
    """Read a JSONL or CoNLL token-classification file.

    JSONL (``.jsonl``, ``.ndjson``, ``.json``, or any file whose first non-blank line starts with
    ``{`` unless its extension is a CoNLL one): one object per line, ``tokens`` (a non-empty list of
    non-empty strings) and ``tags`` (as many strings). With ``labelled=False`` ``tags`` is optional
    and ignored, and a record may give ``{"text": "..."}`` instead of ``tokens``: its words are the
    runs of non-whitespace, and the text is kept for character offsets. (Labelled records may also
    give ``text`` with ``tags`` for its words.)

    CoNLL (``.conll``, ``.conllu``, ``.iob``, ``.bio``, ``.txt``, any other file): one word a line,
    whitespace-separated columns, the word first and its tag last; a blank line ends a sentence;
    ``-DOCSTART-`` lines are skipped (they end a sentence); in ``.conllu`` files ``#`` comment lines
    are skipped, and a 10-column CoNLL-U line (an integer ID first) gives its word from the FORM
    column, while multiword-token (``1-2``) and empty-node (``1.1``) lines are skipped. Unlabelled,
    a one-column line is a word without a tag.

    Raises:
        DataError: one line ``"{path}:{line}: ..."`` naming what was expected: invalid JSON, a record
            that is not an object or lacks ``tokens``, an empty token list, a token or tag that is not
            a (non-empty) string, a tag list of another length than the tokens, a labelled CoNLL line
            with one column, no sentences at all; and the path and encoding errors of
            :func:`~cofi_kernels.data.text.read_examples`.
    """
    path = os.fsdecode(check_input_file(path, "data file", DataError))
    where = _shown(path)
    text = _decode(where, _read_bytes(path))
    ext = os.path.splitext(path)[1].lower()
    if ext in JSON_EXTENSIONS or (ext not in CONLL_EXTENSIONS and text.lstrip().startswith("{")):
        data = _read_jsonl(where, text, labelled)
    else:
        data = _read_conll(where, text, labelled, conllu=ext == ".conllu")
    data.source = path
    if not data.tokens:
        what = "tokens and tags" if labelled else "tokens"
        raise DataError(f"{where}: the file has no sentences; give JSONL records with {what} or CoNLL columns "
                        "(word ... tag, a blank line between sentences)")
    return data


def _check_words(where: str, line: int, words, what: str = "'tokens'") -> list[str]:
    if not isinstance(words, list):
        raise DataError(f"{where}:{line}: {what} must be a list of strings, got {type(words).__name__}")
    if not words:
        raise DataError(f"{where}:{line}: {what} is an empty list; every example needs at least one word")
    for k, w in enumerate(words):
        if not isinstance(w, str):
            raise DataError(f"{where}:{line}: token {k + 1} is {type(w).__name__} {_quote(str(w))}, not a string")
        if not w.strip():
            raise DataError(f"{where}:{line}: token {k + 1} is empty or only whitespace; give non-empty words")
    return words


def _check_tags(where: str, line: int, tags, n_words: int) -> list[str]:
    if not isinstance(tags, list):
        raise DataError(f"{where}:{line}: 'tags' must be a list of strings, got {type(tags).__name__}")
    for k, t in enumerate(tags):
        if not isinstance(t, str):
            raise DataError(f"{where}:{line}: tag {k + 1} is {type(t).__name__} {_quote(str(t))}, not a string")
        if not t.strip() or t != t.strip():
            raise DataError(f"{where}:{line}: tag {k + 1} ({_quote(t)}) is empty or has surrounding whitespace")
    if len(tags) != n_words:
        raise DataError(f"{where}:{line}: {len(tags)} tag(s) for {n_words} token(s); give one tag per token")
    return tags


def _read_jsonl(where: str, text: str, labelled: bool) -> TokenDataset:
    tokens, tags, raw, lines = [], [] if labelled else None, [], []
    for line_no, obj in json_records(where, text):
        if "tokens" in obj:
            words = _check_words(where, line_no, obj["tokens"])
            raw_text = None
        elif "text" in obj:
            raw_text = obj["text"]
            if not isinstance(raw_text, str) or not raw_text.strip():
                raise DataError(f"{where}:{line_no}: 'text' is empty or not a string; give the sentence's text")
            words = _WORD.findall(raw_text)
        else:
            keys = ", ".join(_quote(k) for k in sorted(obj)[:10])
            raise DataError(f"{where}:{line_no}: missing 'tokens'; each record needs 'tokens' (a list of words) "
                            f"and 'tags'{'' if labelled else ' (or a text to predict on)'}, found [{keys}]")
        if labelled:
            if "tags" not in obj:
                raise DataError(f"{where}:{line_no}: missing 'tags'; labelled data needs one tag per token")
            tags.append(_check_tags(where, line_no, obj["tags"], len(words)))
        tokens.append(words)
        raw.append(raw_text)
        lines.append(line_no)
    return TokenDataset(tokens, tags, where, raw if any(r is not None for r in raw) else None, lines)


def _read_conll(where: str, text: str, labelled: bool, conllu: bool) -> TokenDataset:
    tokens, tags, lines = [], [] if labelled else None, []
    words: list[str] = []
    word_tags: list[str] = []
    first = 0

    def end_sentence():
        """Close the sentence being read (if any)."""
        nonlocal words, word_tags
        if words:
            tokens.append(words)
            if labelled:
                tags.append(word_tags)
            lines.append(first)
        words, word_tags = [], []

    for line_no, line in enumerate(io.StringIO(text, newline=""), 1):
        stripped = line.strip()
        if not stripped:
            end_sentence()
            continue
        if conllu and stripped.startswith("#"):
            continue
        cols = stripped.split()
        if cols[0] == "-DOCSTART-":
            end_sentence()
            continue
        if conllu and len(line.rstrip("\r\n").split("\t")) == 10 and re.fullmatch(r"\d+([-.]\d+)?", cols[0]):
            if not cols[0].isdigit():
                continue  # a multiword token or an empty node: its words come on their own lines
            cols = line.rstrip("\r\n").split("\t")
            word = cols[1]
        else:
            word = cols[0]
        if labelled and len(cols) < 2:
            raise DataError(f"{where}:{line_no}: one column ({_quote(stripped)}); each line needs the word and "
                            "its tag separated by whitespace (the tag last)")
        if not words:
            first = line_no
        words.append(word)
        if labelled:
            word_tags.append(cols[-1].strip())
    end_sentence()
    return TokenDataset(tokens, tags, where, None, lines)


# ---------------------------------------------------------------------- spec


@dataclass
class TagSpace:
    """The tags of a token-classification task, in id order.

    Attributes:
        task: ``"token_classification"``.
        names: the tags, ``"O"`` first (when present) then the others sorted by name.
        origin: where the tags come from, for messages; not saved, not compared.
    """

    task: str
    names: list[str]
    origin: str = field(default="", compare=False)

    @classmethod
    def from_tags(cls, tags: Sequence[Sequence[str]], *, source: str | None = None) -> "TagSpace":
        """The tag space of the training tags (per example, one tag per word).

        Raises:
            DataError: fewer than 2 distinct tags."""
        origin = f"the training tags of {source}" if source else "the training tags"
        found = {t for seq in tags for t in seq}
        names = (["O"] if "O" in found else []) + sorted(found - {"O"})
        if len(names) < 2:
            raise DataError(f"token classification needs at least 2 tags, {origin} have {names}")
        return cls("token_classification", names, origin)

    @property
    def num_outputs(self) -> int:
        """Width of the model's head: the number of tags."""
        return len(self.names)

    @property
    def num_labels(self) -> int:
        """The number of tags (as :attr:`num_outputs`)."""
        return len(self.names)

    def index(self) -> dict[str, int]:
        """Tag name -> id."""
        return {n: i for i, n in enumerate(self.names)}

    def shown(self) -> str:
        """The tags for a message (at most 20 of them)."""
        names = [_quote(n) for n in self.names[:_SHOWN_TAGS]]
        more = f", ... ({len(self.names)} in all)" if len(self.names) > _SHOWN_TAGS else ""
        return f"[{', '.join(names)}{more}]"

    def to_json(self) -> dict:
        """``{"task": "token_classification", "labels": [...]}``."""
        return {"task": self.task, "labels": list(self.names)}

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "TagSpace":
        """Inverse of :meth:`to_json`; DataError naming ``where`` when malformed."""
        labels = obj.get("labels") if isinstance(obj, dict) else None
        if (not isinstance(obj, dict) or obj.get("task") != "token_classification" or not isinstance(labels, list)
                or not all(isinstance(n, str) and n for n in labels) or len(set(labels)) != len(labels)
                or len(labels) < 2):
            raise DataError(f"{where}: malformed tag space {_quote(repr(obj))}; expected "
                            '{"task": "token_classification", "labels": [at least 2 distinct tags]}')
        return cls("token_classification", list(labels), f"the tags in {where}")


# ---------------------------------------------------------------------- encoding


def word_tokenizer(tokenizer):
    """The tokenizer to encode pre-split words with: ``tokenizer`` itself, or a copy whose byte-level
    pre-tokenizer adds a prefix space.

    Byte-level BPE tokenizers (RoBERTa, ModernBERT, GPT-2 style) mark a word start by the space before
    it; words given one by one (``is_split_into_words=True``) have none unless the pre-tokenizer has
    ``add_prefix_space=True``, so every word would be encoded as a word-internal piece (transformers 5
    does so silently). A tokenizer without the flag is copied with it set (the original is left as
    it is).

    Raises:
        DataError: the tokenizer is not a fast (``tokenizers``-backed) one: word ids need one.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        raise DataError(f"token classification needs a fast tokenizer (one with a tokenizer.json), got "
                        f"{type(tokenizer).__name__}; save the model directory's tokenizer as a fast one")
    pre = backend.pre_tokenizer
    if pre is None:
        return tokenizer
    state = json.loads(pre.__getstate__())
    if not _set_prefix_space(state):
        return tokenizer
    fixed = copy.deepcopy(tokenizer)
    new_pre = copy.deepcopy(pre)
    new_pre.__setstate__(json.dumps(state).encode())
    fixed.backend_tokenizer.pre_tokenizer = new_pre
    if hasattr(fixed, "add_prefix_space"):
        fixed.add_prefix_space = True
    return fixed


def _set_prefix_space(state) -> bool:
    """Set ``add_prefix_space`` on every ByteLevel pre-tokenizer in a serialised one; whether any changed."""
    changed = False
    if isinstance(state, dict):
        if state.get("type") == "ByteLevel" and state.get("add_prefix_space") is False:
            state["add_prefix_space"] = True
            changed = True
        for v in state.values():
            changed |= _set_prefix_space(v)
    elif isinstance(state, list):
        for v in state:
            changed |= _set_prefix_space(v)
    return changed


class TokenFeatures(Features):
    """Tokenized sentences: one feature per example (long sentences are truncated).

    Attributes:
        input_ids, token_type_ids: per feature, a list of ints (truncated to ``max_length``, no padding).
        word_ids: per feature, per token, the index of its word in the example, ``None`` for special tokens.
        labels: per feature, per token, the tag id on the first sub-token of each word and -100 elsewhere
            (other sub-tokens, special tokens); words cut off by truncation have no token. ``None`` when
            encoded unlabelled. ``targets`` is the same list.
        example_of: per feature, its example (the identity).
    """

    def __init__(self, input_ids, token_type_ids, pad_id, word_ids, labels=None):
        super().__init__(input_ids, token_type_ids, pad_id)
        self.word_ids = word_ids
        self.labels = labels
        self.targets = labels

    def first_tokens(self, f: int) -> list[tuple[int, int]]:
        """``(position, word)`` of the first sub-token of each word of feature ``f`` that kept one."""
        out, prev = [], None
        for pos, w in enumerate(self.word_ids[f]):
            if w is not None and w != prev:
                out.append((pos, w))
            prev = w
        return out

    def label_tensor(self, index: Sequence[int], seq_len: int | None = None) -> torch.Tensor:
        """``[b, T]`` int64 labels of features ``index``, padded with -100 to ``seq_len`` (default: the
        longest of them)."""
        index = list(index)
        T = seq_len if seq_len is not None else max(len(self.input_ids[i]) for i in index)
        out = torch.full((len(index), T), IGNORE, dtype=torch.long)
        for r, i in enumerate(index):
            out[r, : len(self.labels[i])] = torch.tensor(self.labels[i], dtype=torch.long)
        return out

    def batch(self, index: Sequence[int], device="cpu") -> dict[str, torch.Tensor]:
        """:meth:`inputs` (``[b, T]``) plus ``labels`` ``[b, T]`` int64, -100 where no tag is learned
        (when encoded labelled)."""
        out = self.inputs(index, device)
        if self.labels is not None:
            out["labels"] = self.label_tensor(index, out["input_ids"].shape[1]).to(device)
        return out


def encode_tokens(data: TokenDataset, spec: TagSpace | None, tokenizer, max_length: int) -> TokenFeatures:
    """Tokenize ``data``'s words (``is_split_into_words``), truncated to ``max_length`` tokens; with a
    ``spec`` the features carry labels on each word's first sub-token.

    Raises:
        DataError: a tag that ``spec`` lacks (naming it, the example, the file and the known tags), a
            tokenizer without a padding token or not a fast one."""
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no padding token; set one in the model directory's tokenizer config")
    tok = word_tokenizer(tokenizer)
    index = None
    if spec is not None:
        if data.tags is None:
            raise DataError(f"{data.source}: the data has no tags; give labelled data (tokens and tags)")
        index = spec.index()
        for i, seq in enumerate(data.tags):
            for t in seq:
                if t not in index:
                    raise DataError(
                        f"{data.source}: tag {_quote(t)} ({data.where(i)}) is not one of the tags {spec.shown()} "
                        f"(from {spec.origin or 'the tag space'}); give data tagged with those tags")
    enc = tok(data.tokens, is_split_into_words=True, truncation=True, max_length=max_length,
              return_token_type_ids=True, return_attention_mask=False)
    word_ids = [enc.word_ids(i) for i in range(len(data))]
    labels = None
    if index is not None:
        labels = []
        for i, ids in enumerate(word_ids):
            row, prev = [], None
            for w in ids:
                row.append(index[data.tags[i][w]] if w is not None and w != prev else IGNORE)
                prev = w
            labels.append(row)
    return TokenFeatures(enc["input_ids"], enc["token_type_ids"], tokenizer.pad_token_id, word_ids, labels)


# ---------------------------------------------------------------------- losses


def token_loss(outputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per example, the mean cross-entropy (float32) of ``outputs [B, T, C]`` over its positions with
    ``labels [B, T] != -100`` (0 for an example without one); then their mean or sum."""
    if outputs.shape[:2] != labels.shape:
        raise ValueError(f"outputs {tuple(outputs.shape)} do not match labels {tuple(labels.shape)}")
    B, T, C = outputs.shape
    mask = labels != IGNORE
    ce = F.cross_entropy(outputs.float().reshape(B * T, C), labels.reshape(B * T), ignore_index=IGNORE,
                         reduction="none").view(B, T)
    per_example = torch.where(mask, ce, 0.0).sum(1) / mask.sum(1).clamp_min(1)
    return reduce_examples(per_example, reduction)


def scored_positions(batch: dict) -> torch.Tensor:
    """``[B, T]`` bool: the positions a per-token distillation loss reads. With ``labels`` in the batch,
    those with a label (each kept word's first sub-token); without, every real token of
    ``attention_mask`` except each row's first and last (the special tokens around a sentence), so
    every sub-token of unlabelled data is distilled."""
    if "labels" in batch:
        return batch["labels"] != IGNORE
    mask = batch["attention_mask"].bool()
    n = mask.sum(1, keepdim=True)
    pos = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return mask & (pos > 0) & (pos < n - 1)


def token_distill_loss(student: torch.Tensor, teacher: torch.Tensor, batch: dict, temperature: float,
                       reduction: str = "mean") -> torch.Tensor:
    """Per token ``KL(softmax(t/T) ‖ softmax(s/T)) · T²`` of ``student`` / ``teacher`` outputs
    ``[B, T, C]`` (float32), averaged per example over :func:`scored_positions` (0 without one), then
    their mean or sum."""
    T = float(temperature)
    mask = scored_positions(batch)
    log_p_s = F.log_softmax(student.float() / T, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / T, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1) * (T * T)
    per_example = torch.where(mask, kl, 0.0).sum(1) / mask.sum(1).clamp_min(1)
    return reduce_examples(per_example, reduction)


# ---------------------------------------------------------------------- chunking and scores

_PREFIXES = ("B-", "I-", "E-", "S-")


def _split_tag(tag: str) -> tuple[str, str]:
    """``(prefix, type)`` of a tag: ``"O"`` -> ``("O", "")``; ``"B-PER"`` -> ``("B", "PER")``; a bare
    ``B``/``I``/``E``/``S`` -> type ``"_"`` (as seqeval); any other tag ``X`` is ``I-X`` (conlleval ``-r``)."""
    if tag == "O":
        return "O", ""
    if tag in ("B", "I", "E", "S"):
        return tag, "_"
    if tag.startswith(_PREFIXES):
        return tag[0], tag[2:] or "_"
    return "I", tag


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag != "O" and prev_type != type_


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag != "O" and prev_type != type_


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities of one tag sequence: ``(type, first_word, last_word)`` (inclusive), in order.

    Chunking is conlleval's, as seqeval's default (non-strict) mode: ``B-X`` starts an entity;
    ``I-X`` continues an entity of type X and starts one after ``O``, after an ``E-``/``S-`` tag or
    after another type; ``E-X`` ends an entity (and starts one after ``O``/``E-``/``S-``); ``S-X`` is a
    one-word entity; ``O`` ends any. A tag without a prefix is ``I-`` of its own type (conlleval ``-r``).
    """
    chunks = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, t in enumerate(list(tags) + ["O"]):
        tag, type_ = _split_tag(t)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def entity_scores(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict:
    """Entity-level micro ``{"precision", "recall", "f1"}`` (fractions) of predicted tag sequences
    against reference ones (one list of tags per sentence, sentences paired): an entity counts when
    its type, first and last word all match (:func:`entities`). Precision is 0 without predicted
    entities, recall 0 without reference ones, F1 0 when both are 0.

    Raises:
        ValueError: the lists, or a pair of sentences, differ in length."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference sentence(s) but {len(predictions)} predicted")
    correct = n_pred = n_true = 0
    for k, (ref, pred) in enumerate(zip(references, predictions)):
        if len(ref) != len(pred):
            raise ValueError(f"sentence {k + 1}: {len(ref)} reference tag(s) but {len(pred)} predicted")
        gold, found = set(entities(ref)), set(entities(pred))
        correct += len(gold & found)
        n_pred += len(found)
        n_true += len(gold)
    p = correct / n_pred if n_pred else 0.0
    r = correct / n_true if n_true else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1}


# ---------------------------------------------------------------------- decoding


def word_predictions(outputs: torch.Tensor, features: TokenFeatures, n_examples: int, spec: TagSpace,
                     n_words: Sequence[int]):
    """Per example ``(tags, probs, predicted)``: each word's predicted tag (argmax of its first sub-token's
    row of ``outputs [N, T, C]``), the softmax probability of that tag, and whether the word had a token
    (words cut by truncation get ``"O"``, probability 1.0 and False). Only real positions are read."""
    tags = [["O"] * n for n in n_words]
    probs = [[1.0] * n for n in n_words]
    has = [[False] * n for n in n_words]
    for f in range(len(features)):
        e = features.example_of[f]
        firsts = features.first_tokens(f)
        if not firsts:
            continue
        pos = torch.tensor([p for p, _ in firsts])
        p = outputs[f, pos].float().softmax(-1)
        best_p, best = p.max(-1)
        for (_, w), b, bp in zip(firsts, best.tolist(), best_p.tolist()):
            if not has[e][w]:
                tags[e][w], probs[e][w], has[e][w] = spec.names[b], bp, True
    return tags, probs, has


class TokenClassificationTask(Task):
    """Token classification: a tag per word (see the module docstring)."""

    name = "token_classification"
    auto_class = "AutoModelForTokenClassification"
    pruned_task = "token_classification"
    per_token = True
    metric = "f1"
    formats = 'JSONL with tokens, tags (or {"text": ...} to predict on); CoNLL columns (word ... tag)'
    dataset_class = TokenDataset

    def matches(self, columns: set[str]) -> bool:
        """Records with ``tokens`` (``tags`` are optional for data to predict on)."""
        return "tokens" in columns

    def read(self, path: str, *, labelled: bool = True) -> TokenDataset:
        """See :func:`read_tokens`."""
        return read_tokens(path, labelled=labelled)

    def spec(self, train: TokenDataset, forced: str | None = None) -> TagSpace:
        """The tags of the training data (``"O"`` first, then sorted); DataError for fewer than 2."""
        if train.tags is None:
            raise DataError(f"{train.source}: the training data has no tags; give tokens and tags")
        return TagSpace.from_tags(train.tags, source=train.source)

    def spec_from_json(self, obj: dict, where: str) -> TagSpace:
        """See :meth:`TagSpace.from_json`."""
        return TagSpace.from_json(obj, where)

    def encode(self, data: TokenDataset, spec: TagSpace, tokenizer, max_length: int, *, labelled: bool = True,
               **options) -> TokenFeatures:
        """See :func:`encode_tokens` (``labelled=False``: no labels)."""
        return encode_tokens(data, spec if labelled else None, tokenizer, max_length)

    def head_config(self, spec: TagSpace) -> dict:
        """``num_labels``, ``id2label``, ``label2id`` of the tags."""
        return {"num_labels": spec.num_outputs, "id2label": dict(enumerate(spec.names)), "label2id": spec.index()}

    def outputs(self, model, batch: dict, output_hidden_states: bool = False):
        """Tag logits ``[B, T, C]`` (a transformers ``*ForTokenClassification``'s ``logits`` or a PrunedModel's
        forward); with ``output_hidden_states``, ``(logits, per-layer hidden states)``."""
        return model_outputs(model, batch, output_hidden_states)

    def loss(self, outputs: torch.Tensor, batch: dict, reduction: str = "mean") -> torch.Tensor:
        """See :func:`token_loss` (against ``batch["labels"]``)."""
        return token_loss(outputs, batch["labels"], reduction)

    def distill_loss(self, student, teacher, batch, temperature, reduction="mean"):
        """See :func:`token_distill_loss`."""
        return token_distill_loss(student, teacher, batch, temperature, reduction)

    def metrics(self, outputs: torch.Tensor, features: TokenFeatures, data: TokenDataset, spec: TagSpace) -> dict:
        """``{"metric": "f1", "f1", "precision", "recall", "accuracy", "loss"}`` of ``outputs [N, T, C]``:
        entity scores (:func:`entity_scores`) of the decoded word tags against the gold ones (words cut by
        truncation predicted ``"O"``), word accuracy over the words with a prediction, and the mean of
        :func:`token_loss`."""
        if features.labels is None or data.tags is None:
            raise ValueError("metrics need labelled data and features encoded with labels")
        tags, _, has = word_predictions(outputs, features, len(data), spec, [len(t) for t in data.tokens])
        scores = entity_scores(data.tags, tags)
        right = total = 0
        for gold, pred, h in zip(data.tags, tags, has):
            for g, p, k in zip(gold, pred, h):
                if k:
                    total += 1
                    right += g == p
        n = max((len(x) for x in features.input_ids), default=0)
        if outputs.shape[1] < n:
            raise ValueError(f"outputs have {outputs.shape[1]} positions, features up to {n}")
        labels = features.label_tensor(range(len(features)), outputs.shape[1]).to(outputs.device)
        with torch.no_grad():
            loss = float(token_loss(outputs, labels))
        return {"metric": "f1", "f1": scores["f1"], "precision": scores["precision"], "recall": scores["recall"],
                "accuracy": right / total if total else 0.0, "loss": loss}

    def decode(self, outputs: torch.Tensor, features: TokenFeatures, data: TokenDataset, spec: TagSpace) -> list[dict]:
        """Per example ``{"entities": [{"type", "start", "end", "text", "score"}], "tags": [...]}``: ``start``
        / ``end`` are character offsets (end exclusive) into the example's text (:attr:`TokenDataset.texts`),
        ``text`` that slice, ``score`` the mean over the entity's words of the predicted tag's probability;
        ``tags`` one per word (``"O"`` for words cut by truncation)."""
        tags, probs, _ = word_predictions(outputs, features, len(data), spec, [len(t) for t in data.tokens])
        out = []
        for i in range(len(data)):
            text, spans = data.text(i), data.spans(i)
            found = []
            for type_, a, b in entities(tags[i]):
                start, end = spans[a][0], spans[b][1]
                found.append({"type": type_, "start": start, "end": end, "text": text[start:end],
                              "score": float(sum(probs[i][a : b + 1]) / (b - a + 1))})
            out.append({"entities": found, "tags": tags[i]})
        return out


TASK = TokenClassificationTask()
