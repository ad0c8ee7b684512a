"""Each non-classification task through the product on tiny models: `cofi finetune` (not for embeddings),
`cofi prune` (CoFi), `cofi eval --json` (the task's metric keys), `cofi predict` (the task's output),
`cofi export`, the engine against the reference, and the refusals of methods that do not run a task."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cofi_kernels import cli
from cofi_kernels.models.pruned_model import PrunedModel
from tests.tasks.task_data import squad_examples, tagged_sentences, write_jsonl
from tests.training_support import FAST_FINETUNE, FAST_PRUNE, tiny_bert_dir, toy_rows

FINETUNE_FLAGS = ["--epochs", "4", "--batch-size", "8", "--lr", "3e-3", "--max-length", "32",
                  "--checkpoint-every", "50", "--eval-every", "6", "--quiet"]
PRUNE_FLAGS = ["--target-sparsity", "0.6", "--distill-epochs", "0.5", "--prune-epochs", "3",
               "--sparsity-warmup-epochs", "1", "--finetune-epochs", "1", "--batch-size", "8", "--lr", "1e-3",
               "--reg-lr", "0.3", "--finetune-lr", "1e-3", "--max-length", "32", "--checkpoint-every", "50",
               "--eval-every", "3", "--epsilon", "0.05", "--quiet"]


def _json_out(capsys, argv) -> dict:
    capsys.readouterr()
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("base"), seed=3, layers=2)


@pytest.fixture(scope="module")
def ner_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ner")
    return {"train": write_jsonl(d / "train.jsonl", tagged_sentences(48, 0)),
            "eval": write_jsonl(d / "eval.jsonl", tagged_sentences(16, 1))}


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("qa")
    return {"train": write_jsonl(d / "train.jsonl", squad_examples(48, 0, impossible=0.25)),
            "eval": write_jsonl(d / "eval.jsonl", squad_examples(16, 1, impossible=0.25))}


def _exported_outputs(tmp_path, pruned: str) -> dict:
    """`cofi export` of ``pruned``, run in ONNX Runtime on one padded batch: ``{output name: array}``, and
    the same batch through the model's reference forward."""
    import onnxruntime as ort

    path = str(tmp_path / "model.onnx")
    assert cli.main(["export", "--model", pruned, "--out", path]) == 0
    model = PrunedModel.from_pretrained(pruned)
    ids = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    types = torch.zeros_like(ids)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()}
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, (torch.from_numpy(a) for a in session.run(None, feeds))))
    with torch.no_grad():
        want = model(ids, mask, types, backend="reference")
    return got, want, mask


def _finetune_and_prune(tmp_path, base_dir, files, task_flags=()):
    teacher, pruned = str(tmp_path / "teacher"), str(tmp_path / "pruned")
    assert cli.main(["finetune", "--model", base_dir, "--data", files["train"], "--eval-data", files["eval"],
                     "--out", teacher, *task_flags, *FINETUNE_FLAGS]) == 0
    assert cli.main(["prune", "--teacher", teacher, "--data", files["train"], "--eval-data", files["eval"],
                     "--out", pruned, *task_flags, *PRUNE_FLAGS]) == 0
    return teacher, pruned


