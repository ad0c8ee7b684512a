"""The CoFi loop (DESIGN §4): learn the gates, prune, fine-tune the compact model.

:func:`cofi_prune` runs four phases on one global step counter:

1. **distill**: the student (a copy of the teacher, or a given model) learns
   from the teacher with every gate 1;
2. **prune**: gates sampled every step; loss = α_pred·KL·T² + α_layer·L_layer
   + the Lagrangian λ1(ŝ−t) + λ2(ŝ−t)²; the target t grows linearly from 0;
   the model and log α minimise, λ1, λ2 maximise; evaluation every N steps
   keeps the best state whose expected sparsity is within ε of the target;
3. :func:`~cofi_kernels.pruning.cofi.fold.prune` of that state, then
4. **finetune** of the compact model, distillation still on.

Runs are resumable and deterministic as described in :mod:`cofi_kernels.training.trainer`.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from ...models.plots import write_shapes_png
from ...models.pruned_model import PrunedModel
from ...training.config import RunSettings, check_run_settings, documented, fraction, setting
from ...data.text import steps_per_epoch
from ...tasks.base import Dataset, Features
from ...training.distill import LayerDistiller
from ...training.distributed import BatchPart, local_device
from ...training.evaluation import autocast, evaluate, teacher_outputs_of
from ...training.model_io import (
    TASK_FILE,
    check_max_length,
    hf_token_limit,
    load_task_model,
    load_tokenizer,
    read_model_config,
    saved_settings,
    teacher_task,
    write_task,
)
from ...training.optim import decay_groups, freeze_embeddings, linear_schedule, set_lr
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
from .fold import prune
from .gates import TYPES
from .patch import apply_cofi
from .trajectory import write_lagrangian_png

GATES_FILE = "gates.safetensors"


@documented
@dataclass
class PruneConfig(RunSettings):
    """Settings of :func:`cofi_prune` (``cofi prune --method cofi``)."""

    target_sparsity: float = setting(0.9, "final target t in (0, 1) of the expected sparsity, e.g. 0.9",
                                     cli_type=fraction, required=True)
    distill_epochs: float = setting(0.5, "distillation with every gate 1 before any gate is sampled")
    prune_epochs: float = setting(5.0, "the gate-learning phase")
    sparsity_warmup_epochs: float = setting(2.0, "the target grows linearly from 0 to t over this part of the "
                                                 "prune phase")
    finetune_epochs: float = setting(2.0, "fine-tuning of the compact model after pruning")
    lr: float = setting(1e-4, "AdamW learning rate of the model while pruning (distill and prune phases)")
    reg_lr: float = setting(0.1, "AdamW learning rate of log alpha (no weight decay)")
    lambda_lr: float = setting(10.0, "step size of the gradient ascent on lambda_1, lambda_2: each prune step adds "
                                     "lambda_lr times their gradient, (s - t) and (s - t)^2")
    finetune_lr: float = setting(2e-4, "peak learning rate of the compact model's fine-tuning (linear warm-up "
                                       "over 10%, then linear decay)")
    weight_decay: float = setting(0.0, "AdamW weight decay of the model (not biases, LayerNorms)")
    temperature: float = setting(2.0, "temperature T of the prediction distillation")
    alpha_pred: float = setting(1.0, "weight of the prediction distillation")
    alpha_layer: float = setting(1.0, "weight of the layer distillation (0: none)")
    teacher_layers: list[int] | None = setting(None, "teacher layers matched by the layer distillation "
                                                     "(default: every third of a 12-layer model, scaled)")
    epsilon: float = setting(0.02, "the best state is chosen among evaluations with |expected sparsity - t| "
                                   "<= epsilon; also how far below t hold_target lets it fall")
    hold_target: bool = setting(True, "after each prune step, when the expected sparsity has left [t - epsilon, t] "
                                      "(t: the step's target), shift every log alpha by one common amount to bring it "
                                      "back to the band's edge: never sparser than asked, never more than epsilon "
                                      "behind", flag="--no-hold-target",
                                flag_help="leave the expected sparsity to the Lagrangian alone (held in [t - epsilon, t] "
                                          "by default)")
    eval_every: int = setting(0, "evaluate every N steps (0: twice per epoch) in the prune and finetune phases, "
                                 "and at the end of each; in the prune phase only states within epsilon of the "
                                 "target are evaluated")
    freeze_embeddings: bool = setting(True, "do not train the embedding tables (as CoFi)", flag="--train-embeddings",
                                      flag_help="also train the embedding tables (frozen by default, as CoFi)")
    learn: tuple[str, ...] = setting(TYPES, "gate types to learn", choices=TYPES)
    droprate_init: float = setting(0.01, "initial drop probability of the FFN-unit gates (the other types start "
                                         "at log alpha 10), so the expected sparsity starts near 0")
    teacher_cache_mb: int = setting(4096, "keep the frozen teacher's logits and matched hidden states for the "
                                          "training set in memory when they fit in this many MiB (0: run the "
                                          "teacher every step)")


def check_prune_config(cfg: PruneConfig) -> None:
    """Refuse bad settings (:class:`RunError` naming the setting): the shared checks, then CoFi's ranges."""
    check_run_settings(cfg, "prune")
    t = cfg.target_sparsity
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.0 < t < 1.0:
        raise RunError(f"prune: target sparsity must be in (0, 1) (e.g. 0.9 for 90%), got {t!r}")
    for name in ("distill_epochs", "sparsity_warmup_epochs", "finetune_epochs"):
        if not getattr(cfg, name) >= 0:
            raise RunError(f"prune: {name} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.prune_epochs > 0:
        raise RunError(f"prune: prune_epochs must be > 0, got {cfg.prune_epochs}")
    if cfg.sparsity_warmup_epochs > cfg.prune_epochs:
        raise RunError(
            f"prune: sparsity_warmup_epochs ({cfg.sparsity_warmup_epochs}) must not exceed prune_epochs "
            f"({cfg.prune_epochs})"
        )
    for name in ("lr", "reg_lr", "lambda_lr", "finetune_lr", "temperature"):
        if not getattr(cfg, name) > 0:
            raise RunError(f"prune: {name} must be > 0, got {getattr(cfg, name)}")
    if cfg.alpha_pred < 0 or cfg.alpha_layer < 0:
        raise RunError("prune: alpha_pred and alpha_layer must be >= 0")
    if not 0 < cfg.epsilon < 1:
        raise RunError(f"prune: epsilon must be in (0, 1), got {cfg.epsilon}")


class _PrunePlan:
    """Step boundaries of the phases (one global step counter) and the target schedule."""

    def __init__(self, cfg: PruneConfig, n: int):
        spe = steps_per_epoch(n, cfg.batch_size)
        self.spe = spe
        self.distill_end = math.ceil(cfg.distill_epochs * spe)
        self.prune_steps = max(1, math.ceil(cfg.prune_epochs * spe))
        self.warmup = math.ceil(cfg.sparsity_warmup_epochs * spe)
        self.prune_end = self.distill_end + self.prune_steps
        self.total = self.prune_end + math.ceil(cfg.finetune_epochs * spe)
        self.eval_every = cfg.eval_every or max(1, spe // 2)

    def phases(self) -> list[Phase]:
        return [Phase("distill", self.distill_end), Phase("prune", self.prune_steps, self.eval_every),
                Phase("finetune", self.total - self.prune_end, self.eval_every)]

    def target(self, step: int, final: float) -> float:
        """The target sparsity of the step that starts after ``step`` steps.

        At prune step j (0-based) the target is ``t·(j+1)/W``: the first
        prune step already asks for ``t/W`` and the last warm-up step reaches
        ``t``. "Grows linearly from 0" (DESIGN §4) would be ``t·j/W``, one step
        later; this schedule is kept because the demo's recorded figures were
        measured with it (the difference is one step of W).
        """
        k = step - self.distill_end + 1
        return final if self.warmup == 0 else final * min(1.0, k / self.warmup)


def cofi_prune(
    teacher_dir: str,
    train: Dataset,
    eval_data: Dataset,
    out: str,
    config: PruneConfig | None = None,
    *,
    student_dir: str | None = None,
    distill: bool = True,
    resume: bool | str = False,
    progress: bool = True,
    stop_at: int | None = None,
    task: str | None = None,
) -> RunResult:
    """CoFi-prune the fine-tuned model in ``teacher_dir`` to ``config.target_sparsity``.

    Args:
        teacher_dir: a directory written by :func:`finetune` (or any BERT/RoBERTa
            model with a ``cofi_task.json``); for ``task="embedding"`` the pre-trained
            embedding model itself (a sentence-transformers folder or a bare encoder).
        train, eval_data: training data, and the data the best state is chosen on.
        out: the run directory; at the end it holds the pruned model
            (:class:`~cofi_kernels.models.pruned_model.PrunedModel` files, tokenizer,
            ``cofi_task.json``), ``shapes.png`` (:func:`~cofi_kernels.models.plots.write_shapes_png`),
            the learned gates (``gates.safetensors``), ``lagrangian.png``
            (:func:`~cofi_kernels.pruning.cofi.trajectory.write_lagrangian_png`),
            ``log.jsonl`` and ``run.json``.
        config: :class:`PruneConfig`.
        student_dir: start the student from this pre-trained model instead of a
            copy of the teacher (same hidden size).
        distill: False trains the student with plain cross-entropy (MSE for
            regression) and no teacher.
        resume: continue the unfinished run in ``out`` from its checkpoint (``"any-world-size"``:
            also one written by another number of processes).
        stop_at: stop after that many steps, with a checkpoint
            (:class:`~cofi_kernels.training.trainer.RunStopped`).
        progress: show a progress bar (loss, expected sparsity ŝ, target, λ).
        task: the task by name (:mod:`cofi_kernels.tasks`); default: the teacher's ``cofi_task.json``.
            The losses, metrics and the compact model's head are the task's.

    Raises:
        DataError, RunError: as :func:`finetune`; also a target sparsity outside (0, 1).
    """
    cfg = config or PruneConfig()
    check_prune_config(cfg)
    saved = teacher_task(teacher_dir, task, "prune")
    handler, labels = saved["handler"], saved["handler"].with_settings(saved["spec"], cfg)
    if handler.teacher_targets and not distill:
        raise RunError(f"prune: the {handler.name} task learns from the teacher's outputs; it cannot run without "
                       "distillation (drop --no-distill)")
    limit = saved["token_limit"]
    if student_dir is not None:
        limit = min(limit, hf_token_limit(read_model_config(student_dir)))
    check_max_length(cfg.max_length, limit, "prune")
    tokenizer = load_tokenizer(teacher_dir)
    train_enc = handler.featurize(train, labels, tokenizer, cfg.max_length)
    eval_enc = handler.featurize(eval_data, labels, tokenizer, cfg.max_length)
    # Classification runs keep the fingerprint they had before tasks were named in it (their checkpoints resume).
    extra = {} if handler.name in ("classification", "regression") else {"task": handler.name}
    fingerprint = run_fingerprint(cfg, models={"teacher": teacher_dir, "student": student_dir},
                                  data={"train": train, "eval": eval_data}, distill=bool(distill), **extra)
    run = RunDirectory(out, fingerprint, resume, "prune")
    device = local_device(cfg.device, run.world)
    teacher, student, gates, distiller = _build_models(cfg, teacher_dir, student_dir, distill, handler, labels,
                                                       device)
    if handler.teacher_targets:
        eval_enc.set_targets(teacher_outputs_of(teacher, handler, labels, eval_enc, device, cfg.bf16))

    plan = _PrunePlan(cfg, len(train_enc))
    method = _CoFiRun(cfg, plan, run, student, teacher, gates, distiller, labels, train_enc, eval_enc, device)
    trainer = Trainer(run, method, plan.phases(), train_enc, seed=cfg.seed, batch_size=cfg.batch_size,
                      device=device, checkpoint_every=cfg.checkpoint_every, description="cofi prune")
    trainer.fit(progress, stop_at)

    pruned = method.pruned
    pruned.requires_grad_(False)
    pruned.config["target_sparsity"] = cfg.target_sparsity

    best = trainer.best.get("finetune")

    def write():
        pruned.save_pretrained(run.out)
        write_shapes_png(pruned, run.out)
        write_lagrangian_png(run.records(), run.out, cfg.target_sparsity, cfg.epsilon,
                             plan.distill_end + plan.warmup)
        tokenizer.save_pretrained(run.out)
        write_task(run.out, labels, cfg.max_length, "pruned", **saved_settings(handler, teacher_dir, best))
        handler.write_extras(run.out, labels, cfg.max_length)
        _save_gates(os.path.join(run.out, GATES_FILE), method.selected_gates)

    run.write(write)
    summary = {
        "kind": "prune",
        "selected": method.selected,
        "best": best,
        "target_sparsity": cfg.target_sparsity,
        "sparsity": pruned.sparsity,
        "parameters": pruned.num_parameters(),
        "layer_shapes": pruned.layer_shapes(),
        "steps": plan.total,
        "seconds": trainer.seconds,
        "config": fingerprint["config"],
    }
    run.finish(summary)
    return RunResult(run.out, best, plan.total, trainer.seconds,
                     {"sparsity": pruned.sparsity, "target_sparsity": cfg.target_sparsity})


def _build_models(cfg: PruneConfig, teacher_dir, student_dir, distill: bool, handler, labels, device):
    """``(teacher or None, gated student, its gates, LayerDistiller or None)`` on ``device``."""
    teacher = load_task_model(teacher_dir, task=handler).to(device).eval() if distill else None
    if teacher is not None:
        handler.prepare_model(teacher, labels)
        teacher.requires_grad_(False)
        if not handler.teacher_targets and teacher.config.num_labels != labels.num_outputs:
            raise RunError(
                f"teacher {teacher_dir!r}: its head has {teacher.config.num_labels} output(s) but its "
                f"{TASK_FILE} lists {labels.num_outputs}"
            )
    torch.manual_seed(cfg.seed)  # a new classification head, when the student brings none
    if student_dir is not None:
        student = load_task_model(student_dir, labels)
    elif teacher is not None:
        student = copy.deepcopy(teacher)
    else:
        student = load_task_model(teacher_dir, task=handler)
        handler.prepare_model(student, labels)
    student.to(device).requires_grad_(True)
    if cfg.freeze_embeddings:
        freeze_embeddings(student)
    if teacher is not None and student.config.hidden_size != teacher.config.hidden_size:
        raise RunError(
            f"the student's hidden size {student.config.hidden_size} differs from the teacher's "
            f"{teacher.config.hidden_size}; give a student of the same width"
        )
    gates = apply_cofi(student, learn=cfg.learn, droprate_init=cfg.droprate_init)
    distiller = None
    if teacher is not None and cfg.alpha_layer > 0:
        distiller = LayerDistiller(
            teacher.config.hidden_size, teacher.config.num_hidden_layers, cfg.teacher_layers
        ).to(device)
    return teacher, student, gates, distiller


def _save_gates(path: str, selected: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for t, v in selected["log_alpha"].items():
        tensors[f"log_alpha.{t}"] = v.contiguous()
    for t, v in selected["z"].items():
        if v is not None:
            tensors[f"z.{t}"] = v.contiguous()
    save_file(tensors, path)


class CoFiLoss(nn.Module):
    """A CoFi step's whole loss as one module, the one DDP wraps (DESIGN §9): the student (gated,
    or the compact model after pruning), its gates (log α, λ1, λ2) and the layer map ``W``.
    The frozen teacher stays outside; its outputs come in as an argument.

    ``forward(batch, part, teacher_out, target, sample)`` draws the step's gates (``sample``;
    else every gate is 1) from the seed every process shares, then this process's dropout
    noise, and returns ``(loss to backpropagate, {name: share}, {name: whole value}, match)``
    (:class:`~cofi_kernels.training.distributed.BatchPart`): the distillation terms are the
    part's shares, the Lagrangian (when ``target`` is given) is whole.
    """

    def __init__(self, cfg: PruneConfig, model: nn.Module, gates, distiller, task):
        super().__init__()
        self.cfg, self.model, self.gates, self.distiller, self.task = cfg, model, gates, distiller, task

    def forward(self, b: dict, part: BatchPart, teacher_out, target: float | None, sample: bool):
        z = None
        if self.gates is not None:
            z = self.gates.sample() if sample else {}
            self.gates.fix(z)
        part.local_noise()
        whole: dict = {}
        try:
            shares, match = self._data_loss(b, part, teacher_out, z)
            loss = part.backward_loss(shares["loss"])
            if target is not None:
                lag = self.gates.lagrangian(target)
                loss = loss + lag
                whole.update(lagrangian=lag.item(), target=target)
        finally:
            if self.gates is not None:
                self.gates.unfix()
        return loss, {k: v.detach() for k, v in shares.items()}, whole, match

    def _data_loss(self, b, part: BatchPart, teacher_out, z):
        cfg, model, task = self.cfg, self.model, self.task
        if teacher_out is None:
            loss = part.share(task.loss(task.outputs(model, b), b, "sum"))
            return {"loss": loss, "task": loss}, None
        t_logits, t_hidden = teacher_out
        need_layers = self.distiller is not None
        s_out = task.outputs(model, b, output_hidden_states=need_layers)
        s_logits, s_hidden = s_out if need_layers else (s_out, None)
        pred = cfg.alpha_pred * part.share(task.distill_loss(s_logits, t_logits, b, cfg.temperature, "sum"))
        shares = {"loss": pred, "distill_pred": pred}
        if not need_layers:
            return shares, None
        if isinstance(model, PrunedModel):
            alive, hidden_index = model.layer_alive(), model.hidden_index
        else:
            alive, hidden_index = _alive_layers(z or None, self.gates.num_layers), None
        layer, match = self.distiller(s_hidden, t_hidden, b["attention_mask"] * part.weight, alive, hidden_index,
                                      tokens=part.tokens, reduce=part.world.sum)
        shares.update(loss=pred + cfg.alpha_layer * layer, distill_layer=layer)
        return shares, match


class _CoFiRun(TrainerHooks):
    """CoFi's hooks of the trainer: the steps of the three phases, the gated and the compact
    evaluations, and the switch to the compact model at the end of the prune phase."""

    def __init__(self, cfg, plan, run, student, teacher, gates, distiller, labels, train_enc, eval_enc, device):
        self.cfg, self.plan, self.run = cfg, plan, run
        self.student, self.teacher, self.gates, self.distiller = student, teacher, gates, distiller
        self.labels, self.train_enc, self.eval_enc, self.device = labels, train_enc, eval_enc, device
        from ...tasks import get_task

        self.task = get_task(labels.task)
        self.pruned = None
        self.selected = None
        self.selected_gates = None
        self.cache = None
        self.world = run.world
        self._make_optimizers()

    def on_start(self, step: int, examples: list[int]) -> None:
        """Run the teacher over this process's training examples once when its outputs fit in
        ``teacher_cache_mb``."""
        if self.teacher is None or self.cfg.teacher_cache_mb <= 0:
            return
        layers = [] if self.distiller is None else self.distiller.teacher_layers
        size = TeacherCache.size_mb(self.train_enc, examples, len(layers), self.teacher.config.hidden_size)
        if size <= self.cfg.teacher_cache_mb:
            self.cache = TeacherCache(self._teacher_outputs, self.train_enc, examples, layers, self.device,
                                      self.cfg.bf16, per_token=self.task.per_token)
            self.run.log({"event": "teacher_cache", "examples": len(examples), "megabytes": round(size, 1)})

    def _teacher_outputs(self, b: dict):
        """``(logits, hidden states or None)`` of the frozen teacher on ``b``."""
        with torch.no_grad():
            out = self.task.outputs(self.teacher, b, output_hidden_states=self.distiller is not None)
        return out if self.distiller is not None else (out, None)

    # -- optimisers --------------------------------------------------------

    def _model_groups(self, model):
        """AdamW groups of ``model`` plus the layer distiller's map ``W`` (no weight decay)."""
        groups = decay_groups(model, self.cfg.weight_decay)
        if self.distiller is not None:
            groups.append({"params": list(self.distiller.parameters()), "weight_decay": 0.0})
        return groups

    def _make_optimizers(self):
        cfg = self.cfg
        # Distill and prune phases: the gates and λ get no gradient in the distill phase, and live-only
        # compute skips the weights of heads, units and sublayers whose sampled gate is 0.
        self.loss_fn = self.world.wrap(CoFiLoss(cfg, self.student, self.gates, self.distiller, self.task), varying=True)
        self.opt_model = torch.optim.AdamW(self._model_groups(self.student), lr=cfg.lr)
        self.opt_gates = torch.optim.AdamW(list(self.gates.log_alpha.values()), lr=cfg.reg_lr, weight_decay=0.0)
        # Plain gradient ascent: λ += lambda_lr·∂L_c/∂λ (the gradients are negated before the step). An
        # adaptive optimiser's normalised steps make λ move at full speed on any error, however small, and
        # wind up while ŝ lags (benchmarks/results/cofi_targets.md).
        self.opt_lambda = torch.optim.SGD([self.gates.lambda_1, self.gates.lambda_2], lr=cfg.lambda_lr)

    def _make_finetune_optimizer(self):
        # The compact model computes every weight it has at every step (tests/training/test_distributed.py
        # measures the set of parameters with a gradient, step after step).
        self.loss_fn = self.world.wrap(CoFiLoss(self.cfg, self.pruned, None, self.distiller, self.task),
                                       varying=False)
        self.opt_model = torch.optim.AdamW(self._model_groups(self.pruned), lr=self.cfg.finetune_lr)
        self.opt_gates = self.opt_lambda = None

    # -- checkpoint --------------------------------------------------------

    def state_dict(self) -> dict:
        st = {
            "selected": self.selected,
            "selected_gates": self.selected_gates,
            "distiller": None if self.distiller is None else self.distiller.state_dict(),
            "opt_model": self.opt_model.state_dict(),
        }
        if self.pruned is None:
            st.update(student=self.student.state_dict(), gates=self.gates.state_dict(),
                      opt_gates=self.opt_gates.state_dict(), opt_lambda=self.opt_lambda.state_dict())
        else:
            st.update(pruned_config=self.pruned.config, pruned=self.pruned.state_dict())
        return st

    def load_state_dict(self, st: dict) -> None:
        self.selected, self.selected_gates = st["selected"], st["selected_gates"]
        if self.distiller is not None:
            self.distiller.load_state_dict(st["distiller"])
        if "pruned" in st:
            self._become_pruned(PrunedModel(st["pruned_config"]))
            self.pruned.load_state_dict(st["pruned"])
        else:
            self.student.load_state_dict(st["student"])
            self.gates.load_state_dict(st["gates"])
            self.opt_gates.load_state_dict(st["opt_gates"])
            self.opt_lambda.load_state_dict(st["opt_lambda"])
        self.opt_model.load_state_dict(st["opt_model"])

    # -- steps -------------------------------------------------------------

    def train_step(self, phase: str, step: int, b: dict, part: BatchPart) -> dict:
        cfg, plan = self.cfg, self.plan
        if phase == "finetune":
            total_ft = plan.total - plan.prune_end
            k = step - plan.prune_end
            set_lr(self.opt_model, cfg.finetune_lr * linear_schedule(k, total_ft, int(0.1 * total_ft)))
        target = plan.target(step, cfg.target_sparsity) if phase == "prune" else None
        self.loss_fn.train()
        with autocast(self.device, cfg.bf16):
            loss, shares, whole, match = self.loss_fn(b, part, self._teacher_batch(b, part), target,
                                                      phase == "prune")
        loss.backward()
        self.opt_model.step()
        self.opt_model.zero_grad(set_to_none=True)
        if phase == "prune":
            for lam in (self.gates.lambda_1, self.gates.lambda_2):
                if lam.grad is not None:
                    lam.grad.neg_()  # gradient ascent on λ
            self.opt_gates.step()
            self.opt_lambda.step()
            self.gates.clamp_()
            self.opt_gates.zero_grad(set_to_none=True)
            self.opt_lambda.zero_grad(set_to_none=True)
            if cfg.hold_target:
                # Never above t: a state pruned past the target loses what the gates put back to
                # meet it (benchmarks/results/cofi_targets.md, the 0.95 runs).
                shift = self.gates.hold_expected_sparsity_(target - cfg.epsilon, target)
                whole["hold_shift"] = shift
        rec = part.totals(shares)
        rec["loss"] += whole.get("lagrangian", 0.0)
        rec.update(whole)
        if match is not None:
            rec["match"] = match
        if self.pruned is None:
            with torch.no_grad():
                rec["expected_sparsity"] = float(self.gates.expected_sparsity())
            rec["lambda_1"] = self.gates.lambda_1.item()
            rec["lambda_2"] = self.gates.lambda_2.item()
        return rec

    def _teacher_batch(self, b: dict, part: BatchPart):
        """The teacher's outputs for this process's part (from the cache when there is one)."""
        if self.teacher is None:
            return None
        if self.cache is not None:
            return self.cache.batch(part.index, b["input_ids"].shape[1], self.device)
        return self._teacher_outputs(b)

    def postfix(self, phase: str, rec: dict) -> dict:
        return _postfix(phase, rec)

    # -- evaluation and best states -------------------------------------------

    def evaluate(self, phase: str, step: int) -> Evaluation:
        return self._evaluate_gated(step) if self.pruned is None else self._evaluate_compact()

    def _evaluate_gated(self, step: int) -> Evaluation:
        """The gated student under its deterministic gates. Only a state whose expected
        sparsity is within ε of the target can be chosen, so the others are not
        evaluated (except at the end of the phase, for the record)."""
        cfg = self.cfg
        with torch.no_grad():
            s_hat = float(self.gates.expected_sparsity())
        # The slack lets a state that hold_target put on the band's edge count as within it.
        eligible = abs(s_hat - cfg.target_sparsity) <= cfg.epsilon + 1e-6
        if not eligible and step != self.plan.prune_end:
            return Evaluation({"expected_sparsity": s_hat, "eligible": False, "skipped": True})
        z = self.gates.deterministic(cfg.target_sparsity)  # the gates this state would be pruned with
        self.gates.fix(z)
        try:
            m = evaluate(self.student, self.eval_enc, self.labels, device=self.device, bf16=cfg.bf16)
        finally:
            self.gates.unfix()
        realised = self.gates.realised_sparsity(z)
        sizes = {"expected_sparsity": s_hat, "realised_sparsity": realised}
        return Evaluation({**m, **sizes, "eligible": eligible}, {**m, **sizes}, eligible)

    def _evaluate_compact(self) -> Evaluation:
        m = evaluate(self.pruned, self.eval_enc, self.labels, device=self.device, bf16=self.cfg.bf16)
        return Evaluation({**m, "realised_sparsity": self.pruned.sparsity}, m)

    def snapshot(self, phase: str) -> dict:
        if phase == "finetune":
            return clone_state(self.pruned)
        return {"student": clone_state(self.student), "gates": clone_state(self.gates),
                "distiller": None if self.distiller is None else clone_state(self.distiller)}

    def end_phase(self, phase: str, best: dict | None, best_state: dict | None) -> bool:
        if phase == "prune":
            self._to_compact(best, best_state)
            return True
        if phase == "finetune" and best_state is not None:
            self.pruned.load_state_dict(best_state)
            return True
        return False

    def _to_compact(self, best: dict | None, best_state: dict | None) -> None:
        """Prune the best eligible prune-phase state (else the last one)."""
        if best_state is not None:
            self.student.load_state_dict(best_state["student"])
            self.gates.load_state_dict(best_state["gates"])
            if self.distiller is not None and best_state["distiller"] is not None:
                self.distiller.load_state_dict(best_state["distiller"])
            self.selected = {**best, "fallback": False}
        else:
            with torch.no_grad():
                s_hat = float(self.gates.expected_sparsity())
            self.selected = {"step": self.plan.prune_end, "expected_sparsity": s_hat, "fallback": True}
            self.run.log({"event": "warning", "step": self.plan.prune_end,
                          "message": f"no evaluation had expected sparsity within {self.cfg.epsilon} of the target "
                                     f"{self.cfg.target_sparsity}; pruning the last state (expected sparsity {s_hat:.4f})"})
        z = self.gates.deterministic(self.cfg.target_sparsity)
        self.selected["realised_sparsity"] = self.gates.realised_sparsity(z)
        self.selected_gates = {
            "log_alpha": {t: v.detach().clone().cpu() for t, v in self.gates.log_alpha.items()},
            "z": {t: (None if v is None else v.detach().clone().cpu()) for t, v in z.items()},
        }
        self.student.eval()
        pruned = self.task.finish_pruned(prune(self.student, self.gates, z), self.labels)
        self.run.log({"event": "pruned", "step": self.plan.prune_end, **self.selected,
                      "layer_shapes": pruned.layer_shapes()})
        self._become_pruned(pruned)

    def _become_pruned(self, pruned) -> None:
        self.pruned = pruned.to(self.device)
        self.pruned.requires_grad_(True)
        if self.cfg.freeze_embeddings:
            freeze_embeddings(self.pruned)
        self.student = self.gates = None
        self._make_finetune_optimizer()


def _alive_layers(z, num_layers: int) -> list[bool]:
    if z is None:
        return [True] * num_layers
    mha, ffn = z.get("mha"), z.get("ffn")
    alive = []
    for i in range(num_layers):
        a = mha is None or bool(mha[i] != 0)
        f = ffn is None or bool(ffn[i] != 0)
        alive.append(a or f)
    return alive


def _postfix(phase: str, rec: dict) -> dict:
    out = {"phase": phase, "loss": f"{rec['loss']:.4f}"}
    if "expected_sparsity" in rec:
        out["ŝ"] = f"{rec['expected_sparsity']:.3f}"
    if "target" in rec:
        out["t"] = f"{rec['target']:.3f}"
    if "lambda_1" in rec and phase == "prune":
        out["λ1"] = f"{rec['lambda_1']:.3f}"
        out["λ2"] = f"{rec['lambda_2']:.3f}"
    return out
