"""Evaluation of a model on encoded data: metrics, and examples per second."""

from __future__ import annotations

import itertools
import time

import torch
from torch import nn

from ..models.pruned_model import PrunedModel
from ..data.text import Encoded, LabelSpace
from .distill import task_loss
from .distributed import World, current_world


def evaluate(model: nn.Module, data: Encoded, labels: LabelSpace, *, batch_size: int = 64,
             device: str | torch.device = "cpu", bf16: bool = False, world: World | None = None) -> dict[str, float]:
    """Metrics of ``model`` on ``data`` (eval mode, no gradients).

    Returns ``{"metric": name, name: value, "loss": ...}`` with ``accuracy`` for
    classification and ``pearson`` (plus ``mse``) for regression.

    With several processes (``world``, default the current one) each process runs
    every ``size``-th batch of ``batch_size`` examples in index order and the logits
    are summed over the processes, so every process gets exactly the metrics one
    process computes (the same batches, the same numbers).
    """
    world = world or current_world()
    was_training = model.training
    model.eval()
    logits = torch.zeros(len(data), labels.num_labels)
    with torch.no_grad(), autocast(device, bf16):
        for c, index in enumerate(data.in_order(batch_size)):
            if c % world.size == world.rank:
                logits[index] = model_outputs(model, data.batch(index, device)).float().cpu()
    model.train(was_training)
    return metrics_of(world.sum(logits), data.targets, labels)


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


def model_outputs(model, b, output_hidden_states: bool = False):
    if isinstance(model, PrunedModel):
        return model(b["input_ids"], b["attention_mask"], b["token_type_ids"], output_hidden_states=output_hidden_states)
    out = model(
        input_ids=b["input_ids"],
        attention_mask=b["attention_mask"],
        token_type_ids=b["token_type_ids"],
        output_hidden_states=output_hidden_states,
    )
    return (out.logits, list(out.hidden_states[1:])) if output_hidden_states else out.logits


def autocast(device, bf16: bool):
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
                model_outputs(model, b)
            _sync(device)
            if r:
                times.append(time.perf_counter() - t0)
    times.sort()
    return n / times[len(times) // 2]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