def test_token_classification_through_the_product(tmp_path, base_dir, ner_files, capsys):
    teacher, pruned = _finetune_and_prune(tmp_path, base_dir, ner_files)
    task = json.load(open(os.path.join(pruned, "cofi_task.json")))
    assert task["task"] == "token_classification" and task["labels"][0] == "O"
    for model in (teacher, pruned):
        r = _json_out(capsys, ["eval", "--model", model, "--data", ner_files["eval"], "--json"])
        assert r["metric"] == "f1" and r["task"] == "token_classification"
        assert {"precision", "recall", "f1", "accuracy", "sparsity", "examples_per_second"} <= r.keys()
        assert 0.0 <= r["f1"] <= 1.0 and r["examples"] == 16
        assert all(isinstance(r[k], float) for k in ("precision", "recall", "f1", "accuracy"))
        assert r["serving_precision"] == "fp32"
    assert _json_out(capsys, ["eval", "--model", pruned, "--data", ner_files["eval"], "--json"])["sparsity"] > 0.3
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": "Anna Berg works at Globex in  Oslo"},
                                                   {"tokens": ["Tom", "visited", "Lima"]}])
    out = str(tmp_path / "pred.jsonl")
    assert cli.main(["predict", "--model", pruned, "--data", data, "--out", out, "--quiet"]) == 0
    rows = [json.loads(l) for l in open(out)]
    assert len(rows) == 2 and len(rows[0]["tags"]) == 7 and len(rows[1]["tags"]) == 3
    text = "Anna Berg works at Globex in  Oslo"
    for e in rows[0]["entities"]:
        assert text[e["start"]:e["end"]] == e["text"] and 0.0 <= e["score"] <= 1.0
    got, want, mask = _exported_outputs(tmp_path, pruned)
    assert list(got) == ["logits"] and got["logits"].shape == want.shape
    real = mask.bool()
    torch.testing.assert_close(got["logits"][real], want[real], rtol=1e-4, atol=1e-5)


def test_question_answering_through_the_product(tmp_path, base_dir, qa_files, capsys):
    teacher, pruned = _finetune_and_prune(tmp_path, base_dir, qa_files, ("--doc-stride", "8"))
    task = json.load(open(os.path.join(pruned, "cofi_task.json")))
    assert task["task"] == "question_answering" and task["version_2"] and task["doc_stride"] == 8
    for model in (teacher, pruned):
        r = _json_out(capsys, ["eval", "--model", model, "--data", qa_files["eval"], "--json"])
        assert r["metric"] == "f1" and {"exact_match", "f1", "sparsity", "examples_per_second"} <= r.keys()
        assert 0.0 <= r["exact_match"] <= 100.0 and 0.0 <= r["f1"] <= 100.0
    out = str(tmp_path / "pred.jsonl")
    assert cli.main(["predict", "--model", pruned, "--data", qa_files["eval"], "--out", out, "--quiet"]) == 0
    rows = [json.loads(l) for l in open(out)]
    contexts = [json.loads(l)["context"] for l in open(qa_files["eval"])]
    assert len(rows) == 16
    for r, c in zip(rows, contexts):
        assert {"answer", "start", "end", "score"} <= r.keys()
        if r["answer"]:
            assert c[r["start"]:r["end"]] == r["answer"]
    got, want, mask = _exported_outputs(tmp_path, pruned)
    assert list(got) == ["start_logits", "end_logits"]
    real = mask.bool()
    torch.testing.assert_close(got["start_logits"][real], want[..., 0][real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["end_logits"][real], want[..., 1][real], rtol=1e-4, atol=1e-5)


def test_embedding_through_the_product(tmp_path, base_dir, capsys):
    rows = toy_rows(64, 0)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:48])
    held = write_jsonl(tmp_path / "eval.jsonl", rows[48:])
    pruned = str(tmp_path / "pruned")
    assert cli.main(["finetune", "--model", base_dir, "--data", train, "--task", "embedding",
                     "--out", str(tmp_path / "ft"), "--quiet"]) == 2
    assert cli.main(["prune", "--task", "embedding", "--teacher", base_dir, "--data", train, "--eval-data", held,
                     "--out", pruned, *PRUNE_FLAGS]) == 0
    task = json.load(open(os.path.join(pruned, "cofi_task.json")))
    assert task["task"] == "embedding" and task["teacher"] == os.path.abspath(base_dir)
    # A plain transformers directory (no sentence-transformers files): mean pooling, not normalised.
    assert task["pooling"] == "mean" and task["normalize"] is False
    r = _json_out(capsys, ["eval", "--model", pruned, "--data", held, "--json"])
    assert r["metric"] == "cosine_to_teacher" and -1.0 <= r["cosine_to_teacher"] <= 1.0
    assert 0.0 <= r["retrieval_accuracy"] <= 1.0 and r["sparsity"] > 0.3
    again = _json_out(capsys, ["eval", "--model", pruned, "--data", held, "--teacher", base_dir, "--json"])
    assert again["cosine_to_teacher"] == r["cosine_to_teacher"]
    out = str(tmp_path / "pred.jsonl")
    assert cli.main(["predict", "--model", pruned, "--data", held, "--out", out, "--quiet"]) == 0
    vectors = torch.tensor([json.loads(l)["embedding"] for l in open(out)])
    assert vectors.shape == (16, 32) and torch.isfinite(vectors).all()
    got, want, _ = _exported_outputs(tmp_path, pruned)
    assert list(got) == ["embedding"]
    torch.testing.assert_close(got["embedding"], want, rtol=1e-4, atol=1e-5)
    # The saved embedder loads in sentence-transformers and gives the same vectors.
    from cofi_kernels.tasks.embedding import load_sentence_transformer

    st = load_sentence_transformer(pruned, device="cpu")
    texts = [json.loads(l)["text"] for l in open(held)]
    got = torch.as_tensor(st.encode(texts, convert_to_numpy=True, batch_size=4))
    torch.testing.assert_close(got, vectors, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,task", [("smp", "token_classification"), ("theseus", "embedding"),
                                         ("scratch", "embedding")])
