"""Evaluation of a model on encoded data: metrics, and examples per second."""

from __future__ import annotations

import itertools
import time

import torch
from torch import nn

from ..tasks import get_task
from ..tasks.base import Features
from ..tasks.classification import model_outputs
from .distributed import World, current_world


def evaluate(model: nn.Module, data: Features, spec, *, batch_size: int = 64,
             device: str | torch.device = "cpu", bf16: bool = False, world: World | None = None) -> dict[str, float]:
    """Metrics of ``model`` on the encoded ``data`` (eval mode, no gradients) for the task of ``spec``.

    Returns the task's metric dict (:meth:`~cofi_kernels.tasks.base.Task.metrics`):
    ``{"metric": name, name: value, "loss": ..., ...}``, e.g. ``accuracy`` for classification,
    ``pearson`` (plus ``mse``) for regression, ``f1`` for token classification and QA,
    ``cosine_to_teacher`` for embeddings.

    With several processes (``world``, default the current one) each process runs
    every ``size``-th batch of ``batch_size`` features in index order and the outputs
    are summed over the processes, so every process gets exactly the metrics one
    process computes (the same batches, the same numbers).
    """
    task = get_task(spec.task)
    outputs = model_outputs_of(model, task, spec, data, batch_size=batch_size, device=device, bf16=bf16, world=world)
    return task.metrics(outputs, data, data.data, spec)


def model_outputs_of(model: nn.Module, task, spec, data: Features, *, batch_size: int = 64,
                     device: str | torch.device = "cpu", bf16: bool = False, world: World | None = None):
    """``task``'s outputs of ``model`` for every feature of ``data`` (fp32, on the CPU): ``[N, C]``, or
    ``[N, T, C]`` zero-padded to the longest feature for per-token tasks (see :func:`evaluate` for ``world``)."""
    world = world or current_world()
    was_training = model.training
    model.eval()
    per_feature = (data.max_length(), spec.num_outputs) if task.per_token else (spec.num_outputs,)
    outputs = torch.zeros(len(data), *per_feature)
    with torch.no_grad(), autocast(device, bf16):
        for c, index in enumerate(data.in_order(batch_size)):
            if c % world.size == world.rank:
                out = task.outputs(model, data.batch(index, device)).float().cpu()
                if task.per_token:
                    outputs[index, : out.shape[1]] = out
                else:
                    outputs[index] = out
    model.train(was_training)
    return world.sum(outputs)


def teacher_outputs_of(teacher: nn.Module, task, spec, data: Features, device, bf16: bool = False,
                       batch_size: int = 64) -> torch.Tensor:
    """The frozen teacher's outputs for every feature of ``data`` (one process computes all of them):
    the targets of a task that learns from the teacher (embeddings), on the CPU in fp32."""
    from .distributed import World

    return model_outputs_of(teacher, task, spec, data, batch_size=batch_size, device=device, bf16=bf16,
                            world=World())


def autocast(device, bf16: bool):
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bool(bf16) and device.type == "cuda")


def throughput(model: nn.Module, data: Features, *, batch_size: int = 32, repeats: int = 3,
               device: str | torch.device = "cpu", max_examples: int = 256, task=None) -> float:
    """Examples per second of ``model``'s forward over the first ``max_examples`` of ``data``
    (eval mode, no grad): one warm-up pass, then the median of ``repeats`` timed passes. ``task``: whose
    outputs are computed (default classification's: the model's logits)."""
    outputs = model_outputs if task is None else task.outputs
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
                outputs(model, b)
            _sync(device)
            if r:
                times.append(time.perf_counter() - t0)
    times.sort()
    return n / times[len(times) // 2]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
