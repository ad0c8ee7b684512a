"""The machinery every training run shares: its directory, checkpoints, seeding and batches.

Every run writes into one output directory: a JSON log (``log.jsonl``),
a checkpoint (``checkpoint/state.pt``, replaced atomically every
``checkpoint_every`` steps and at step 0), and at the end the model and
``run.json``. A run killed at any point continues with ``resume=True`` and
ends with the same weights as an uninterrupted run: every step reseeds the
random number generators from ``(seed, step)`` and draws its batch from a
permutation that is a pure function of ``(seed, epoch)``. A checkpoint
records a fingerprint of the settings, the model files and the data, and a
run with a different fingerprint refuses to resume it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import TextDataset, epoch_order, steps_per_epoch

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
LOG_FILE = "log.jsonl"
RUN_FILE = "run.json"
CHECKPOINT_FORMAT = 1


class RunError(ValueError):
    """A run cannot start or resume (bad setting, output directory in use, foreign checkpoint,
    unusable model directory); the message says what to do."""


def check_common(cfg, where: str) -> None:
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


def first_line(e: BaseException) -> str:
    """``"ExceptionType: first line of its message"``, for one-line error reports."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_digest(data: TextDataset) -> str:
    h = hashlib.sha256()
    for i in range(len(data)):
        h.update(json.dumps([data.texts[i], None if data.text_pairs is None else data.text_pairs[i], data.labels[i]]).encode())
    return h.hexdigest()


def model_digest(model_dir: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name.endswith((".safetensors", ".bin", ".json")):
            h.update(name.encode() + file_digest(os.path.join(model_dir, name)).encode())
    return h.hexdigest()


class RunDirectory:
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
            raise RunError(f"--resume: checkpoint {self.ckpt_path!r} cannot be read ({first_line(e)})") from None
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
        write_json(os.path.join(self.out, RUN_FILE), summary)
        shutil.rmtree(os.path.join(self.out, CHECKPOINT_DIR), ignore_errors=True)


def seed_step(seed: int, step: int) -> None:
    # One fresh stream per step (dropout, gate noise, new weights) so a resumed run repeats it exactly.
    torch.manual_seed((seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1))


def batch_at(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    spe = steps_per_epoch(n, batch_size)
    return epoch_order(n, batch_size, seed, step // spe)[step % spe]


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # a declared dependency

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0, leave=True)


def better(new: dict, old: dict | None) -> bool:
    return old is None or new[new["metric"]] > old[old["metric"]]


@dataclass
class RunResult:
    """What a finished run returns (and writes to ``run.json``)."""

    out: str
    metrics: dict
    steps: int
    seconds: float
    extra: dict = field(default_factory=dict)
