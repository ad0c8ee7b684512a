"""Issue 23: a run's output directory is locked for the run's life, and a failed write (a full disk)
is one line that leaves the directory ready for the same command, fresh or with --resume.

The lock is taken on the directory itself (``flock``), so it dies with the process that holds it;
the toy trainer below drives it in seconds, the CLI tests check the line and what is left in ``--out``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from cofi_kernels import cli
from cofi_kernels.training import trainer as tr
from cofi_kernels.training.trainer import Phase, Trainer, TrainerHooks
from tests.training_support import (
    FAST_FINETUNE,
    FAST_PRUNE,
    Killed,
    read_log,
    strip_times,
    toy_rows,
    tree_snapshot,
    write_jsonl,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IN_USE = r"output directory '.*out' is in use by another cofi run"
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
FINGERPRINT = {"toy": 1}


def by_process(pid: int) -> str:
    """The part of the in-use message that names the holder (Linux tells it through /proc/locks)."""
    return rf" \(process {pid}\)" if os.path.exists("/proc/locks") else ""


# ---------------------------------------------------------------------- a toy run (seconds)


class _Data:
    """10 examples; a batch is their indices."""

    input_ids = [[0]] * 10

    def __len__(self):
        return 10

    def batch(self, index, device):
        return {"x": torch.tensor(index, dtype=torch.float64)}


class _Toy(TrainerHooks):
    """One weight following the batch mean; ``at_step[step]()`` runs before that step (another run, a hang)."""

    def __init__(self, at_step=None):
        self.w = torch.zeros((), dtype=torch.float64)
        self.at_step = at_step or {}

    def train_step(self, phase, step, batch, part):
        if step in self.at_step:
            self.at_step[step]()
        self.w += 0.1 * (batch["x"].mean() - self.w)
        return {"loss": float(self.w)}

    def state_dict(self):
        return {"w": self.w.clone()}

    def load_state_dict(self, state):
        self.w = state["w"].clone()


def _fit(run: tr.RunDirectory, hooks: _Toy) -> _Toy:
    Trainer(run, hooks, [Phase("p", 12)], _Data(), seed=3, batch_size=4, device="cpu", checkpoint_every=4,
            description="toy").fit(progress=False)
    return hooks


def toy_run(out, hooks: _Toy | None = None, resume: bool = False) -> _Toy:
    """A whole toy run into ``out``: its directory, 12 steps, ``run.json``."""
    run = tr.RunDirectory(str(out), FINGERPRINT, resume, "toy")
    hooks = _fit(run, hooks or _Toy())
    run.finish({})
    return hooks


def assert_same_run(out, ref_out, hooks: _Toy, ref: _Toy) -> None:
    """``out`` holds what an uninterrupted run wrote to ``ref_out``: nothing of another run in it."""
    assert torch.equal(hooks.w, ref.w)
    assert strip_times(read_log(str(out))) == strip_times(read_log(str(ref_out)))
    assert sorted(os.listdir(out)) == [tr.LOG_FILE, tr.RUN_FILE]


# ---------------------------------------------------------------------- the lock


def test_a_second_run_into_the_out_of_a_running_one_is_refused(tmp_path):
    out, refused = tmp_path / "out", []

    def second_run(resume):
        before = tree_snapshot(out)
        with pytest.raises(tr.RunError, match=IN_USE + by_process(os.getpid())) as e:
            toy_run(out, resume=resume)
        assert tree_snapshot(out) == before  # refused without writing
        refused.append(str(e.value))

    # Step 6: a checkpoint of step 4 is there, which --resume used to continue beside the running run.
    hooks = toy_run(out, _Toy({6: lambda: second_run(True), 7: lambda: second_run(False)}))
    assert len(refused) == 2
    assert_same_run(out, tmp_path / "ref", hooks, toy_run(tmp_path / "ref"))


def test_the_lock_of_a_killed_run_does_not_block_resume(tmp_path):
    out = tmp_path / "out"
    child_code = textwrap.dedent("""
        import sys, time
        from tests.training.test_out_lock import _Toy, toy_run

        def hang():
            print("running", flush=True)
            time.sleep(600)

        toy_run(sys.argv[1], _Toy({6: hang}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", child_code, str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "running"
        before = tree_snapshot(out)
        with pytest.raises(tr.RunError, match=IN_USE + by_process(child.pid)):
            toy_run(out, resume=True)
        assert tree_snapshot(out) == before
    finally:
        child.kill()  # SIGKILL: no cleanup runs in the child
        child.wait()
    hooks = toy_run(out, resume=True)  # from the checkpoint of step 4
    assert_same_run(out, tmp_path / "ref", hooks, toy_run(tmp_path / "ref"))


def test_two_runs_started_together_one_wins_the_other_is_refused(tmp_path):
    out = tmp_path / "out"  # not there yet: both runs pass the check for a new or empty directory
    first = tr.RunDirectory(str(out), FINGERPRINT, False, "toy")
    second = tr.RunDirectory(str(out), FINGERPRINT, False, "toy")
    refused = []

    def second_starts():
        before = tree_snapshot(out)
        with pytest.raises(tr.RunError, match=IN_USE) as e:
            _fit(second, _Toy())
        assert "\n" not in str(e.value) and tree_snapshot(out) == before
        refused.append(e.value)

    hooks = _fit(first, _Toy({1: second_starts}))
    first.finish({})
    assert len(refused) == 1
    with pytest.raises(tr.RunError, match="holds a finished run"):  # not "in use": finish released the lock
        tr.RunDirectory(str(out), FINGERPRINT, True, "toy")
    assert_same_run(out, tmp_path / "ref", hooks, toy_run(tmp_path / "ref"))


def test_a_file_system_that_cannot_lock_gets_a_warning_and_an_unlocked_run(tmp_path, monkeypatch):
    def no_locks(fd, operation):  # NFS: flock emulated with locks a directory cannot take
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(tr.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match=r"'.*out' cannot be locked on its file system \(No locks available\)"):
        hooks = toy_run(tmp_path / "out")
    monkeypatch.undo()
    assert_same_run(tmp_path / "out", tmp_path / "ref", hooks, toy_run(tmp_path / "ref"))


def test_disk_full_when_a_resume_cuts_the_log_back_keeps_the_log_and_the_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def killed():
        raise Killed()

    with pytest.raises(Killed):
        toy_run(out, _Toy({6: killed}))  # the checkpoint of step 4 and 6 steps in the log
    before = tree_snapshot(out)
    with monkeypatch.context() as m:
        m.setattr(tr, "open", _FailingOpen(lambda p: os.path.basename(p) in (tr.LOG_FILE, tr.LOG_FILE + ".tmp"), 1),
                  raising=False)
        with pytest.raises(tr.RunError, match=rf"cannot be written \({NO_SPACE}\) while writing log\.jsonl.*; "
                                              r"its last checkpoint is kept: free some space and continue with --resume"):
            toy_run(out, resume=True)
    assert tree_snapshot(out) == before  # the log as it was, not cut short, and no temporary file
    hooks = toy_run(out, resume=True)
    assert_same_run(out, tmp_path / "ref", hooks, toy_run(tmp_path / "ref"))


# ---------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return SimpleNamespace(train=write_jsonl(d / "train.jsonl", toy_rows(48, seed=1)),
                           eval=write_jsonl(d / "eval.jsonl", toy_rows(24, seed=2)))


def finetune_argv(files, model, out, *extra):
    f = FAST_FINETUNE
    return ["finetune", "--model", model, "--data", files.train, "--eval-data", files.eval, "--out", str(out),
            "--epochs", str(f["epochs"]), "--batch-size", str(f["batch_size"]), "--max-length", str(f["max_length"]),
            "--checkpoint-every", str(f["checkpoint_every"]), "--quiet", *extra]


def prune_argv(files, teacher, out, *extra):
    argv = ["prune", "--teacher", teacher, "--data", files.train, "--eval-data", files.eval, "--out", str(out)]
    for key in ("target_sparsity", "distill_epochs", "prune_epochs", "sparsity_warmup_epochs", "finetune_epochs",
                "batch_size", "max_length", "checkpoint_every"):
        argv += ["--" + key.replace("_", "-"), str(FAST_PRUNE[key])]
    return argv + ["--quiet", *extra]


def cofi(argv, capsys) -> tuple[int, list[str]]:
    """``(exit status, stderr lines)`` of ``cofi argv`` run in-process."""
    status = cli.main(argv)
    return status, capsys.readouterr().err.strip().splitlines()


def assert_one_run_in(out) -> None:
    """``out`` holds one finished run: ``run.json``, no checkpoint, every step logged once."""
    names = os.listdir(out)
    assert tr.RUN_FILE in names and tr.CHECKPOINT_DIR not in names, names
    assert not [n for n in names if n.endswith(".tmp")], names
    steps = [r["step"] for r in read_log(str(out)) if r["event"] == "step"]
    assert steps == list(range(1, json.load(open(os.path.join(out, tr.RUN_FILE)))["steps"] + 1))


def test_two_commands_started_together_one_wins_with_nothing_half_written(tmp_path, monkeypatch, capsys, files,
                                                                          base_dir):
    out = tmp_path / "out"
    argv = finetune_argv(files, base_dir, out)
    real_start, started, second = tr.RunDirectory.start, [], []

    def start(self):
        # The first command to start writing lets the second one, past the same checks, run first and end.
        started.append(self.out)
        if len(started) == 1:
            second.append(cli.main(argv))
        real_start(self)

    monkeypatch.setattr(tr.RunDirectory, "start", start)
    status, err = cofi(argv, capsys)
    assert second == [0] and len(started) == 2
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("cofi finetune: error: output directory ") and "exists and is not empty" in err[0], err
    assert_one_run_in(out)


# ---------------------------------------------------------------------- a full disk


def fail_torch_save(monkeypatch, at: int, error: BaseException) -> None:
    """``torch.save`` writes part of its file and raises ``error`` at its ``at``-th call (1: the checkpoint
    of step 0), as it does when the disk fills up."""
    real, calls = torch.save, []

    def save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == at:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise error
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)


