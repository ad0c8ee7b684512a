"""`cofi predict` (batch inference to JSONL) and `cofi eval --precision`.

The models are the session's tiny fine-tuned teacher (dense) and pruned models built from it
directly with the builder (no CoFi run), so each test takes seconds. Bad inputs of `predict`
are cases of the table in tests/cli/test_bad_input.py; the ones here need more than one run.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import stat
import subprocess
import sys

import pytest
import torch

from cofi_kernels import cli
from cofi_kernels.data.text import DataError, LabelSpace, read_examples
from cofi_kernels.tasks.classification import Encoded
from cofi_kernels.training.model_io import load_task_model, load_tokenizer, read_task, write_task
from tests import REPO_ROOT
from tests.training_support import toy_rows, tree_snapshot, write_csv, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------- models and data


def _save_pruned(hf_model, source_dir: str, out: str, labels: LabelSpace, max_length: int) -> str:
    from cofi_kernels.models.builder import KeptLayer, build_pruned_model

    # Irregular: 3, 1, 0 heads; a removed attention and a removed FFN; 24 of 32 hidden dims.
    layers = [KeptLayer([0, 2, 3], list(range(0, 64, 2))), KeptLayer([1], None), KeptLayer(None, list(range(40))),
              KeptLayer([0, 1, 2, 3], list(range(64)))]
    pruned = build_pruned_model(hf_model, layers, hidden=sorted({*range(0, 32, 4), *range(1, 32, 2)}))
    os.makedirs(out, exist_ok=True)
    pruned.save_pretrained(out)
    load_tokenizer(source_dir).save_pretrained(out)
    write_task(out, labels, max_length, "pruned")
    return out


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, teacher_dir):
    task = read_task(teacher_dir)
    out = str(tmp_path_factory.mktemp("predict") / "pruned")
    return _save_pruned(load_task_model(teacher_dir), teacher_dir, out, task["spec"], task["max_length"])


@pytest.fixture(scope="module")
def regression_dir(tmp_path_factory, base_dir):
    labels = LabelSpace("regression", [])
    out = str(tmp_path_factory.mktemp("predict") / "regression")
    return _save_pruned(load_task_model(base_dir, labels), base_dir, out, labels, 16)


def _rows(n: int, seed: int, pair: bool = False) -> list[dict]:
    """Toy rows with very different lengths in random order (so sorting by length matters)."""
    rng = random.Random(seed)
    rows = toy_rows(n, seed=seed, pair=pair)
    for r in rows:
        words = r["text"].split()
        r["text"] = " ".join(words[: rng.choice([1, 2, 3])] if rng.random() < 0.4 else words * rng.choice([1, 3]))
    return rows


@pytest.fixture(scope="module")
def rows():
    return _rows(37, seed=11)


def _reference(model_dir: str, rows: list[dict]) -> torch.Tensor:
    """fp32 logits ``[N, outputs]``, one example at a time, through the plain forward."""
    from cofi_kernels.models.pruned_model import CONFIG_NAME, PrunedModel
    from tests.training_support import dataset

    task = read_task(model_dir)
    tok = load_tokenizer(model_dir)
    pruned = os.path.isfile(os.path.join(model_dir, CONFIG_NAME))
    model = PrunedModel.from_pretrained(model_dir) if pruned else load_task_model(model_dir).eval()
    kw = {"backend": "reference"} if pruned and "backend" in inspect.signature(model.forward).parameters else {}
    out = []
    with torch.no_grad():
        for r in rows:
            b = Encoded(dataset([r]), None, tok, task["max_length"]).batch([0])
            if pruned:
                out.append(model(b["input_ids"], b["attention_mask"], b["token_type_ids"], **kw).float())
            else:
                out.append(model(**b).logits.float())
    return torch.cat(out)


def _predict(model_dir, data, out, *extra) -> list[dict]:
    assert cli.main(["predict", "--model", model_dir, "--data", data, "--out", str(out), "--quiet", *extra]) == 0
    with open(out, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _check_classification(results, model_dir, rows):
    labels = read_task(model_dir)["labels"]
    assert len(results) == len(rows)
    ref = _reference(model_dir, rows)
    for i, r in enumerate(results):
        assert set(r) == {"label", "probabilities"}
        assert list(r["probabilities"]) == labels
        assert r["label"] in labels
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert r["label"] == labels[int(ref[i].argmax())], f"example {i}"
        want = ref[i].softmax(-1).tolist()
        assert list(r["probabilities"].values()) == pytest.approx(want, abs=1e-4), f"example {i}"


# ---------------------------------------------------------------------- predictions


def test_pruned_predictions_are_the_reference_forward_in_input_order(tmp_path, pruned_dir, rows, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", rows)  # with a label column: ignored
    results = _predict(pruned_dir, data, tmp_path / "pred.jsonl", "--batch-size", "4")
    _check_classification(results, pruned_dir, rows)
    assert "37 predictions of the pruned model" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl", "pred.jsonl"]  # no temporary file left


def test_dense_model_predicts_in_fp32_from_a_csv_without_labels(tmp_path, teacher_dir, rows):
    data = write_csv(tmp_path / "data.csv", rows, columns=("text",))
    results = _predict(teacher_dir, data, tmp_path / "pred.jsonl")
    _check_classification(results, teacher_dir, rows)


@pytest.mark.parametrize("pair", [False, True], ids=["text", "text_pair"])
def test_csv_and_jsonl_with_and_without_labels_give_the_same_lines(tmp_path, pruned_dir, pair):
    rows = _rows(19, seed=3, pair=pair)
    cols = ("text", "text_pair") if pair else ("text",)
    outputs = []
    for name, path in [
        ("jsonl-labelled", write_jsonl(tmp_path / "a.jsonl", rows)),
        ("jsonl-unlabelled", write_jsonl(tmp_path / "b.jsonl", [{k: r[k] for k in cols} for r in rows])),
        ("csv-labelled", write_csv(tmp_path / "c.csv", rows, columns=(*cols, "label"))),
        ("csv-unlabelled", write_csv(tmp_path / "d.csv", rows, columns=cols)),
    ]:
        out = tmp_path / f"{name}.out.jsonl"
        _predict(pruned_dir, path, out, "--batch-size", "5")
        outputs.append(out.read_bytes())
    assert len(outputs[0].splitlines()) == len(rows)
    assert all(o == outputs[0] for o in outputs[1:])


def test_batch_size_does_not_change_the_predictions(tmp_path, pruned_dir, rows):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    one = _predict(pruned_dir, data, tmp_path / "one.jsonl", "--batch-size", "1")
    big = _predict(pruned_dir, data, tmp_path / "big.jsonl", "--batch-size", "64")
    assert [r["label"] for r in one] == [r["label"] for r in big]
    for a, b in zip(one, big):
        assert list(a["probabilities"].values()) == pytest.approx(list(b["probabilities"].values()), abs=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_bf16_and_int8_agree_with_fp32_on_most_examples(tmp_path, pruned_dir, rows, precision):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    fp32 = _predict(pruned_dir, data, tmp_path / "fp32.jsonl")
    low = _predict(pruned_dir, data, tmp_path / f"{precision}.jsonl", "--precision", precision, "--batch-size", "8")
    assert len(low) == len(fp32)
    labels = read_task(pruned_dir)["labels"]
    for r in low:
        assert r["label"] in labels and sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    agree = sum(a["label"] == b["label"] for a, b in zip(fp32, low))
    assert agree >= 0.8 * len(fp32), f"{precision} agrees with fp32 on {agree} of {len(fp32)}"


def test_regression_model_writes_scores(tmp_path, regression_dir, rows):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    results = _predict(regression_dir, data, tmp_path / "pred.jsonl", "--batch-size", "6")
    ref = _reference(regression_dir, rows)[:, 0].tolist()
    assert [set(r) for r in results] == [{"score"}] * len(rows)
    assert [r["score"] for r in results] == pytest.approx(ref, abs=1e-4)


def test_unusable_labels_are_ignored(tmp_path, pruned_dir):
    rows = [{"text": "goal match team", "label": ""}, {"text": "bank market", "label": ["x"]},
            {"text": "song album band"}]
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = _predict(pruned_dir, str(path), tmp_path / "pred.jsonl")
    assert len(results) == 3


# ---------------------------------------------------------------------- the output file


def test_an_existing_output_file_is_replaced_keeping_its_mode(tmp_path, pruned_dir, rows):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "pred.jsonl"
    out.write_text("old predictions\n")
    os.chmod(out, 0o640)
    results = _predict(pruned_dir, data, out)
    assert len(results) == len(rows)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl", "pred.jsonl"]


def test_a_failure_while_writing_leaves_the_old_file_and_no_temporary(tmp_path, pruned_dir, rows, monkeypatch,
                                                                      capsys):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "pred.jsonl"
    out.write_text("old predictions\n")
    before = tree_snapshot(tmp_path)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # after every line is written to the temporary file
    status = cli.main(["predict", "--model", pruned_dir, "--data", data, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == ["cofi predict: error: No space left on device"], err
    assert tree_snapshot(tmp_path) == before


def test_a_failure_while_predicting_writes_nothing(tmp_path, pruned_dir, rows, monkeypatch, capsys):
    from cofi_kernels.tasks.classification import ClassificationTask

    data = write_jsonl(tmp_path / "data.jsonl", rows)
    before = tree_snapshot(tmp_path)
    n = []

    def outputs(self, model, b, output_hidden_states=False):
        n.append(1)
        if len(n) == 3:
            raise MemoryError
        return real(self, model, b, output_hidden_states)

    real = ClassificationTask.outputs
    monkeypatch.setattr(ClassificationTask, "outputs", outputs)
    status = cli.main(["predict", "--model", pruned_dir, "--data", data, "--out", str(tmp_path / "p.jsonl"),
                       "--batch-size", "4", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "out of memory" in err[0], err
    assert tree_snapshot(tmp_path) == before


def test_predict_as_a_subprocess_with_its_progress_bar(tmp_path, pruned_dir, rows):
    data = write_csv(tmp_path / "data.csv", rows)
    out = tmp_path / "pred.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "cofi_kernels.cli", "predict", "--model", pruned_dir, "--data", data,
                          "--out", str(out), "--batch-size", "8"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "predict" in res.stderr and f"{len(rows)}/{len(rows)}" in res.stderr  # the tqdm bar, on stderr
    assert res.stdout.strip().endswith(f"written to {out}")
    lines = out.read_text().splitlines()
    assert len(lines) == len(rows)
    _check_classification([json.loads(line) for line in lines], pruned_dir, rows)


def test_predict_help_says_an_existing_file_is_replaced(capsys):
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "an existing file is replaced" in text and "--precision {fp32,bf16,fp16,int8}" in text


# ---------------------------------------------------------------------- reading data to predict on


def test_read_examples_without_labels(tmp_path):
    csv_path = write_csv(tmp_path / "d.csv", toy_rows(5, 1), columns=("text",))
    with pytest.raises(DataError, match=r"missing column.*'label'"):
        read_examples(csv_path)  # the default still needs labels
    data = read_examples(csv_path, labelled=False)
    assert len(data) == 5 and data.labels == [None] * 5 and data.text_pairs is None
    labelled = read_examples(write_jsonl(tmp_path / "l.jsonl", toy_rows(5, 1)), labelled=False)
    assert labelled.texts == data.texts and labelled.labels == [None] * 5
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\]; the data needs 'text' \("):
        read_examples(write_jsonl(tmp_path / "x.jsonl", [{"sentence": "a b"}]), labelled=False)
    with pytest.raises(DataError, match=r"no examples; give a file with text rows"):
        read_examples(write_csv(tmp_path / "e.csv", [], columns=("text",)), labelled=False)


# ---------------------------------------------------------------------- eval --precision


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eval_reports_its_precision(capsys, pruned_dir, tmp_path, precision):
    data = write_jsonl(tmp_path / "data.jsonl", toy_rows(24, seed=2))
    assert cli.main(["eval", "--model", pruned_dir, "--data", data, "--precision", precision, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["serving_precision"] == precision and r["kind"] == "pruned" and r["examples"] == 24
    assert 0.0 <= r["accuracy"] <= 1.0 and r["examples_per_second"] > 0
    assert cli.main(["eval", "--model", pruned_dir, "--data", data, "--precision", precision]) == 0
    assert f"(pruned, {precision})" in capsys.readouterr().out


def test_evaluate_dir_defaults_to_fp32(teacher_dir, toy):
    from cofi_kernels.cli import evaluate_dir

    r = evaluate_dir(teacher_dir, toy[1], repeats=1)
    assert r["serving_precision"] == "fp32" and r["kind"] == "dense"
