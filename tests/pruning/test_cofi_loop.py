"""The CoFi loop on tiny random models: gates and λ respond, the compact model, runs resume exactly."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cofi_kernels.pruning.cofi import loop as pl
from cofi_kernels.training import evaluation, model_io
from cofi_kernels.training import finetune as ft
from cofi_kernels.training import trainer as tr
from cofi_kernels.training.teacher import TeacherCache
from tests.training_support import (
    FAST_FINETUNE,
    FAST_PRUNE,
    Killed,
    dataset,
    files_equal_tensors,
    kill_at,
    read_log,
    strip_times,
    toy_rows,
    tree_snapshot,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, teacher_dir, toy):
    out = str(tmp_path_factory.mktemp("runs") / "pruned")
    result = pl.cofi_prune(teacher_dir, *toy, out, pl.PruneConfig(**FAST_PRUNE), progress=False)
    return out, result

def test_expected_sparsity_starts_near_0_and_is_held_within_epsilon_of_the_ramp(pruned_run):
    out, _ = pruned_run
    records = read_log(out)
    distill = [r for r in records if r["event"] == "step" and r["phase"] == "distill"]
    steps = [r for r in records if r["event"] == "step" and r["phase"] == "prune"]
    target, eps = FAST_PRUNE["target_sparsity"], FAST_PRUNE["epsilon"]
    # Every gate starts nearly surely kept (FFN units at drop rate 0.01), so ŝ starts below the
    # first targets instead of above them.
    assert 0.0 <= distill[0]["expected_sparsity"] < 0.02
    # The target ramps linearly from 0 to t over the warm-up ...
    ramp = [r["target"] for r in steps]
    assert steps[0]["target"] < 0.2 * target and ramp[-1] == pytest.approx(target)
    assert all(b >= a for a, b in zip(ramp, ramp[1:]))
    # ... and ŝ follows it in [t − ε, t] at every step (hold_target), moved by a shift of log α
    # where the Lagrangian alone left the band.
    assert all(-eps - 1e-6 <= r["expected_sparsity"] - r["target"] <= 1e-6 for r in steps)
    assert any(r["hold_shift"] != 0 for r in steps)


def test_lambda_update_is_the_gradient_ascent_on_the_lagrangian(pruned_run):
    """λ1 += lr·(ŝ − t) and λ2 += lr·(ŝ − t)² at every prune step, ŝ being the expected sparsity
    the step's forward saw (the one logged after the previous step): sign and magnitude."""
    out, _ = pruned_run
    records = [r for r in read_log(out) if r["event"] == "step" and r["phase"] in ("distill", "prune")]
    lr = pl.PruneConfig().lambda_lr
    moved = 0
    for before, r in zip(records, records[1:]):
        if r["phase"] != "prune":
            continue
        diff = before["expected_sparsity"] - r["target"]
        want_1 = before["lambda_1"] + lr * diff
        want_2 = before["lambda_2"] + lr * diff * diff
        assert r["lambda_1"] == pytest.approx(want_1, rel=1e-5, abs=1e-5), r["step"]
        assert r["lambda_2"] == pytest.approx(want_2, rel=1e-5, abs=1e-6), r["step"]
        # The step's Lagrangian is λ1·(ŝ − t) + λ2·(ŝ − t)² at the λ it was computed with.
        assert r["lagrangian"] == pytest.approx(before["lambda_1"] * diff + before["lambda_2"] * diff * diff,
                                                rel=1e-4, abs=1e-6)
        moved += abs(r["lambda_1"] - before["lambda_1"]) > 1e-3
    assert moved > 5
    assert min(r["lambda_1"] for r in records) < 0  # ŝ below t pushes λ1 down: the force raises ŝ


