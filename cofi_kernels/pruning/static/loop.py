"""Static model pruning (SMP; Jiang et al., ACL 2023, "Pruning Pre-trained Language Models Without
Fine-Tuning") on the one trainer: :func:`smp_prune`.

The pre-trained encoder's weights stay frozen. One score matrix ``S`` per pruned linear weight
(:mod:`.scores`) is trained with AdamW through the straight-through estimator, and the forward pass
uses ``W' = M ⊙ W`` with ``M`` the top-v of ``S``. The remaining fraction follows
``v(t) = v_f + (1 − v_f)(1 − t/T_s)³`` over the first ``schedule_epochs`` and stays at ``v_f``
after; the loss adds ``λ(t)·mean σ(S)`` with ``λ(t) = λ_max(1 − (1 − t/T)³)`` over the whole run.
The loss is cross-entropy (MSE for regression), or ``α_ce·CE + α_distil·KL(T)·T²`` against a
fine-tuned teacher. Both learning rates decay linearly to 0 over the run (SMP trains with the
Hugging Face trainer's default linear schedule).

SMP reads its predictions from the frozen masked-LM head through label words. all-MiniLM-L6-v2
(and any encoder saved without one) has no masked-LM head, so a linear classification head
(``model.classifier``; RoBERTa: its dense + out_proj) is trained beside the scores instead; BERT's
pre-trained pooler stays frozen.

Output:

- ``structured=True``: whole heads and FFN units are kept per layer; the result is a
  :class:`~cofi_kernels.models.pruned_model.PrunedModel` built by the generic builder, whose logits
  equal the masked model's, plus ``shapes.png`` and ``smp_structure.safetensors`` (head and unit
  scores, kept masks). Hidden dims are not pruned.
- ``structured=False``: per-matrix masks, saved as packed bits
  (:data:`~cofi_kernels.training.model_io.MASKS_FILE`) beside the dense classifier, whose
  weights are the unchanged pre-trained ones; ``cofi eval`` / ``cofi predict`` apply the masks
  when they load it. Unstructured zeros give no speed-up on dense hardware: the matrices keep
  their shapes.

Both also hold the tokenizer, ``cofi_task.json``, ``log.jsonl`` and ``run.json``. States are
evaluated only once ``v`` has reached ``v_f``; the best of those is the output.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from ...models.builder import KeptLayer, build_pruned_model
from ...models.plots import write_shapes_png
from ...models.size import dense_encoder_size, encoder_size
from ...training.config import RunSettings, check_run_settings, documented, fraction, setting
from ...data.text import LabelSpace, TextDataset, steps_per_epoch
from ...tasks.classification import Encoded, model_outputs, prediction_loss, task_loss
from ...training.distributed import BatchPart, local_device
from ...training.evaluation import autocast, evaluate
from ...training.model_io import (
    MASKS_FILE,
    TASK_FILE,
    check_max_length,
    hf_token_limit,
    load_task_model,
    load_tokenizer,
    model_limits,
    read_model_config,
    read_task,
    write_task,
    write_weight_masks,
)
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
from .scores import MaskedClassifier, kept_count, regulariser_weight, remaining_fraction

STRUCTURE_FILE = "smp_structure.safetensors"


@documented
@dataclass
class SMPConfig(RunSettings):
    """Settings of :func:`smp_prune` (``cofi prune --method smp``)."""

    remaining: float = setting(0.1, "final remaining fraction v_f in (0, 1): of each matrix's weights "
                                    "(--unstructured) or of each layer's heads and FFN units (--structured)",
                               cli_type=fraction, required=True)
    epochs: float = setting(3.0, "the whole run (passes over the training data)")
    schedule_epochs: float = setting(2.0, "v falls from 1 to v_f (cubic) over this part of the run, then stays "
                                          "at v_f; only states at v_f are evaluated")
    lr: float = setting(2e-2, "AdamW learning rate of the scores (no weight decay; decays linearly to 0)")
    head_lr: float = setting(2e-3, "AdamW learning rate of the linear classification head (no weight decay; "
                                   "decays linearly to 0)")
    lambda_max: float = setting(400.0, "final weight lambda_max of the regulariser lambda(t) * mean sigmoid(S)")
    temperature: float = setting(2.0, "temperature T of the distillation from --teacher")
    alpha_ce: float = setting(0.5, "weight of the task loss when distilling from --teacher")
    alpha_distil: float = setting(0.5, "weight of KL(T) * T^2 against --teacher")
    eval_every: int = setting(0, "evaluate every N steps once v has reached v_f (0: twice per epoch), and at "
                                 "the end; the best evaluation's scores and head are the output")


def check_smp_config(cfg: SMPConfig) -> None:
    """Refuse bad settings (:class:`RunError` naming the setting): the shared checks, then SMP's ranges."""
    check_run_settings(cfg, "prune")
    v = cfg.remaining
    if not 0.0 < v < 1.0:
        raise RunError(f"prune: remaining must be in (0, 1) (e.g. 0.1 keeps 10%), got {v!r}")
    if not cfg.epochs > 0:
        raise RunError(f"prune: epochs must be > 0, got {cfg.epochs}")
    if not 0 < cfg.schedule_epochs <= cfg.epochs:
        raise RunError(f"prune: schedule_epochs must be in (0, epochs = {cfg.epochs}], got {cfg.schedule_epochs}")
    for name in ("lr", "head_lr", "temperature"):
        if not getattr(cfg, name) > 0:
            raise RunError(f"prune: {name} must be > 0, got {getattr(cfg, name)}")
    for name in ("lambda_max", "alpha_ce", "alpha_distil"):
        if not getattr(cfg, name) >= 0:
            raise RunError(f"prune: {name} must be >= 0, got {getattr(cfg, name)}")


