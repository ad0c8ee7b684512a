"""Optimizer helpers shared by every training loop: parameter groups, frozen embeddings, schedules."""

from __future__ import annotations

import torch
from torch import nn


def decay_groups(module: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name or "ln_" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def is_embedding(name: str) -> bool:
    return "embeddings." in name and "LayerNorm" not in name and ".ln_" not in name


def freeze_embeddings(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if is_embedding(name):
            p.requires_grad_(False)


def linear_schedule(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