def test_prune_writes_a_compact_model_at_the_selected_gates(pruned_run, toy):
    from cofi_kernels.models.pruned_model import PrunedModel

    out, result = pruned_run
    model = PrunedModel.from_pretrained(out)
    run = json.load(open(os.path.join(out, tr.RUN_FILE)))
    assert run["sparsity"] == pytest.approx(model.sparsity)
    assert result.extra["sparsity"] == pytest.approx(model.sparsity)
    assert run["selected"]["realised_sparsity"] == pytest.approx(model.sparsity)
    # The realised sparsity is the target up to the granularity (half the largest piece: one head
    # of 4·d_head·hidden weights) and both are saved side by side.
    target = FAST_PRUNE["target_sparsity"]
    half_head = 4 * model.config["head_dim"] * model.config["hidden_size"] / model.config["original_size"] / 2
    assert abs(model.sparsity - target) <= half_head
    assert run["target_sparsity"] == result.extra["target_sparsity"] == model.target_sparsity == target
    assert os.path.isfile(os.path.join(out, "lagrangian.png"))
    # The best state is chosen only among evaluations within ε of the target.
    evals = [r for r in read_log(out) if r["event"] == "eval" and r["phase"] == "prune"]
    end = max(r["step"] for r in evals)
    for r in evals:  # states outside the ε band cannot be chosen, so they are not evaluated
        assert r["eligible"] == (abs(r["expected_sparsity"] - FAST_PRUNE["target_sparsity"])
                                 <= FAST_PRUNE["epsilon"] + 1e-6)
        assert ("accuracy" in r) == (r["eligible"] or r["step"] == end)
    if not run["selected"]["fallback"]:
        chosen = [r for r in evals if r["step"] == run["selected"]["step"]][0]
        assert abs(chosen["expected_sparsity"] - FAST_PRUNE["target_sparsity"]) <= FAST_PRUNE["epsilon"] + 1e-6
        eligible = [r["accuracy"] for r in evals if r["eligible"]]
        assert chosen["accuracy"] == max(eligible)
    from safetensors.torch import load_file

    gates = load_file(os.path.join(out, pl.GATES_FILE))
    assert {"log_alpha.head", "log_alpha.int", "log_alpha.hidden", "z.head", "z.hidden"} <= set(gates)
    assert int((gates["z.hidden"] > 0).sum()) == model.config["hidden_size"]

def test_compact_finetune_phase_distils_through_the_pruned_model(pruned_run):
    out, _ = pruned_run
    ft = [r for r in read_log(out) if r["event"] == "step" and r["phase"] == "finetune"]
    assert ft and all(r["distill_layer"] >= 0 and r["distill_pred"] >= 0 for r in ft)
    assert all(all(m is None or isinstance(m, int) for m in r["match"]) for r in ft)

def test_prune_without_teacher_uses_cross_entropy(tmp_path, teacher_dir, toy):
    out = str(tmp_path / "ce")
    cfg = pl.PruneConfig(**{**FAST_PRUNE, "prune_epochs": 1.0, "sparsity_warmup_epochs": 0.5, "finetune_epochs": 0.5})
    pl.cofi_prune(teacher_dir, *toy, out, cfg, distill=False, progress=False)
    steps = [r for r in read_log(out) if r["event"] == "step"]
    assert all("task" in r and "distill_pred" not in r for r in steps)

def _plan_of(toy):
    return pl._PrunePlan(pl.PruneConfig(**FAST_PRUNE), len(toy[0]))

@pytest.mark.parametrize("where", ["distill", "prune", "at_pruning", "finetune"])
def test_prune_killed_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, pruned_run, teacher_dir, toy, where):
    plan = _plan_of(toy)
    at = {"distill": 1, "prune": plan.distill_end + 7, "at_pruning": plan.prune_end,
          "finetune": plan.total - 2}[where]
    out = str(tmp_path / "run")
    cfg = pl.PruneConfig(**FAST_PRUNE)
    with monkeypatch.context() as m:
        kill_at(m, pl._CoFiRun, "train_step", at)
        with pytest.raises(Killed):
            pl.cofi_prune(teacher_dir, *toy, out, cfg, progress=False)
    assert os.path.isfile(os.path.join(out, tr.CHECKPOINT_DIR, tr.CHECKPOINT_FILE))
    assert not os.path.exists(os.path.join(out, tr.RUN_FILE))
    pl.cofi_prune(teacher_dir, *toy, out, cfg, resume=True, progress=False)
    ref, _ = pruned_run
    for name in ("model.safetensors", pl.GATES_FILE):
        assert files_equal_tensors(os.path.join(ref, name), os.path.join(out, name)), name
    a, b = (json.load(open(os.path.join(d, tr.RUN_FILE))) for d in (ref, out))
    assert a["selected"] == b["selected"] and a["best"] == b["best"]
    assert strip_times(read_log(ref)) == strip_times(read_log(out))

