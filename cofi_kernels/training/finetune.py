"""Fine-tuning a classifier (the teacher of a pruning run): :func:`finetune`."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from .data import Encoded, LabelSpace, TextDataset, steps_per_epoch
from .distill import task_loss
from .evaluation import autocast, evaluate, model_outputs
from .model_io import load_classifier, load_tokenizer, write_task
from .optim import decay_groups, freeze_embeddings, linear_schedule, set_lr
from .trainer import (
    RunDirectory,
    RunError,
    RunResult,
    batch_at,
    better,
    check_common,
    clone_state,
    data_digest,
    model_digest,
    progress_bar,
    seed_step,
)


@dataclass
class FinetuneConfig:
    """Settings of :func:`finetune` (the teacher).

    Attributes:
        epochs: passes over the training data (fractions allowed).
        batch_size: examples per step.
        lr: peak AdamW learning rate (linear warm-up, then linear decay to 0).
        warmup_fraction: share of the steps spent warming up.
        weight_decay: AdamW weight decay (not on biases and LayerNorms).
        max_length: tokens per example (longer texts are truncated).
        eval_every: evaluate every this many steps (0: once per epoch); the best
            evaluation's weights are kept.
        checkpoint_every: write a checkpoint every this many steps.
        freeze_embeddings: do not train the embedding tables.
        seed: seeds the data order, dropout and the classifier initialisation.
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``.
        bf16: bf16 autocast (GPU only).
    """

    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 5e-5
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 128
    eval_every: int = 0
    checkpoint_every: int = 50
    freeze_embeddings: bool = False
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False


def _check_finetune_config(cfg: FinetuneConfig) -> None:
    check_common(cfg, "finetune")
    if not cfg.epochs > 0:
        raise RunError(f"finetune: epochs must be > 0, got {cfg.epochs}")
    if not cfg.lr > 0:
        raise RunError(f"finetune: lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.warmup_fraction < 1:
        raise RunError(f"finetune: warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")


def finetune(
    model_dir: str,
    train: TextDataset,
    eval_data: TextDataset,
    out: str,
    config: FinetuneConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    task: str | None = None,
) -> RunResult:
    """Fine-tune the BERT/RoBERTa model in ``model_dir`` on ``train``; keep the best on ``eval_data``.

    Writes a Hugging Face model directory to ``out`` (``config.json``,
    ``model.safetensors``, the tokenizer, ``cofi_task.json``) plus
    ``log.jsonl`` and ``run.json``. ``task`` forces ``"classification"`` or
    ``"regression"`` (default: inferred from the labels).

    Raises:
        DataError: unusable data (missing columns, labels of the evaluation
            data that the training data does not have, ...).
        RunError: bad settings, unusable model directory, ``out`` not empty
            (without ``resume``), or a checkpoint of another run.
    """
    cfg = config or FinetuneConfig()
    _check_finetune_config(cfg)
    labels = LabelSpace.from_labels(train.labels, task)
    tokenizer = load_tokenizer(model_dir)
    train_enc = Encoded(train, labels, tokenizer, cfg.max_length)
    eval_enc = Encoded(eval_data, labels, tokenizer, cfg.max_length)
    fingerprint = {
        "config": dataclasses.asdict(cfg),
        "model": model_digest(model_dir),
        "train": data_digest(train),
        "eval": data_digest(eval_data),
        "labels": labels.to_json(),
    }
    run = RunDirectory(out, fingerprint, resume, "finetune")
    torch.manual_seed(cfg.seed)  # the new classification head's initialisation
    model = load_classifier(model_dir, labels)
    device = torch.device(cfg.device)
    model.to(device)
    if cfg.freeze_embeddings:
        freeze_embeddings(model)
    opt = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr)
    n = len(train_enc)
    spe = steps_per_epoch(n, cfg.batch_size)
    total = max(1, math.ceil(cfg.epochs * spe))
    warmup = int(cfg.warmup_fraction * total)
    eval_every = cfg.eval_every or spe
    step, best, best_state = 0, None, None
    run.start()
    if run.resumed is not None:
        st = run.resumed
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step, best = st["step"], st["best"]
        best_state = st["best_state"]
    t_start = time.perf_counter() - (run.resumed or {}).get("seconds", 0.0)

    def checkpoint():
        run.save_checkpoint({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                             "best": best, "best_state": best_state, "seconds": time.perf_counter() - t_start})

    if run.resumed is None:
        checkpoint()  # a run killed before its first interval still resumes
    bar = progress_bar(total, step, "finetune", progress)
    model.train()
    while step < total:
        seed_step(cfg.seed, step)
        b = train_enc.batch(batch_at(step, n, cfg.batch_size, cfg.seed), device)
        set_lr(opt, cfg.lr * linear_schedule(step, total, warmup))
        with autocast(device, cfg.bf16):
            loss = task_loss(model_outputs(model, b), b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        run.log({"event": "step", "phase": "finetune", "step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"]})
        if step % eval_every == 0 or step == total:
            m = evaluate(model, eval_enc, labels, device=device, bf16=cfg.bf16)
            model.train()
            run.log({"event": "eval", "phase": "finetune", "step": step, **m})
            if bar is not None:
                bar.write(f"step {step}: eval {m['metric']} {m[m['metric']]:.4f}")
            if better(m, best):
                best, best_state = {**m, "step": step}, clone_state(model)
        if step % cfg.checkpoint_every == 0 or step == total:
            checkpoint()
    if bar is not None:
        bar.close()
    model.load_state_dict(best_state)
    model.save_pretrained(run.out)
    tokenizer.save_pretrained(run.out)
    write_task(run.out, labels, cfg.max_length, "finetuned")
    seconds = time.perf_counter() - t_start
    summary = {"kind": "finetune", "best": best, "steps": total, "seconds": seconds, "config": dataclasses.asdict(cfg)}
    run.finish(summary)
    return RunResult(run.out, best, total, seconds)
