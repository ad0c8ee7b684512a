"""The one training loop (:class:`Trainer`) and the run machinery it stands on.

A method (fine-tuning, CoFi, ...) describes its run as phases (:class:`Phase`) and
fills in the hooks of :class:`TrainerHooks`: a training step, an evaluation,
the state to keep when an evaluation is the best so far, what happens when a
phase ends, and its own ``state_dict`` / ``load_state_dict``. Everything else
happens here, in one place: seeding, batches, evaluation every N steps,
best-state choice, checkpoints, fingerprints, resume, the progress bar and the
JSON log.

Every run writes into one output directory: a JSON log (``log.jsonl``),
a checkpoint (``checkpoint/state.pt``, replaced atomically every
``checkpoint_every`` steps and at step 0), and at the end the model and
``run.json``. A run killed at any point continues with ``resume=True`` and
ends with the same weights as an uninterrupted run: every step reseeds the
random number generators from ``(seed, step)`` and draws its batch from a
permutation that is a pure function of ``(seed, epoch)``. A checkpoint
records a fingerprint of the settings, the model files and the data, and a
run with a different fingerprint refuses to resume it.

A run holds an exclusive lock on its output directory (:class:`OutputLock`) from
its checks to its end, so a second run into it, fresh or resumed, is refused;
the lock dies with the process, so a killed run never blocks ``resume``. A write
that fails (a full disk) is one :class:`RunError` that leaves the directory
ready for the same call: without a checkpoint yet nothing of the run is left, with
one the last complete checkpoint is kept for ``resume``.

Under torchrun (:mod:`.distributed`) every process runs this loop on its part
of each global batch; rank 0 alone writes the directory, and a checkpoint
records the number of processes, which a resume must match unless asked
otherwise (:data:`ANY_WORLD_SIZE`).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.text import epoch_order, steps_per_epoch
from ..tasks.base import Dataset, Features
from .distributed import BatchPart, World, init_distributed
from .errors import RunError
from ..data.paths import check_output_dir

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
LOG_FILE = "log.jsonl"
RUN_FILE = "run.json"
CHECKPOINT_FORMAT = 2  # 2: the trainer's state and the method's state in separate entries
ANY_WORLD_SIZE = "any-world-size"  # resume=ANY_WORLD_SIZE: continue a checkpoint of another number of processes


class RunStopped(Exception):
    """The run stopped where it was asked to (``stop_at``), with a checkpoint written there;
    continue it with ``resume=True``. ``step`` is the number of steps done."""

    def __init__(self, step: int, out: str):
        super().__init__(f"stopped after step {step} as asked; continue the run in {out!r} with --resume")
        self.step, self.out = step, out


def first_line(e: BaseException) -> str:
    """``"ExceptionType: first line of its message"``, for one-line error reports."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def write_json(path: str, obj) -> None:
    """Write ``obj`` to ``path`` atomically (through ``path + ".tmp"``, left behind when a write fails)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device", also in the messages of torch and safetensors


def is_write_failure(e: BaseException) -> bool:
    """True when ``e`` is the system refusing a write: an OSError, or another library's error
    wrapping a full disk (safetensors, torch)."""
    return isinstance(e, OSError) or NO_SPACE in str(e)


def write_failure_reason(e: BaseException) -> str:
    """What made a write fail, in a few words (``"No space left on device"`` for a full disk)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or NO_SPACE in str(e):
        return NO_SPACE
    return (e.strerror if isinstance(e, OSError) else None) or first_line(e)


def _remove(path: str) -> None:
    """Remove the file or directory tree ``path`` if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except OSError:
            pass


def read_json(path: str):
    """The JSON value in ``path``; :class:`RunError` ``"<path>: unreadable (...)"`` when it cannot be read
    or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise RunError(f"{path}: unreadable ({first_line(e)})") from None