def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, pruned_run, teacher_dir, toy):
    out = str(tmp_path / "run")
    cfg = pl.PruneConfig(**FAST_PRUNE)
    original = tr.RunDirectory.save_checkpoint
    calls = {"n": 0}

    def torn(self, state):
        calls["n"] += 1
        if calls["n"] == 3:  # half a file at the temporary name, then death
            with open(self.ckpt_path + ".tmp", "wb") as f:
                f.write(b"PK\x03\x04 torn")
            raise Killed()
        return original(self, state)

    with monkeypatch.context() as m:
        m.setattr(tr.RunDirectory, "save_checkpoint", torn)
        with pytest.raises(Killed):
            pl.cofi_prune(teacher_dir, *toy, out, cfg, progress=False)
    pl.cofi_prune(teacher_dir, *toy, out, cfg, resume=True, progress=False)
    ref, _ = pruned_run
    assert files_equal_tensors(os.path.join(ref, "model.safetensors"), os.path.join(out, "model.safetensors"))
    assert files_equal_tensors(os.path.join(ref, pl.GATES_FILE), os.path.join(out, pl.GATES_FILE))

def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, monkeypatch, teacher_dir, toy):
    out = str(tmp_path / "run")
    cfg = pl.PruneConfig(**FAST_PRUNE)
    with monkeypatch.context() as m:
        kill_at(m, pl._CoFiRun, "train_step", 6)
        with pytest.raises(Killed):
            pl.cofi_prune(teacher_dir, *toy, out, cfg, progress=False)
    before = tree_snapshot(out)
    other = pl.PruneConfig(**{**FAST_PRUNE, "target_sparsity": 0.5})
    with pytest.raises(tr.RunError, match="another run.*target_sparsity|another run.*config"):
        pl.cofi_prune(teacher_dir, *toy, out, other, resume=True, progress=False)
    with pytest.raises(tr.RunError, match="another run"):
        pl.cofi_prune(teacher_dir, toy[1], toy[1], out, cfg, resume=True, progress=False)
    with pytest.raises(tr.RunError, match="another run"):
        ft.finetune(teacher_dir, *toy, out, ft.FinetuneConfig(**FAST_FINETUNE), resume=True, progress=False)
    with pytest.raises(tr.RunError, match="unfinished run.*--resume"):
        pl.cofi_prune(teacher_dir, *toy, out, cfg, progress=False)
    assert tree_snapshot(out) == before

def test_resume_without_checkpoint_and_finished_runs(tmp_path, pruned_run, teacher_dir, toy):
    cfg = pl.PruneConfig(**FAST_PRUNE)
    with pytest.raises(tr.RunError, match="no checkpoint"):
        pl.cofi_prune(teacher_dir, *toy, str(tmp_path / "nothing"), cfg, resume=True, progress=False)
    assert not os.path.exists(tmp_path / "nothing")
    done, _ = pruned_run
    before = tree_snapshot(done)
    with pytest.raises(tr.RunError, match="finished run"):
        pl.cofi_prune(teacher_dir, *toy, done, cfg, resume=True, progress=False)
    with pytest.raises(tr.RunError, match="not empty"):
        pl.cofi_prune(teacher_dir, *toy, done, cfg, progress=False)
    assert tree_snapshot(done) == before

