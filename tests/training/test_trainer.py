"""The one trainer, on a toy method: seeding, batches, evaluation schedule, best states, checkpoints, resume."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cofi_kernels.training import trainer as tr
from cofi_kernels.training.trainer import Evaluation, Phase, Trainer, TrainerHooks


class _Data:
    """Stands in for encoded data: 10 examples, a batch is their indices."""

    input_ids = [[0]] * 10  # one token each (the trainer counts a global batch's tokens)

    def __len__(self):
        return 10

    def batch(self, index, device):
        return {"x": torch.tensor(index, dtype=torch.float64, device=device)}


class _Killed(BaseException):
    pass


class _Toy(TrainerHooks):
    """One weight learning the mean of the batch plus seeded noise; evaluations score chosen values."""

    def __init__(self, scores=None, kill_at=None):
        self.w = torch.zeros((), dtype=torch.float64)
        self.calls = []
        self.scores = scores or {}
        self.kill_at = kill_at
        self.ended = []

    def train_step(self, phase, step, batch, part):
        index = part.index
        if step == self.kill_at:
            raise _Killed()
        noise = float(torch.randn(()))  # reseeded from (seed, step) by the trainer
        self.w += 0.1 * (batch["x"].mean() - self.w) + 0.01 * noise
        self.calls.append((phase, step, tuple(index), noise))
        return {"loss": float(self.w), "noise": noise}

    def evaluate(self, phase, step):
        score, eligible = self.scores.get(step, (0.0, True))
        m = {"metric": "score", "score": score}
        return Evaluation({**m, "w": float(self.w)}, m, eligible)

    def snapshot(self, phase):
        return {"w": self.w.clone()}

    def end_phase(self, phase, best, best_state):
        self.ended.append((phase, best, None if best_state is None else float(best_state["w"])))
        return best_state is not None

    def state_dict(self):
        return {"w": self.w.clone(), "ended": list(self.ended)}

    def load_state_dict(self, state):
        self.w, self.ended = state["w"].clone(), list(state["ended"])


PHASES = [Phase("warm", 5), Phase("main", 7, eval_every=3)]


def _run(out, hooks, resume=False):
    run = tr.RunDirectory(str(out), {"toy": 1}, resume, "toy")
    trainer = Trainer(run, hooks, PHASES, _Data(), seed=3, batch_size=4, device="cpu", checkpoint_every=4,
                      description="toy")
    trainer.fit(progress=False)
    return trainer


def _log(out):
    with open(os.path.join(out, tr.LOG_FILE)) as f:
        return [json.loads(line) for line in f]


def test_steps_batches_and_seeds(tmp_path):
    hooks = _Toy()
    trainer = _run(tmp_path / "a", hooks)
    assert trainer.total == 12 and trainer.step == 12
    assert [c[:2] for c in hooks.calls] == [("warm", s) for s in range(5)] + [("main", s) for s in range(5, 12)]
    for phase, step, index, noise in hooks.calls:
        assert list(index) == tr.batch_at(step, 10, 4, 3)
        tr.seed_step(3, step)
        assert noise == float(torch.randn(()))
    # Every example once per epoch (3 steps of 4, 4, 2 examples).
    assert sorted(i for c in hooks.calls[:3] for i in c[2]) == list(range(10))


def test_evaluation_schedule_and_best_choice(tmp_path):
    # The highest score (step 11) is not eligible: the best is step 8's.
    hooks = _Toy(scores={8: (0.5, True), 11: (0.9, False), 12: (0.4, True)})
    trainer = _run(tmp_path / "a", hooks)
    evals = [r for r in _log(tmp_path / "a") if r["event"] == "eval"]
    assert [(r["phase"], r["step"]) for r in evals] == [("main", 8), ("main", 11), ("main", 12)]
    assert trainer.best["main"] == {"metric": "score", "score": 0.5, "step": 8}
    w_at_8 = evals[0]["w"]
    assert hooks.ended == [("warm", None, None), ("main", {"metric": "score", "score": 0.5, "step": 8}, w_at_8)]


def test_checkpoints_written_at_start_interval_phase_change_and_end(tmp_path, monkeypatch):
    written = []
    original = tr.RunDirectory.save_checkpoint

    def spy(self, state):
        written.append(state["trainer"]["step"])
        original(self, state)

    monkeypatch.setattr(tr.RunDirectory, "save_checkpoint", spy)
    _run(tmp_path / "a", _Toy(scores={8: (0.5, True)}))
    # 0: start; 4, 8: every 4; 5: not (the warm phase's end changed nothing); 12: the main phase's end and the last step.
    assert written == [0, 4, 8, 12]


@pytest.mark.parametrize("kill_at", [2, 5, 9, 11])
def test_resume_repeats_the_uninterrupted_run(tmp_path, kill_at):
    scores = {8: (0.5, True), 11: (0.7, True), 12: (0.1, True)}
    ref = _Toy(scores)
    _run(tmp_path / "ref", ref)
    with pytest.raises(_Killed):
        _run(tmp_path / "run", _Toy(scores, kill_at=kill_at))
    resumed = _Toy(scores)
    trainer = _run(tmp_path / "run", resumed, resume=True)
    assert torch.equal(resumed.w, ref.w) and resumed.ended == ref.ended
    assert trainer.best == {"main": {"metric": "score", "score": 0.7, "step": 11}}

    def record(out):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in _log(out) if r["event"] in ("step", "eval")]

    assert record(tmp_path / "run") == record(tmp_path / "ref")