def read_log(directory: str) -> list[dict]:
    """The records of the ``log.jsonl`` in a run directory, one dict per line."""
    with open(os.path.join(directory, LOG_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_digest(data) -> str:
    """SHA-256 of a data set's examples (any task's: each gives its ``rows()``)."""
    h = hashlib.sha256()
    for row in data.rows():
        h.update(json.dumps(row).encode())
    return h.hexdigest()


def model_digest(model_dir: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name.endswith((".safetensors", ".bin", ".json")):
            h.update(name.encode() + file_digest(os.path.join(model_dir, name)).encode())
    return h.hexdigest()


class OutputLock:
    """An exclusive lock on a run's output directory, held for the run's life.

    ``flock`` on a descriptor of the directory itself: no lock file to leave behind
    or to make the directory look used, and the kernel drops the lock when the
    process ends however it ends, so a killed run never blocks ``--resume``.
    Raises :class:`RunError` when another process holds it. A file system that
    cannot lock a directory (NFS emulates ``flock`` with locks that need a file
    open for writing) gets a warning and an unlocked run rather than no run.
    """

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_holder(path)
            by = f" (process {holder})" if holder is not None else ""
            raise RunError(f"output directory {path!r} is in use by another cofi run{by}; wait for it to end "
                           "or choose another --out") from None
        except OSError as e:
            import warnings

            warnings.warn(f"output directory {path!r} cannot be locked on its file system ({e.strerror or e}); "
                          "nothing keeps another run from writing into it at the same time", stacklevel=2)
        # Closing the descriptor releases the lock: on release(), or when the lock is dropped unreleased.
        self.release = weakref.finalize(self, os.close, fd)


def lock_holder(path: str) -> int | None:
    """The process holding a ``flock`` on ``path``, as Linux's /proc/locks tells it; None elsewhere."""
    try:
        st = os.stat(path)
        inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2146594 0 EOF" (waiters have "->" before FLOCK)
                fields = line.split()
                if fields[1:2] == ["FLOCK"] and fields[5:6] == [inode]:
                    return int(fields[4])
    except (OSError, ValueError, IndexError):
        pass
    return None


class RunDirectory:
    """The output directory of one run: log, checkpoint, final files.

    ``resume``: False for a fresh run, True to continue the checkpoint in ``out``
    (written by as many processes as this run has), or :data:`ANY_WORLD_SIZE` to
    continue it whatever the number of processes that wrote it (the global batch
    must still be the same). With several processes only rank 0 reads and writes
    here; the others receive the checkpoint from it, and any error is raised on
    every process.

    Rank 0 holds the directory's :class:`OutputLock` from the checks below (an
    existing directory) or from :meth:`start` (one it creates) until :meth:`finish`,
    :meth:`release` or the end of the process; :class:`Trainer` releases it when
    its run stops early. A failed write raises :class:`RunError` after the cleanup
    that lets the run be started again (:meth:`_failed_write`).
    """

    def __init__(self, out: str, fingerprint: dict, resume: bool | str, kind: str, world: World | None = None):
        # A run under torchrun joins its process group here, whoever called it.
        self.world = world or init_distributed(fingerprint.get("config", {}).get("device", "cpu"))
        # Only rank 0 writes here, so only its machine needs the directory.
        self.out = self.world.on_main(lambda: check_output_dir(out, "output directory", RunError))
        self.fingerprint = fingerprint
        self.kind = kind
        self.any_world_size = resume == ANY_WORLD_SIZE
        if not isinstance(resume, bool) and not self.any_world_size:
            raise RunError(f"resume must be True, False or {ANY_WORLD_SIZE!r}, got {resume!r}")
        self.ckpt_path = os.path.join(self.out, CHECKPOINT_DIR, CHECKPOINT_FILE)
        self.log_path = os.path.join(self.out, LOG_FILE)
        self.log_lines = 0
        self.resumed = None
        self._lock: OutputLock | None = None
        self._created = False  # whether this run created the directory (and removes it when it leaves nothing)
        if resume:
            self.resumed = self.world.on_main(lambda: self._locked(self._load_for_resume))
        else:
            self.world.on_main(lambda: self._locked(self._check_fresh))

    @property
    def is_main(self) -> bool:
        """True in the process that writes this directory (rank 0)."""
        return self.world.is_main

    def release(self) -> None:
        """Give up the lock on the directory (the run is over); a no-op when not held."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _locked(self, check):
        """``check()`` under the directory's lock, taken first when the directory exists, so two runs
        started together cannot both pass it; the lock is released again if ``check`` refuses the run.
        A directory not there yet is locked by :meth:`start`, which creates it and checks again."""
        try:
            if self._lock is None and os.path.isdir(self.out):
                self._lock = OutputLock(self.out)
            return check()
        except BaseException:
            self.release()
            raise

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
        state = load_checkpoint(self.ckpt_path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise RunError(f"--resume: {self.ckpt_path!r} is not a checkpoint of this version of cofi_kernels")
        theirs = state.get("fingerprint", {})
        batch, their_batch = (f.get("config", {}).get("batch_size") for f in (self.fingerprint, theirs))
        if state.get("kind") == self.kind and batch != their_batch:
            raise RunError(f"--resume: the checkpoint in {self.out!r} was written with a global batch of "
                           f"{their_batch} examples, this run has {batch}; rerun with --batch-size {their_batch}")
        if state.get("kind") != self.kind or theirs != self.fingerprint:
            diff = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
            raise RunError(
                f"--resume: the checkpoint in {self.out!r} is from another run (kind {state.get('kind')!r}; "
                f"differs in: {', '.join(diff) or 'kind'}); rerun with that run's arguments or choose another --out"
            )
        theirs_n = state.get("world_size", 1)
        if theirs_n != self.world.size and not self.any_world_size:
            raise RunError(
                f"--resume: the checkpoint in {self.out!r} was written by {theirs_n} process(es), this run has "
                f"{self.world.size}; start as many, or add --allow-world-size-change (same global batch, results "
                "equal up to the order of floating-point sums)")
        return state

    def start(self) -> None:
        """Create the directory (fresh run) or cut the log back to the checkpoint (resume)."""
        self.world.on_main(self._start_checked)
        if self.resumed is not None:
            self.log_lines = int(self.resumed["log_lines"])

    def _start_checked(self) -> None:
        try:
            if self._lock is None:
                self._create_locked()
            self._start()
        except OSError as e:
            raise self._failed_write(e, self._name(e.filename), self.log_path + ".tmp") from e

    def _create_locked(self) -> None:
        """Create the directory of a fresh run, lock it, and check again that it is new or empty (another
        run may have taken it since the first check)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        try:
            os.mkdir(self.out)
            self._created = True
        except FileExistsError:
            pass
        self._locked(self._check_fresh)

    def _start(self) -> None:
        os.makedirs(os.path.join(self.out, CHECKPOINT_DIR), exist_ok=True)
        if self.resumed is None:
            open(self.log_path, "w").close()
            return
        self.log_lines = int(self.resumed["log_lines"])
        lines = []
        if os.path.isfile(self.log_path):
            with open(self.log_path) as f:
                lines = f.readlines()[: self.log_lines]
        tmp = self.log_path + ".tmp"  # cut back atomically: a failed write leaves the log the checkpoint knows
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.log_path)

    def _name(self, path: str | None) -> str | None:
        """How a message names ``path``: relative to the directory when inside it (None for the directory)."""
        if path is None:
            return None
        rel = os.path.relpath(path, self.out)
        return None if rel == "." else repr(path) if rel.startswith("..") else rel

    def _failed_write(self, e: BaseException, what: str | None, tmp: str | None = None) -> RunError:
        """The error of a write (of ``what``, :meth:`_name`) that failed, once the directory is left ready
        for a rerun: ``tmp``, the write's temporary file, is removed; a fresh run without a checkpoint yet
        removes everything it wrote (the same command starts again), any other keeps its last complete
        checkpoint (--resume). The run is over: the lock is released."""
        if tmp is not None:
            _remove(tmp)
        if os.path.isfile(self.ckpt_path):
            hint = "its last checkpoint is kept: free some space and continue with --resume"
        else:
            if self.resumed is None and self._lock is not None:  # unlocked, the files may be another run's
                self._remove_own_files()
            hint = "nothing of this run is kept: free some space and run the same command again"
        self.release()
        where = f" while writing {what}" if what else ""
        return RunError(f"output directory {self.out!r} cannot be written ({write_failure_reason(e)}){where}; {hint}")

    def _remove_own_files(self) -> None:
        """Remove what a fresh run writes before its first checkpoint (the directory, if it created it)."""
        for name in (LOG_FILE, LOG_FILE + ".tmp", CHECKPOINT_DIR):
            _remove(os.path.join(self.out, name))
        if self._created:
            try:
                os.rmdir(self.out)
            except OSError:
                pass

    def records(self) -> list[dict]:
        """The records of ``log.jsonl`` so far (rank 0, which writes it)."""
        return read_log(self.out)

    def log(self, record: dict) -> None:
        """Append ``record`` to ``log.jsonl`` (rank 0 only)."""
        if not self.is_main:
            return
        try:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a line cut short is dropped by a resume, which keeps the checkpoint's lines
            raise self._failed_write(e, LOG_FILE) from e
        self.log_lines += 1

    def save_checkpoint(self, state: dict) -> None:
        """Write ``state`` atomically (rank 0 only)."""
        if not self.is_main:
            return
        state = {"format": CHECKPOINT_FORMAT, "kind": self.kind, "fingerprint": self.fingerprint,
                 "log_lines": self.log_lines, "world_size": self.world.size, **state}
        tmp = self.ckpt_path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.ckpt_path)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            raise self._failed_write(e, f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}", tmp) from e

    def write(self, fn) -> None:
        """Run ``fn()`` (which writes outputs into the directory) on rank 0; every process returns
        once it is done (or raises its error). A failed write removes the files ``fn`` created, so no
        half-written model is left beside the checkpoint that ``--resume`` continues."""
        try:
            self.world.on_main(lambda: self._write_outputs(fn))
        except BaseException:
            self.release()
            raise

    def _write_outputs(self, fn) -> None:
        before = set(os.listdir(self.out))
        try:
            fn()
        except Exception as e:
            if not is_write_failure(e):
                raise
            for name in set(os.listdir(self.out)) - before:
                _remove(os.path.join(self.out, name))
            raise self._failed_write(e, self._name(getattr(e, "filename", None)) or "the model") from e

    def finish(self, summary: dict) -> None:
        """Write ``run.json`` (``summary`` plus the number of processes and the global batch) and drop the
        checkpoint; every process returns once that is done."""
        batch = self.fingerprint.get("config", {}).get("batch_size")
        summary = {**summary, "world_size": self.world.size, "global_batch": batch}

        def _finish():
            path = os.path.join(self.out, RUN_FILE)
            try:
                write_json(path, summary)
            except OSError as e:
                raise self._failed_write(e, RUN_FILE, path + ".tmp") from e
            shutil.rmtree(os.path.join(self.out, CHECKPOINT_DIR), ignore_errors=True)

        try:
            self.world.on_main(_finish)
        finally:
            self.release()


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by :meth:`RunDirectory.save_checkpoint`, through torch's weights-only
    unpickler (it builds tensors and plain containers, never runs code from the file)."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            # torch warns about a foreign file's pickle protocol just before refusing it.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise RunError(f"--resume: {path!r} is not a checkpoint written by cofi_kernels (it holds objects other "
                       "than tensors and plain values, which are never loaded)") from None
    except Exception as e:
        raise RunError(f"--resume: checkpoint {path!r} cannot be read ({first_line(e)})") from None


def seed_step(seed: int, step: int) -> None:
    """Reseed torch for training step ``step`` of a run seeded with ``seed``."""
    # One fresh stream per step (dropout, gate noise, new weights) so a resumed run repeats it exactly.
    torch.manual_seed((seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1))


def batch_at(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The example indices of step ``step``: its slice of the (seed, epoch) permutation."""
    spe = steps_per_epoch(n, batch_size)
    return epoch_order(n, batch_size, seed, step // spe)[step % spe]


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict (for best-state snapshots)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` steps starting at ``initial``, or None when not ``enabled``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm  # a declared dependency

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0, leave=True)


def better(new: dict, old: dict | None) -> bool:
    """True when the metric dict ``new`` beats ``old`` (higher is better; any beats None)."""
    return old is None or new[new["metric"]] > old[old["metric"]]


@dataclass
class RunResult:
    """What a finished run returns (and writes to ``run.json``)."""

    out: str
    metrics: dict
    steps: int
    seconds: float
    extra: dict = field(default_factory=dict)


def run_fingerprint(config, *, models: Mapping[str, str | None] = {}, data: Mapping[str, Dataset] = {},
                    **extra) -> dict:
    """What identifies a run for ``--resume``: its settings (a dataclass), the SHA-256 of the
    model directories and of the data, and any ``extra`` JSON values."""
    out = {"config": json.loads(json.dumps(dataclasses.asdict(config)))}
    out.update({k: None if v is None else model_digest(v) for k, v in models.items()})
    out.update({k: data_digest(v) for k, v in data.items()})
    out.update(extra)
    return out


# ---------------------------------------------------------------------- the trainer


@dataclass(frozen=True)
class Phase:
    """A stretch of a run: ``steps`` optimizer steps, evaluated every ``eval_every`` steps
    and at its end (``eval_every = 0``: never evaluated)."""

    name: str
    steps: int
    eval_every: int = 0


@dataclass
class Evaluation:
    """What :meth:`TrainerHooks.evaluate` returns.

    Attributes:
        record: logged to ``log.jsonl`` as the evaluation (besides event, phase and step).
        metrics: the metric dict (``{"metric": name, name: value, ...}``) that competes for the
            phase's best state, or None when nothing was evaluated.
        eligible: False keeps an evaluated state out of the best-state choice.
    """

    record: dict
    metrics: dict | None = None
    eligible: bool = True


class TrainerHooks:
    """The parts of a run that a method fills in; :class:`Trainer` calls them.

    Only :meth:`train_step` is required. Steps are counted over the whole run
    (all phases); ``step`` is the number of steps done before the call.

    With several processes every process calls the same hooks in the same order;
    ``train_step`` sees this process's part of the global batch, and what it
    returns must already be the global values (:meth:`BatchPart.totals`), as
    only rank 0's record is logged.
    """

    def on_start(self, step: int, examples: list[int]) -> None:
        """Before the first step this process runs (after a resume, at the restored step);
        ``examples``: the training examples this process will train on from ``step`` to the
        end, ascending (what a cache of teacher outputs needs)."""

    def train_step(self, phase: str, step: int, batch: dict, part: BatchPart) -> dict:
        """One optimizer step on ``batch``, this process's part (``part.index``) of the
        step's global batch; returns the step's record (``"loss"`` at least), logged and
        shown on the progress bar."""
        raise NotImplementedError

    def evaluate(self, phase: str, step: int) -> Evaluation:
        """Evaluate after ``step`` steps; only called in phases with ``eval_every > 0``."""
        raise NotImplementedError(f"{type(self).__name__} evaluates in phase {phase!r} but has no evaluate hook")

    def snapshot(self, phase: str) -> dict:
        """The state to keep when an evaluation of ``phase`` is its best so far."""
        return {}

    def end_phase(self, phase: str, best: dict | None, best_state: dict | None) -> bool:
        """``phase`` has done its last step (``best``: its best evaluation with ``step``, and
        that state, or None). Return True when this changed the state a checkpoint holds."""
        return False

    def state_dict(self) -> dict:
        """The method's state for a checkpoint (models, optimizers, ...)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def postfix(self, phase: str, record: dict) -> dict:
        """What the progress bar shows after a step."""
        return {"loss": f"{record['loss']:.4f}"}


class Trainer:
    """Runs a method's phases: one seeded step after another, evaluations, best states, checkpoints.

    Every step reseeds torch from ``(seed, step)`` and draws its batch from the
    permutation of ``(seed, epoch)`` (:func:`batch_at`), so a run resumed from
    any checkpoint repeats the uninterrupted run exactly (same thread count
    and number of processes). Each process trains on its part of that global
    batch (:meth:`~.distributed.World.part`).
    A checkpoint is written at step 0, every ``checkpoint_every`` steps, at
    the last step and after a phase end that changed the state; each write is
    atomic. The best evaluation of each phase (by its metric, among eligible
    ones) and a snapshot of its state are kept and handed to
    :meth:`TrainerHooks.end_phase`.

    Args:
        run: the run directory (fingerprint checked; holds the checkpoint to resume).
        hooks: the method.
        phases: the run's phases, in order.
        data: the encoded training data.
        seed, batch_size, device: of the batches.
        checkpoint_every: steps between checkpoints.
        description: the progress bar's label.
    """

    def __init__(self, run: RunDirectory, hooks: TrainerHooks, phases: Sequence[Phase], data: Features, *, seed: int,
                 batch_size: int, device, checkpoint_every: int, description: str):
        self.run, self.hooks, self.phases, self.data = run, hooks, list(phases), data
        self.seed, self.batch_size, self.device = seed, batch_size, torch.device(device)
        self.checkpoint_every, self.description = checkpoint_every, description
        self.world = run.world
        if batch_size < self.world.size:
            raise RunError(f"batch_size (the global batch) is {batch_size} but {self.world.size} processes run; "
                           "give each process at least one example per step (--batch-size >= the processes)")
        self.lengths = [len(ids) for ids in data.input_ids]
        self.total = sum(p.steps for p in self.phases)
        self.step = 0
        self.seconds = 0.0
        self.best: dict[str, dict] = {}
        self.best_state: dict[str, dict] = {}
        self.ended: list[str] = []

    # -- phases -------------------------------------------------------------

    def _phase_at(self, step: int) -> tuple[Phase, int]:
        start = 0
        for p in self.phases:
            if step < start + p.steps:
                return p, start
            start += p.steps
        raise IndexError(step)

    # -- checkpoints --------------------------------------------------------

    def state_dict(self) -> dict:
        return {"trainer": {"step": self.step, "seconds": self.seconds, "best": self.best,
                            "best_state": self.best_state, "ended": self.ended},
                "method": self.hooks.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        t = state["trainer"]
        self.step, self.seconds = t["step"], t["seconds"]
        self.best, self.best_state, self.ended = t["best"], t["best_state"], list(t["ended"])
        self.hooks.load_state_dict(state["method"])

    def checkpoint(self) -> None:
        if self.run.is_main:
            self.run.save_checkpoint(self.state_dict())

    def _part(self, step: int, batch: list[int] | None = None) -> BatchPart:
        """This process's part of the global batch of ``step`` (``batch``, when the caller has it)."""
        if batch is None:
            batch = batch_at(step, len(self.data), self.batch_size, self.seed)
        return self.world.part(batch, self.lengths, seed=self.seed, step=step)

    def examples_ahead(self, step: int) -> list[int]:
        """The training examples this process takes from ``step`` to the end, ascending."""
        n, seen = len(self.data), set()
        spe = steps_per_epoch(n, self.batch_size)
        for epoch in range(step // spe, -(-self.total // spe)):  # one permutation per epoch, not per step
            batches = epoch_order(n, self.batch_size, self.seed, epoch)
            for s in range(max(step, epoch * spe), min(self.total, (epoch + 1) * spe)):
                seen.update(self._part(s, batches[s - epoch * spe]).index)
        return sorted(seen)

    # -- the loop -----------------------------------------------------------

    def fit(self, progress: bool = True, stop_at: int | None = None) -> None:
        """Run (or, from the run directory's checkpoint, continue) every phase to its end.

        ``stop_at``: stop once that many steps (counted over the whole run) are done, with a
        checkpoint written there, by raising :class:`RunStopped` (a job with a time limit
        continues later with ``resume``); None or a step at or past the end runs to the end.
        """
        try:
            self._fit(progress, stop_at)
        except BaseException:
            self.run.release()  # the run stopped here: a resume, even in this process, must find it free
            raise

    def _fit(self, progress: bool, stop_at: int | None) -> None:
        if stop_at is not None and (isinstance(stop_at, bool) or not isinstance(stop_at, int) or stop_at < 1):
            raise RunError(f"stop_at (--stop-at-step) must be a whole number >= 1, got {stop_at!r}")
        self.run.start()
        if self.run.resumed is not None:
            self.load_state_dict(self.run.resumed)
            self.run.log({"event": "resume", "step": self.step})
        else:
            self.checkpoint()  # a run killed before its first interval still resumes
        if self.step < self.total:
            self.hooks.on_start(self.step, self.examples_ahead(self.step))
        bar = progress_bar(self.total, self.step, self.description, progress and self.run.is_main)
        try:
            self._steps(bar, stop_at)
        finally:
            if bar is not None:
                bar.close()

    def _steps(self, bar, stop_at: int | None) -> None:
        t0 = time.perf_counter() - self.seconds
        while self.step < self.total:
            if stop_at is not None and self.step >= stop_at:
                self.checkpoint()
                raise RunStopped(self.step, self.run.out)
            phase, start = self._phase_at(self.step)
            seed_step(self.seed, self.step)
            part = self._part(self.step)
            record = self.hooks.train_step(phase.name, self.step, self.data.batch(part.index, self.device), part)
            self.step += 1
            self.seconds = time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix({"phase": phase.name, **self.hooks.postfix(phase.name, record)}, refresh=False)
            self.run.log({"event": "step", "phase": phase.name, "step": self.step, **record,
                          "seconds": round(self.seconds, 3)})
            at_end = self.step == start + phase.steps
            if phase.eval_every and (at_end or (self.step - start) % phase.eval_every == 0):
                self._evaluate(phase.name, bar)
            changed = False
            if at_end and phase.name not in self.ended:
                changed = self.hooks.end_phase(phase.name, self.best.get(phase.name),
                                               self.best_state.get(phase.name))
                self.ended.append(phase.name)
                self.best_state.pop(phase.name, None)  # handed over; keeps checkpoints small
                self.seconds = time.perf_counter() - t0
            if changed or self.step % self.checkpoint_every == 0 or self.step == self.total:
                self.checkpoint()

    def _evaluate(self, phase: str, bar) -> None:
        ev = self.hooks.evaluate(phase, self.step)
        self.run.log({"event": "eval", "phase": phase, "step": self.step, **ev.record})
        m = ev.metrics
        if m is None:
            return
        if bar is not None:
            extra = "".join(f", {k.replace('_', ' ')} {ev.record[k]:.4f}"
                            for k in ("realised_sparsity", "expected_sparsity") if k in ev.record)
            bar.write(f"step {self.step} ({phase}): eval {m['metric']} {m[m['metric']]:.4f}{extra}")
        if ev.eligible and better(m, self.best.get(phase)):
            self.best[phase] = {**m, "step": self.step}
            self.best_state[phase] = self.hooks.snapshot(phase)