@pytest.mark.parametrize("target", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_target_sparsity_outside_0_1_is_refused_before_anything_is_written(tmp_path, teacher_dir, toy, target):
    out = tmp_path / "out"
    with pytest.raises(tr.RunError, match=r"target.sparsity must be (in \(0, 1\)|a finite number)"):
        pl.cofi_prune(teacher_dir, *toy, str(out), pl.PruneConfig(**{**FAST_PRUNE, "target_sparsity": target}),
                      progress=False)
    assert not out.exists()

def test_bf16_on_cpu_and_missing_gpu_are_clear_errors(tmp_path, teacher_dir, toy):
    with pytest.raises(tr.RunError, match="bf16 autocast is for GPUs"):
        pl.cofi_prune(teacher_dir, *toy, str(tmp_path / "o"), pl.PruneConfig(**{**FAST_PRUNE, "bf16": True}),
                      progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(tr.RunError, match="no CUDA GPU"):
            ft.finetune(teacher_dir, *toy, str(tmp_path / "o"), ft.FinetuneConfig(device="cuda"), progress=False)
    assert not (tmp_path / "o").exists()

def test_teacher_cache_holds_the_teachers_outputs(teacher_dir, toy):
    """The cached logits and layer outputs equal a direct teacher forward on the training batch."""
    from cofi_kernels.tasks.classification import Encoded

    task = model_io.read_task(teacher_dir)
    enc = Encoded(toy[0], task["spec"], model_io.load_tokenizer(teacher_dir), FAST_PRUNE["max_length"])
    teacher = model_io.load_task_model(teacher_dir).eval()
    index = [7, 0, 31, 12, 44, 3]

    def outputs(b):
        return evaluation.model_outputs(teacher, b, output_hidden_states=True)

    cache = TeacherCache(outputs, enc, index, [1, 3], "cpu", False, chunk=5)
    assert sorted(cache.logits) == sorted(index)  # the examples asked for, no others
    b = enc.batch(index)
    with torch.no_grad():
        out = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      token_type_ids=b["token_type_ids"], output_hidden_states=True)
    logits, hidden = cache.batch(index, b["input_ids"].shape[1], "cpu")
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)
    real = b["attention_mask"].bool()
    for t in (1, 3):
        want = out.hidden_states[t + 1]  # hidden_states[0] is the embedding output
        torch.testing.assert_close(hidden[t][real], want[real], rtol=1e-5, atol=1e-5)
        assert torch.all(hidden[t][~real] == 0)

def test_regression_with_text_pairs_end_to_end(tmp_path, base_dir):
    """Float labels: one output, MSE losses, Pearson as the metric, through finetune, prune and eval."""
    import random

    from cofi_kernels.models.pruned_model import PrunedModel

    rng = random.Random(5)

    def rows(n):
        out = []
        for r in toy_rows(n, seed=rng.randint(0, 10**6), pair=True):
            score = {"sport": 0.5, "money": 2.25, "music": 4.0}[r["label"]] + rng.uniform(-0.2, 0.2)
            out.append({**r, "label": round(score, 3)})
        return out

    train, ev = dataset(rows(48)), dataset(rows(24))
    assert train.text_pairs is not None
    teacher = str(tmp_path / "teacher")
    ft.finetune(base_dir, train, ev, teacher, ft.FinetuneConfig(**FAST_FINETUNE), progress=False)
    task = model_io.read_task(teacher)
    assert task["task"] == "regression" and model_io.load_task_model(teacher).config.num_labels == 1
    out = str(tmp_path / "pruned")
    result = pl.cofi_prune(teacher, train, ev, out, pl.PruneConfig(**FAST_PRUNE), progress=False)
    assert result.metrics["metric"] == "pearson" and -1.0 <= result.metrics["pearson"] <= 1.0
    steps = [r for r in read_log(out) if r["event"] == "step"]
    assert all(r["distill_pred"] >= 0 for r in steps)
    model = PrunedModel.from_pretrained(out)
    assert model.config["num_labels"] == 1
    from cofi_kernels.tasks.classification import Encoded

    enc = Encoded(ev, task["spec"], model_io.load_tokenizer(out), FAST_PRUNE["max_length"])
    assert enc.token_type_ids[0].count(1) > 0  # the pair is its own segment
    m = evaluation.evaluate(model, enc, task["spec"])
    assert m["pearson"] == pytest.approx(result.metrics["pearson"], abs=1e-6)
