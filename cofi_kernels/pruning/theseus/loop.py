"""BERT-of-Theseus (Xu et al., EMNLP 2020; DESIGN §8) on the one trainer.

:func:`theseus_prune` compresses a fine-tuned n-layer classifier (the
predecessor) into m layers (the successor) in two phases on one global step
counter:

1. **replace**: every step draws, for each of the m modules, one
   Bernoulli(p_t) for the whole batch from the step's seeded generator; 1 runs
   the module's successor layer, 0 its n/m predecessor layers. p_t follows the
   linear schedule ``min(1, k·t + b)`` or the constant one (``b`` for S steps,
   then 1) of :mod:`.schedule`; by default it reaches 1 at 60% of the phase.
   The learning rate decays linearly from ``lr`` to 0 over the phase.
2. **finetune**: the successor alone (p = 1) with its own AdamW, ``finetune_lr``
   with a 10% warm-up then linear decay; the best evaluation's weights are kept.

Only the successor layers train: embeddings, predecessor layers and the
classification head have ``requires_grad`` off and never change. The loss is
the task's cross-entropy (MSE for regression); ``distill`` adds
``alpha_pred · KL(p_pred ‖ p_succ; T)·T²`` against the predecessor's
predictions (computed once, in eval mode). Evaluation runs the successor only.

The output directory holds a :class:`~cofi_kernels.models.pruned_model.PrunedModel`
of m full layers (from the generic builder; realised sparsity counted against
the predecessor), the tokenizer, ``cofi_task.json``, ``log.jsonl``,
``run.json`` and ``shapes.png``. Runs resume exactly after a kill, as every
run of :mod:`cofi_kernels.training.trainer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...training.config import RunSettings, check_run_settings, documented, setting
from ...data.text import steps_per_epoch
from ...tasks.base import Dataset
from ...tasks import get_task
from ...training.distributed import BatchPart, local_device
from ...training.evaluation import autocast, evaluate
from ...training.model_io import (
    TASK_FILE,
    check_max_length,
    load_task_model,
    load_tokenizer,
    model_limits,
    read_model_config,
    read_task,
    saved_settings,
    write_task,
)
from ..registry import labelled_task
from ...training.optim import decay_groups, linear_schedule, set_lr
from ...training.trainer import (
    Evaluation,
    Phase,
    RunDirectory,
    RunError,
    RunResult,
    Trainer,
    TrainerHooks,
    clone_state,
    run_fingerprint,
)
from ...training.teacher import TeacherCache
from .model import TheseusModel, successor_pruned_model
from .schedule import SCHEDULES, ReplaceSchedule

__all__ = ["TheseusConfig", "check_dense_teacher", "check_theseus_config", "check_layers", "theseus_prune"]

WHERE = "theseus"


@documented
@dataclass
class TheseusConfig(RunSettings):
    """Settings of :func:`theseus_prune` (``cofi prune --method theseus``)."""

    layers: int = setting(0, "m, the successor's depth: the teacher's n layers are cut into m modules of n/m "
                             "consecutive layers (m must divide n)", required=True)
    replace_epochs: float = setting(3.0, "the replacing phase (modules drawn between successor and predecessor)")
    finetune_epochs: float = setting(2.0, "fine-tuning of the successor alone (p = 1) after the replacing phase")
    schedule: str = setting("linear", "replacing-rate schedule: linear (p_t = min(1, k*t + b)) or constant "
                                      "(p = b for S steps, then 1)", choices=SCHEDULES)
    replace_rate: float = setting(0.3, "b in [0, 1]: the probability that a module runs its successor at the "
                                       "first replacing step")
    slope: float = setting(0.0, "k >= 0 of the linear schedule, per optimizer step (0: p reaches 1 after "
                                "rate_full_at of the replacing steps)")
    constant_steps: int = setting(0, "S >= 0 of the constant schedule (0: rate_full_at of the replacing steps)")
    rate_full_at: float = setting(0.6, "in (0, 1]: where slope or constant_steps is 0, p reaches 1 after this "
                                       "fraction of the replacing phase's steps")
    lr: float = setting(5e-4, "AdamW learning rate of the successor in the replacing phase (linear decay to 0)")
    finetune_lr: float = setting(2e-4, "peak AdamW learning rate of the successor-only fine-tuning (linear warm-up "
                                       "over 10%, then linear decay)")
    weight_decay: float = setting(0.0, "AdamW weight decay of the successor (not biases, LayerNorms)")
    eval_every: int = setting(0, "evaluate the successor every N steps (0: twice per epoch) and at the end of each "
                                 "phase; the fine-tuning phase keeps its best evaluation's weights")
    distill: bool = setting(False, "add prediction distillation from the predecessor to the cross-entropy")
    alpha_pred: float = setting(1.0, "weight of the prediction distillation (with --distill)")
    temperature: float = setting(2.0, "temperature T of the prediction distillation (with --distill)")


def check_theseus_config(cfg: TheseusConfig) -> None:
    """Refuse bad settings (:class:`RunError` naming the setting): the shared checks, then Theseus' ranges.
    The depth is checked against the teacher by :func:`check_layers`."""
    check_run_settings(cfg, WHERE)
    if cfg.layers < 1:
        raise RunError(f"{WHERE}: layers (--layers) must be >= 1 (the successor's depth), got {cfg.layers}")
    if cfg.schedule not in SCHEDULES:
        raise RunError(f"{WHERE}: schedule (--schedule) must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if not 0.0 <= cfg.replace_rate <= 1.0:
        raise RunError(f"{WHERE}: replace_rate (--replace-rate) must be in [0, 1], got {cfg.replace_rate}")
    if cfg.slope < 0:
        raise RunError(f"{WHERE}: slope (--slope) must be >= 0, got {cfg.slope}")
    if cfg.constant_steps < 0:
        raise RunError(f"{WHERE}: constant_steps (--constant-steps) must be >= 0, got {cfg.constant_steps}")
    if cfg.schedule == "constant" and cfg.slope > 0:
        raise RunError(f"{WHERE}: slope (--slope) belongs to the linear schedule; the constant schedule takes "
                       "--constant-steps")
    if cfg.schedule == "linear" and cfg.constant_steps > 0:
        raise RunError(f"{WHERE}: constant_steps (--constant-steps) belongs to the constant schedule; the linear "
                       "schedule takes --slope")
    if not 0.0 < cfg.rate_full_at <= 1.0:
        raise RunError(f"{WHERE}: rate_full_at (--rate-full-at) must be in (0, 1], got {cfg.rate_full_at}")
    if not cfg.replace_epochs > 0:
        raise RunError(f"{WHERE}: replace_epochs must be > 0, got {cfg.replace_epochs}")
    if not cfg.finetune_epochs >= 0:
        raise RunError(f"{WHERE}: finetune_epochs must be >= 0, got {cfg.finetune_epochs}")
    for name in ("lr", "finetune_lr", "temperature"):
        if not getattr(cfg, name) > 0:
            raise RunError(f"{WHERE}: {name} must be > 0, got {getattr(cfg, name)}")
    for name in ("weight_decay", "alpha_pred"):
        if getattr(cfg, name) < 0:
            raise RunError(f"{WHERE}: {name} must be >= 0, got {getattr(cfg, name)}")


def check_dense_teacher(teacher_dir: str) -> None:
    """``teacher_dir`` holds a dense model: a pruned one (written by ``cofi prune``) has irregular layers
    and no Hugging Face ``config.json`` to cut into modules (:class:`RunError` saying so)."""
    from ...serving.predict import model_kind

    if model_kind(teacher_dir) == "pruned":
        raise RunError(f"{WHERE}: --teacher {teacher_dir!r} is a pruned model (written by `cofi prune`); Theseus "
                       "needs a fine-tuned dense teacher: give a directory written by `cofi finetune`")


def check_layers(layers: int, depth: int, teacher_dir: str) -> None:
    """``layers`` (m) divides the teacher's ``depth`` (n): :class:`RunError` listing the divisors otherwise."""
    divisors = ", ".join(str(d) for d in range(1, depth + 1) if depth % d == 0)
    if layers > depth:
        raise RunError(f"{WHERE}: --layers {layers} is more than the {depth} layers of the teacher {teacher_dir!r}; "
                       f"choose a divisor of {depth} ({divisors})")
    if depth % layers:
        raise RunError(f"{WHERE}: --layers {layers} does not divide the {depth} layers of the teacher "
                       f"{teacher_dir!r}; choose a divisor of {depth} ({divisors})")


