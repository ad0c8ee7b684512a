"""Scratch-E and Scratch-B: how many epochs a from-scratch run of a pruned architecture gets.

Liu et al. (ICLR 2019, "Rethinking the Value of Network Pruning") compare a
pruned model with the same architecture trained from scratch under two budgets:

- **Scratch-E**: as many epochs as the pruning run trained in total;
- **Scratch-B**: as much computation as the pruning run spent on the dense
  model, i.e. those epochs × FLOPs(dense) / FLOPs(pruned), at most 2× the epochs
  (the cap of their ImageNet scripts).

Here the pruning run's epochs are read from its ``run.json``: the top-level
``epochs`` when a method records its total, else CoFi's phases
``config.distill_epochs + config.prune_epochs + config.finetune_epochs``. FLOPs
per token come from the per-layer shapes
(:func:`cofi_kernels.models.size.encoder_flops_per_token`) at the pruning run's
``config.max_length``; the dense model is the pruned one's original sizes
(``original_*`` of its ``cofi_config.json``).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from ...models.size import dense_encoder_flops_per_token, encoder_flops_per_token
from ...training.trainer import RUN_FILE, RunError, read_json

__all__ = ["BUDGETS", "B_CAP", "Budget", "architecture_flops", "pruning_run_record", "scratch_budget"]

BUDGETS = ("E", "B")
B_CAP = 2.0  # Scratch-B trains at most this many times the pruning run's epochs
_COFI_PHASES = ("distill_epochs", "prune_epochs", "finetune_epochs")


@dataclass(frozen=True)
class Budget:
    """The epochs of a scratch run and how they were reached (recorded in its ``run.json``).

    Attributes:
        rule: ``"E"`` or ``"B"``.
        pruning_epochs: the pruning run's epochs in total.
        max_length: the pruning run's tokens per sequence (attention's FLOPs).
        dense_flops, pruned_flops: forward FLOPs per token of the dense and the pruned encoder.
        ratio: ``dense_flops / pruned_flops`` (``inf`` for an encoder with no FLOPs left).
        factor: 1 for Scratch-E; ``min(ratio, B_CAP)`` for Scratch-B.
        capped: Scratch-B's ratio exceeded the cap.
        epochs: ``pruning_epochs · factor``, the scratch run's epochs.
    """

    rule: str
    pruning_epochs: float
    max_length: int
    dense_flops: int
    pruned_flops: int
    ratio: float
    factor: float
    capped: bool
    epochs: float

    def to_json(self) -> dict:
        """The fields as a JSON-safe dict (an infinite ratio as None)."""
        d = asdict(self)
        d["ratio"] = None if math.isinf(self.ratio) else self.ratio
        return d


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pruning_run_record(architecture_dir: str) -> tuple[float, int]:
    """``(epochs in total, max_length)`` of the pruning run whose output is ``architecture_dir``.

    Read from its ``run.json`` (see the module docstring). :class:`RunError` naming
    ``--architecture`` when the file is missing or unreadable or lacks either value.
    """
    path = os.path.join(architecture_dir, RUN_FILE)
    where = f"--architecture {architecture_dir!r}"
    if not os.path.isfile(path):
        raise RunError(f"{where} has no {RUN_FILE}; the scratch budget is the pruning run's epochs, read from "
                       "there: give the output directory of a finished `cofi prune` run")
    run = read_json(path)
    config = run.get("config") if isinstance(run, dict) else None
    config = config if isinstance(config, dict) else {}
    if isinstance(run, dict) and _number(run.get("epochs")) and run["epochs"] > 0:
        epochs = float(run["epochs"])
    elif all(_number(config.get(k)) and config[k] >= 0 for k in _COFI_PHASES) and sum(config[k] for k in _COFI_PHASES) > 0:
        epochs = float(sum(config[k] for k in _COFI_PHASES))
    else:
        raise RunError(f"{path}: records no epochs of the pruning run (neither 'epochs' nor config "
                       f"{', '.join(_COFI_PHASES)}); the scratch budget is read from them")
    max_length = config.get("max_length")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise RunError(f"{path}: records no max_length of the pruning run (config.max_length); Scratch-B's "
                       "attention FLOPs are counted at it")
    return epochs, max_length


def architecture_flops(config: dict, seq_len: int) -> tuple[int, int]:
    """``(dense, pruned)`` forward FLOPs per token of a pruned model's ``cofi_config.json`` dict."""
    heads = [s["heads"] or 0 for s in config["layers"]]
    units = [s["ffn_width"] or 0 for s in config["layers"]]
    pruned = encoder_flops_per_token(heads, units, config["hidden_size"], config["head_dim"], seq_len)
    dense = dense_encoder_flops_per_token(config["num_layers"], config["original_num_heads"], config["head_dim"],
                                          config["original_intermediate_size"], config["original_hidden_size"],
                                          seq_len)
    return dense, pruned


def scratch_budget(config: dict, pruning_epochs: float, max_length: int, rule: str) -> Budget:
    """The :class:`Budget` of rule ``"E"`` or ``"B"`` for the architecture ``config``
    (a ``cofi_config.json`` dict) pruned by a run of ``pruning_epochs`` at ``max_length``."""
    if rule not in BUDGETS:
        raise RunError(f"prune: budget must be 'E' or 'B', got {rule!r}")
    dense, pruned = architecture_flops(config, max_length)
    ratio = dense / pruned if pruned else math.inf
    factor = 1.0 if rule == "E" else min(ratio, B_CAP)
    return Budget(rule, pruning_epochs, max_length, dense, pruned, ratio, factor,
                  rule == "B" and ratio > B_CAP, pruning_epochs * factor)
