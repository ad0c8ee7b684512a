"""The sparsity trajectory of a CoFi run: ``lagrangian.png`` beside the pruned model.

Drawn from the prune-phase records of the run's ``log.jsonl``: how far the expected
sparsity ŝ was from the step's target t, and the multipliers λ1, λ2 that push it there.
"""

from __future__ import annotations

import os

from ...models.plots import save_figure

__all__ = ["LAGRANGIAN_NAME", "draw_epsilon_lines", "draw_trajectory", "prune_steps", "write_lagrangian_png"]

LAGRANGIAN_NAME = "lagrangian.png"


def prune_steps(records) -> list[dict]:
    """The prune-phase step records of a run log (dicts as in ``log.jsonl``), in step order."""
    return [r for r in records if r.get("event") == "step" and r.get("phase") == "prune"]


def draw_trajectory(ax, steps: list[dict], label: str | None = None, **style) -> None:
    """Plot ŝ − t against the step on a matplotlib axis, one line per call."""
    ax.plot([r["step"] for r in steps], [r["expected_sparsity"] - r["target"] for r in steps], label=label,
            linewidth=1.0, **style)


def draw_epsilon_lines(ax, epsilon: float) -> None:
    """Horizontal lines at ±``epsilon`` (solid) and ±2·``epsilon`` (dashed) on a matplotlib axis."""
    for k, style in ((1, "-"), (2, "--")):
        for sign in (-1, 1):
            ax.axhline(sign * k * epsilon, color="#718096", linestyle=style, linewidth=0.8)


def write_lagrangian_png(records, directory: str | os.PathLike, target: float, epsilon: float,
                         warmup_end: int | None = None) -> str:
    """Write ``lagrangian.png`` into ``directory`` and return its path.

    Top: ŝ − t per prune step; shaded, the band [−``epsilon``, 0] that ``hold_target`` keeps it in;
    solid lines at ±``epsilon`` (the best state is chosen within them), dashed at ±2·``epsilon``;
    a dotted vertical line where the target stops growing (``warmup_end``, a step number).
    Bottom: λ1 and λ2. ``records`` are the run's log records; ``ValueError`` when they hold no
    prune step.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = prune_steps(records)
    if not steps:
        raise ValueError("write_lagrangian_png: the records hold no prune-phase step")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    fig = Figure(figsize=(8.0, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    draw_trajectory(top, steps, color="#2b6cb0")
    draw_epsilon_lines(top, epsilon)
    top.axhspan(-epsilon, 0.0, color="#bee3f8", alpha=0.5, linewidth=0)
    top.axhline(0.0, color="black", linewidth=0.6)
    top.set_ylabel("expected sparsity − target")
    xs = [r["step"] for r in steps]
    bottom.plot(xs, [r["lambda_1"] for r in steps], label="λ1", color="#c05621", linewidth=1.0)
    bottom.plot(xs, [r["lambda_2"] for r in steps], label="λ2", color="#2f855a", linewidth=1.0)
    bottom.set_ylabel("multiplier")
    bottom.set_xlabel("step")
    bottom.legend(loc="best", fontsize=8, frameon=False)
    if warmup_end is not None:
        for ax in (top, bottom):
            ax.axvline(warmup_end, color="#a0aec0", linestyle=":", linewidth=0.8)
    fig.suptitle(f"CoFi prune phase, target {target:g}: ±{epsilon:g} solid, ±{2 * epsilon:g} dashed, "
                 f"held band [−{epsilon:g}, 0] shaded; dotted: end of the target's warm-up", fontsize=9)
    return save_figure(fig, directory, LAGRANGIAN_NAME)
