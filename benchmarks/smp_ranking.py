"""SMP's ranking over training, from the ``ranking`` records of runs' ``log.jsonl``: one picture and one table.

Every ``ranking`` record (ten per epoch, :mod:`cofi_kernels.pruning.static.loop`) holds the share of the
kept set at the final remaining fraction that the previous record's scores kept too, the scores'
statistics and the mean absolute gradient on the scores from the regulariser and from the task loss.
The step records hold the task loss and ``λ·mean σ(S)``. This script draws the overlap against the
step for each run (and below it the task loss of every step) and tabulates, per run, those figures at
a quarter, half, three quarters and the end of the run.

Usage:

    .venv/bin/python benchmarks/smp_ranking.py --out benchmarks/results/smp_ranking \\
        "before (defaults of 2026-12-05)=RUN_DIR_1" "after (new defaults)=RUN_DIR_2"

writes ``OUT.png`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os


def read_log(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _at_fractions(records: list[dict], total: int) -> list[dict]:
    out = []
    for frac in (0.25, 0.5, 0.75, 1.0):
        want = frac * total
        r = min(records, key=lambda r: abs(r["step"] - want))
        if r not in out:  # a run stopped early has fewer distinct records
            out.append(r)
    return out


def table(runs: dict[str, list[dict]]) -> list[str]:
    lines = ["| run | step | v | overlap with previous | score mean ± std | task loss | λ·mean σ(S) | "
             "regulariser share of the loss | regulariser share of the score gradient |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, log in runs.items():
        steps = {r["step"]: r for r in log if r.get("event") == "step"}
        ranking = [r for r in log if r.get("event") == "ranking" and r["overlap_with_previous"] is not None]
        total = max(steps) + 1
        for r in _at_fractions(ranking, total):
            s = steps.get(r["step"] - 1)  # the step record of the step that ended here
            reg = s["lambda"] * s["regulariser"]
            share = reg / (reg + s["task"]) if reg + s["task"] else 0.0
            grad = r.get("regulariser_gradient_share")
            lines.append(f"| {name} | {r['step']} | {s['remaining']:.3f} | {r['overlap_with_previous']:.3f} | "
                         f"{r['score_mean']:.3f} ± {r['score_std']:.3f} | {s['task']:.3f} | {reg:.2f} | "
                         f"{100 * share:.1f}% | {'—' if grad is None else f'{100 * grad:.1f}%'} |")
    return lines


def plot(runs: dict[str, list[dict]], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 7.6))
    FigureCanvasAgg(fig)
    ax, lx = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    for name, log in runs.items():
        steps = [r for r in log if r.get("event") == "step"]
        lx.plot([r["step"] for r in steps], [r["task"] for r in steps], linewidth=1, label=name)
        pts = [(r["step"], r["overlap_with_previous"]) for r in log
               if r.get("event") == "ranking" and r["overlap_with_previous"] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
        vs = [r["remaining"] for r in log if r.get("event") == "step"]
        final = [r["step"] for r in log if r.get("event") == "step" and r["remaining"] == min(vs)]
        if len(final) > 1:  # v stayed at its minimum: the run reached v_f (a stopped run may not have)
            reached = final[0]
            ax.axvline(reached, color=ax.lines[-1].get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("training step (dotted: v reaches v_f)")
    ax.set_ylabel("kept set at v_f: share kept by the previous record")
    ax.set_title("SMP, unstructured, 10% remaining, BBC News: stability of the ranking")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    lx.set_yscale("log")
    lx.set_xlabel("training step")
    lx.set_ylabel("task loss (cross-entropy) of the step")
    lx.axhline(1.6094, color="grey", linestyle="--", linewidth=1)
    lx.text(2, 1.75, "ln 5: chance", fontsize=8, color="grey")
    lx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output path without extension (writes .png and .md)")
    p.add_argument("runs", nargs="+", help="NAME=RUN_DIR: a finished or stopped `cofi prune --method smp` run")
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, sep, path = item.rpartition("=")
        if not sep or not name:
            p.error(f"runs: expected NAME=RUN_DIR, got {item!r}")
        runs[name] = read_log(path)
    plot(runs, args.out + ".png")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(table(runs)) + "\n")
    print("\n".join(table(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
