"""Fine-tuning on the trainer (tiny random BERT, toy data): a loadable teacher, exact resume."""

from __future__ import annotations

import json
import os

import pytest

from cofi_kernels.tasks.classification import ClassificationTask
from cofi_kernels.training import distill, evaluation, model_io
from cofi_kernels.training import finetune as ft
from cofi_kernels.training import trainer as tr
from tests.training_support import (
    FAST_FINETUNE,
    Killed,
    files_equal_tensors,
    read_log,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_finetune_writes_a_loadable_teacher(teacher_dir, toy):
    files = set(os.listdir(teacher_dir))
    assert {"config.json", "model.safetensors", model_io.TASK_FILE, tr.RUN_FILE, tr.LOG_FILE} <= files
    assert tr.CHECKPOINT_DIR not in files  # removed once the run finished
    task = model_io.read_task(teacher_dir)
    assert task["spec"].names == ["money", "music", "sport"]
    model = model_io.load_task_model(teacher_dir)
    assert model.config.num_labels == 3
    run = json.load(open(os.path.join(teacher_dir, tr.RUN_FILE)))
    evals = [r for r in read_log(teacher_dir) if r["event"] == "eval"]
    # The kept weights are those of the best evaluation, and they reproduce its accuracy.
    assert run["best"]["accuracy"] == max(r["accuracy"] for r in evals)
    from cofi_kernels.tasks.classification import Encoded

    enc = Encoded(toy[1], task["spec"], model_io.load_tokenizer(teacher_dir), FAST_FINETUNE["max_length"])
    assert evaluation.evaluate(model, enc, task["spec"])["accuracy"] == pytest.approx(run["best"]["accuracy"])

def test_finetune_learns_the_toy_task(teacher_dir):
    run = json.load(open(os.path.join(teacher_dir, tr.RUN_FILE)))
    # 3 balanced classes: chance is 1/3; the class words make it learnable in a few steps.
    assert run["best"]["accuracy"] > 0.5

def test_finetune_killed_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, base_dir, teacher_dir, toy):
    out = str(tmp_path / "ft")
    cfg = ft.FinetuneConfig(**FAST_FINETUNE)
    original = ClassificationTask.loss
    seen = {"n": 0}

    def dying_loss(*a, **kw):
        seen["n"] += 1
        if seen["n"] == 8:  # mid-epoch 2, after the checkpoint at step 6
            raise Killed()
        return original(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(ClassificationTask, "loss", dying_loss)
        with pytest.raises(Killed):
            ft.finetune(base_dir, *toy, out, cfg, progress=False)
    ft.finetune(base_dir, *toy, out, cfg, resume=True, progress=False)
    assert files_equal_tensors(os.path.join(teacher_dir, "model.safetensors"), os.path.join(out, "model.safetensors"))
