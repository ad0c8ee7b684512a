"""Static model pruning (SMP; Jiang et al., ACL 2023, "Pruning Pre-trained Language Models Without
Fine-Tuning") on the one trainer: :func:`smp_prune`.

The pre-trained encoder's weights stay frozen. One score matrix ``S`` per pruned linear weight
(:mod:`.scores`) is trained with AdamW through the straight-through estimator, and the forward pass
uses ``W' = M ⊙ W`` with ``M`` the top-v of ``S``. First the classification head alone trains for
``head_warmup_epochs`` (v = 1, the scores get no step): SMP reads label words through a
pre-trained head that separates the classes from step 0, while a fresh head's first-order signal
is about its random logits, not the classes. Then the remaining fraction follows
``v(t) = v_f + (1 − v_f)(1 − t/T_s)³`` over ``schedule_epochs`` and stays at ``v_f`` after; the
loss adds ``λ(t)·mean σ(S)`` with ``λ(t) = λ_max(1 − (1 − t/T)³)`` over the rest of the run (t
counted from the warm-up's end). The loss is cross-entropy (MSE for regression), or
``α_ce·CE + α_distil·KL(T)·T²`` against a fine-tuned teacher. Both learning rates decay linearly
to 0 at the end of the run (SMP trains with the Hugging Face trainer's default linear schedule),
the scores' from the warm-up's end. The scores start at ``|W| / mean |W|`` of each matrix
(``score_init``): started at 0 they all tie, and the first top-v keeps the lowest indices of
every matrix.

SMP reads its predictions from the frozen masked-LM head through label words. all-MiniLM-L6-v2
(and any encoder saved without one) has no masked-LM head, so a classification head
``out(tanh(dense(x)))`` is trained beside the scores instead (BERT: its pooler dense and classifier;
RoBERTa: its classifier's dense and out_proj). By default (``pooling="mean"``) ``x`` is the mean
of the last hidden state over the real tokens, what a sentence-transformers model was trained
for: with 90% of every matrix masked, the first token's state barely depends on the input (its
per-dimension spread across BBC News articles is 0.0015 against 0.048 for the mean), and a head
reading it stays at chance. ``pooling="cls"`` reads the first token through BERT's frozen
pre-trained pooler and trains ``model.classifier`` only (the earlier behaviour).

Every ``ranking_every`` steps the log gets a ``ranking`` record: the share of the kept set at
``v_f`` that the previous record's scores kept too, the scores' statistics, and the mean absolute
gradient on the scores from the regulariser and from the task loss.

Output: a :class:`~cofi_kernels.models.pruned_model.PrunedModel` (with the run's head and pooling)
in both cases, whose logits equal the masked model's.

- ``structured=True``: whole heads and FFN units are kept per layer, cut by the generic builder,
  plus ``shapes.png`` and ``smp_structure.safetensors`` (head and unit scores, kept masks).
  Hidden dims are not pruned.
- ``structured=False``: every head and unit kept, each masked weight ``M ⊙ W`` (zeros where
  pruned; the pre-trained values elsewhere), and the masks as packed bits
  (:data:`~cofi_kernels.training.model_io.MASKS_FILE`), which ``cofi eval`` counts for the
  realised sparsity. Unstructured zeros give no speed-up on dense hardware: the matrices keep
  their shapes. (Directories of earlier versions, a dense Hugging Face classifier beside the
  masks, still load: the masks are applied then.)

Both also hold the tokenizer, ``cofi_task.json``, ``log.jsonl`` and ``run.json``. States are
evaluated only once ``v`` has reached ``v_f``; the best of those is the output.
"""

from __future__ import annotations

import copy
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
    apply_weight_masks,
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
from .scores import (
    POOLINGS,
    SCORE_INITS,
    MaskedClassifier,
    kept_count,
    kept_overlap,
    regulariser_weight,
    remaining_fraction,
)

STRUCTURE_FILE = "smp_structure.safetensors"


