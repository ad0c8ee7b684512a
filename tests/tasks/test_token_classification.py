"""Token classification task: reading, tag spaces, encoding, losses, chunking, metrics, decoding."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cofi_kernels.data.text import DataError
from cofi_kernels.tasks import entity_scores as exported_entity_scores
from cofi_kernels.tasks import get_task, task_of_file
from cofi_kernels.tasks.token_classification import (
    IGNORE,
    TASK,
    TagSpace,
    TokenDataset,
    entities,
    entity_scores,
    scored_positions,
    word_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    from tests.training_support import tokenizer

    return tokenizer()


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8", newline="")
    return str(p)


def _jsonl(tmp_path, records, name="data.jsonl"):
    return _write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------------- reading


def test_registered_and_detected(tmp_path):
    assert get_task("token_classification") is TASK
    assert TASK.per_token and TASK.metric == "f1" and TASK.pruned_task == "token_classification"
    assert TASK.auto_class == "AutoModelForTokenClassification"
    assert TASK.matches({"tokens", "tags"}) and TASK.matches({"tokens"}) and not TASK.matches({"text", "label"})
    path = _jsonl(tmp_path, [{"tokens": ["a"], "tags": ["O"]}])
    assert task_of_file(path) == "token_classification"
    assert task_of_file(_write(tmp_path, "x.conll", "a O\n")) == "token_classification"


def test_read_jsonl(tmp_path):
    path = _jsonl(tmp_path, [
        {"tokens": ["Ada", "Lovelace", "wrote"], "tags": ["B-PER", "I-PER", "O"]},
        {"tokens": ["In", "London"], "tags": ["O", "B-LOC"], "extra": 1},
    ])
    d = TASK.read(path)
    assert d.tokens == [["Ada", "Lovelace", "wrote"], ["In", "London"]]
    assert d.tags == [["B-PER", "I-PER", "O"], ["O", "B-LOC"]]
    assert d.source == path and len(d) == 2 and d.lines == [1, 2]
    assert d.texts == ["Ada Lovelace wrote", "In London"]
    assert d.spans(0) == [(0, 3), (4, 12), (13, 18)]
    rows = list(d.rows())
    assert rows[1] == {"tokens": ["In", "London"], "tags": ["O", "B-LOC"]}
    json.dumps(rows)
    sub = d.subset([1], "part")
    assert sub.tokens == [["In", "London"]] and sub.tags == [["O", "B-LOC"]] and sub.source == "part"
    assert sub.lines == [2]


def test_read_jsonl_unlabelled_text(tmp_path):
    text = "  Ada\tLovelace  met\u00a0Babbage .\n"
    path = _jsonl(tmp_path, [{"text": text}, {"tokens": ["x", "y"]}, {"tokens": ["z"], "tags": [1]}])
    d = TASK.read(path, labelled=False)
    assert d.tags is None
    assert d.tokens[0] == ["Ada", "Lovelace", "met", "Babbage", "."]
    assert d.texts[0] == text and d.texts[1] == "x y"
    for (s, e), w in zip(d.spans(0), d.tokens[0]):
        assert text[s:e] == w
    rows = list(d.rows())
    assert rows[0]["text"] == text and "text" not in rows[1]
    assert d.subset([0]).raw_texts == [text]


def test_read_conll(tmp_path):
    content = (
        "-DOCSTART- -X- -X- O\r\n\r\n"
        "EU NNP B-NP B-ORG\r\n"
        "rejects VBZ B-VP O\r\n"
        "German JJ B-NP B-MISC\n"
        "\n\n"
        "Peter\tB-PER\n"
        "Blackburn I-PER\n"
        "-DOCSTART- O\n"
        "London B-LOC"
    )
    for ext in (".conll", ".iob", ".bio", ".txt", ".dat"):
        d = TASK.read(_write(tmp_path, "train" + ext, content))
        assert d.tokens == [["EU", "rejects", "German"], ["Peter", "Blackburn"], ["London"]]
        assert d.tags == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"], ["B-LOC"]]
        assert d.lines == [3, 8, 11]
    d = TASK.read(_write(tmp_path, "p.conll", "Peter\nBlackburn B-PER\n\nx\n"), labelled=False)
    assert d.tokens == [["Peter", "Blackburn"], ["x"]] and d.tags is None


def test_read_conllu(tmp_path):
    content = (
        "# sent_id = 1\n"
        "# text = Ada's book\n"
        "1-2\tAda's\t_\t_\t_\t_\t_\t_\t_\t_\n"
        "1\tAda\tAda\tPROPN\t_\t_\t0\troot\t_\tB-PER\n"
        "2\t's\t's\tPART\t_\t_\t1\tcase\t_\tO\n"
        "2.1\tx\tx\tX\t_\t_\t_\t_\t_\tO\n"
        "3\tbook\tbook\tNOUN\t_\t_\t1\tnmod\t_\tO\n"
        "\n"
        "# a comment\n"
        "Paris B-LOC\n"
    )
    d = TASK.read(_write(tmp_path, "x.conllu", content))
    assert d.tokens == [["Ada", "'s", "book"], ["Paris"]]
    assert d.tags == [["B-PER", "O", "O"], ["B-LOC"]]


BAD = [
    ("a.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', 1, "1 tag(s) for 2 token(s)"),
    ("a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n\n{"tokens": [], "tags": []}\n', 3, "empty list"),
    ("a.jsonl", '{"tokens": ["a", 3], "tags": ["O", "O"]}\n', 1, "token 2 is int"),
    ("a.jsonl", '{"tokens": ["a", " "], "tags": ["O", "O"]}\n', 1, "token 2 is empty"),
    ("a.jsonl", '{"tokens": "a b", "tags": ["O", "O"]}\n', 1, "must be a list"),
    ("a.jsonl", '{"tokens": ["a", "b"], "tags": ["O", null]}\n', 1, "tag 2 is NoneType"),
    ("a.jsonl", '{"tokens": ["a", "b"], "tags": ["O", ""]}\n', 1, "tag 2"),
    ("a.jsonl", '{"tokens": ["a"]}\n', 1, "missing 'tags'"),
    ("a.jsonl", '{"words": ["a"], "tags": ["O"]}\n', 1, "missing 'tokens'"),
    ("a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a"], "tags": ["O"]\n', 2, "not valid JSON"),
    ("a.jsonl", '["a", "b"]\n', 1, "JSON object"),
    ("a.jsonl", "\n\n", None, "no sentences"),
    ("a.conll", "EU B-ORG\nrejects\n", 2, "one column"),
    ("a.conll", "-DOCSTART- O\n\n\n", None, "no sentences"),
    ("a.txt", "", None, "no sentences"),
]


@pytest.mark.parametrize("name,content,line,what", BAD)
def test_read_errors(tmp_path, name, content, line, what):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        TASK.read(path)
    msg = str(e.value)
    assert "\n" not in msg and what in msg
    assert msg.startswith(f"{path}:{line}:" if line is not None else f"{path}:")


def test_read_unlabelled_errors(tmp_path):
    with pytest.raises(DataError, match=r"a\.jsonl:1: 'text' is empty"):
        TASK.read(_jsonl(tmp_path, [{"text": "  "}], "a.jsonl"), labelled=False)
    with pytest.raises(DataError, match=r"b\.jsonl:2: .*empty list"):
        TASK.read(_jsonl(tmp_path, [{"text": "a"}, {"tokens": []}], "b.jsonl"), labelled=False)
    with pytest.raises(DataError, match="does not exist"):
        TASK.read(str(tmp_path / "missing.conll"))


# ---------------------------------------------------------------------- spec


def test_spec():
    d = TokenDataset([["a", "b", "c"], ["d"]], [["I-PER", "O", "B-LOC"], ["B-PER"]], "train.jsonl")
    spec = TASK.spec(d)
    assert spec.names == ["O", "B-LOC", "B-PER", "I-PER"] and spec.num_outputs == 4
    assert spec.to_json() == {"task": "token_classification", "labels": ["O", "B-LOC", "B-PER", "I-PER"]}
    assert TASK.spec_from_json(spec.to_json(), "cofi_task.json") == spec
    assert TASK.head_config(spec) == {"num_labels": 4, "id2label": {0: "O", 1: "B-LOC", 2: "B-PER", 3: "I-PER"},
                                      "label2id": {"O": 0, "B-LOC": 1, "B-PER": 2, "I-PER": 3}}
    assert TagSpace.from_tags([["X", "A"]]).names == ["A", "X"]
    with pytest.raises(DataError, match="at least 2 tags.*train.jsonl"):
        TASK.spec(TokenDataset([["a", "b"]], [["O", "O"]], "train.jsonl"))
    for bad in ({"task": "classification", "labels": ["O", "X"]}, {"task": "token_classification"},
                {"task": "token_classification", "labels": ["O", "O"]},
                {"task": "token_classification", "labels": [1, 2]}):
        with pytest.raises(DataError, match="^m.json: malformed tag space"):
            TASK.spec_from_json(bad, "m.json")


# ---------------------------------------------------------------------- encoding


def test_encode_labels_on_first_subtokens(tok):
    d = TokenDataset([["Johanson", "lives", "in", "Reykjavik"], ["Hi"]],
                     [["B-PER", "O", "O", "B-LOC"], ["O"]], "t.jsonl")
    spec = TASK.spec(d)
    f = TASK.encode(d, spec, tok, 64)
    for i in range(len(d)):
        enc = tok(d.tokens[i], is_split_into_words=True)
        assert f.input_ids[i] == enc["input_ids"] and f.word_ids[i] == enc.word_ids()
        seen = set()
        for pos, (w, lab) in enumerate(zip(f.word_ids[i], f.labels[i])):
            if w is None or w in seen:
                assert lab == IGNORE
            else:
                seen.add(w)
                assert lab == spec.names.index(d.tags[i][w])
        assert seen == set(range(len(d.tokens[i])))
    assert len(f.input_ids[0]) > len(d.tokens[0]) + 2  # some word has several sub-tokens
    b = f.batch([0, 1])
    assert b["labels"].dtype == torch.long and b["labels"].shape == b["input_ids"].shape
    n = len(f.input_ids[1])
    assert (b["labels"][1, n:] == IGNORE).all() and (b["attention_mask"][1, n:] == 0).all()
    # Truncation: words past max_length get no token, hence no label.
    short = TASK.encode(d, spec, tok, 5)
    assert len(short.input_ids[0]) == 5 and short.word_ids[0][-1] is None
    assert max(w for w in short.word_ids[0] if w is not None) < 3
    # Unlabelled: no labels in the batch.
    u = TASK.encode(d, spec, tok, 64, labelled=False)
    assert u.labels is None and "labels" not in u.batch([0])


def test_encode_unknown_tag(tok):
    spec = TagSpace("token_classification", ["O", "B-PER"], "the training tags of train.jsonl")
    d = TokenDataset([["a"], ["b", "c"]], [["O"], ["O", "B-LOC"]], "dev.jsonl", lines=[1, 3])
    with pytest.raises(DataError) as e:
        TASK.encode(d, spec, tok, 16)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("dev.jsonl", "'B-LOC'", "example 2", "line 3", "'O', 'B-PER'", "train.jsonl"):
        assert part in msg


def _bpe_tokenizer(add_prefix_space=False):
    from tokenizers import pre_tokenizers
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    merges = [("Ġ", "w"), ("Ġw", "o"), ("Ġwo", "r"), ("Ġwor", "l"), ("Ġworl", "d"), ("l", "l"), ("Ġ", "h")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=merges, add_prefix_space=add_prefix_space)


def test_byte_level_tokenizer_gets_prefix_space():
    tok = _bpe_tokenizer()
    fixed = word_tokenizer(tok)
    assert fixed is not tok
    assert '"add_prefix_space":false' in tok.backend_tokenizer.pre_tokenizer.__getstate__().decode()
    words = ["hello", "world"]
    ids = fixed(words, is_split_into_words=True)["input_ids"]
    # Each word encoded as in running text (" hello world"), not as word-internal pieces.
    assert ids == tok(" hello world")["input_ids"]
    assert fixed.convert_ids_to_tokens(ids)[-2] == "Ġworld"
    d = TokenDataset([words], [["O", "B-LOC"]], "t.jsonl")
    f = TASK.encode(d, TASK.spec(d), tok, 32)
    assert f.input_ids[0] == ids
    already = _bpe_tokenizer(add_prefix_space=True)
    assert word_tokenizer(already) is already


def test_slow_tokenizer_refused():
    class Slow:
        is_fast = False
        pad_token_id = 0

    with pytest.raises(DataError, match="fast tokenizer"):
        word_tokenizer(Slow())


# ---------------------------------------------------------------------- round trip


def _one_hot_outputs(features, spec, tags_per_example, extra_positions=3):
    """Outputs [N, T, C] with random values everywhere and a large logit for the gold tag on
    each word's first sub-token (zeros beyond each feature's length)."""
    T = features.max_length() + extra_positions
    C = spec.num_outputs
    out = torch.zeros(len(features), T, C)
    for f in range(len(features)):
        n = len(features.input_ids[f])
        out[f, :n] = torch.randn(n, C)
        for pos, w in features.first_tokens(f):
            out[f, pos, spec.names.index(tags_per_example[features.example_of[f]][w])] = 20.0
    return out


def test_round_trip_decode(tmp_path, tok):
    long_words = [f"w{k}" for k in range(40)] + ["Reykjavik"]
    long_tags = ["B-PER", "I-PER"] + ["O"] * 38 + ["B-LOC"]
    text = "  Gudrun Johansdottir\tvisited  Reykjavik,\u00a0Iceland .  "
    text_tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "O"]
    path = _jsonl(tmp_path, [
        {"tokens": ["Johanson", "Smithereens", "lives", "in", "New", "Reykjavik"],
         "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"]},
        {"tokens": long_words, "tags": long_tags},
        {"text": text, "tags": text_tags},
    ])
    d = TASK.read(path)
    spec = TASK.spec(d)
    f = TASK.encode(d, spec, tok, 24)
    assert len(f.input_ids[1]) == 24 and f.word_ids[1][-2] < 40  # the long sentence is truncated
    assert any(f.word_ids[0].count(w) > 1 for w in range(6))  # multi-sub-token words
    outputs = _one_hot_outputs(f, spec, d.tags)
    pred = TASK.decode(outputs, f, d, spec)
    json.dumps(pred)
    assert pred[0]["tags"] == d.tags[0]
    joined = d.texts[0]
    assert [(e["type"], e["start"], e["end"], e["text"]) for e in pred[0]["entities"]] == [
        ("PER", 0, 20, "Johanson Smithereens"), ("LOC", 30, 43, "New Reykjavik")]
    assert joined[30:43] == "New Reykjavik"
    for e in pred[0]["entities"]:
        assert 0.99 < e["score"] <= 1.0 and isinstance(e["score"], float)
    kept = max(w for w in f.word_ids[1] if w is not None) + 1
    assert pred[1]["tags"][:kept] == long_tags[:kept] and pred[1]["tags"][kept:] == ["O"] * (41 - kept)
    assert [e["type"] for e in pred[1]["entities"]] == ["PER"]  # the LOC at the end was cut off
    start = text.index("Gudrun")
    assert [(e["type"], e["start"], e["end"], e["text"]) for e in pred[2]["entities"]] == [
        ("PER", start, start + len("Gudrun Johansdottir"), "Gudrun Johansdottir"),
        ("LOC", text.index("Reykjavik,"), text.index("Reykjavik,") + 10, "Reykjavik,"),
        ("LOC", text.index("Iceland"), text.index("Iceland") + 7, "Iceland")]
    # Metrics of the same outputs: every kept word right; the cut-off LOC is missed.
    m = TASK.metrics(outputs, f, d, spec)
    assert m["metric"] == "f1" and m["accuracy"] == 1.0
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(6 / 7)  # 7 gold entities, 6 kept
    assert m["f1"] == pytest.approx(12 / 13)
    assert 0.0 <= m["loss"] < 1e-3
    # Unlabelled prediction data decodes the same way.
    u = TASK.read(path, labelled=False)
    fu = TASK.encode(u, spec, tok, 24, labelled=False)
    assert fu.input_ids == f.input_ids
    assert [p["entities"] for p in TASK.decode(outputs, fu, u, spec)] == [p["entities"] for p in pred]


def test_metrics_wrong_predictions(tok):
    d = TokenDataset([["a", "b", "c", "d"]], [["B-PER", "I-PER", "O", "B-LOC"]], "t")
    spec = TASK.spec(d)
    f = TASK.encode(d, spec, tok, 32)
    predicted = [["B-PER", "O", "O", "B-LOC"]]
    out = _one_hot_outputs(f, spec, predicted)
    m = TASK.metrics(out, f, d, spec)
    # gold {PER(0,1), LOC(3,3)}, predicted {PER(0,0), LOC(3,3)}: 1 of 2 right both ways; 3 of 4 words right.
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.5, 0.5, 0.5, 0.75)
    labels = f.batch([0])["labels"]
    assert m["loss"] == pytest.approx(float(TASK.loss(out[:, : labels.shape[1]], {"labels": labels})), rel=1e-6)


# ---------------------------------------------------------------------- chunking and scores


@pytest.mark.parametrize("tags,expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    (["O", "I-PER", "I-PER", "O"], [("PER", 1, 2)]),  # I- after O starts an entity
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),  # a type change starts one
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 2)]),
    (["I-PER", "B-LOC"], [("PER", 0, 0), ("LOC", 1, 1)]),
    (["S-PER", "B-LOC", "I-LOC", "E-LOC", "E-LOC", "O", "I-ORG", "S-ORG"],
     [("PER", 0, 0), ("LOC", 1, 3), ("LOC", 4, 4), ("ORG", 6, 6), ("ORG", 7, 7)]),
    (["I-X", "E-X", "I-X"], [("X", 0, 1), ("X", 2, 2)]),  # I- after E- starts one
    (["PER", "PER", "O", "LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),  # bare tags: I- of their own type
    (["B-I-X", "I-I-X"], [("I-X", 0, 1)]),  # a type holding a hyphen
    (["O", "O"], []),
    ([], []),
])
def test_entities(tags, expected):
    assert entities(tags) == expected


def test_entity_scores():
    # seqeval's documented example: 0.5 / 0.5 / 0.5.
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert entity_scores(y_true, y_pred) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert exported_entity_scores(y_true, y_pred) == entity_scores(y_true, y_pred)
    # 3 gold entities, 2 predicted, 1 right: p 1/2, r 1/3, f1 2/5.
    s = entity_scores([["B-PER", "O", "B-LOC", "I-LOC", "S-ORG"]], [["B-PER", "O", "B-LOC", "O", "O"]])
    assert s["precision"] == 0.5 and s["recall"] == pytest.approx(1 / 3) and s["f1"] == pytest.approx(0.4)
    # I- after O in the prediction is an entity: it matches a gold B-PER I-PER span.
    assert entity_scores([["O", "B-PER", "I-PER"]], [["O", "I-PER", "I-PER"]])["f1"] == 1.0
    # A type change splits the predicted span: neither part matches.
    assert entity_scores([["B-PER", "I-PER"]], [["B-PER", "I-LOC"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # IOBES against IOB: same spans, same scores.
    assert entity_scores([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "E-PER", "O", "S-LOC"]])["f1"] == 1.0
    # Nothing to find, or nothing found: 0 without raising.
    assert entity_scores([["O", "O"]], [["O", "O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert entity_scores([["B-PER"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert entity_scores([["O"]], [["B-PER"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert entity_scores([], []) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(ValueError):
        entity_scores([["O"]], [["O", "O"]])


# ---------------------------------------------------------------------- losses


def _labels():
    # 3 examples of length 5: 3 labelled positions, 1, none.
    labels = torch.full((3, 5), IGNORE, dtype=torch.long)
    labels[0, [1, 2, 4]] = torch.tensor([0, 3, 2])
    labels[1, 3] = 1
    return labels


def test_loss_and_gradient():
    labels = _labels()
    logits = torch.randn(3, 5, 4, requires_grad=True)
    for reduction, scale in (("mean", 1 / 3), ("sum", 1.0)):
        loss = TASK.loss(logits, {"labels": labels}, reduction)
        lp = logits.detach().double().log_softmax(-1)
        manual = (-(lp[0, 1, 0] + lp[0, 2, 3] + lp[0, 4, 2]) / 3 - lp[1, 3, 1]) * scale
        assert float(loss.detach()) == pytest.approx(float(manual), rel=1e-5)
        (g,) = torch.autograd.grad(loss, logits)
        # d(loss)/d(logits) = (softmax - one_hot) / (labelled positions of the example) · scale.
        want = torch.zeros(3, 5, 4, dtype=torch.float64)
        p = lp.exp()
        for b in range(3):
            n = int((labels[b] != IGNORE).sum())
            for t in range(5):
                if labels[b, t] != IGNORE:
                    want[b, t] = (p[b, t] - F.one_hot(labels[b, t], 4).double()) / n * scale
        torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        TASK.loss(logits, {"labels": labels}, "none")


def test_loss_is_float32_for_half_inputs():
    labels = _labels()
    logits = torch.randn(3, 5, 4)
    a = TASK.loss(logits.bfloat16(), {"labels": labels})
    b = TASK.loss(logits.bfloat16().float(), {"labels": labels})
    assert a.dtype == torch.float32 and float(a) == float(b)


def test_distill_loss():
    labels = _labels()
    batch = {"labels": labels, "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    teacher = torch.randn(3, 5, 4)
    assert float(TASK.distill_loss(teacher.clone(), teacher, batch, 2.0)) == pytest.approx(0.0, abs=1e-6)
    for T in (1.0, 2.0):
        student = torch.randn(3, 5, 4, requires_grad=True)
        loss = TASK.distill_loss(student, teacher, batch, T)
        assert float(loss.detach()) > 0
        ps = (student.detach().double() / T).softmax(-1)
        pt = (teacher.double() / T).softmax(-1)
        kl = (pt * (pt.log() - ps.log())).sum(-1) * T * T  # [3, 5]
        mask = labels != IGNORE
        per = [(kl[b][mask[b]].sum() / max(int(mask[b].sum()), 1)) for b in range(3)]
        assert float(loss) == pytest.approx(float(sum(per) / 3), rel=1e-5)
        (g,) = torch.autograd.grad(loss, student)
        # d/ds of KL(p_t ‖ p_s)·T² = T·(p_s − p_t) on scored positions, / count / batch.
        want = torch.zeros_like(ps)
        for b in range(3):
            n = int(mask[b].sum())
            for t in range(5):
                if mask[b, t]:
                    want[b, t] = T * (ps[b, t] - pt[b, t]) / n / 3
        torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-7)
    # The padding and unlabelled positions are never read.
    student = torch.randn(3, 5, 4)
    changed = student.clone()
    changed[labels == IGNORE] = torch.randn(int((labels == IGNORE).sum()), 4) * 50
    assert float(TASK.distill_loss(student, teacher, batch, 2.0, "sum")) == pytest.approx(
        float(TASK.distill_loss(changed, teacher, batch, 2.0, "sum")), rel=1e-6)


def test_distill_positions_without_labels():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    pos = scored_positions({"attention_mask": mask})
    assert pos.tolist() == [[False, True, True, True, False], [False, True, False, False, False], [False] * 5]
    teacher = torch.randn(3, 5, 4)
    student = torch.randn(3, 5, 4)
    loss = TASK.distill_loss(student, teacher, {"attention_mask": mask}, 1.0, "sum")
    kl = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), reduction="none", log_target=True).sum(-1)
    assert float(loss) == pytest.approx(float(kl[0, 1:4].mean() + kl[1, 1]), rel=1e-5)


# ---------------------------------------------------------------------- a real model


def test_hf_token_classification_model(tok):
    import transformers as tf

    d = TokenDataset([["Johanson", "lives", "in", "Reykjavik"], ["Hi", "there", "Ada"]],
                     [["B-PER", "O", "O", "B-LOC"], ["O", "O", "B-PER"]], "t")
    spec = TASK.spec(d)
    cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, **TASK.head_config(spec))
    model = tf.BertForTokenClassification(cfg).eval()
    assert model.config.id2label[2] == "B-PER"
    f = TASK.encode(d, spec, tok, 32)
    batch = f.batch([0, 1])
    out = TASK.outputs(model, batch)
    assert out.shape == (*batch["input_ids"].shape, spec.num_outputs)
    loss = TASK.loss(out, batch)
    loss.backward()
    g = model.classifier.weight.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    # One example: the per-example mean is HF's token-mean cross-entropy.
    one = f.batch([0])
    with torch.no_grad():
        hf = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"],
                   token_type_ids=one["token_type_ids"], labels=one["labels"]).loss
        ours = TASK.loss(TASK.outputs(model, one), one)
    assert float(ours) == pytest.approx(float(hf), rel=1e-5)
    logits, hidden = TASK.outputs(model, batch, output_hidden_states=True)
    assert len(hidden) == 2 and logits.shape == out.shape
    with torch.no_grad():
        m = TASK.metrics(out, f, d, spec)
        pred = TASK.decode(out, f, d, spec)
    assert set(m) == {"metric", "f1", "precision", "recall", "accuracy", "loss"}
    assert m["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert [len(p["tags"]) for p in pred] == [4, 3]