DISK_FULL = [
    RuntimeError(f"[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: "
                 f"file write failed ({NO_SPACE})"),
    OSError(errno.ENOSPC, NO_SPACE),
]


@pytest.mark.parametrize("error", DISK_FULL, ids=["torch-runtime-error", "os-error"])
@pytest.mark.parametrize("out_exists", [False, True], ids=["new-out", "empty-out"])
def test_disk_full_at_the_first_checkpoint_leaves_nothing_and_the_same_command_runs(
        tmp_path, monkeypatch, capsys, files, base_dir, error, out_exists):
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    before = tree_snapshot(out)
    argv = finetune_argv(files, base_dir, out)
    with monkeypatch.context() as m:
        fail_torch_save(m, 1, error)
        status, err = cofi(argv, capsys)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"cofi finetune: error: output directory '{out}' cannot be written ({NO_SPACE}) "
                             f"while writing checkpoint/state.pt; "), err
    assert "run the same command again" in err[0], err
    assert tree_snapshot(out) == before  # nothing of the run, not even the directory it created
    assert cofi(argv, capsys)[0] == 0
    assert_one_run_in(out)


def test_disk_full_at_a_later_checkpoint_keeps_the_last_one_and_resume_finishes(tmp_path, monkeypatch, capsys, files,
                                                                               base_dir):
    out = tmp_path / "out"
    argv = finetune_argv(files, base_dir, out)
    with monkeypatch.context() as m:
        fail_torch_save(m, 3, DISK_FULL[0])  # the checkpoint of step 6; the one of step 3 is complete
        status, err = cofi(argv, capsys)
    assert status == 2 and len(err) == 1, err
    assert re.search(rf"output directory '.*out' cannot be written \({NO_SPACE}\) while writing checkpoint/state\.pt; "
                     r"its last checkpoint is kept: free some space and continue with --resume", err[0]), err
    assert sorted(os.listdir(out / tr.CHECKPOINT_DIR)) == [tr.CHECKPOINT_FILE]  # no state.pt.tmp
    assert tr.load_checkpoint(str(out / tr.CHECKPOINT_DIR / tr.CHECKPOINT_FILE))["trainer"]["step"] == 3
    status, err = cofi(argv, capsys)
    assert status == 2 and "holds an unfinished run; continue it with --resume" in err[0], err
    assert cofi(argv + ["--resume"], capsys)[0] == 0
    assert_one_run_in(out)