@documented
@dataclass
class SMPConfig(RunSettings):
    """Settings of :func:`smp_prune` (``cofi prune --method smp``)."""

    remaining: float = setting(0.1, "final remaining fraction v_f in (0, 1): of each matrix's weights "
                                    "(--unstructured) or of each layer's heads and FFN units (--structured)",
                               cli_type=fraction, required=True)
    epochs: float = setting(4.0, "the whole run (passes over the training data): the head's warm-up, the fall "
                                 "of v, then v_f (1.5 epochs by default, for the head to fit the final masks)")
    schedule_epochs: float = setting(2.0, "v falls from 1 to v_f (cubic) over this part of the run, after the head's "
                                          "warm-up, then stays at v_f; only states at v_f are evaluated")
    head_warmup_epochs: float = setting(0.5, "the classification head alone trains this first part of the run "
                                             "(v = 1, scores frozen), so that the scores' first-order signal "
                                             "comes from a head that separates the classes")
    lr: float = setting(2e-2, "AdamW learning rate of the scores (no weight decay; decays linearly to 0)")
    head_lr: float = setting(2e-3, "AdamW learning rate of the linear classification head (no weight decay; "
                                   "decays linearly to 0)")
    lambda_max: float = setting(400.0, "final weight lambda_max of the regulariser lambda(t) * mean sigmoid(S)")
    temperature: float = setting(2.0, "temperature T of the distillation from --teacher")
    alpha_ce: float = setting(0.5, "weight of the task loss when distilling from --teacher")
    alpha_distil: float = setting(0.5, "weight of KL(T) * T^2 against --teacher")
    eval_every: int = setting(0, "evaluate every N steps once v has reached v_f (0: twice per epoch), and at "
                                 "the end; the best evaluation's scores and head are the output")
    score_init: str = setting("magnitude", "how the scores start: magnitude (|W| / mean |W| of each matrix: the "
                                           "first masks are magnitude pruning's) or zero (all tied: the first "
                                           "masks keep the lowest indices of every matrix)", choices=SCORE_INITS)
    pooling: str = setting("mean", "what the classification head reads: mean (the mean of the last hidden state "
                                   "over the real tokens, what a sentence-transformers model was trained for) or "
                                   "cls (the first token, through BERT's frozen pre-trained pooler)",
                           choices=POOLINGS)