class SMPPlan:
    """Step counts of a run: ``total`` (T), ``schedule_steps`` (T_s <= T), evaluation interval."""

    def __init__(self, cfg: SMPConfig, n: int):
        spe = steps_per_epoch(n, cfg.batch_size)
        self.total = max(1, math.ceil(cfg.epochs * spe))
        self.schedule_steps = min(self.total, max(1, math.ceil(cfg.schedule_epochs * spe)))
        self.eval_every = cfg.eval_every or max(1, spe // 2)


def smp_prune(
    model_dir: str,
    train: TextDataset,
    eval_data: TextDataset,
    out: str,
    config: SMPConfig | None = None,
    *,
    structured: bool,
    teacher_dir: str | None = None,
    resume: bool | str = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> RunResult:
    """Prune the pre-trained BERT/RoBERTa encoder in ``model_dir`` by SMP to ``config.remaining``.

    Args:
        model_dir: a pre-trained (not fine-tuned) model directory; its weights are never changed.
        train, eval_data: training data, and the data the best state (at ``v_f``) is chosen on.
        out: the run directory (see the module docstring for what it holds at the end).
        config: :class:`SMPConfig`.
        structured: True prunes whole heads and FFN units into a compact ``PrunedModel``; False
            keeps per-matrix unstructured masks beside the dense model.
        teacher_dir: a fine-tuned model (``cofi finetune``) to distil from; its label space is used,
            and it must read the same tokens (same vocabulary) as ``model_dir``.
        resume: continue the unfinished run in ``out`` from its checkpoint (``"any-world-size"``:
            also one written by another number of processes).
        stop_at: stop after that many steps, with a checkpoint
            (:class:`~cofi_kernels.training.trainer.RunStopped`).
        progress: show a progress bar.

    Raises:
        DataError, RunError: as :func:`~cofi_kernels.training.finetune.finetune`; also a remaining
        fraction outside (0, 1) or a teacher with another vocabulary.
    """
    cfg = config or SMPConfig()
    check_smp_config(cfg)
    if not isinstance(structured, bool):
        raise RunError(f"prune: structured must be True or False, got {structured!r}")
    limit = hf_token_limit(read_model_config(model_dir))
    tokenizer = load_tokenizer(model_dir)
    if teacher_dir is not None:
        labels: LabelSpace = read_task(teacher_dir)["spec"]
        if labels.task not in ("classification", "regression"):
            raise RunError(f"--method smp does not run the {labels.task} task of --teacher {teacher_dir!r}: it trains a "
                           "sentence classifier's head beside the masks; use --method cofi")
        limit = min(limit, model_limits(teacher_dir)[1])
        if load_tokenizer(teacher_dir).get_vocab() != tokenizer.get_vocab():
            raise RunError(f"--teacher {teacher_dir!r} has another vocabulary than --model {model_dir!r}; "
                           "give a teacher fine-tuned from the same pre-trained model")
    else:
        labels = LabelSpace.from_labels(train.labels, source=train.source)
    check_max_length(cfg.max_length, limit, "prune")
    train_enc = Encoded(train, labels, tokenizer, cfg.max_length)
    eval_enc = Encoded(eval_data, labels, tokenizer, cfg.max_length)
    fingerprint = run_fingerprint(cfg, models={"model": model_dir, "teacher": teacher_dir},
                                  data={"train": train, "eval": eval_data}, structured=structured,
                                  labels=labels.to_json())
    run = RunDirectory(out, fingerprint, resume, "smp")
    device = local_device(cfg.device, run.world)
    teacher = None
    if teacher_dir is not None:
        teacher = load_task_model(teacher_dir).to(device).eval()
        teacher.requires_grad_(False)
        if teacher.config.num_labels != labels.num_labels:
            raise RunError(f"teacher {teacher_dir!r}: its head has {teacher.config.num_labels} output(s) but its "
                           f"{TASK_FILE} lists {labels.num_labels}")
    torch.manual_seed(cfg.seed)  # the new classification head
    model = load_task_model(model_dir, labels).to(device)
    masked = MaskedClassifier(model, structured=structured)

    plan = SMPPlan(cfg, len(train_enc))
    hooks = _SMPRun(cfg, plan, run, masked, teacher, labels, train_enc, eval_enc, device)
    trainer = Trainer(run, hooks, [Phase("prune", plan.total, plan.eval_every)], train_enc, seed=cfg.seed,
                      batch_size=cfg.batch_size, device=device, checkpoint_every=cfg.checkpoint_every,
                      description=f"smp prune ({'structured' if structured else 'unstructured'})")
    trainer.fit(progress, stop_at)

    best = trainer.best["prune"]
    masked.remaining = cfg.remaining
    summary = {"kind": "prune", "method": "smp", "structure": "structured" if structured else "unstructured",
               "remaining": cfg.remaining, "best": best, "steps": plan.total, "seconds": trainer.seconds,
               "config": fingerprint["config"]}
    masked.eval()
    model.requires_grad_(False)
    masked.cpu()
    if structured:
        pruned = _compact(masked)

        def write():
            pruned.save_pretrained(run.out)
            write_task(run.out, labels, cfg.max_length, "pruned")
            write_shapes_png(pruned, run.out)
            _save_structure(os.path.join(run.out, STRUCTURE_FILE), masked)
            tokenizer.save_pretrained(run.out)

        sparsity = pruned.sparsity
        summary.update(sparsity=sparsity, parameters=pruned.num_parameters(), encoder_weights=pruned.encoder_size,
                       layer_shapes=pruned.layer_shapes())
    else:
        masks = masked.masks(cfg.remaining)

        def write():
            model.save_pretrained(run.out)
            write_task(run.out, labels, cfg.max_length, "masked")
            write_weight_masks(os.path.join(run.out, MASKS_FILE), {t.name: m for t, m in zip(masked.targets, masks)})
            tokenizer.save_pretrained(run.out)

        kept = sum(int(m.sum()) for m in masks)
        sparsity = 1.0 - kept / _dense_size(masked)
        summary.update(sparsity=sparsity, encoder_weights=kept,
                       kept_per_matrix={t.name: int(m.sum()) for t, m in zip(masked.targets, masks)})
    run.write(write)
    run.finish(summary)
    return RunResult(run.out, best, plan.total, trainer.seconds, {"sparsity": sparsity})


def _dense_size(masked: MaskedClassifier) -> int:
    d = masked.model.config
    return dense_encoder_size(masked.num_layers, masked.num_heads, masked.head_dim, masked.intermediate_size,
                              d.hidden_size)


def realised_sparsity(masked: MaskedClassifier, v: float) -> float:
    """DESIGN §4's realised sparsity of the masked model at remaining fraction ``v``: kept heads and
    units (structured) or kept weight entries (unstructured) against the dense count."""
    dense = _dense_size(masked)
    if masked.structured:
        heads, units = masked.kept_units(v)
        kept = encoder_size(heads.sum(1).tolist(), units.sum(1).tolist(), masked.model.config.hidden_size,
                            masked.head_dim)
    else:
        kept = sum(kept_count(v, s.numel()) for s in masked.scores)
    return 1.0 - kept / dense


def _compact(masked: MaskedClassifier):
    """The :class:`PrunedModel` of a structured run at ``masked.remaining``: the kept heads and units of
    every layer, cut from the unchanged pre-trained weights (a layer with no head left keeps its
    attention output bias and LayerNorm, as the masked model does)."""
    heads, units = masked.kept_units()
    layers = [KeptLayer(heads=h.nonzero().flatten(), units=u.nonzero().flatten()) for h, u in zip(heads, units)]
    return build_pruned_model(masked.model, layers)


def _save_structure(path: str, masked: MaskedClassifier) -> None:
    from safetensors.torch import save_file

    head_scores, unit_scores = masked.unit_scores()
    heads, units = masked.kept_units()
    save_file({"head_scores": head_scores.contiguous(), "unit_scores": unit_scores.contiguous(),
               "heads_kept": heads.to(torch.uint8), "units_kept": units.to(torch.uint8)}, path)


class SMPLoss(nn.Module):
    """An SMP step's whole loss as one module, the one DDP wraps: the scores and the classification
    head (the encoder's weights are frozen). ``forward(batch, part, teacher_logits, lam)`` returns
    ``(loss to backpropagate, {name: this process's share}, regulariser)``: cross-entropy (and the
    distillation against ``teacher_logits``) as shares, ``lam · mean σ(S)`` whole."""

    def __init__(self, cfg: SMPConfig, masked: MaskedClassifier):
        super().__init__()
        self.cfg, self.masked = cfg, masked

    def forward(self, b: dict, part: BatchPart, teacher_logits, lam: float):
        cfg = self.cfg
        part.local_noise()
        logits = model_outputs(self.masked, b)
        task = part.share(task_loss(logits, b["labels"], "sum"))
        shares = {"task": task, "loss": task}
        if teacher_logits is not None:
            kd = part.share(prediction_loss(logits, teacher_logits, cfg.temperature, "sum"))
            shares.update(distill=kd, loss=cfg.alpha_ce * task + cfg.alpha_distil * kd)
        reg = self.masked.regulariser()
        return part.backward_loss(shares["loss"], lam * reg), {k: v.detach() for k, v in shares.items()}, reg


class _SMPRun(TrainerHooks):
    """SMP's hooks: one scored step, evaluations at v_f, the best scores and head."""

    def __init__(self, cfg: SMPConfig, plan: SMPPlan, run: RunDirectory, masked: MaskedClassifier, teacher,
                 labels: LabelSpace, train_enc: Encoded, eval_enc: Encoded, device):
        self.cfg, self.plan, self.run, self.masked, self.teacher = cfg, plan, run, masked, teacher
        self.labels, self.train_enc, self.eval_enc, self.device = labels, train_enc, eval_enc, device
        self.cache = None
        # Every score gets a gradient through the straight-through mask, and the head is always used.
        self.loss_fn = run.world.wrap(SMPLoss(cfg, masked), varying=False)
        self.opt = torch.optim.AdamW(
            [{"params": list(masked.scores), "lr": cfg.lr, "weight_decay": 0.0, "base_lr": cfg.lr},
             {"params": masked.head_parameters(), "lr": cfg.head_lr, "weight_decay": 0.0, "base_lr": cfg.head_lr}])

    def on_start(self, step: int, examples: list[int]) -> None:
        if self.teacher is not None:
            self.cache = TeacherCache(lambda b: (model_outputs(self.teacher, b), None), self.train_enc, examples, [],
                                      self.device, self.cfg.bf16)
            self.run.log({"event": "teacher_cache", "examples": len(examples)})

    def train_step(self, phase: str, step: int, b: dict, part: BatchPart) -> dict:
        cfg, plan, masked = self.cfg, self.plan, self.masked
        v = remaining_fraction(step, cfg.remaining, plan.schedule_steps)
        lam = regulariser_weight(step, cfg.lambda_max, plan.total)
        decay = (plan.total - step) / plan.total
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * decay
        masked.remaining = v
        masked.train()
        rec: dict = {"remaining": v, "lambda": lam}
        teacher = None if self.cache is None else self.cache.batch_logits(part.index, self.device)
        with autocast(self.device, cfg.bf16):
            loss, shares, reg = self.loss_fn(b, part, teacher, lam)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        rec.update(part.totals(shares), regulariser=reg.item())
        rec["loss"] += lam * rec["regulariser"]
        return rec

    def postfix(self, phase: str, rec: dict) -> dict:
        return {"loss": f"{rec['loss']:.4f}", "v": f"{rec['remaining']:.3f}", "λ": f"{rec['lambda']:.1f}"}

    def evaluate(self, phase: str, step: int) -> Evaluation:
        v = remaining_fraction(step, self.cfg.remaining, self.plan.schedule_steps)
        if step < self.plan.schedule_steps:  # before v reaches v_f a state cannot be the output
            return Evaluation({"remaining": v, "eligible": False, "skipped": True})
        self.masked.remaining = v
        m = evaluate(self.masked, self.eval_enc, self.labels, device=self.device, bf16=self.cfg.bf16)
        s = realised_sparsity(self.masked, v)
        return Evaluation({**m, "remaining": v, "realised_sparsity": s, "eligible": True},
                          {**m, "realised_sparsity": s})

    def snapshot(self, phase: str) -> dict:
        return {"scores": clone_state(self.masked.scores), "head": clone_state(self.masked.model.classifier)}

    def end_phase(self, phase: str, best: dict | None, best_state: dict | None) -> bool:
        if best_state is None:
            return False
        self.masked.scores.load_state_dict(best_state["scores"])
        self.masked.model.classifier.load_state_dict(best_state["head"])
        self.run.log({"event": "selected", **best})
        return True

    def state_dict(self) -> dict:
        return {"scores": self.masked.scores.state_dict(), "head": self.masked.model.classifier.state_dict(),
                "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.masked.scores.load_state_dict(state["scores"])
        self.masked.model.classifier.load_state_dict(state["head"])
        self.opt.load_state_dict(state["optimizer"])
