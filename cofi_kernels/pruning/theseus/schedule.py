"""BERT-of-Theseus' replacing-rate schedules (DESIGN §8): the probability p_t that a module
runs its successor at replacing step t.

- linear: ``p_t = min(1, k·t + b)``;
- constant: ``p_t = b`` for ``t < S``, then 1.

``t`` counts the optimizer steps of the replacing phase from 0, so the first
step runs at ``b`` (as the original code's schedulers, which advance their
counter after each optimizer step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SCHEDULES", "ReplaceSchedule"]

SCHEDULES = ("linear", "constant")


@dataclass(frozen=True)
class ReplaceSchedule:
    """A resolved schedule: its kind, the base rate ``b``, and ``k`` (linear) or ``S`` (constant).

    Attributes:
        kind: ``"linear"`` or ``"constant"``.
        base: ``b`` in [0, 1].
        slope: ``k`` >= 0 per optimizer step (linear only; 0 for constant).
        steps: ``S`` >= 0 (constant only; 0 for linear).
    """

    kind: str
    base: float
    slope: float = 0.0
    steps: int = 0

    @classmethod
    def resolve(cls, kind: str, base: float, slope: float, constant_steps: int, full_at: float,
                replace_steps: int) -> "ReplaceSchedule":
        """The schedule of a run with ``replace_steps`` replacing steps.

        A ``slope`` (linear) or ``constant_steps`` (constant) of 0 is derived
        from ``full_at``: p reaches 1 after ``full_at·replace_steps`` steps,
        i.e. ``k = (1 − b)/(full_at·replace_steps)`` or
        ``S = ceil(full_at·replace_steps)``. The values are assumed checked
        (:func:`cofi_kernels.pruning.theseus.loop.check_theseus_config`).
        """
        if kind == "linear":
            k = slope if slope > 0 else (1.0 - base) / (full_at * replace_steps)
            return cls("linear", float(base), float(k), 0)
        s = constant_steps if constant_steps > 0 else math.ceil(full_at * replace_steps)
        return cls("constant", float(base), 0.0, int(s))

    def rate(self, t: int) -> float:
        """``p_t``, the replacing rate of replacing step ``t`` (0-based)."""
        if self.kind == "linear":
            return min(1.0, self.slope * t + self.base)
        return self.base if t < self.steps else 1.0

    def full_at_step(self) -> int | None:
        """The first step ``t`` with ``p_t = 1`` (None when the linear rate never gets there)."""
        if self.kind == "constant":
            return 0 if self.base >= 1.0 else self.steps
        if self.base >= 1.0:
            return 0
        if self.slope <= 0:
            return None
        t = max(0, math.floor((1.0 - self.base) / self.slope) - 1)
        while self.rate(t) < 1.0:  # rounding of k·t + b decides the exact step
            t += 1
        return t

    def to_json(self) -> dict:
        """The schedule as written to ``run.json``."""
        out = {"schedule": self.kind, "base_rate": self.base}
        out.update({"slope": self.slope} if self.kind == "linear" else {"constant_steps": self.steps})
        return out