def test_methods_that_do_not_run_a_task_refuse_it_in_one_line(tmp_path, base_dir, ner_files, method, task, capsys):
    flags = {"theseus": ["--teacher", base_dir, "--layers", "1"],
             "smp": ["--model", base_dir, "--unstructured", "--remaining", "0.5"],
             "scratch": ["--architecture", base_dir, "--budget", "E"]}[method]
    data = ner_files["train"] if task == "token_classification" else write_jsonl(tmp_path / "t.jsonl", toy_rows(8, 0))
    capsys.readouterr()
    assert cli.main(["prune", "--method", method, *flags, "--data", data, "--task", task,
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--method {method} does not run the {task} task" in err[0]
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("method", ["theseus", "scratch"])
def test_theseus_and_scratch_run_token_classification(tmp_path, base_dir, ner_files, method, capsys):
    teacher, pruned = _finetune_and_prune(tmp_path, base_dir, ner_files)
    out = str(tmp_path / method)
    data = ["--data", ner_files["train"], "--eval-data", ner_files["eval"], "--max-length", "32", "--quiet",
            "--batch-size", "8", "--checkpoint-every", "50"]
    flags = (["--teacher", teacher, "--layers", "1", "--replace-epochs", "2", "--finetune-epochs", "1"] if method == "theseus"
             else ["--architecture", pruned, "--budget", "E"])
    assert cli.main(["prune", "--method", method, *flags, *data, "--out", out]) == 0
    r = _json_out(capsys, ["eval", "--model", out, "--data", ner_files["eval"], "--json"])
    assert r["task"] == "token_classification" and 0.0 <= r["f1"] <= 1.0 and r["kind"] == "pruned"


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_task_data_gets_one_line_and_exit_2(tmp_path, base_dir, ner_files, qa_files, capsys):
    out = str(tmp_path / "out")
    short = write_jsonl(tmp_path / "short.jsonl", [{"tokens": ["Tom", "visited", "Lima"], "tags": ["B-PER", "O"]}])
    err = _one_line_error(capsys, ["finetune", "--model", base_dir, "--data", short, "--out", out])
    assert "short.jsonl" in err and "2 tag" in err and "3 token" in err
    row = squad_examples(1, 0)[0]
    row["answers"]["answer_start"] = [row["answers"]["answer_start"][0] + 1]
    moved = write_jsonl(tmp_path / "moved.jsonl", [row])
    err = _one_line_error(capsys, ["finetune", "--model", base_dir, "--data", moved, "--out", out])
    assert "moved.jsonl" in err and "answer_start" in err
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"tokens": ["Tom", "sang"], "tags": ["B-ART", "O"]}])
    err = _one_line_error(capsys, ["finetune", "--model", base_dir, "--data", ner_files["train"],
                                   "--eval-data", unknown, "--out", out, "--max-length", "32"])
    assert "B-ART" in err and "unknown.jsonl" in err
    assert not os.path.exists(out)
    err = _one_line_error(capsys, ["prune", "--task", "question_answering", "--teacher", base_dir,
                                   "--data", qa_files["train"], "--out", out, "--target-sparsity", "0.5"])
    assert "cofi_task.json" in err