class _Plan:
    """Step boundaries of the two phases (one global step counter) and the resolved schedule."""

    def __init__(self, cfg: TheseusConfig, n: int):
        spe = steps_per_epoch(n, cfg.batch_size)
        self.replace_steps = max(1, math.ceil(cfg.replace_epochs * spe))
        self.finetune_steps = math.ceil(cfg.finetune_epochs * spe)
        self.total = self.replace_steps + self.finetune_steps
        self.eval_every = cfg.eval_every or max(1, spe // 2)
        self.schedule = ReplaceSchedule.resolve(cfg.schedule, cfg.replace_rate, cfg.slope, cfg.constant_steps,
                                                cfg.rate_full_at, self.replace_steps)

    def phases(self) -> list[Phase]:
        phases = [Phase("replace", self.replace_steps, self.eval_every)]
        if self.finetune_steps:
            phases.append(Phase("finetune", self.finetune_steps, self.eval_every))
        return phases


def theseus_prune(
    teacher_dir: str,
    train: Dataset,
    eval_data: Dataset,
    out: str,
    config: TheseusConfig | None = None,
    *,
    resume: bool | str = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> RunResult:
    """Compress the fine-tuned model in ``teacher_dir`` to ``config.layers`` layers by module replacing.

    Args:
        teacher_dir: a directory written by :func:`~cofi_kernels.training.finetune.finetune`
            (a BERT/RoBERTa classifier with a ``cofi_task.json``): the predecessor.
        train, eval_data: training data, and the data the successor is evaluated on
            (the fine-tuning phase keeps its best state on it).
        out: the run directory; at the end it holds the successor as a
            :class:`~cofi_kernels.models.pruned_model.PrunedModel` (with the tokenizer
            and ``cofi_task.json``), ``log.jsonl``, ``run.json`` and ``shapes.png``.
        config: :class:`TheseusConfig` (``layers`` must be given).
        resume: continue the unfinished run in ``out`` from its checkpoint (``"any-world-size"``:
            also one written by another number of processes).
        stop_at: stop after that many steps, with a checkpoint
            (:class:`~cofi_kernels.training.trainer.RunStopped`).
        progress: show a progress bar (loss, replacing rate p).

    Returns:
        The :class:`RunResult`: ``metrics`` is the fine-tuning phase's best
        evaluation (without fine-tuning: the final successor's), ``extra`` holds
        the realised ``sparsity``.

    Raises:
        DataError: unusable data.
        RunError: bad settings (a ``layers`` that does not divide the teacher's
            depth among them), an unusable teacher directory (a pruned model among them), ``out`` not empty
            (without ``resume``), or a checkpoint of another run. Nothing is
            written before these checks pass.
    """
    cfg = config or TheseusConfig()
    check_theseus_config(cfg)
    check_dense_teacher(teacher_dir)
    handler, labels = labelled_task(read_task(teacher_dir), cfg, "theseus")
    depth = read_model_config(teacher_dir).num_hidden_layers
    check_layers(cfg.layers, depth, teacher_dir)
    check_max_length(cfg.max_length, model_limits(teacher_dir)[1], WHERE)
    tokenizer = load_tokenizer(teacher_dir)
    train_enc = handler.featurize(train, labels, tokenizer, cfg.max_length)
    eval_enc = handler.featurize(eval_data, labels, tokenizer, cfg.max_length)
    fingerprint = run_fingerprint(cfg, models={"teacher": teacher_dir}, data={"train": train, "eval": eval_data},
                                  method="theseus")
    run = RunDirectory(out, fingerprint, resume, "prune")
    device = local_device(cfg.device, run.world)
    model = _build_model(cfg, teacher_dir, labels, device)

    plan = _Plan(cfg, len(train_enc))
    hooks = _TheseusRun(cfg, plan, run, model, labels, train_enc, eval_enc, device)
    trainer = Trainer(run, hooks, plan.phases(), train_enc, seed=cfg.seed, batch_size=cfg.batch_size,
                      device=device, checkpoint_every=cfg.checkpoint_every, description="theseus")
    trainer.fit(progress, stop_at)

    best = trainer.best.get("finetune")
    metrics = best
    if metrics is None:  # no fine-tuning phase: the replacing phase's last state is the model
        metrics = evaluate(model, eval_enc, labels, device=device, bf16=cfg.bf16)
    pruned = successor_pruned_model(model)

    def write():
        pruned.save_pretrained(run.out)
        tokenizer.save_pretrained(run.out)
        write_task(run.out, labels, cfg.max_length, "pruned", **saved_settings(handler, teacher_dir, metrics))
        _write_shapes(pruned, run.out)

    run.write(write)
    summary = {
        "kind": "prune",
        "method": "theseus",
        "best": best,
        "metrics": metrics,
        "modules": [list(range(j * model.ratio, (j + 1) * model.ratio)) for j in range(model.num_modules)],
        "schedule": {**plan.schedule.to_json(), "full_at_step": plan.schedule.full_at_step(),
                     "replace_steps": plan.replace_steps},
        "sparsity": pruned.sparsity,
        "parameters": pruned.num_parameters(),
        "layer_shapes": pruned.layer_shapes(),
        "steps": plan.total,
        "seconds": trainer.seconds,
        "config": fingerprint["config"],
    }
    run.finish(summary)
    return RunResult(run.out, metrics, plan.total, trainer.seconds, {"sparsity": pruned.sparsity})


class TheseusLoss(nn.Module):
    """A Theseus step's whole loss as one module, the one DDP wraps: the predecessor (frozen) and
    its successor layers. ``forward(batch, part, use_successor, teacher_logits)`` returns
    ``(loss to backpropagate, {name: this process's share})``; ``teacher_logits`` (the
    predecessor's, with ``--distill``) come from outside."""

    def __init__(self, cfg: TheseusConfig, model: TheseusModel, task):
        super().__init__()
        self.cfg, self.model, self.task = cfg, model, task

    def forward(self, b: dict, part: BatchPart, use_successor, teacher_logits):
        cfg = self.cfg
        part.local_noise()
        logits = self.task.from_model_output(self.model(b["input_ids"], b["attention_mask"], b["token_type_ids"],
                                                        use_successor=use_successor))
        task = part.share(self.task.loss(logits, b, "sum"))
        shares = {"task": task, "loss": task}
        if teacher_logits is not None:
            kd = part.share(self.task.distill_loss(logits, teacher_logits, b, cfg.temperature, "sum"))
            shares.update(distill_pred=kd, loss=task + cfg.alpha_pred * kd)
        return part.backward_loss(shares["loss"]), {k: v.detach() for k, v in shares.items()}


def _write_shapes(pruned, out: str) -> None:
    from ...models.plots import write_shapes_png

    write_shapes_png(pruned, out)


def _build_model(cfg: TheseusConfig, teacher_dir: str, labels, device) -> TheseusModel:
    """The predecessor (frozen) with its successor layers (trainable) on ``device``."""
    net = load_task_model(teacher_dir)
    if net.config.num_labels != labels.num_outputs:
        raise RunError(f"teacher {teacher_dir!r}: its head has {net.config.num_labels} output(s) but its "
                       f"{TASK_FILE} lists {labels.num_outputs}")
    model = TheseusModel(net, cfg.layers).to(device)
    # Only the successor trains: embeddings, predecessor layers and the head stay as fine-tuned.
    model.requires_grad_(False)
    model.successor.requires_grad_(True)
    model.train()
    return model


class _TheseusRun(TrainerHooks):
    """Theseus' hooks of the trainer: replacing and fine-tuning steps, successor-only evaluation."""

    def __init__(self, cfg, plan: _Plan, run, model: TheseusModel, labels, train_enc, eval_enc, device):
        self.cfg, self.plan, self.run, self.model = cfg, plan, run, model
        self.labels, self.train_enc, self.eval_enc, self.device = labels, train_enc, eval_enc, device
        self.task = get_task(labels.task)
        self.teacher = None
        # The successor modules that run change from step to step.
        self.loss_fn_local = TheseusLoss(cfg, model, self.task)
        self.loss_fn = run.world.wrap(self.loss_fn_local, varying=True)
        # One optimizer per phase: the successor-only fine-tuning starts afresh, as the paper's separate run.
        self.opt_replace = torch.optim.AdamW(decay_groups(model.successor, cfg.weight_decay), lr=cfg.lr)
        self.opt_finetune = torch.optim.AdamW(decay_groups(model.successor, cfg.weight_decay), lr=cfg.finetune_lr)

    def on_start(self, step: int, examples: list[int]) -> None:
        """With ``distill``: the predecessor's logits for this process's training examples, once."""
        if not self.cfg.distill:
            return
        self.model.eval()
        self.teacher = TeacherCache(self._predecessor_logits, self.train_enc, examples, [], self.device,
                                    self.cfg.bf16, per_token=self.task.per_token)
        self.model.train()

    def _predecessor_logits(self, b: dict):
        # Called by TeacherCache, under no_grad and autocast.
        out = self.model(b["input_ids"], b["attention_mask"], b["token_type_ids"], predecessor=True)
        return self.task.from_model_output(out), None

    # -- checkpoint: only the successor and the optimizers change -------------

    def state_dict(self) -> dict:
        return {"successor": self.model.successor.state_dict(), "opt_replace": self.opt_replace.state_dict(),
                "opt_finetune": self.opt_finetune.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.successor.load_state_dict(state["successor"])
        self.opt_replace.load_state_dict(state["opt_replace"])
        self.opt_finetune.load_state_dict(state["opt_finetune"])

    # -- steps ---------------------------------------------------------------

    def rate(self, step: int) -> float:
        """p of global step ``step`` (1 in the fine-tuning phase)."""
        return self.plan.schedule.rate(step) if step < self.plan.replace_steps else 1.0

    def train_step(self, phase: str, step: int, b: dict, part: BatchPart) -> dict:
        cfg, plan = self.cfg, self.plan
        rec: dict = {}
        if phase == "replace":
            opt = self.opt_replace
            set_lr(opt, cfg.lr * linear_schedule(step, plan.replace_steps, 0))
            p = self.rate(step)
            # One draw per module for the whole global batch, from the generator the trainer seeded for
            # this step: the same on every process.
            use = torch.bernoulli(torch.full((self.model.num_modules,), p)).bool()
            rec.update(replace_rate=p, successor=[int(x) for x in use.tolist()])
        else:
            opt = self.opt_finetune
            k = step - plan.replace_steps
            set_lr(opt, cfg.finetune_lr * linear_schedule(k, plan.finetune_steps, int(0.1 * plan.finetune_steps)))
            use = None
            rec["replace_rate"] = 1.0
        self.model.train()
        trains = use is None or bool(use.any())
        # With every module on its (frozen) predecessor nothing trains: the step runs outside DDP, which
        # would wait for gradients that never come.
        loss_fn = self.loss_fn if trains else self.loss_fn_local
        teacher = None if self.teacher is None else self.teacher.batch_logits(part.index, self.device,
                                                                                b["input_ids"].shape[1])
        with autocast(self.device, cfg.bf16):
            loss, shares = loss_fn(b, part, use, teacher)
        if trains:
            loss.backward()
        # else AdamW skips parameters without a gradient, so the step changes nothing.
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec.update(part.totals(shares))
        rec["lr"] = opt.param_groups[0]["lr"]
        return rec

    def postfix(self, phase: str, rec: dict) -> dict:
        return {"loss": f"{rec['loss']:.4f}", "p": f"{rec['replace_rate']:.3f}"}

    # -- evaluation and best state -------------------------------------------

    def evaluate(self, phase: str, step: int) -> Evaluation:
        m = evaluate(self.model, self.eval_enc, self.labels, device=self.device, bf16=self.cfg.bf16)
        self.model.train()
        # The replacing phase's evaluations are a record; the model kept is the fine-tuning phase's best.
        return Evaluation({**m, "replace_rate": self.rate(step - 1)}, m, eligible=phase == "finetune")

    def snapshot(self, phase: str) -> dict:
        return clone_state(self.model.successor)

    def end_phase(self, phase: str, best: dict | None, best_state: dict | None) -> bool:
        if phase == "finetune" and best_state is not None:
            self.model.successor.load_state_dict(best_state)
            return True
        return False
