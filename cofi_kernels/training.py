"""The CoFi training loop (DESIGN §4): fine-tune a teacher, learn the gates, prune, fine-tune.

Two entry points, both resumable and deterministic for a given seed:

- :func:`finetune` — train a classifier/regressor on labelled text (the teacher).
- :func:`cofi_prune` — CoFi on a fine-tuned model:

  1. **distill**: the student (a copy of the teacher, or a given model) learns
     from the teacher with every gate 1;
  2. **prune**: gates sampled every step; loss = α_pred·KL·T² + α_layer·L_layer
     + the Lagrangian λ1(ŝ−t) + λ2(ŝ−t)²; the target t grows linearly from 0;
     the model and log α minimise, λ1, λ2 maximise; evaluation every N steps
     keeps the best model whose expected sparsity is within ε of the target;
  3. :func:`~cofi_kernels.pruning.prune` of the best state, then
  4. **finetune** of the compact model, distillation still on.

Every run writes into one output directory: a JSON log (``log.jsonl``),
a checkpoint (``checkpoint/state.pt``, replaced atomically every
``checkpoint_every`` steps), and at the end the model and ``run.json``. A run
killed at any point continues with ``resume=True`` and ends with the same
weights and gates as an uninterrupted run: every step reseeds the random
number generators from ``(seed, step)`` and draws its batch from a permutation
that is a pure function of ``(seed, epoch)``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .data import Encoded, LabelSpace, TextDataset, epoch_order, steps_per_epoch
from .distill import LayerDistiller, prediction_loss, task_loss

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
LOG_FILE = "log.jsonl"
RUN_FILE = "run.json"
TASK_FILE = "cofi_task.json"
GATES_FILE = "gates.safetensors"
CHECKPOINT_FORMAT = 1


class RunError(ValueError):
    """A run cannot start or resume (bad setting, output directory in use, foreign checkpoint,
    unusable model directory); the message says what to do."""


# ---------------------------------------------------------------------- configs


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


@dataclass
class PruneConfig:
    """Settings of :func:`cofi_prune`.

    Attributes:
        target_sparsity: final target t in (0, 1) of the expected sparsity ŝ.
        distill_epochs: distillation before any gate is sampled.
        prune_epochs: the gate-learning phase.
        sparsity_warmup_epochs: the target grows linearly from 0 to t over
            this part of the prune phase.
        finetune_epochs: fine-tuning of the compact model after pruning.
        batch_size: examples per step.
        lr: AdamW learning rate of the model (distill and prune phases).
        reg_lr: AdamW learning rate of log α (no weight decay).
        lambda_lr: learning rate of the gradient ascent on λ1, λ2 (AdamW on the negated gradients).
        finetune_lr: peak learning rate of the compact model's fine-tuning
            (linear warm-up over 10%, then linear decay).
        weight_decay: AdamW weight decay of the model (not biases, LayerNorms).
        temperature: T of the prediction distillation.
        alpha_pred, alpha_layer: weights of the prediction and layer distillation.
        teacher_layers: teacher layers matched by the layer distillation
            (default: every third layer of a 12-layer model, scaled).
        epsilon: a state is eligible as "best" when ``|ŝ − t| ≤ epsilon``.
        eval_every: evaluate every this many steps (0: twice per epoch) in the
            prune and finetune phases, and at the end of each; in the prune
            phase only states within ``epsilon`` of the target are evaluated
            (the others cannot be chosen).
        checkpoint_every: write a checkpoint every this many steps.
        freeze_embeddings: do not train the embedding tables (default, as CoFi).
        learn: gate types to learn (subset of ``head, mha, int, ffn, hidden``).
        droprate_init: initial drop probability of the FFN-unit gates.
        teacher_cache_mb: the teacher is frozen and deterministic, so its logits
            and matched hidden states for the training set are computed once and
            kept in memory when they fit in this many MiB (0: run the teacher
            every step).
        max_length, seed, device, bf16: as in :class:`FinetuneConfig`.
    """

    target_sparsity: float = 0.9
    distill_epochs: float = 0.5
    prune_epochs: float = 5.0
    sparsity_warmup_epochs: float = 2.0
    finetune_epochs: float = 2.0
    batch_size: int = 32
    lr: float = 5e-5
    reg_lr: float = 0.1
    lambda_lr: float = 0.5
    finetune_lr: float = 1e-4
    weight_decay: float = 0.0
    temperature: float = 2.0
    alpha_pred: float = 1.0
    alpha_layer: float = 1.0
    teacher_layers: list[int] | None = None
    epsilon: float = 0.02
    eval_every: int = 0
    checkpoint_every: int = 50
    freeze_embeddings: bool = True
    learn: tuple[str, ...] = ("head", "mha", "int", "ffn", "hidden")
    droprate_init: float = 0.5
    max_length: int = 128
    teacher_cache_mb: int = 4096
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False


def _check_common(cfg, where: str) -> None:
    def positive(name, integer=True):
        v = getattr(cfg, name)
        if integer and (not isinstance(v, int) or isinstance(v, bool)):
            raise RunError(f"{where}: {name} must be an integer, got {v!r}")
        if not v > 0:
            raise RunError(f"{where}: {name} must be > 0, got {v!r}")

    for name in ("batch_size", "max_length", "checkpoint_every"):
        positive(name)
    if not isinstance(cfg.eval_every, int) or cfg.eval_every < 0:
        raise RunError(f"{where}: eval_every must be an integer >= 0, got {cfg.eval_every!r}")
    if cfg.max_length < 8:
        raise RunError(f"{where}: max_length must be >= 8, got {cfg.max_length}")
    device = torch.device(cfg.device)
    if device.type not in ("cpu", "cuda"):
        raise RunError(f"{where}: device must be 'cpu' or 'cuda[:N]', got {cfg.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"{where}: device {cfg.device!r} was asked for, but no CUDA GPU is available; use --device cpu")
    if cfg.bf16 and device.type != "cuda":
        raise RunError(f"{where}: bf16 autocast is for GPUs; drop --bf16 or use --device cuda")


def _check_finetune_config(cfg: FinetuneConfig) -> None:
    _check_common(cfg, "finetune")
    if not cfg.epochs > 0:
        raise RunError(f"finetune: epochs must be > 0, got {cfg.epochs}")
    if not cfg.lr > 0:
        raise RunError(f"finetune: lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.warmup_fraction < 1:
        raise RunError(f"finetune: warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")


def _check_prune_config(cfg: PruneConfig) -> None:
    _check_common(cfg, "prune")
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


# ---------------------------------------------------------------------- models and files


def load_tokenizer(model_dir: str):
    """The tokenizer saved in ``model_dir``; :class:`RunError` when there is none."""
    from transformers import AutoTokenizer

    _require_dir(model_dir)
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # transformers raises many types for a broken directory
        raise RunError(f"model directory {model_dir!r}: cannot load its tokenizer ({_first_line(e)})") from None


def load_classifier(model_dir: str, labels: LabelSpace | None = None):
    """A BERT/RoBERTa ``*ForSequenceClassification`` from ``model_dir``.

    With ``labels`` the classification head is sized for them (a new head when
    the directory holds a bare encoder or a head for other labels); without,
    the directory's own head is used.
    """
    import transformers as tf

    _require_dir(model_dir)
    try:
        config = tf.AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        raise RunError(f"model directory {model_dir!r}: cannot read config.json ({_first_line(e)})") from None
    if config.model_type not in ("bert", "roberta"):
        raise RunError(
            f"model directory {model_dir!r}: model_type {config.model_type!r} is not supported; "
            "give a BERT or RoBERTa model"
        )
    kw = {}
    if labels is not None:
        kw = {"num_labels": labels.num_labels, "problem_type": _problem_type(labels)}
        if labels.task == "classification":
            kw["id2label"] = dict(enumerate(labels.names))
            kw["label2id"] = {n: i for i, n in enumerate(labels.names)}
    try:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected here
        try:
            model = tf.AutoModelForSequenceClassification.from_pretrained(
                model_dir, ignore_mismatched_sizes=labels is not None, **kw
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as e:
        raise RunError(f"model directory {model_dir!r}: cannot load the model ({_first_line(e)})") from None
    return model


def _problem_type(labels: LabelSpace) -> str:
    return "regression" if labels.task == "regression" else "single_label_classification"


def _require_dir(model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        raise RunError(f"model directory {model_dir!r} does not exist")
    if not os.access(model_dir, os.R_OK | os.X_OK):
        raise RunError(f"model directory {model_dir!r} is not readable")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def read_task(model_dir: str) -> dict:
    """``cofi_task.json`` of a model written by this package (label space, max_length, kind)."""
    path = os.path.join(model_dir, TASK_FILE)
    if not os.path.isfile(path):
        raise RunError(f"model directory {model_dir!r} has no {TASK_FILE}; give a model written by `cofi finetune` or `cofi prune`")
    try:
        with open(path) as f:
            task = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: unreadable ({_first_line(e)})") from None
    if not isinstance(task, dict) or "labels" not in task or "max_length" not in task:
        raise RunError(f"{path}: malformed (needs 'task', 'labels', 'max_length')")
    task["label_space"] = LabelSpace.from_json(task, path)
    return task


def _write_task(directory: str, labels: LabelSpace, max_length: int, kind: str) -> None:
    _write_json(os.path.join(directory, TASK_FILE), {**labels.to_json(), "max_length": max_length, "kind": kind})


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data_digest(data: TextDataset) -> str:
    h = hashlib.sha256()
    for i in range(len(data)):
        h.update(json.dumps([data.texts[i], None if data.text_pairs is None else data.text_pairs[i], data.labels[i]]).encode())
    return h.hexdigest()


def _model_digest(model_dir: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name.endswith((".safetensors", ".bin", ".json")):
            h.update(name.encode() + _file_digest(os.path.join(model_dir, name)).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------- evaluation


def evaluate(model: nn.Module, data: Encoded, labels: LabelSpace, *, batch_size: int = 64,
             device: str | torch.device = "cpu", bf16: bool = False) -> dict[str, float]:
    """Metrics of ``model`` on ``data`` (eval mode, no gradients).

    Returns ``{"metric": name, name: value, "loss": ...}`` with ``accuracy`` for
    classification and ``pearson`` (plus ``mse``) for regression.
    """
    was_training = model.training
    model.eval()
    preds = []
    with torch.no_grad(), _autocast(device, bf16):
        for index in data.in_order(batch_size):
            b = data.batch(index, device)
            preds.append(_logits(model, b).float().cpu())
    model.train(was_training)
    logits = torch.cat(preds)
    return metrics_of(logits, data.targets, labels)


def metrics_of(logits: torch.Tensor, targets: torch.Tensor, labels: LabelSpace) -> dict:
    """Metric dict (see :func:`evaluate`) of ``logits`` against ``targets``."""
    loss = float(task_loss(logits, targets))
    if labels.task == "regression":
        p = logits.squeeze(-1).double()
        y = targets.double()
        pc, yc = p - p.mean(), y - y.mean()
        denom = float(pc.norm() * yc.norm())
        pearson = float((pc * yc).sum()) / denom if denom > 0 else 0.0
        return {"metric": "pearson", "pearson": pearson, "mse": float(((p - y) ** 2).mean()), "loss": loss}
    acc = float((logits.argmax(-1) == targets).double().mean())
    return {"metric": "accuracy", "accuracy": acc, "loss": loss}


def _logits(model, b, output_hidden_states: bool = False):
    from .pruning import PrunedModel

    if isinstance(model, PrunedModel):
        return model(b["input_ids"], b["attention_mask"], b["token_type_ids"], output_hidden_states=output_hidden_states)
    out = model(
        input_ids=b["input_ids"],
        attention_mask=b["attention_mask"],
        token_type_ids=b["token_type_ids"],
        output_hidden_states=output_hidden_states,
    )
    return (out.logits, list(out.hidden_states[1:])) if output_hidden_states else out.logits


def _autocast(device, bf16: bool):
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bool(bf16) and device.type == "cuda")


def throughput(model: nn.Module, data: Encoded, *, batch_size: int = 32, repeats: int = 3,
               device: str | torch.device = "cpu", max_examples: int = 256) -> float:
    """Examples per second of ``model``'s forward over the first ``max_examples`` of ``data``
    (eval mode, no grad): one warm-up pass, then the median of ``repeats`` timed passes."""
    model.eval()
    n = min(len(data), max_examples)
    batches = [data.batch(ix, device) for ix in data.in_order(batch_size)][: -(-n // batch_size)]
    n = sum(b["input_ids"].shape[0] for b in batches)
    times = []
    with torch.no_grad():
        for r in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            for b in batches:
                _logits(model, b)
            _sync(device)
            if r:
                times.append(time.perf_counter() - t0)
    times.sort()
    return n / times[len(times) // 2]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- the run directory


class _RunDir:
    """The output directory of one run: log, checkpoint, final files."""

    def __init__(self, out: str, fingerprint: dict, resume: bool, kind: str):
        self.out = os.fspath(out)
        self.fingerprint = fingerprint
        self.kind = kind
        self.ckpt_path = os.path.join(self.out, CHECKPOINT_DIR, CHECKPOINT_FILE)
        self.log_path = os.path.join(self.out, LOG_FILE)
        self.log_lines = 0
        self.resumed = None
        if resume:
            self.resumed = self._load_for_resume()
        else:
            self._check_fresh()

    def _check_fresh(self) -> None:
        if os.path.exists(self.out) and (not os.path.isdir(self.out) or os.listdir(self.out)):
            if os.path.isfile(self.ckpt_path):
                raise RunError(
                    f"output directory {self.out!r} holds an unfinished run; continue it with --resume "
                    "or choose another --out"
                )
            raise RunError(f"output directory {self.out!r} exists and is not empty; choose another --out")

    def _load_for_resume(self) -> dict:
        if os.path.isfile(os.path.join(self.out, RUN_FILE)) and not os.path.isfile(self.ckpt_path):
            raise RunError(f"output directory {self.out!r} holds a finished run; there is nothing to resume")
        if not os.path.isfile(self.ckpt_path):
            raise RunError(f"--resume: no checkpoint in {self.out!r} ({CHECKPOINT_DIR}/{CHECKPOINT_FILE} is missing)")
        try:
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RunError(f"--resume: checkpoint {self.ckpt_path!r} cannot be read ({_first_line(e)})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise RunError(f"--resume: {self.ckpt_path!r} is not a checkpoint of this version of cofi_kernels")
        theirs = state.get("fingerprint", {})
        if state.get("kind") != self.kind or theirs != self.fingerprint:
            diff = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
            raise RunError(
                f"--resume: the checkpoint in {self.out!r} is from another run (kind {state.get('kind')!r}; "
                f"differs in: {', '.join(diff) or 'kind'}); rerun with that run's arguments or choose another --out"
            )
        return state

    def start(self) -> None:
        """Create the directory (fresh run) or cut the log back to the checkpoint (resume)."""
        os.makedirs(os.path.join(self.out, CHECKPOINT_DIR), exist_ok=True)
        if self.resumed is None:
            open(self.log_path, "w").close()
            return
        self.log_lines = int(self.resumed["log_lines"])
        lines = []
        if os.path.isfile(self.log_path):
            with open(self.log_path) as f:
                lines = f.readlines()[: self.log_lines]
        with open(self.log_path, "w") as f:
            f.writelines(lines)

    def log(self, record: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.log_lines += 1

    def save_checkpoint(self, state: dict) -> None:
        state = {"format": CHECKPOINT_FORMAT, "kind": self.kind, "fingerprint": self.fingerprint,
                 "log_lines": self.log_lines, **state}
        tmp = self.ckpt_path + ".tmp"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.ckpt_path)

    def finish(self, summary: dict) -> None:
        _write_json(os.path.join(self.out, RUN_FILE), summary)
        shutil.rmtree(os.path.join(self.out, CHECKPOINT_DIR), ignore_errors=True)


# ---------------------------------------------------------------------- shared step machinery


def _seed_step(seed: int, step: int) -> None:
    # One fresh stream per step (dropout, gate noise, new weights) so a resumed run repeats it exactly.
    torch.manual_seed((seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1))


def _batch_at(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    spe = steps_per_epoch(n, batch_size)
    return epoch_order(n, batch_size, seed, step // spe)[step % spe]


def _decay_groups(module: nn.Module, weight_decay: float, skip: Callable[[str], bool] = lambda n: False):
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad or skip(name):
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name or "ln_" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _is_embedding(name: str) -> bool:
    return "embeddings." in name and "LayerNorm" not in name and ".ln_" not in name


def _freeze_embeddings(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if _is_embedding(name):
            p.requires_grad_(False)


def _linear_schedule(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0, leave=True)


def _better(new: dict, old: dict | None) -> bool:
    return old is None or new[new["metric"]] > old[old["metric"]]


# ---------------------------------------------------------------------- finetune


@dataclass
class RunResult:
    """What a finished run returns (and writes to ``run.json``)."""

    out: str
    metrics: dict
    steps: int
    seconds: float
    extra: dict = field(default_factory=dict)


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
        "model": _model_digest(model_dir),
        "train": _data_digest(train),
        "eval": _data_digest(eval_data),
        "labels": labels.to_json(),
    }
    run = _RunDir(out, fingerprint, resume, "finetune")
    torch.manual_seed(cfg.seed)  # the new classification head's initialisation
    model = load_classifier(model_dir, labels)
    device = torch.device(cfg.device)
    model.to(device)
    if cfg.freeze_embeddings:
        _freeze_embeddings(model)
    opt = torch.optim.AdamW(_decay_groups(model, cfg.weight_decay), lr=cfg.lr)
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
    bar = _progress(total, step, "finetune", progress)
    model.train()
    while step < total:
        _seed_step(cfg.seed, step)
        b = train_enc.batch(_batch_at(step, n, cfg.batch_size, cfg.seed), device)
        _set_lr(opt, cfg.lr * _linear_schedule(step, total, warmup))
        with _autocast(device, cfg.bf16):
            loss = task_loss(_logits(model, b), b["labels"])
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
            if _better(m, best):
                best, best_state = {**m, "step": step}, _clone_state(model)
        if step % cfg.checkpoint_every == 0 or step == total:
            checkpoint()
    if bar is not None:
        bar.close()
    model.load_state_dict(best_state)
    model.save_pretrained(run.out)
    tokenizer.save_pretrained(run.out)
    _write_task(run.out, labels, cfg.max_length, "finetuned")
    seconds = time.perf_counter() - t_start
    summary = {"kind": "finetune", "best": best, "steps": total, "seconds": seconds, "config": dataclasses.asdict(cfg)}
    run.finish(summary)
    return RunResult(run.out, best, total, seconds)


# ---------------------------------------------------------------------- CoFi prune


class _PrunePlan:
    """Step boundaries of the phases (global step counter)."""

    def __init__(self, cfg: PruneConfig, n: int):
        spe = steps_per_epoch(n, cfg.batch_size)
        self.spe = spe
        self.distill_end = math.ceil(cfg.distill_epochs * spe)
        self.prune_steps = max(1, math.ceil(cfg.prune_epochs * spe))
        self.warmup = math.ceil(cfg.sparsity_warmup_epochs * spe)
        self.prune_end = self.distill_end + self.prune_steps
        self.total = self.prune_end + math.ceil(cfg.finetune_epochs * spe)
        self.eval_every = cfg.eval_every or max(1, spe // 2)

    def phase(self, step: int) -> str:
        if step < self.distill_end:
            return "distill"
        return "prune" if step < self.prune_end else "finetune"

    def target(self, step: int, final: float) -> float:
        k = step - self.distill_end + 1
        return final if self.warmup == 0 else final * min(1.0, k / self.warmup)

    def eval_due(self, step: int) -> bool:
        # step = number of steps done so far.
        if step <= self.distill_end:
            return False
        if step == self.prune_end or step == self.total:
            return True
        start = self.distill_end if step <= self.prune_end else self.prune_end
        return (step - start) % self.eval_every == 0


def cofi_prune(
    teacher_dir: str,
    train: TextDataset,
    eval_data: TextDataset,
    out: str,
    config: PruneConfig | None = None,
    *,
    student_dir: str | None = None,
    distill: bool = True,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """CoFi-prune the fine-tuned model in ``teacher_dir`` to ``config.target_sparsity``.

    Args:
        teacher_dir: a directory written by :func:`finetune` (or any BERT/RoBERTa
            classifier with a ``cofi_task.json``).
        train, eval_data: training data, and the data the best state is chosen on.
        out: the run directory; at the end it holds the pruned model
            (:class:`~cofi_kernels.pruning.PrunedModel` files, tokenizer,
            ``cofi_task.json``), the learned gates (``gates.safetensors``),
            ``log.jsonl`` and ``run.json``.
        config: :class:`PruneConfig`.
        student_dir: start the student from this pre-trained model instead of a
            copy of the teacher (same hidden size).
        distill: False trains the student with plain cross-entropy (MSE for
            regression) and no teacher.
        resume: continue the unfinished run in ``out`` from its checkpoint.
        progress: show a progress bar (loss, expected sparsity ŝ, target, λ).

    Raises:
        DataError, RunError: as :func:`finetune`; also a target sparsity outside (0, 1).
    """
    from .hf_integration import apply_cofi
    from .pruning import PrunedModel

    cfg = config or PruneConfig()
    _check_prune_config(cfg)
    task = read_task(teacher_dir)
    labels: LabelSpace = task["label_space"]
    tokenizer = load_tokenizer(teacher_dir)
    train_enc = Encoded(train, labels, tokenizer, cfg.max_length)
    eval_enc = Encoded(eval_data, labels, tokenizer, cfg.max_length)
    fingerprint = {
        "config": dataclasses.asdict(cfg),
        "teacher": _model_digest(teacher_dir),
        "student": None if student_dir is None else _model_digest(student_dir),
        "distill": bool(distill),
        "train": _data_digest(train),
        "eval": _data_digest(eval_data),
    }
    fingerprint["config"]["learn"] = list(cfg.learn)
    run = _RunDir(out, fingerprint, resume, "prune")
    device = torch.device(cfg.device)

    teacher = load_classifier(teacher_dir).to(device).eval() if distill else None
    if teacher is not None:
        teacher.requires_grad_(False)
        if teacher.config.num_labels != labels.num_labels:
            raise RunError(
                f"teacher {teacher_dir!r}: its head has {teacher.config.num_labels} output(s) but its "
                f"{TASK_FILE} lists {labels.num_labels}"
            )
    torch.manual_seed(cfg.seed)
    if student_dir is not None:
        student = load_classifier(student_dir, labels)
    elif teacher is not None:
        student = copy.deepcopy(teacher)
    else:
        student = load_classifier(teacher_dir)
    student.to(device).requires_grad_(True)
    if cfg.freeze_embeddings:
        _freeze_embeddings(student)
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

    n = len(train_enc)
    plan = _PrunePlan(cfg, n)
    loop = _PruneLoop(cfg, plan, run, student, teacher, gates, distiller, labels, train_enc, eval_enc, device)
    run.start()
    if run.resumed is not None:
        loop.restore(run.resumed, PrunedModel)
        run.log({"event": "resume", "step": loop.step})
    else:
        loop.save_checkpoint()  # a run killed before its first interval still resumes
    if loop.step < plan.total:
        loop.build_teacher_cache()
    loop.train(progress)

    pruned = loop.pruned
    pruned.requires_grad_(False)
    pruned.save_pretrained(run.out)
    tokenizer.save_pretrained(run.out)
    _write_task(run.out, labels, cfg.max_length, "pruned")
    _save_gates(os.path.join(run.out, GATES_FILE), loop.selected_gates)
    summary = {
        "kind": "prune",
        "selected": loop.selected,
        "best": loop.best_ft,
        "sparsity": pruned.sparsity,
        "parameters": pruned.num_parameters(),
        "layer_shapes": pruned.layer_shapes(),
        "steps": plan.total,
        "seconds": loop.seconds,
        "config": fingerprint["config"],
    }
    run.finish(summary)
    return RunResult(run.out, loop.best_ft, plan.total, loop.seconds, {"sparsity": pruned.sparsity})


def _save_gates(path: str, selected: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for t, v in selected["log_alpha"].items():
        tensors[f"log_alpha.{t}"] = v.contiguous()
    for t, v in selected["z"].items():
        if v is not None:
            tensors[f"z.{t}"] = v.contiguous()
    save_file(tensors, path)


class _TeacherCache:
    """The teacher's logits and matched layer outputs for every training example.

    Computed once, in index order with a fixed batch size, so a resumed run
    recomputes exactly the same values; padding positions are not stored.
    """

    def __init__(self, teacher, enc: Encoded, layers: list[int], batch_size: int, device, bf16: bool):
        self.layers = layers
        self.logits: list[torch.Tensor] = []
        self.hidden: list[dict[int, torch.Tensor]] = []
        with torch.no_grad(), _autocast(device, bf16):
            for index in enc.in_order(batch_size):
                b = enc.batch(index, device)
                out = _logits(teacher, b, output_hidden_states=bool(layers))
                logits, hidden = out if layers else (out, None)
                for r, i in enumerate(index):
                    n = len(enc.input_ids[i])
                    self.logits.append(logits[r].float().cpu())
                    self.hidden.append({t: hidden[t][r, :n].float().cpu() for t in layers} if layers else {})

    @staticmethod
    def size_mb(enc: Encoded, num_layers: int, hidden_size: int) -> float:
        """Memory the cache of ``num_layers`` matched layers would take."""
        tokens = sum(len(ids) for ids in enc.input_ids)
        return tokens * num_layers * hidden_size * 4 / 2**20

    def batch(self, index: list[int], seq_len: int, device):
        """``(logits [B, C], {layer: [B, T, D]})`` for the examples ``index`` padded to ``seq_len``."""
        logits = torch.stack([self.logits[i] for i in index]).to(device)
        hidden = {}
        for t in self.layers:
            rows = [self.hidden[i][t] for i in index]
            h = rows[0].new_zeros(len(index), seq_len, rows[0].shape[-1])
            for r, x in enumerate(rows):
                h[r, : x.shape[0]] = x
            hidden[t] = h.to(device)
        return logits, hidden


class _PruneLoop:
    """State and steps of one :func:`cofi_prune` run."""

    def __init__(self, cfg, plan, run, student, teacher, gates, distiller, labels, train_enc, eval_enc, device):
        self.cfg, self.plan, self.run = cfg, plan, run
        self.student, self.teacher, self.gates, self.distiller = student, teacher, gates, distiller
        self.labels, self.train_enc, self.eval_enc, self.device = labels, train_enc, eval_enc, device
        self.pruned = None
        self.step = 0
        self.best = None  # best eligible evaluation in the prune phase
        self.best_state = None  # {"student": ..., "gates": ..., "distiller": ...}
        self.best_ft = None  # best evaluation of the compact model
        self.best_ft_state = None
        self.selected = None
        self.selected_gates = None
        self.seconds = 0.0
        self.cache = None
        self._make_optimizers()

    def build_teacher_cache(self) -> None:
        """Run the teacher over the training set once when its outputs fit in ``teacher_cache_mb``."""
        if self.teacher is None or self.cfg.teacher_cache_mb <= 0:
            return
        layers = [] if self.distiller is None else self.distiller.teacher_layers
        size = _TeacherCache.size_mb(self.train_enc, len(layers), self.teacher.config.hidden_size)
        if size <= self.cfg.teacher_cache_mb:
            self.cache = _TeacherCache(self.teacher, self.train_enc, layers, 64, self.device, self.cfg.bf16)
            self.run.log({"event": "teacher_cache", "examples": len(self.train_enc), "megabytes": round(size, 1)})

    # -- optimisers --------------------------------------------------------

    def _model_params(self, model):
        return _decay_groups(model, self.cfg.weight_decay)

    def _make_optimizers(self):
        cfg = self.cfg
        groups = self._model_params(self.student)
        if self.distiller is not None:
            groups.append({"params": list(self.distiller.parameters()), "weight_decay": 0.0})
        self.opt_model = torch.optim.AdamW(groups, lr=cfg.lr)
        self.opt_gates = torch.optim.AdamW(list(self.gates.log_alpha.values()), lr=cfg.reg_lr, weight_decay=0.0)
        self.opt_lambda = torch.optim.AdamW([self.gates.lambda_1, self.gates.lambda_2], lr=cfg.lambda_lr,
                                            weight_decay=0.0)

    def _make_finetune_optimizer(self):
        groups = self._model_params(self.pruned)
        if self.distiller is not None:
            groups.append({"params": list(self.distiller.parameters()), "weight_decay": 0.0})
        self.opt_model = torch.optim.AdamW(groups, lr=self.cfg.finetune_lr)
        self.opt_gates = self.opt_lambda = None

    # -- checkpoint --------------------------------------------------------

    def state(self) -> dict:
        st = {
            "step": self.step,
            "seconds": self.seconds,
            "best": self.best,
            "best_state": self.best_state,
            "best_ft": self.best_ft,
            "best_ft_state": self.best_ft_state,
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

    def restore(self, st: dict, pruned_cls) -> None:
        self.step, self.seconds = st["step"], st["seconds"]
        self.best, self.best_state = st["best"], st["best_state"]
        self.best_ft, self.best_ft_state = st["best_ft"], st["best_ft_state"]
        self.selected, self.selected_gates = st["selected"], st["selected_gates"]
        if self.distiller is not None:
            self.distiller.load_state_dict(st["distiller"])
        if "pruned" in st:
            self._become_pruned(pruned_cls(st["pruned_config"]))
            self.pruned.load_state_dict(st["pruned"])
        else:
            self.student.load_state_dict(st["student"])
            self.gates.load_state_dict(st["gates"])
            self.opt_gates.load_state_dict(st["opt_gates"])
            self.opt_lambda.load_state_dict(st["opt_lambda"])
        self.opt_model.load_state_dict(st["opt_model"])

    def save_checkpoint(self) -> None:
        self.run.save_checkpoint(self.state())

    # -- phases ------------------------------------------------------------

    def run_steps(self, bar) -> None:
        plan = self.plan
        t0 = time.perf_counter() - self.seconds
        while self.step < plan.total:
            if self.step == plan.prune_end and self.pruned is None:
                self._to_compact()
                self.seconds = time.perf_counter() - t0
                self.save_checkpoint()
            phase = plan.phase(self.step)
            rec = self._train_step(phase)
            self.step += 1
            self.seconds = time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(_postfix(phase, rec), refresh=False)
            self.run.log({"event": "step", "phase": phase, "step": self.step, **rec, "seconds": round(self.seconds, 3)})
            if plan.eval_due(self.step):
                self._evaluate(phase, bar)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == plan.total:
                if not (self.step == plan.prune_end and self.pruned is None):
                    self.save_checkpoint()
        if self.pruned is None:  # no finetune phase
            self._to_compact()
        if self.best_ft_state is not None:
            self.pruned.load_state_dict(self.best_ft_state)

    def train(self, progress: bool) -> None:
        bar = _progress(self.plan.total, self.step, "cofi prune", progress)
        try:
            self.run_steps(bar)
        finally:
            if bar is not None:
                bar.close()

    def _train_step(self, phase: str) -> dict:
        cfg, plan = self.cfg, self.plan
        _seed_step(cfg.seed, self.step)
        index = _batch_at(self.step, len(self.train_enc), cfg.batch_size, cfg.seed)
        b = self.train_enc.batch(index, self.device)
        model = self.pruned if phase == "finetune" else self.student
        if phase == "finetune":
            total_ft = plan.total - plan.prune_end
            k = self.step - plan.prune_end
            _set_lr(self.opt_model, cfg.finetune_lr * _linear_schedule(k, total_ft, int(0.1 * total_ft)))
        rec: dict = {}
        z = None
        if phase == "prune":
            z = self.gates.sample()
            self.gates.fix(z)
        elif phase == "distill":
            self.gates.fix({})
        model.train()
        try:
            with _autocast(self.device, cfg.bf16):
                loss = self._loss(model, b, index, z, rec)
                if phase == "prune":
                    target = plan.target(self.step, cfg.target_sparsity)
                    lag = self.gates.lagrangian(target)
                    loss = loss + lag
                    rec.update(lagrangian=lag.item(), target=target)
            loss.backward()
        finally:
            if self.pruned is None:
                self.gates.unfix()
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
        if self.pruned is None:
            with torch.no_grad():
                rec["expected_sparsity"] = float(self.gates.expected_sparsity())
            rec["lambda_1"] = self.gates.lambda_1.item()
            rec["lambda_2"] = self.gates.lambda_2.item()
        rec["loss"] = loss.item()
        return rec

    def _loss(self, model, b, index, z, rec: dict) -> torch.Tensor:
        cfg = self.cfg
        if self.teacher is None:
            loss = task_loss(_logits(model, b), b["labels"])
            rec["task"] = loss.item()
            return loss
        need_layers = self.distiller is not None
        if self.cache is not None:
            t_logits, t_hidden = self.cache.batch(index, b["input_ids"].shape[1], self.device)
        else:
            with torch.no_grad():
                t_out = _logits(self.teacher, b, output_hidden_states=need_layers)
            t_logits, t_hidden = t_out if need_layers else (t_out, None)
        s_out = _logits(model, b, output_hidden_states=need_layers)
        s_logits, s_hidden = s_out if need_layers else (s_out, None)
        loss = cfg.alpha_pred * prediction_loss(s_logits, t_logits, cfg.temperature)
        rec["distill_pred"] = loss.item()
        if need_layers:
            if self.pruned is not None:
                alive, hidden_index = self.pruned.layer_alive(), self.pruned.hidden_index
            else:
                alive, hidden_index = _alive_layers(z, self.gates.num_layers), None
            layer, match = self.distiller(s_hidden, t_hidden, b["attention_mask"], alive, hidden_index)
            loss = loss + cfg.alpha_layer * layer
            rec["distill_layer"] = layer.item()
            rec["match"] = match
        return loss

    def _evaluate(self, phase: str, bar) -> None:
        rec = self._evaluate_gated() if self.pruned is None else self._evaluate_compact()
        self.run.log({"event": "eval", "phase": phase, "step": self.step, **rec})
        if bar is not None and "metric" in rec:
            extra = f", expected sparsity {rec['expected_sparsity']:.4f}" if "expected_sparsity" in rec else ""
            bar.write(f"step {self.step} ({phase}): eval {rec['metric']} {rec[rec['metric']]:.4f}, "
                      f"realised sparsity {rec['realised_sparsity']:.4f}{extra}")

    def _evaluate_gated(self) -> dict:
        """Evaluate the gated student under its deterministic gates. Only a state whose
        expected sparsity is within ε of the target can be chosen, so the others are
        not evaluated (except at the end of the phase, for the record)."""
        cfg = self.cfg
        with torch.no_grad():
            s_hat = float(self.gates.expected_sparsity())
        eligible = abs(s_hat - cfg.target_sparsity) <= cfg.epsilon
        if not eligible and self.step != self.plan.prune_end:
            return {"expected_sparsity": s_hat, "eligible": False, "skipped": True}
        m = evaluate(self.student, self.eval_enc, self.labels, device=self.device, bf16=cfg.bf16)
        with torch.no_grad():
            realised = self.gates.realised_sparsity(self.gates.deterministic())
        if eligible and _better(m, self.best):
            self.best = {**m, "step": self.step, "expected_sparsity": s_hat, "realised_sparsity": realised}
            self.best_state = {
                "student": _clone_state(self.student),
                "gates": _clone_state(self.gates),
                "distiller": None if self.distiller is None else _clone_state(self.distiller),
            }
        return {**m, "expected_sparsity": s_hat, "realised_sparsity": realised, "eligible": eligible}

    def _evaluate_compact(self) -> dict:
        m = evaluate(self.pruned, self.eval_enc, self.labels, device=self.device, bf16=self.cfg.bf16)
        if _better(m, self.best_ft):
            self.best_ft = {**m, "step": self.step}
            self.best_ft_state = _clone_state(self.pruned)
        return {**m, "realised_sparsity": self.pruned.sparsity}

    def _to_compact(self) -> None:
        """Pick the best eligible prune-phase state (else the last one) and prune it."""
        from .pruning import prune

        if self.best_state is not None:
            self.student.load_state_dict(self.best_state["student"])
            self.gates.load_state_dict(self.best_state["gates"])
            if self.distiller is not None and self.best_state["distiller"] is not None:
                self.distiller.load_state_dict(self.best_state["distiller"])
            self.selected = {**self.best, "fallback": False}
        else:
            with torch.no_grad():
                s_hat = float(self.gates.expected_sparsity())
            self.selected = {"step": self.step, "expected_sparsity": s_hat, "fallback": True}
            self.run.log({"event": "warning", "step": self.step,
                          "message": f"no evaluation had expected sparsity within {self.cfg.epsilon} of the target "
                                     f"{self.cfg.target_sparsity}; pruning the last state (expected sparsity {s_hat:.4f})"})
        with torch.no_grad():
            z = self.gates.deterministic()
        self.selected["realised_sparsity"] = self.gates.realised_sparsity(z)
        self.selected_gates = {
            "log_alpha": {t: v.detach().clone().cpu() for t, v in self.gates.log_alpha.items()},
            "z": {t: (None if v is None else v.detach().clone().cpu()) for t, v in z.items()},
        }
        self.student.eval()
        pruned = prune(self.student, self.gates, z)
        self.run.log({"event": "pruned", "step": self.step, **self.selected, "layer_shapes": pruned.layer_shapes()})
        self._become_pruned(pruned)
        self.best_state = None  # no longer needed; keeps checkpoints small

    def _become_pruned(self, pruned) -> None:
        self.pruned = pruned.to(self.device)
        self.pruned.requires_grad_(True)
        if self.cfg.freeze_embeddings:
            _freeze_embeddings(self.pruned)
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
