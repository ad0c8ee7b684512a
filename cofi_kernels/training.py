"""Training runs: the shared machinery and :func:`finetune` (the teacher).

Every run writes into one output directory: a JSON log (``log.jsonl``),
a checkpoint (``checkpoint/state.pt``, replaced atomically every
``checkpoint_every`` steps and at step 0), and at the end the model and
``run.json``. A run killed at any point continues with ``resume=True`` and
ends with the same weights as an uninterrupted run: every step reseeds the
random number generators from ``(seed, step)`` and draws its batch from a
permutation that is a pure function of ``(seed, epoch)``. A checkpoint
records a fingerprint of the settings, the model files and the data, and a
run with a different fingerprint refuses to resume it.

The CoFi loop itself (:func:`~cofi_kernels.prune_loop.cofi_prune`) lives in
:mod:`cofi_kernels.prune_loop` and uses the helpers here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import Encoded, LabelSpace, TextDataset, epoch_order, steps_per_epoch
from .distill import task_loss

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
LOG_FILE = "log.jsonl"
RUN_FILE = "run.json"
TASK_FILE = "cofi_task.json"
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
    batches = [data.batch(ix, device) for ix in itertools.islice(data.in_order(batch_size), -(-n // batch_size))]
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


def _decay_groups(module: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
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
    from tqdm.auto import tqdm  # a declared dependency

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
