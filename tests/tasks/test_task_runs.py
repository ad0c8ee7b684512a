"""A non-classification task on the one trainer's guarantees: token classification under torchrun (2 processes
equal 1 with twice the batch) and a killed CoFi run resumed to the uninterrupted result, bit for bit."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from cofi_kernels.pruning.cofi import loop as cofi_loop
from cofi_kernels.tasks import get_task
from cofi_kernels.training import finetune as ft
from tests.tasks.task_data import tagged_sentences, write_jsonl
from tests.training.test_distributed import _cofi, _cofi_differences, _ok, _state, _steps, _torchrun
from tests.training_support import FAST_FINETUNE, FAST_PRUNE, Killed, files_equal_tensors, kill_at, tiny_bert_dir


@pytest.fixture(scope="module")
def ner_job(tmp_path_factory):
    """Tagged sentences, and a dropout-free token-classification teacher in float32 and float64."""
    d = tmp_path_factory.mktemp("ner_ddp")
    files = {"train": write_jsonl(d / "train.jsonl", tagged_sentences(48, 0)),
             "eval": write_jsonl(d / "eval.jsonl", tagged_sentences(16, 1))}
    task = get_task("token_classification")
    base = tiny_bert_dir(d / "base", dropout=0.0, layers=2)
    teacher32 = str(d / "teacher32")
    ft.finetune(base, task.read(files["train"]), task.read(files["eval"]), teacher32,
                ft.FinetuneConfig(**{**FAST_FINETUNE, "max_length": 32}), progress=False)
    teacher64 = str(d / "teacher64")
    shutil.copytree(teacher32, teacher64)
    import transformers as tf

    tf.AutoModelForTokenClassification.from_pretrained(teacher32).double().save_pretrained(teacher64)
    return {"files": files, "teacher32": teacher32, "teacher64": teacher64, "task": task}


def _prune_args(job, teacher, out) -> list[str]:
    return ["prune", "--teacher", job[teacher], "--data", job["files"]["train"], "--eval-data", job["files"]["eval"],
            "--out", str(out), "--max-length", "32", "--quiet", "--target-sparsity", "0.6", "--distill-epochs", "0.5",
            "--prune-epochs", "6", "--sparsity-warmup-epochs", "2", "--finetune-epochs", "1", "--lr", "1e-3",
            "--reg-lr", "0.3", "--finetune-lr", "1e-3", "--checkpoint-every", "4", "--eval-every", "3",
            "--epsilon", "0.05", "--batch-size", "8"]


def test_token_classification_on_two_processes_equals_one(ner_job, tmp_path):
    """20 CoFi steps of per-token prediction and layer distillation: 2 processes × 4 sentences against
    1 × 8; parameters, log α, λ and W within 1e-5 (float64), the logged losses within 1e-6."""
    one, two = tmp_path / "one", tmp_path / "two"
    stop = ["--stop-at-step", "20"]
    _ok(_cofi(_prune_args(ner_job, "teacher64", one) + stop))
    _ok(_torchrun(2, _prune_args(ner_job, "teacher64", two) + stop))
    a, b = _state(one), _state(two)
    assert (a["world_size"], b["world_size"]) == (1, 2) and a["trainer"]["step"] == b["trainer"]["step"] == 20
    diff = _cofi_differences(a, b)
    assert all(v <= 1e-5 for v in diff.values()), diff
    assert float(a["method"]["gates"]["lambda_1"].abs()) > 0.1  # the gates moved
    sa, sb = _steps(one), _steps(two)
    assert [r["match"] for r in sa] == [r["match"] for r in sb]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 * max(1.0, abs(x["loss"])) for x, y in zip(sa, sb))


def test_killed_token_classification_run_resumes_bit_identical(ner_job, tmp_path, monkeypatch):
    task, files = ner_job["task"], ner_job["files"]
    train, held = task.read(files["train"]), task.read(files["eval"])
    cfg = cofi_loop.PruneConfig(**{**FAST_PRUNE, "max_length": 32})
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    cofi_loop.cofi_prune(ner_job["teacher32"], train, held, whole, cfg, progress=False)
    with monkeypatch.context() as m:
        kill_at(m, cofi_loop._CoFiRun, "train_step", 30)  # in the prune phase, after the checkpoint at 28
        with pytest.raises(Killed):
            cofi_loop.cofi_prune(ner_job["teacher32"], train, held, killed, cfg, progress=False)
    cofi_loop.cofi_prune(ner_job["teacher32"], train, held, killed, cfg, resume=True, progress=False)
    assert files_equal_tensors(os.path.join(whole, "model.safetensors"), os.path.join(killed, "model.safetensors"))
    assert open(os.path.join(whole, "cofi_task.json")).read() == open(os.path.join(killed, "cofi_task.json")).read()
