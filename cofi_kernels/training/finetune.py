"""Fine-tuning a classifier (the teacher of a pruning run): :func:`finetune`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import RunSettings, check_run_settings, documented, setting
from ..data.text import steps_per_epoch
from ..tasks import task_of_data
from ..tasks.base import Dataset, Features
from .distributed import BatchPart, World, local_device
from .evaluation import autocast, evaluate
from .model_io import (check_max_length, hf_token_limit, load_task_model, load_tokenizer, read_model_config,
                       saved_settings, write_task)
from .optim import decay_groups, freeze_embeddings, linear_schedule, set_lr
from .trainer import (
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


@documented
@dataclass
class FinetuneConfig(RunSettings):
    """Settings of :func:`finetune` (the teacher)."""

    epochs: float = setting(3.0, "passes over the training data (fractions allowed)")
    lr: float = setting(5e-5, "peak AdamW learning rate (linear warm-up, then linear decay to 0)")
    warmup_fraction: float = setting(0.1, "share of the steps spent warming up the learning rate")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases and LayerNorms)")
    eval_every: int = setting(0, "evaluate every N steps (0: once per epoch); the best evaluation's weights are kept")
    freeze_embeddings: bool = setting(False, "do not train the embedding tables")


def _check_finetune_config(cfg: FinetuneConfig) -> None:
    check_run_settings(cfg, "finetune")
    if not cfg.epochs > 0:
        raise RunError(f"finetune: epochs must be > 0, got {cfg.epochs}")
    if not cfg.lr > 0:
        raise RunError(f"finetune: lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.warmup_fraction < 1:
        raise RunError(f"finetune: warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")


def finetune(
    model_dir: str,
    train: Dataset,
    eval_data: Dataset,
    out: str,
    config: FinetuneConfig | None = None,
    *,
    resume: bool | str = False,
    progress: bool = True,
    task: str | None = None,
    stop_at: int | None = None,
) -> RunResult:
    """Fine-tune the BERT/RoBERTa model in ``model_dir`` on ``train``; keep the best on ``eval_data``.

    Writes a Hugging Face model directory to ``out`` (``config.json``,
    ``model.safetensors``, the tokenizer, ``cofi_task.json``) plus
    ``log.jsonl`` and ``run.json``. The task is the data's (:mod:`cofi_kernels.tasks`: text and label
    data is classification, or regression when the labels are numbers; token / tag data is token
    classification; question / context data is question answering); ``task`` forces one by name.
    Embeddings have no fine-tuning (their teacher is the pre-trained model): refused. ``resume`` continues the
    unfinished run in ``out`` (``"any-world-size"``: also one written by another number
    of processes); ``stop_at`` stops after that many steps, with a checkpoint
    (:class:`~cofi_kernels.training.trainer.RunStopped`). Under torchrun every process
    calls this with the same arguments (:mod:`~cofi_kernels.training.distributed`).

    Raises:
        DataError: unusable data (missing columns, labels of the evaluation
            data that the training data does not have, ...).
        RunError: bad settings (``max_length`` beyond the model's position
            embeddings among them), unusable model directory, ``out`` not
            empty or not creatable (without ``resume``), or a checkpoint of
            another run.
    """
    cfg = config or FinetuneConfig()
    _check_finetune_config(cfg)
    check_max_length(cfg.max_length, hf_token_limit(read_model_config(model_dir)), "finetune")
    handler, forced = task_of_data(train, task)
    if handler.teacher_targets:
        raise RunError(f"finetune: the {handler.name} task has no labels to fine-tune on; prune the pre-trained "
                       "model directly (`cofi prune --task embedding --teacher DIR`)")
    labels = handler.with_settings(handler.spec(train, forced), cfg)
    tokenizer = load_tokenizer(model_dir)
    train_enc = handler.featurize(train, labels, tokenizer, cfg.max_length)
    eval_enc = handler.featurize(eval_data, labels, tokenizer, cfg.max_length)
    fingerprint = run_fingerprint(cfg, models={"model": model_dir}, data={"train": train, "eval": eval_data},
                                  labels=labels.to_json())
    run = RunDirectory(out, fingerprint, resume, "finetune")
    device = local_device(cfg.device, run.world)
    torch.manual_seed(cfg.seed)  # the new classification head's initialisation
    model = load_task_model(model_dir, labels).to(device)
    if cfg.freeze_embeddings:
        freeze_embeddings(model)
    spe = steps_per_epoch(len(train_enc), cfg.batch_size)
    total = max(1, math.ceil(cfg.epochs * spe))
    hooks = FinetuneHooks(model, cfg, eval_enc, labels, total, device, run.world)
    trainer = Trainer(run, hooks, [Phase("finetune", total, cfg.eval_every or spe)], train_enc, seed=cfg.seed,
                      batch_size=cfg.batch_size, device=device, checkpoint_every=cfg.checkpoint_every,
                      description="finetune")
    trainer.fit(progress, stop_at)
    best = trainer.best["finetune"]

    def write():
        model.save_pretrained(run.out)
        tokenizer.save_pretrained(run.out)
        write_task(run.out, labels, cfg.max_length, "finetuned", **saved_settings(handler, model_dir, best))

    run.write(write)
    summary = {"kind": "finetune", "best": best, "steps": total, "seconds": trainer.seconds,
               "config": fingerprint["config"]}
    run.finish(summary)
    return RunResult(run.out, best, total, trainer.seconds)


class TaskLoss(nn.Module):
    """The task loss as one module (what DDP wraps): ``forward(batch, part)`` returns
    ``(loss to backpropagate, this process's share of the global batch's loss)``."""

    def __init__(self, model: nn.Module, task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: dict, part: BatchPart):
        part.local_noise()
        share = part.share(self.task.loss(self.task.outputs(self.model, batch), batch, "sum"))
        return part.backward_loss(share), share.detach()


class FinetuneHooks(TrainerHooks):
    """Task loss, AdamW with linear warm-up and decay; the best evaluation's weights are kept.

    ``cfg`` needs the fields ``lr``, ``warmup_fraction``, ``weight_decay`` and ``bf16``
    (:class:`FinetuneConfig`'s; the scratch method's config has them too). ``device``: where
    ``model`` is; ``world``: the processes (DDP-wrapped loss when several).
    """

    def __init__(self, model, cfg: FinetuneConfig, eval_enc: Features, labels, total: int, device,
                 world: World):
        from ..tasks import get_task

        self.model, self.cfg, self.eval_enc, self.labels, self.total = model, cfg, eval_enc, labels, total
        self.task = get_task(labels.task)
        self.device = device
        self.warmup = int(cfg.warmup_fraction * total)
        self.opt = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr)
        # Every trainable weight of a classifier gets a gradient at every step (measured in
        # tests/training/test_distributed.py).
        self.loss_fn = world.wrap(TaskLoss(model, self.task), varying=False)
        model.train()

    def train_step(self, phase, step, batch, part):
        cfg = self.cfg
        set_lr(self.opt, cfg.lr * linear_schedule(step, self.total, self.warmup))
        with autocast(self.device, cfg.bf16):
            loss, share = self.loss_fn(batch, part)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {**part.totals({"loss": share}), "lr": self.opt.param_groups[0]["lr"]}

    def evaluate(self, phase, step):
        m = evaluate(self.model, self.eval_enc, self.labels, device=self.device, bf16=self.cfg.bf16)
        self.model.train()
        return Evaluation(m, m)

    def snapshot(self, phase):
        return clone_state(self.model)

    def end_phase(self, phase, best, best_state):
        self.model.load_state_dict(best_state)
        return True

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