def check_smp_config(cfg: SMPConfig) -> None:
    """Refuse bad settings (:class:`RunError` naming the setting): the shared checks, then SMP's ranges."""
    check_run_settings(cfg, "prune")
    v = cfg.remaining
    if not 0.0 < v < 1.0:
        raise RunError(f"prune: remaining must be in (0, 1) (e.g. 0.1 keeps 10%), got {v!r}")
    if not cfg.epochs > 0:
        raise RunError(f"prune: epochs must be > 0, got {cfg.epochs}")
    if not 0 <= cfg.head_warmup_epochs < cfg.epochs:
        raise RunError(f"prune: head_warmup_epochs must be in [0, epochs = {cfg.epochs}), got {cfg.head_warmup_epochs}")
    room = cfg.epochs - cfg.head_warmup_epochs
    if not 0 < cfg.schedule_epochs <= room + 1e-9:
        raise RunError(f"prune: schedule_epochs must be in (0, epochs - head_warmup_epochs = {room:g}], "
                       f"got {cfg.schedule_epochs}")
    for name in ("lr", "head_lr", "temperature"):
        if not getattr(cfg, name) > 0:
            raise RunError(f"prune: {name} must be > 0, got {getattr(cfg, name)}")
    for name in ("lambda_max", "alpha_ce", "alpha_distil"):
        if not getattr(cfg, name) >= 0:
            raise RunError(f"prune: {name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.score_init not in SCORE_INITS:
        raise RunError(f"prune: score_init must be one of {', '.join(SCORE_INITS)}, got {cfg.score_init!r}")
    if cfg.pooling not in POOLINGS:
        raise RunError(f"prune: pooling must be one of {', '.join(POOLINGS)}, got {cfg.pooling!r}")


class SMPPlan:
    """Step counts of a run and its schedules: ``total`` steps, the first ``warmup`` of which train the
    head alone (v = 1, the scores frozen), then the cubic fall of v over ``schedule_steps`` (T_s), v_f
    from step ``final_from`` on; the evaluation interval, and the interval of the ``ranking`` log
    records (ten per epoch)."""

    def __init__(self, cfg: SMPConfig, n: int):
        spe = steps_per_epoch(n, cfg.batch_size)
        self.total = max(1, math.ceil(cfg.epochs * spe))
        self.warmup = min(self.total - 1, math.ceil(cfg.head_warmup_epochs * spe))
        self.schedule_steps = min(self.total - self.warmup, max(1, math.ceil(cfg.schedule_epochs * spe)))
        self.final_from = self.warmup + self.schedule_steps
        self.eval_every = cfg.eval_every or max(1, spe // 2)
        self.ranking_every = max(1, spe // 10)

    def remaining(self, step: int, final: float) -> float:
        """v at ``step``: 1 during the head's warm-up, then :func:`remaining_fraction`."""
        return 1.0 if step < self.warmup else remaining_fraction(step - self.warmup, final, self.schedule_steps)

    def regulariser_weight(self, step: int, lambda_max: float) -> float:
        """λ at ``step``: 0 during the head's warm-up, then :func:`regulariser_weight` over the rest."""
        return 0.0 if step < self.warmup else regulariser_weight(step - self.warmup, lambda_max,
                                                                  self.total - self.warmup)

    def lr_factors(self, step: int) -> tuple[float, float]:
        """(scores, head) learning-rate factors at ``step``: each decays linearly to 0 at the end of the
        run, the head's over the whole run, the scores' from the end of the warm-up (0 before)."""
        scores = 0.0 if step < self.warmup else (self.total - step) / (self.total - self.warmup)
        return scores, (self.total - step) / self.total


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
    masked = MaskedClassifier(model, structured=structured, pooling=cfg.pooling, score_init=cfg.score_init)

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
        by_name = {t.name: m for t, m in zip(masked.targets, masks)}
        pruned = _zeroed(masked, by_name)

        def write():
            pruned.save_pretrained(run.out)
            write_task(run.out, labels, cfg.max_length, "masked")
            write_weight_masks(os.path.join(run.out, MASKS_FILE), by_name)
            tokenizer.save_pretrained(run.out)

        kept = sum(int(m.sum()) for m in masks)
        sparsity = 1.0 - kept / _dense_size(masked)
        summary.update(sparsity=sparsity, encoder_weights=kept,
                       kept_per_matrix={name: int(m.sum()) for name, m in by_name.items()})
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
    return build_pruned_model(masked.model, layers, pooling=masked.pooling)


def _zeroed(masked: MaskedClassifier, masks: dict[str, torch.Tensor]):
    """The :class:`PrunedModel` of an unstructured run (``masks``: parameter name → bool mask): every
    head and unit kept, each masked weight ``M ⊙ W`` (on a copy: the pre-trained tensors are not
    written), the run's head and pooling. Its logits equal the masked model's; its shapes are the
    dense ones (no speed-up)."""
    model = copy.deepcopy(masked.model)
    apply_weight_masks(model, masks)
    all_kept = KeptLayer(heads=torch.arange(masked.num_heads), units=torch.arange(masked.intermediate_size))
    return build_pruned_model(model, [all_kept] * masked.num_layers, pooling=masked.pooling)


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
        self.ranked: list[torch.Tensor] | None = None  # the last ranking record's masks at v_f
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
        v = plan.remaining(step, cfg.remaining)
        lam = plan.regulariser_weight(step, cfg.lambda_max)
        for g, factor in zip(self.opt.param_groups, plan.lr_factors(step)):
            g["lr"] = g["base_lr"] * factor
        masked.remaining = v
        masked.train()
        rec: dict = {"remaining": v, "lambda": lam}
        teacher = None if self.cache is None else self.cache.batch_logits(part.index, self.device)
        with autocast(self.device, cfg.bf16):
            loss, shares, reg = self.loss_fn(b, part, teacher, lam)
        loss.backward()
        warmup = step < plan.warmup
        if warmup:  # the head alone: no Adam state for the scores from a head that does not separate yet
            for s in masked.scores:
                s.grad = None
        ranking = not warmup and ((step + 1) % plan.ranking_every == 0 or step + 1 == plan.total)
        gradients = self._gradient_split(lam) if ranking else {}
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        rec.update(part.totals(shares), regulariser=reg.item())
        rec["loss"] += lam * rec["regulariser"]
        if ranking:
            self.run.log({**self._ranking(step + 1), **gradients})
        return rec

    def _gradient_split(self, lam: float) -> dict:
        """The mean absolute gradient on the scores from the regulariser (``λ·σ'(S)/(M·numel)``, known in
        closed form) and from the task loss (the rest of the gradient), and the regulariser's share."""
        with torch.no_grad():
            reg_sum = task_sum = 0.0
            n = 0
            for s in self.masked.scores:
                sig = torch.sigmoid(s.detach())
                reg = lam * sig * (1 - sig) / (len(self.masked.scores) * s.numel())
                grad = s.grad if s.grad is not None else torch.zeros_like(s)
                reg_sum += float(reg.abs().sum())
                task_sum += float((grad - reg).abs().sum())
                n += s.numel()
        reg_mean, task_mean = reg_sum / n, task_sum / n
        total = reg_mean + task_mean
        return {"task_gradient": task_mean, "regulariser_gradient": reg_mean,
                "regulariser_gradient_share": reg_mean / total if total else 0.0}

    def _ranking(self, step: int) -> dict:
        """A ``ranking`` log record after ``step`` steps: how stable the final kept set is (the share of
        the entries kept at v_f by the previous record's scores that these scores keep too) and the
        scores' statistics."""
        masked = self.masked
        masked.eval()  # a measurement, not a training forward's masks (the next step sets train mode again)
        final = masked.masks(self.cfg.remaining)
        overlap = None if self.ranked is None else kept_overlap(self.ranked, final)
        self.ranked = final
        with torch.no_grad():
            flat = torch.cat([s.detach().reshape(-1) for s in masked.scores]).float()
            kept = torch.cat([s.detach().reshape(-1)[m.reshape(-1)] for s, m in zip(masked.scores, final)]).float()
        return {"event": "ranking", "step": step, "overlap_with_previous": overlap,
                "score_mean": flat.mean().item(), "score_std": flat.std().item(), "score_min": flat.min().item(),
                "score_max": flat.max().item(), "kept_score_mean": kept.mean().item(),
                "share_at_zero": (flat == 0).float().mean().item()}

    def postfix(self, phase: str, rec: dict) -> dict:
        return {"loss": f"{rec['loss']:.4f}", "v": f"{rec['remaining']:.3f}", "λ": f"{rec['lambda']:.1f}"}

    def evaluate(self, phase: str, step: int) -> Evaluation:
        v = self.plan.remaining(step, self.cfg.remaining)
        if step < self.plan.final_from:  # before v reaches v_f a state cannot be the output
            return Evaluation({"remaining": v, "eligible": False, "skipped": True})
        self.masked.remaining = v
        m = evaluate(self.masked, self.eval_enc, self.labels, device=self.device, bf16=self.cfg.bf16)
        s = realised_sparsity(self.masked, v)
        return Evaluation({**m, "remaining": v, "realised_sparsity": s, "eligible": True},
                          {**m, "realised_sparsity": s})

    def snapshot(self, phase: str) -> dict:
        return {"scores": clone_state(self.masked.scores), "head": self.masked.head_state()}

    def end_phase(self, phase: str, best: dict | None, best_state: dict | None) -> bool:
        if best_state is None:
            return False
        self.masked.scores.load_state_dict(best_state["scores"])
        self.masked.load_head_state(best_state["head"])
        self.run.log({"event": "selected", **best})
        return True

    def state_dict(self) -> dict:
        return {"scores": self.masked.scores.state_dict(), "head": self.masked.head_state(),
                "optimizer": self.opt.state_dict(), "ranked": self.ranked}

    def load_state_dict(self, state: dict) -> None:
        self.masked.scores.load_state_dict(state["scores"])
        self.masked.load_head_state(state["head"])
        self.opt.load_state_dict(state["optimizer"])
        self.ranked = state["ranked"]
