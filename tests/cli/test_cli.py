"""The `cofi` command: an unfinished run refuses to be resumed by another; a run killed with
SIGKILL resumes to the same result; `cofi eval` reports. (Bad input: tests/cli/test_bad_input.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cofi_kernels import cli
from cofi_kernels.pruning.cofi import loop as pl
from cofi_kernels.training import trainer as tr
from tests import REPO_ROOT
from tests.training_support import (
    FAST_FINETUNE,
    FAST_PRUNE,
    files_equal_tensors,
    tree_snapshot,
    tiny_bert_dir,
    toy_rows,
    write_csv,
    write_jsonl,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = REPO_ROOT


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(d / "train.jsonl", toy_rows(48, seed=1)),
        "eval": write_jsonl(d / "eval.jsonl", toy_rows(24, seed=2)),
        "train_csv": write_csv(d / "train.csv", toy_rows(48, seed=1)),
        "dir": d,
    }


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("base"))


def _finetune_args(model, files, out, *extra):
    f = FAST_FINETUNE
    return ["finetune", "--model", model, "--data", files["train"], "--eval-data", files["eval"], "--out", str(out),
            "--epochs", str(f["epochs"]), "--batch-size", str(f["batch_size"]), "--lr", str(f["lr"]),
            "--max-length", str(f["max_length"]), "--eval-every", str(f["eval_every"]),
            "--checkpoint-every", str(f["checkpoint_every"]), "--quiet", *extra]


def _prune_args(teacher, data, eval_data, out, *extra, target=None):
    p = FAST_PRUNE
    args = ["prune", "--teacher", teacher, "--data", data, "--out", str(out),
            "--target-sparsity", str(p["target_sparsity"] if target is None else target)]
    if eval_data is not None:
        args += ["--eval-data", eval_data]
    for key in ("distill_epochs", "prune_epochs", "sparsity_warmup_epochs", "finetune_epochs", "batch_size", "lr",
                "reg_lr", "finetune_lr", "max_length", "checkpoint_every", "eval_every", "epsilon"):
        args += ["--" + key.replace("_", "-"), str(p[key])]
    return args + ["--quiet", *extra]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, base_dir, files):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    assert cli.main(_finetune_args(base_dir, files, out)) == 0
    return str(out)


def _fails(capsys, argv, pattern, out=None):
    """Run `cofi argv`; it must exit 2 with one stderr line matching `pattern`, `out` unchanged."""
    import re

    before = tree_snapshot(out) if out is not None else None
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse
        status = e.code
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"cofi {argv[0]}: error: "), err
    assert re.search(pattern, err), err
    if out is not None:
        assert tree_snapshot(out) == before
    return err


# ---------------------------------------------------------------------- resuming another run
# (every other bad input is a case of tests/cli/test_bad_input.py)


def test_an_unfinished_run_refuses_other_settings_data_and_commands(tmp_path, capsys, teacher_dir, files,
                                                                     monkeypatch):
    run = tmp_path / "run"

    original = pl._CoFiRun.train_step

    def die_at_5(self, phase, step, *a, **kw):
        if step == 5:
            raise KeyboardInterrupt
        return original(self, phase, step, *a, **kw)

    monkeypatch.setattr(pl._CoFiRun, "train_step", die_at_5)
    status = cli.main(_prune_args(teacher_dir, files["train"], files["eval"], run))
    assert status == 130 and "continue with --resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert os.path.isfile(run / tr.CHECKPOINT_DIR / tr.CHECKPOINT_FILE)
    _fails(capsys, _prune_args(teacher_dir, files["train"], files["eval"], run, "--resume", target=0.3),
           r"another run.*config", run)
    _fails(capsys, _prune_args(teacher_dir, files["train_csv"], files["eval"], run, "--resume", "--seed", "1"),
           r"another run.*config", run)
    _fails(capsys, _finetune_args(teacher_dir, files, run, "--resume"), r"another run", run)
    _fails(capsys, _prune_args(teacher_dir, files["train"], files["eval"], run), r"unfinished run.*--resume", run)


# ---------------------------------------------------------------------- eval and the console script


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, teacher_dir, files):
    out = tmp_path_factory.mktemp("runs") / "pruned"
    assert cli.main(_prune_args(teacher_dir, files["train"], files["eval"], out)) == 0
    return str(out)


def test_eval_reports_metric_sparsity_parameters_speed(capsys, pruned_dir, teacher_dir, files):
    from cofi_kernels.models.pruned_model import PrunedModel

    assert cli.main(["eval", "--model", pruned_dir, "--data", files["eval"], "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    model = PrunedModel.from_pretrained(pruned_dir)
    assert r["kind"] == "pruned" and r["examples"] == 24
    assert r["sparsity"] == pytest.approx(model.sparsity) and r["sparsity"] > 0.2
    assert r["parameters"] == model.num_parameters()
    assert r["encoder_parameters"] == model.encoder_size
    assert r["examples_per_second"] > 0
    run = json.load(open(os.path.join(pruned_dir, tr.RUN_FILE)))
    # The target the run was asked for travels with the model and is reported beside the realised value.
    assert r["target_sparsity"] == run["target_sparsity"] == model.target_sparsity
    assert cli.main(["eval", "--model", pruned_dir, "--data", files["eval"]]) == 0
    assert (f"realised sparsity  {model.sparsity:.4f} (target {model.target_sparsity:.4f})"
            in capsys.readouterr().out)
    # Same data as the run's final evaluation -> the same accuracy.
    assert r["accuracy"] == pytest.approx(run["best"]["accuracy"])

    assert cli.main(["eval", "--model", teacher_dir, "--data", files["eval"]]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "realised sparsity  0.0000\n" in text and "examples / s" in text


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "cofi")
    assert os.path.isfile(exe), "pip install -e . should have created the `cofi` console script"
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for command in ("finetune", "prune", "eval", "demo"):
        assert command in res.stdout


def _cli_subprocess(argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cofi_kernels.cli", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path, teacher_dir, files):
    long = ["--prune-epochs", "12", "--checkpoint-every", "2"]  # the last occurrence of an option wins
    ref, run = tmp_path / "ref", tmp_path / "run"
    p = _cli_subprocess(_prune_args(teacher_dir, files["train"], files["eval"], ref, *long))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err

    p = _cli_subprocess(_prune_args(teacher_dir, files["train"], files["eval"], run, *long))
    ckpt = run / tr.CHECKPOINT_DIR / tr.CHECKPOINT_FILE
    deadline = time.time() + 300
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere past the first checkpoint
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / tr.RUN_FILE).exists()

    p = _cli_subprocess(_prune_args(teacher_dir, files["train"], files["eval"], run, *long, "--resume"))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    for name in ("model.safetensors", pl.GATES_FILE):
        assert files_equal_tensors(str(ref / name), str(run / name)), name
    a, b = (json.load(open(d / tr.RUN_FILE)) for d in (ref, run))
    assert a["selected"] == b["selected"] and a["best"] == b["best"]
