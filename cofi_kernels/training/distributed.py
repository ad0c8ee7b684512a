"""Training on several processes (DESIGN §9): ``torch.distributed`` with DDP, started by ``torchrun``.

``torchrun --nproc_per_node N -m cofi_kernels.cli finetune|prune ...`` starts N
copies of the command; :func:`init_distributed` joins them into one process
group (gloo on CPUs, NCCL on GPUs, one GPU per process: ``cuda:LOCAL_RANK``),
N = 1 included. A command started without torchrun's variables runs as one
process without a group or DDP, as before.

What makes N processes compute what one process computes with the same
global batch:

- every process holds the whole model and runs the same steps; each step's
  global batch (``--batch-size``, a slice of the (seed, epoch) permutation)
  is cut into N contiguous parts, one per process (:meth:`World.part`);
- each method's whole loss (student, gates, λ, the layer map, ...) is one
  module wrapped in DDP (:meth:`World.wrap`), and each part's loss is scaled
  so that DDP's average of the gradients is the gradient of the global
  batch's loss (:class:`BatchPart`);
- noise that must agree (gate samples, replacement draws) comes from the step's
  seed, the same on every process; dropout then draws per process
  (:meth:`BatchPart.local_noise`), since each process holds other examples;
- evaluation is sharded by fixed chunks and the logits summed, so every process
  gets the metrics one process would; rank 0 alone writes files.

The results equal one process's up to the order of floating-point sums
(and, with dropout on, up to which dropout masks were drawn).
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import RunError

__all__ = ["DEFAULT_TIMEOUT_S", "BatchPart", "World", "current_world", "init_distributed", "local_device",
           "torchrun_world_size"]

DEFAULT_TIMEOUT_S = 300.0
_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RunError):
    """The process group cannot be formed (or torchrun's variables are wrong); the message says why."""


@dataclass(frozen=True)
class World:
    """The processes of one training job (a single one when not started by torchrun).

    Attributes:
        rank: this process's rank in ``[0, size)``.
        size: the number of processes.
        local_rank: its rank on this machine (which GPU it drives).
        backend: ``"gloo"`` or ``"nccl"``; None when no process group was formed (no torchrun).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when this process is in a process group (started by torchrun, even alone)."""
        return self.backend is not None

    # -- collectives (no-ops for one process) --------------------------------

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (a new tensor; the input's device and dtype)."""
        if not self.distributed:
            return values
        out = values.detach().to(self._device(), copy=True)
        torch.distributed.all_reduce(out)
        return out.to(values.device)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process (pickled between this job's own processes)."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def on_main(self, fn: Callable[[], object]):
        """``fn()`` run on rank 0 only, its result handed to every process, which all return
        once rank 0 is done (what rank 0 wrote is whole by then); an exception it raises is
        raised on every process (same type where it can be rebuilt from its message), so no
        process waits for one that failed."""
        if not self.distributed:
            return fn()
        result = error = None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # handed over, then raised everywhere
                error = (type(e), str(e))
        result, error = self.broadcast((result, error))
        if error is not None:
            kind, message = error
            try:
                exc = kind(message)
            except Exception:  # an exception type that cannot be rebuilt from its message alone
                exc = DistributedError(message)
            raise exc
        return result

    # -- the batch and the model --------------------------------------------

    def part(self, index: Sequence[int], lengths: Sequence[int], *, seed: int, step: int) -> "BatchPart":
        """This process's contiguous part of the global batch ``index`` (``lengths``: real tokens per
        example of the data set). Parts differ in size by at most one; a process whose part is empty
        (a last batch with fewer examples than processes) gets the batch's first example as a
        stand-in with weight 0, so it still runs the same collectives."""
        index = list(index)
        n = len(index)
        lo, hi = self.rank * n // self.size, (self.rank + 1) * n // self.size
        mine, weight = (index[lo:hi], 1.0) if hi > lo else (index[:1], 0.0)
        return BatchPart(mine, n, sum(int(lengths[i]) for i in index), weight, self, seed, step)

    def wrap(self, module: nn.Module, *, varying: bool) -> nn.Module:
        """``module`` in DistributedDataParallel (itself when no process group was formed).

        ``varying``: the set of parameters that receive a gradient changes between steps
        (live-only compute of gated heads and units, Theseus' replaced modules), so DDP must look
        for unused ones after every forward (``find_unused_parameters``); False where every
        trainable parameter gets a gradient at every step.
        """
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.backend == "nccl" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=varying)


@dataclass
class BatchPart:
    """This process's part of one step's global batch, and how its losses combine.

    A loss that is a mean over the global batch's examples (or tokens) is computed
    on each part as its *share*: the part's sum divided by the global count, so the
    shares of all processes add up to the global mean. DDP averages gradients over
    the processes, so the loss a process backpropagates is ``size × share`` plus
    the terms every process computes whole (Lagrangian, regularisers).

    Attributes:
        index: this process's example indices.
        examples: examples in the global batch.
        tokens: real tokens in the global batch.
        weight: 1, or 0 when ``index`` is a stand-in (this process has no example this step).
    """

    index: list[int]
    examples: int
    tokens: int
    weight: float
    world: World
    seed: int
    step: int

    def share(self, total: torch.Tensor) -> torch.Tensor:
        """This part's share of a mean over the global batch's examples: its sum ``total`` over their count."""
        return total * (self.weight / self.examples)

    def backward_loss(self, shares: torch.Tensor, whole: torch.Tensor | float = 0.0) -> torch.Tensor:
        """The loss to backpropagate: ``size × shares + whole`` (see the class docstring)."""
        return shares * self.world.size + whole

    def totals(self, shares: dict[str, torch.Tensor]) -> dict[str, float]:
        """The global values of named shares (summed over the processes in one collective)."""
        if not shares:
            return {}
        names = list(shares)
        summed = self.world.sum(torch.stack([shares[k].detach().float().reshape(()) for k in names]))
        return {k: float(v) for k, v in zip(names, summed.tolist())}

    def local_noise(self) -> None:
        """Reseed torch for the noise each process draws for its own examples (dropout), after the
        draws every process shares; a no-op for one process, whose stream stays as it was."""
        if self.world.size > 1:
            torch.manual_seed((self.seed * 1_000_003 + self.step * 7919 + 104_729 * (self.world.rank + 1))
                              % (2**63 - 1))


_WORLD = World()


def current_world() -> World:
    """The world :func:`init_distributed` joined (a single process before that, or without torchrun)."""
    return _WORLD


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` of torchrun's environment (1 when the process was not started by it)."""
    text = os.environ.get("WORLD_SIZE")
    try:
        return max(1, int(text)) if text else 1
    except ValueError:
        raise DistributedError(f"environment variable WORLD_SIZE must be a whole number, got {text!r}") from None


def _env_int(name: str) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        raise DistributedError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set; start the job "
                               "with torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)")
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"environment variable {name} must be a whole number, got {text!r}") from None


def local_device(device: str | torch.device, world: World | None = None) -> torch.device:
    """The device this process trains on: ``cpu``, or for ``cuda`` the GPU of its ``LOCAL_RANK``
    when several processes run (one GPU per process)."""
    world = world or _WORLD
    d = torch.device(device)
    if d.type != "cuda" or not world.distributed:
        return d
    if d.index is not None:
        raise DistributedError(f"device {str(device)!r}: under torchrun each process drives the GPU of its "
                               "LOCAL_RANK; pass --device cuda")
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise DistributedError(f"process {world.rank} (LOCAL_RANK {world.local_rank}) needs cuda:{world.local_rank}, "
                               f"but this machine has {count} GPU(s); start at most {count} processes per machine")
    return torch.device("cuda", world.local_rank)


def init_distributed(device: str | torch.device = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the process group torchrun's variables describe, once; return the :class:`World`.

    Without torchrun's variables nothing happens and a single-process world without a
    group is returned. Otherwise the backend is NCCL for ``device`` cuda (each process
    on ``cuda:LOCAL_RANK``) and gloo for cpu. Forming the group and every later
    collective wait at most ``timeout_s`` seconds for the other processes.

    Raises:
        DistributedError: missing or malformed variables, a rendezvous that does not
            complete within ``timeout_s`` (an unreachable ``MASTER_ADDR:MASTER_PORT``, a
            process that never starts), or a call with another device type than the first.
    """
    global _WORLD
    import torch.distributed as dist

    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if _WORLD.distributed:
        if _WORLD.backend != backend:
            raise DistributedError(f"the process group uses {_WORLD.backend}; device {str(device)!r} needs {backend}")
        return _WORLD
    size = torchrun_world_size()
    if size == 1 and not all(os.environ.get(name) for name in _ENV):
        return _WORLD
    if not timeout_s > 0:
        raise DistributedError(f"the distributed timeout must be > 0 seconds, got {timeout_s}")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise DistributedError(f"WORLD_SIZE is {size} but {name} is not set; start the job with torchrun")
    if not 0 <= rank < size:
        raise DistributedError(f"RANK {rank} is outside [0, WORLD_SIZE={size})")
    if not dist.is_available():
        raise DistributedError("this build of torch has no torch.distributed")
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    timeout = datetime.timedelta(seconds=timeout_s)
    world = World(rank, size, local_rank, backend)
    if backend == "nccl":
        torch.cuda.set_device(local_device(device, world))
    try:
        with _native_stderr_held():
            store, _, _ = next(dist.rendezvous("env://", rank, size, timeout=timeout))
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"process {rank} of {size} could not join the process group at {where} within {timeout_s:g} s "
            f"({first}); check that every process was started and that MASTER_ADDR:MASTER_PORT is reachable "
            "from every machine (--dist-timeout sets the wait)") from None
    _WORLD = world
    return world


@contextmanager
def _native_stderr_held():
    """Hold back what native code writes to stderr inside the block, and hand it back when the block
    succeeds. The c10d store logs each failed connection attempt with a stack trace; when the
    rendezvous fails, the one-line error says what happened instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if succeeded:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)
