"""Extractive question answering (SQuAD v1.1 / v2): a span of the context answers each question.

Data: SQuAD JSON (``{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}``, v1.1 or v2 with
``is_impossible``) or JSONL with ``question``, ``context``, ``answers`` (:meth:`QuestionAnsweringTask.read`).
Encoding puts the question first and the context second; a context longer than ``max_length`` is split
into several *features* that overlap by ``doc_stride`` tokens (as transformers' ``run_qa.py``). The head
gives a start and an end logit per token (outputs ``[B, T, 2]``: ``[..., 0]`` start, ``[..., 1]`` end).
The loss is the mean of the start and end cross-entropies per feature; CoFi distils with KL on the
start and on the end distributions (times T²). Decoding takes the best valid span over every feature
of an example (the ``n_best`` start and end candidates of each); for SQuAD v2 the example is
unanswered when the no-answer (CLS) score beats the best span by more than ``null_threshold``.
Metrics are the official SQuAD exact match and F1 (:func:`squad_scores`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import string
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.paths import check_input_file
from ..data.text import (
    DataError,
    _decode,
    _json_constant,
    _json_float,
    _json_int,
    _json_object,
    _quote,
    _read_bytes,
    _Refused,
    _shown,
    json_records,
)
from .base import Features, Task, reduce_examples

__all__ = [
    "QADataset",
    "QASpec",
    "QAFeatures",
    "QuestionAnsweringTask",
    "TASK",
    "normalize_answer",
    "squad_scores",
    "qa_loss",
    "qa_distill_loss",
    "decode_spans",
]

# Padding positions get this logit before any softmax: exp() of it is exactly 0 in float32, and it
# stays finite, so masked positions contribute exactly nothing (never NaN) to the losses.
_MASKED = -1e9


# ---------------------------------------------------------------------- data


@dataclass
class QADataset:
    """Questions with their contexts and gold answers, in file order.

    Attributes:
        ids: one string id per question (SQuAD's ``id``; for JSONL the ``id`` field or the line number).
        questions: the question texts.
        contexts: the context text of each question (repeated for questions sharing a paragraph).
        answers: per question ``{"text": [str, ...], "answer_start": [int, ...]}`` (character offsets
            into its context; empty lists = no answer, SQuAD v2's impossible questions and unlabelled data).
        source: where the examples came from (for messages).
    """

    ids: list[str]
    questions: list[str]
    contexts: list[str]
    answers: list[dict]
    source: str

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int], source: str | None = None) -> "QADataset":
        """The examples at ``index``, in that order."""
        return QADataset(
            ids=[self.ids[i] for i in index],
            questions=[self.questions[i] for i in index],
            contexts=[self.contexts[i] for i in index],
            answers=[self.answers[i] for i in index],
            source=source or self.source,
        )

    def rows(self) -> Iterator[list]:
        """``[id, question, context, answers]`` per example (what a run's fingerprint hashes)."""
        for i in range(len(self)):
            yield [self.ids[i], self.questions[i], self.contexts[i], self.answers[i]]


def _load_json(where: str, text: str):
    """A whole SQuAD JSON file parsed with the strict rules of the text reader (no repeated keys, no NaN)."""
    try:
        return json.loads(text, object_pairs_hook=_json_object, parse_constant=_json_constant,
                          parse_float=_json_float, parse_int=_json_int)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix the file") from None
    except _Refused as e:
        raise DataError(f"{where}: {e}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_example(where: str, qid: str, question, context, answers, labelled: bool) -> dict:
    """Check one example; returns its answers as ``{"text": [...], "answer_start": [...]}``.

    ``where`` already names the file and the line / question; ``answers`` is the raw value (SQuAD's list
    of ``{"text", "answer_start"}`` or JSONL's ``{"text": [...], "answer_start": [...]}``, None when absent).
    """
    if not isinstance(context, str) or not context.strip():
        raise DataError(f"{where}: missing or empty 'context'; every question needs a context string")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: 'question' is empty or not a string; every example needs a question")
    if not labelled:
        return {"text": [], "answer_start": []}
    if answers is None:
        raise DataError(f"{where}: no 'answers'; give the gold answers (empty lists for no answer)")
    if isinstance(answers, list):  # SQuAD: [{"text", "answer_start"}, ...]
        texts, starts = [], []
        for a in answers:
            if not isinstance(a, dict) or "text" not in a or "answer_start" not in a:
                raise DataError(f"{where}: each answer must be an object with 'text' and 'answer_start'")
            texts.append(a["text"])
            starts.append(a["answer_start"])
    elif isinstance(answers, dict):  # JSONL: {"text": [...], "answer_start": [...]}
        texts, starts = answers.get("text"), answers.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list):
            raise DataError(f"{where}: 'answers' must hold lists 'text' and 'answer_start'")
        if len(texts) != len(starts):
            raise DataError(f"{where}: 'answers' has {len(texts)} text(s) but {len(starts)} answer_start(s); "
                            "give one start per text")
    else:
        raise DataError(f"{where}: 'answers' must be a list of answers or an object with 'text' and 'answer_start'")
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: an answer 'text' is empty or not a string")
        if not _is_int(start):
            raise DataError(f"{where}: 'answer_start' {start!r} is not an integer character offset")
        if start < 0 or start + len(text) > len(context):
            raise DataError(f"{where}: answer {_quote(text)} at answer_start {start} lies outside the context "
                            f"({len(context)} characters)")
        if context[start:start + len(text)] != text:
            raise DataError(f"{where}: answer {_quote(text)} is not at answer_start {start} of the context "
                            f"(found {_quote(context[start:start + len(text)])})")
    return {"text": list(texts), "answer_start": list(starts)}


def _read_squad(path: str, where: str, obj, labelled: bool) -> QADataset:
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise DataError(f"{where}: expected SQuAD JSON, an object whose 'data' is a list of articles")
    ids, questions, contexts, answers = [], [], [], []
    for i, article in enumerate(obj["data"]):
        at_article = f"{where}: data[{i}]"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise DataError(f"{at_article}: an article must be an object whose 'paragraphs' is a list")
        for j, para in enumerate(article["paragraphs"]):
            at_para = f"{at_article}.paragraphs[{j}]"
            if not isinstance(para, dict):
                raise DataError(f"{at_para}: a paragraph must be an object with 'context' and 'qas'")
            context = para.get("context")
            if not isinstance(context, str) or not context.strip():
                raise DataError(f"{at_para}: missing or empty 'context'; every paragraph needs a context string")
            qas = para.get("qas")
            if not isinstance(qas, list) or not qas:
                raise DataError(f"{at_para}: a context with no question ('qas' is missing or empty); "
                                "give its questions or remove the paragraph")
            for k, qa in enumerate(qas):
                at_q = f"{at_para}.qas[{k}]"
                if not isinstance(qa, dict):
                    raise DataError(f"{at_q}: a question must be an object with 'id', 'question' and 'answers'")
                qid = qa.get("id", f"data[{i}].paragraphs[{j}].qas[{k}]")
                qid = str(qid) if _is_int(qid) or isinstance(qid, str) else None
                if not qid:
                    raise DataError(f"{at_q}: 'id' must be a non-empty string")
                at_q = f"{where}: question {_quote(qid)} (data[{i}].paragraphs[{j}].qas[{k}])"
                raw = qa.get("answers")
                if qa.get("is_impossible") is True:
                    raw = []  # v2: an impossible question (its 'plausible_answers' are not answers)
                ans = _check_example(at_q, qid, qa.get("question"), context, raw, labelled)
                ids.append(qid)
                questions.append(qa["question"])
                contexts.append(context)
                answers.append(ans)
    return _dataset(path, where, ids, questions, contexts, answers)


def _read_jsonl(path: str, where: str, text: str, labelled: bool) -> QADataset:
    ids, questions, contexts, answers = [], [], [], []
    for line_no, rec in json_records(where, text, "a JSON object with 'question', 'context' and 'answers'"):
        at = f"{where}:{line_no}"
        qid = rec.get("id", line_no)
        if not ((_is_int(qid) or isinstance(qid, str)) and str(qid)):
            raise DataError(f"{at}: 'id' must be a non-empty string or an integer")
        qid = str(qid)
        ans = _check_example(f"{at} (question {_quote(qid)})", qid, rec.get("question"), rec.get("context"),
                             rec.get("answers"), labelled)
        ids.append(qid)
        questions.append(rec["question"])
        contexts.append(rec["context"])
        answers.append(ans)
    return _dataset(path, where, ids, questions, contexts, answers)


def _dataset(path, where, ids, questions, contexts, answers) -> QADataset:
    if not ids:
        raise DataError(f"{where}: the file has no questions; give SQuAD JSON or question/context/answers JSONL")
    seen: set[str] = set()
    for qid in ids:
        if qid in seen:
            raise DataError(f"{where}: question id {_quote(qid)} appears twice; ids must be unique")
        seen.add(qid)
    return QADataset(ids, questions, contexts, answers, path)


def read_qa(path: str | os.PathLike, *, labelled: bool = True) -> QADataset:
    """Read SQuAD JSON (``.json``: v1.1, or v2 with ``is_impossible``) or JSONL (``.jsonl`` / ``.ndjson``,
    also a ``.json`` file holding one object per line) of ``{"id"?, "question", "context", "answers":
    {"text": [...], "answer_start": [...]}}`` (``id`` defaults to the line number).

    ``labelled=False`` reads data to predict on: answers are optional and ignored (every example's
    answers are empty). Raises DataError, one line naming the file and the question (its id and place
    in SQuAD JSON; its line in JSONL), for: invalid JSON, no examples, a paragraph without questions,
    a missing context, an empty question, answers whose texts and starts differ in number, an answer
    start outside the context, an answer text not found at its start, a repeated id.
    """
    path = os.fsdecode(check_input_file(path, "data file", DataError))
    where = _shown(path)
    ext = os.path.splitext(path)[1].lower()
    text = _decode(where, _read_bytes(path))
    if ext in (".jsonl", ".ndjson"):
        return _read_jsonl(path, where, text, labelled)
    if ext != ".json":
        raise DataError(f"{where}: unknown question-answering data format {_quote(ext)}; "
                        "use SQuAD .json or .jsonl")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines saved as .json
            return _read_jsonl(path, where, text, labelled)
    except (ValueError, RecursionError):
        pass
    obj = _load_json(where, text)
    return _read_squad(path, where, obj, labelled)


# ---------------------------------------------------------------------- spec


@dataclass
class QASpec:
    """What question answering learns from its training data and how it decodes, saved in ``cofi_task.json``.

    Attributes:
        version_2: SQuAD v2 behaviour: some training question has no answer, so a prediction may be "".
        doc_stride: tokens shared by consecutive features of a long context.
        max_answer_length: the longest answer span, in tokens.
        n_best: start and end candidates per feature considered by decoding.
        null_threshold: (v2) predict no answer when no-answer score − best span score exceeds it.
    """

    task: str = "question_answering"
    version_2: bool = False
    doc_stride: int = 128
    max_answer_length: int = 30
    n_best: int = 20
    null_threshold: float = 0.0

    @property
    def num_outputs(self) -> int:
        """2: a start and an end logit per token."""
        return 2

    def to_json(self) -> dict:
        """``{"task": "question_answering", "version_2", "doc_stride", "max_answer_length", "n_best",
        "null_threshold"}``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "QASpec":
        """Inverse of :meth:`to_json` (missing settings take their defaults); DataError naming ``where``."""
        if not isinstance(obj, dict) or obj.get("task") != "question_answering":
            raise DataError(f"{where}: malformed question-answering spec {obj!r}")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name == "task" or f.name not in obj:
                continue
            v = obj[f.name]
            ok = (isinstance(v, bool) if f.name == "version_2"
                  else isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  if f.name == "null_threshold" else _is_int(v) and v > 0)
            if not ok:
                raise DataError(f"{where}: question-answering setting {f.name!r} has a bad value {v!r}")
            kw[f.name] = float(v) if f.name == "null_threshold" else v
        return cls(**kw)

    def with_threshold(self, threshold: float) -> "QASpec":
        """A copy with ``null_threshold=threshold`` (e.g. the one chosen on evaluation data)."""
        return dataclasses.replace(self, null_threshold=float(threshold))


# ---------------------------------------------------------------------- features


class QAFeatures(Features):
    """Tokenized (question, context window) pairs: one or more features per example.

    Attributes (per feature ``f``, besides :class:`~cofi_kernels.tasks.base.Features`'):
        offsets: per token, ``(char start, char end)`` in the example's context for context tokens,
            ``None`` for the question, special and other non-context tokens.
        example_of: the example of feature ``f`` (the tokenizer's ``overflow_to_sample_mapping``).
        start_positions, end_positions: ``[N]`` int64 token indices of the first and last token of the
            example's first gold answer in this feature; both 0 (the CLS token) when the answer is not
            wholly inside the feature or there is none. ``None`` when built unlabelled.
        targets: ``[N, 2]`` int64 (start, end) or ``None``.
    """

    def __init__(self, input_ids, token_type_ids, pad_id, example_of, offsets,
                 start_positions: list[int] | None, end_positions: list[int] | None):
        super().__init__(input_ids, token_type_ids, pad_id, example_of)
        self.offsets = offsets
        if start_positions is None:
            self.start_positions = self.end_positions = None
        else:
            self.start_positions = torch.tensor(start_positions, dtype=torch.long)
            self.end_positions = torch.tensor(end_positions, dtype=torch.long)
            self.targets = torch.stack([self.start_positions, self.end_positions], dim=1)

    def batch(self, index: Sequence[int], device="cpu") -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``token_type_ids`` ``[b, T]`` of features ``index`` and, when
        labelled, ``start_positions``, ``end_positions`` ``[b]`` int64."""
        out = self.inputs(index, device)
        if self.start_positions is not None:
            index = list(index)
            out["start_positions"] = self.start_positions[index].to(device)
            out["end_positions"] = self.end_positions[index].to(device)
        return out


def _answer_tokens(offsets: list, answers: dict) -> tuple[int, int]:
    """Token indices (first, last) of the first gold answer inside this feature, or (0, 0)."""
    if not answers["text"]:
        return 0, 0
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    ctx = [t for t, o in enumerate(offsets) if o is not None]
    if not ctx or not (offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char):
        return 0, 0
    start = max(t for t in ctx if offsets[t][0] <= start_char)
    end = min(t for t in ctx if offsets[t][1] >= end_char)
    return start, end


def encode_qa(data: QADataset, spec: QASpec, tokenizer, max_length: int, *, labelled: bool = True,
              doc_stride: int | None = None) -> QAFeatures:
    """Tokenize question (first) and context (second) into features of at most ``max_length`` tokens,
    the context split into windows that overlap by ``doc_stride`` (default ``spec.doc_stride``) tokens.

    Raises DataError for a tokenizer without offsets or padding, a question so long that no context
    token fits (naming the example and --max-length), and a stride not below the room left for the
    context (naming --doc-stride)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("question answering needs a fast tokenizer (character offsets); "
                        "give a model directory with tokenizer.json")
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no padding token; set one in the model directory's tokenizer config")
    stride = spec.doc_stride if doc_stride is None else int(doc_stride)
    if stride < 0:
        raise DataError(f"--doc-stride must be at least 0, got {stride}")
    questions = [q.lstrip() for q in data.questions]  # as run_qa.py: leading spaces only cost tokens
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    q_lens = [len(x) for x in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for i, q in enumerate(q_lens):
        room = max_length - specials - q
        if room <= 0:
            raise DataError(f"{data.source}: question {_quote(data.ids[i])} takes {q} tokens, leaving no room for "
                            f"its context within --max-length {max_length}; raise --max-length or shorten it")
        if stride >= room:
            raise DataError(f"{data.source}: --doc-stride {stride} must be below the {room} context tokens a "
                            f"feature of question {_quote(data.ids[i])} holds (--max-length {max_length} minus "
                            "the question); lower --doc-stride or raise --max-length")
    enc = tokenizer(questions, data.contexts, truncation="only_second", max_length=max_length, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, return_token_type_ids=True,
                    padding=False)
    example_of = list(enc["overflow_to_sample_mapping"])
    offsets, starts, ends = [], [], []
    for f in range(len(enc["input_ids"])):
        seq = enc.sequence_ids(f)
        offs = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][f], seq)]
        offsets.append(offs)
        if labelled:
            s, e = _answer_tokens(offs, data.answers[example_of[f]])
            starts.append(s)
            ends.append(e)
    return QAFeatures(enc["input_ids"], enc["token_type_ids"], tokenizer.pad_token_id, example_of, offsets,
                      starts if labelled else None, ends if labelled else None)


# ---------------------------------------------------------------------- losses


def _masked(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[B, T]`` in float32 with padding positions (``mask`` 0) set to a large negative."""
    return logits.float().masked_fill(mask == 0, _MASKED)


def qa_loss(outputs: torch.Tensor, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Per feature ``(CE(start logits, start_position) + CE(end logits, end_position)) / 2`` over the
    feature's real tokens, summed or averaged over the features (float32).

    ``outputs`` ``[B, T, 2]``; ``batch``: ``attention_mask`` ``[B, T]``, ``start_positions``,
    ``end_positions`` ``[B]``."""
    mask = batch["attention_mask"]
    ls = F.cross_entropy(_masked(outputs[..., 0], mask), batch["start_positions"], reduction="none")
    le = F.cross_entropy(_masked(outputs[..., 1], mask), batch["end_positions"], reduction="none")
    return reduce_examples((ls + le) / 2, reduction)


def qa_distill_loss(student: torch.Tensor, teacher: torch.Tensor, batch: dict, temperature: float,
                    reduction: str = "mean") -> torch.Tensor:
    """CoFi's QA prediction distillation: per feature ``(KL(p_t‖p_s) on start + KL on end) / 2 · T²``
    with ``p = softmax(logits / T)`` over the feature's real tokens, summed or averaged over features.

    ``student``, ``teacher`` ``[B, T, 2]``; ``batch["attention_mask"]`` ``[B, T]``."""
    T = float(temperature)
    mask = batch["attention_mask"]
    per = []
    for c in (0, 1):
        log_s = F.log_softmax(_masked(student[..., c] / T, mask), dim=-1)
        log_t = F.log_softmax(_masked(teacher[..., c].detach() / T, mask), dim=-1)
        per.append(F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1))
    return reduce_examples((per[0] + per[1]) / 2 * (T * T), reduction)


# ---------------------------------------------------------------------- decoding


@dataclass
class _Prediction:
    text: str  # the best span's text ("" when no valid span)
    start: int | None  # char offsets of the best span in the context (end exclusive)
    end: int | None
    score: float | None  # best span's start + end logit (None when no valid span)
    null_score: float  # min over the example's features of the CLS start + end logit
    diff: float  # null_score - score (inf when no valid span)


def decode_spans(outputs: torch.Tensor, features: QAFeatures, data: QADataset, spec: QASpec) -> list[_Prediction]:
    """The best span of each example over all its features (as run_qa's ``postprocess_qa_predictions``):
    the ``n_best`` start and end tokens of each feature by logit, pairs inside the context with
    ``start <= end`` and at most ``max_answer_length`` tokens, scored ``start_logit + end_logit``; the
    no-answer score is the minimum over features of the CLS (position 0) score. ``outputs`` ``[N, T, 2]``."""
    if outputs.dim() != 3 or outputs.shape[0] != len(features) or outputs.shape[-1] != 2:
        raise ValueError(f"outputs must be [{len(features)}, T, 2], got {list(outputs.shape)}")
    logits = outputs.detach().float().cpu()
    best: list[tuple | None] = [None] * len(data)
    null = [math.inf] * len(data)
    for f in range(len(features)):
        ex = features.example_of[f]
        offs = features.offsets[f]
        n = len(offs)
        if n > logits.shape[1]:
            raise ValueError(f"feature {f} has {n} tokens but the outputs only {logits.shape[1]}")
        s_log = logits[f, :n, 0]
        e_log = logits[f, :n, 1]
        null[ex] = min(null[ex], float(s_log[0] + e_log[0]))
        k = min(spec.n_best, n)
        s_top = torch.topk(s_log, k).indices.tolist()
        e_top = torch.topk(e_log, k).indices.tolist()
        s_vals, e_vals = s_log.tolist(), e_log.tolist()
        for s in s_top:
            if offs[s] is None:
                continue
            for e in e_top:
                if offs[e] is None or e < s or e - s + 1 > spec.max_answer_length:
                    continue
                score = s_vals[s] + e_vals[e]
                if best[ex] is None or score > best[ex][0]:
                    best[ex] = (score, offs[s][0], offs[e][1])
    preds = []
    for i, b in enumerate(best):
        if b is None:
            preds.append(_Prediction("", None, None, None, null[i], math.inf))
        else:
            score, cs, ce = b
            preds.append(_Prediction(data.contexts[i][cs:ce], cs, ce, score, null[i], null[i] - score))
    return preds


def _answered(p: _Prediction, spec: QASpec) -> bool:
    """Whether ``p`` is answered with its best span (v1: always, given a span; v2: unless the
    no-answer score beats the span by more than the threshold)."""
    if p.score is None:
        return False
    return not spec.version_2 or not p.diff > spec.null_threshold


# ---------------------------------------------------------------------- SQuAD scores


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """The official SQuAD normalisation: lower case, drop ``string.punctuation``, drop the articles
    a / an / the (as words), collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def _f1(gold: str, pred: str, version_2: bool) -> float:
    g = normalize_answer(gold).split()
    p = normalize_answer(pred).split()
    if version_2 and (not g or not p):
        return float(g == p)
    same = sum((Counter(g) & Counter(p)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def _golds(texts: Sequence[str], version_2: bool) -> list[str]:
    """The gold texts scored against: v2 drops those that normalise to nothing; none left (or none
    given) means no answer, ``[""]``."""
    if version_2:
        texts = [t for t in texts if normalize_answer(t)]
    return list(texts) if texts else [""]


def _example_scores(pred: str, golds: Sequence[str], version_2: bool) -> tuple[float, float]:
    g = _golds(golds, version_2)
    return max(_exact(t, pred) for t in g), max(_f1(t, pred, version_2) for t in g)


def squad_scores(predictions, references, *, version_2: bool | None = None) -> dict:
    """``{"exact_match", "f1"}`` in percent, exactly as the official SQuAD evaluation scripts compute them.

    Args:
        predictions: ``{id: answer text}`` (``""`` = no answer); or a list of texts aligned with a list
            ``references``. Predictions for ids not in ``references`` are ignored (as the official
            scripts do); a reference id without a prediction is a ``ValueError``.
        references: ``{id: [gold answer text, ...]}`` (an empty list = no answer, gold ``[""]``);
            or a list of such lists.
        version_2: the v2.0 script's rules (gold texts that normalise to nothing are dropped, and F1
            is exact match when either side has no tokens); ``False`` the v1.1 script's (F1 is 0 when
            there is no common token, even if both are empty). ``None`` (default): v2 when some
            reference has no answer.

    Per question: exact match and token F1 (bag-of-tokens overlap after :func:`normalize_answer`),
    each the maximum over the gold answers; averaged over the questions, times 100.
    """
    if isinstance(references, Mapping):
        if not isinstance(predictions, Mapping):
            raise ValueError("predictions must be a dict {id: text} when references are a dict")
        missing = [k for k in references if k not in predictions]
        if missing:
            raise ValueError(f"no prediction for question {missing[0]!r} ({len(missing)} missing)")
        pairs = [(predictions[k], references[k]) for k in references]
    else:
        if isinstance(predictions, Mapping):
            raise ValueError("predictions must be a list aligned with references when references are a list")
        references = list(references)
        predictions = list(predictions)
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        pairs = list(zip(predictions, references))
    if not pairs:
        raise ValueError("no references to score")
    v2 = any(len(g) == 0 for _, g in pairs) if version_2 is None else bool(version_2)
    em = f1 = 0.0
    for pred, golds in pairs:
        if isinstance(golds, str):
            raise ValueError("each reference must be a list of gold answer texts, not a string")
        e, f = _example_scores(pred, golds, v2)
        em += e
        f1 += f
    return {"exact_match": 100.0 * em / len(pairs), "f1": 100.0 * f1 / len(pairs)}


def best_null_threshold(diffs: Sequence[float], answered_scores: Sequence[tuple[float, float]],
                        null_scores: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """The no-answer threshold that maximises F1 (as the official v2 script's ``find_best_thresh``).

    Args:
        diffs: per example, no-answer score − best span score (``inf``: no span, never answered).
        answered_scores, null_scores: per example ``(exact, f1)`` of answering with the best span and
            of answering "".

    An example is answered when its difference is ≤ the threshold. Starting from every example
    unanswered, the examples are answered in increasing difference, examples of equal difference
    together (the official script can stop inside a run of ties, at a threshold that does not give
    the score it reports); the first threshold reaching the highest F1 wins. It is the difference of
    the last example answered, or ``min(diffs) - 1`` (0.0 without finite differences) when answering
    none is best. Returns ``(threshold, f1 %, exact match %)`` at that threshold.
    """
    n = len(diffs)
    order = sorted((d, i) for i, d in enumerate(diffs) if math.isfinite(d))
    cur_f1 = sum(f for _, f in null_scores)
    cur_em = sum(e for e, _ in null_scores)
    best_f1, best_em = cur_f1, cur_em
    thresh = order[0][0] - 1.0 if order else 0.0
    j = 0
    while j < len(order):
        d = order[j][0]
        while j < len(order) and order[j][0] == d:
            i = order[j][1]
            cur_f1 += answered_scores[i][1] - null_scores[i][1]
            cur_em += answered_scores[i][0] - null_scores[i][0]
            j += 1
        if cur_f1 > best_f1:
            best_f1, best_em, thresh = cur_f1, cur_em, d
    return thresh, 100.0 * best_f1 / n, 100.0 * best_em / n


# ---------------------------------------------------------------------- task


def _qa_outputs(model, b: dict, output_hidden_states: bool = False):
    from ..models.pruned_model import PrunedModel

    if isinstance(model, PrunedModel):
        return model(b["input_ids"], b["attention_mask"], b["token_type_ids"], output_hidden_states=output_hidden_states)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                output_hidden_states=output_hidden_states)
    logits = _stacked(out)
    return (logits, list(out.hidden_states[1:])) if output_hidden_states else logits


def _stacked(out) -> torch.Tensor:
    """``[B, T, 2]``: a transformers QA output's start and end logits."""
    return torch.stack([out.start_logits, out.end_logits], dim=-1)


def _feature_mask(features: QAFeatures, T: int) -> torch.Tensor:
    lengths = torch.tensor([len(x) for x in features.input_ids])
    return (torch.arange(T)[None, :] < lengths[:, None]).long()


class QuestionAnsweringTask(Task):
    """Extractive question answering (see the module docstring)."""

    name = "question_answering"
    auto_class = "AutoModelForQuestionAnswering"
    pruned_task = "question_answering"
    per_token = True
    metric = "f1"
    formats = "SQuAD JSON (v1.1 / v2), or JSONL with question, context, answers {text, answer_start}"
    dataset_class = QADataset

    def with_settings(self, spec: QASpec, settings) -> QASpec:
        """``spec`` with the run's ``doc_stride`` (the windows of long contexts the model is trained on)."""
        return dataclasses.replace(spec, doc_stride=int(settings.doc_stride))

    def matches(self, columns: set[str]) -> bool:
        """Records with ``question`` and ``context``."""
        return "question" in columns and "context" in columns

    def read(self, path: str, *, labelled: bool = True) -> QADataset:
        """See :func:`read_qa`."""
        return read_qa(path, labelled=labelled)

    def spec(self, train: QADataset, forced: str | None = None) -> QASpec:
        """Default settings; ``version_2`` when some training question has no answer."""
        return QASpec(version_2=any(not a["text"] for a in train.answers))

    def spec_from_json(self, obj: dict, where: str) -> QASpec:
        """See :meth:`QASpec.from_json`."""
        return QASpec.from_json(obj, where)

    def encode(self, data: QADataset, spec: QASpec, tokenizer, max_length: int, *, labelled: bool = True,
               doc_stride: int | None = None, **options) -> QAFeatures:
        """See :func:`encode_qa`."""
        return encode_qa(data, spec, tokenizer, max_length, labelled=labelled, doc_stride=doc_stride)

    def head_config(self, spec: QASpec) -> dict:
        """``{"num_labels": 2}`` (start, end)."""
        return {"num_labels": 2}

    def outputs(self, model, batch: dict, output_hidden_states: bool = False):
        """``[B, T, 2]`` (start, end logits) of a transformers QA model or a QA PrunedModel; with
        ``output_hidden_states``, ``(that, [every layer's output [B, T, d]])``."""
        return _qa_outputs(model, batch, output_hidden_states)

    def from_model_output(self, output) -> torch.Tensor:
        """``[B, T, 2]`` from a transformers QA output (start and end logits stacked)."""
        return _stacked(output)

    def loss(self, outputs, batch, reduction="mean"):
        """See :func:`qa_loss`."""
        return qa_loss(outputs, batch, reduction)

    def distill_loss(self, student, teacher, batch, temperature, reduction="mean"):
        """See :func:`qa_distill_loss`."""
        return qa_distill_loss(student, teacher, batch, temperature, reduction)

    def metrics(self, outputs, features: QAFeatures, data: QADataset, spec: QASpec) -> dict:
        """``{"metric": "f1", "f1", "exact_match", "loss"}`` in percent (loss when the features are
        labelled) of every feature's outputs ``[N, T, 2]``.

        v1: the official v1.1 scores of the best spans. v2: also ``best_null_threshold``, the no-answer
        threshold that maximises F1 on this data (:func:`best_null_threshold`); ``f1`` and
        ``exact_match`` are reported at that threshold (not at ``spec.null_threshold``); a run keeps it
        with ``spec.with_threshold``."""
        preds = decode_spans(outputs, features, data, spec)
        golds = [a["text"] for a in data.answers]
        v2 = spec.version_2
        out: dict = {"metric": "f1"}
        if not v2:
            s = squad_scores([p.text for p in preds], golds, version_2=False)
            out.update(f1=s["f1"], exact_match=s["exact_match"])
        else:
            answered = [_example_scores(p.text, g, True) for p, g in zip(preds, golds)]
            null = [_example_scores("", g, True) for g in golds]
            t, f1, em = best_null_threshold([p.diff for p in preds], answered, null)
            out.update(f1=f1, exact_match=em, best_null_threshold=t)
        if features.start_positions is not None:
            mask = _feature_mask(features, outputs.shape[1]).to(outputs.device)
            batch = {"attention_mask": mask, "start_positions": features.start_positions.to(outputs.device),
                     "end_positions": features.end_positions.to(outputs.device)}
            out["loss"] = float(qa_loss(outputs.detach(), batch))
        return out

    def decode(self, outputs, features: QAFeatures, data: QADataset, spec: QASpec) -> list[dict]:
        """Per example ``{"id", "answer", "start", "end", "score"}``: the answer text, its character
        offsets in the context (``context[start:end] == answer``), and the best span's score (start +
        end logit; ``None`` when no span was valid). Unanswered (v2 at ``spec.null_threshold``, or no
        valid span): ``answer`` ``""``, ``start`` and ``end`` ``None``; ``score`` stays the best span's."""
        result = []
        for i, p in enumerate(decode_spans(outputs, features, data, spec)):
            if _answered(p, spec):
                result.append({"id": data.ids[i], "answer": p.text, "start": p.start, "end": p.end, "score": p.score})
            else:
                result.append({"id": data.ids[i], "answer": "", "start": None, "end": None, "score": p.score})
        return result


TASK = QuestionAnsweringTask()