class _FailingOpen:
    """``open`` of trainer.py, failing like a full disk on the ``at``-th opening of a file ``which`` accepts
    for writing, after writing part of it."""

    def __init__(self, which, at: int):
        self.which, self.at, self.seen = which, at, 0

    def __call__(self, path, mode="r", *a, **kw):
        if any(c in mode for c in "wa") and self.which(str(path)):
            self.seen += 1
            if self.seen == self.at:
                with open(path, mode, *a, **kw) as f:
                    f.write("{\"event\": \"st" if "b" not in mode else b"\x00")
                raise OSError(errno.ENOSPC, NO_SPACE, str(path))
        return open(path, mode, *a, **kw)


def fail_model_write(monkeypatch) -> None:
    """safetensors writes half of ``model.safetensors`` and fails as it does on a full disk."""
    import safetensors
    from transformers import modeling_utils

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a model")
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          f'message: "{NO_SPACE}" }})')

    monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)


# What fails, and at which of its openings: the log at the record of step 9 (cut short; the checkpoint of
# step 6 is kept), the model after the last step, run.json after the model.
FAILING_FILE = {"log": (tr.LOG_FILE, 12), "run.json": (tr.RUN_FILE + ".tmp", 1)}


@pytest.mark.parametrize("what", ["log", "model", "run.json"])
def test_disk_full_writing_the_log_the_model_or_run_json_and_resume_finishes(tmp_path, monkeypatch, capsys, files,
                                                                            base_dir, what):
    out = tmp_path / "out"
    argv = finetune_argv(files, base_dir, out)
    with monkeypatch.context() as m:
        if what == "model":
            fail_model_write(m)
        else:
            name, at = FAILING_FILE[what]
            m.setattr(tr, "open", _FailingOpen(lambda p: os.path.basename(p) == name, at), raising=False)
        status, err = cofi(argv, capsys)
    assert status == 2 and len(err) == 1, err
    assert f"cannot be written ({NO_SPACE}) while writing " in err[0] and "continue with --resume" in err[0], err
    left = sorted(tree_snapshot(out))
    assert os.path.join(tr.CHECKPOINT_DIR, tr.CHECKPOINT_FILE) in left and tr.LOG_FILE in left, left
    assert not [n for n in left if n.endswith(".tmp") or n.startswith(tr.RUN_FILE)], left
    if what != "run.json":  # no model file, whole or half: the run ends before or while writing them
        assert left == [os.path.join(tr.CHECKPOINT_DIR, tr.CHECKPOINT_FILE), tr.LOG_FILE], left
    assert cofi(argv + ["--resume"], capsys)[0] == 0
    assert_one_run_in(out)


def test_disk_full_during_prune_keeps_the_last_checkpoint_and_resume_finishes(tmp_path, monkeypatch, capsys, files,
                                                                             teacher_dir):
    out = tmp_path / "out"
    argv = prune_argv(files, teacher_dir, out)
    with monkeypatch.context() as m:
        fail_torch_save(m, 4, DISK_FULL[1])
        status, err = cofi(argv, capsys)
    assert status == 2 and len(err) == 1, err
    assert re.search(rf"^cofi prune: error: output directory '.*out' cannot be written \({NO_SPACE}\) while writing "
                     r"checkpoint/state\.pt; its last checkpoint is kept", err[0]), err
    assert sorted(os.listdir(out / tr.CHECKPOINT_DIR)) == [tr.CHECKPOINT_FILE]
    assert cofi(argv + ["--resume"], capsys)[0] == 0
    assert_one_run_in(out)
