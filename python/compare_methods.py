"""Compare the pruning methods on one data set: one table and one picture.

Runs, through the `cofi` command as a user would, a fine-tuned teacher and
every method of the package on the same train / validation / test parts, then
evaluates each output on the held-out test part (`cofi_kernels.cli.evaluate_dir`:
accuracy, realised sparsity by the DESIGN §4 count, encoder weights, examples/s
on this machine with the serving engine) and writes

    OUT/methods_<data>.md    the table, the settings and the commands
    OUT/methods_<data>.json  the same figures
    OUT/methods_<data>.png   held-out accuracy against examples/s, one point per method

where <data> is ``bbc`` for the default data, else the data file's name
without its extension (benchmarks/results/methods_bbc.* are such files).

Usage:

    .venv/bin/python python/compare_methods.py                           # BBC News, the `cofi demo` split
    .venv/bin/python python/compare_methods.py --data my.csv --out cmp   # any CSV / JSONL with text, label
    .venv/bin/python python/compare_methods.py --rows teacher,cofi-0.9   # a subset

Each row's run goes to OUT/<row>/; a row whose run finished before is not run
again (delete its folder to redo it), so an interrupted comparison continues
where it stopped. Settings: the demo's for the teacher and CoFi, each method's
defaults otherwise (listed in methods.md with the reasons).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from cofi_kernels import cli
from cofi_kernels.data.text import read_examples, split_held_out

MAX_LENGTH = cli.DEMO_MAX_LENGTH
# SMP runs with its defaults and no teacher (issue 25): 4 epochs (0.5 of the head alone, v falling over the next 2,
# then 1.5 at v_f), scores from each matrix's magnitude, lr 2e-2, lambda_max 400, the head on the mean over the
# real tokens.
SMP_WHY = "the method's defaults, no teacher (4 epochs: 0.5 head warm-up, v falls over 2, 1.5 at v_f; magnitude " \
          "start; mean pooling)"


def _flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False:
            out += [flag, str(value)]
    return out


def rows(out: str, pretrained: str) -> dict[str, tuple[str, list[str], str]]:
    """Row name → (label, the `cofi` arguments, why these settings)."""
    data = ["--data", f"{out}/data/train.jsonl", "--eval-data", f"{out}/data/validation.jsonl",
            "--max-length", str(MAX_LENGTH), "--quiet"]
    teacher = f"{out}/teacher"
    cofi_settings = {k: v for k, v in cli.DEMO_PRUNE.items() if k != "target_sparsity"}
    table = {
        "teacher": ("dense teacher (all-MiniLM-L6-v2 fine-tuned)",
                    ["finetune", *data, *_flags(cli.DEMO_FINETUNE)], "the `cofi demo` teacher"),
    }
    for target in (0.6, 0.9):
        table[f"cofi-{target}"] = (
            f"CoFi, target {target}",
            ["prune", "--method", "cofi", "--teacher", teacher, *data, "--target-sparsity", str(target),
             *_flags(cofi_settings)],
            "the `cofi demo` settings")
    for layers in (3, 2):
        table[f"theseus-6to{layers}"] = (
            f"BERT-of-Theseus 6→{layers}",
            ["prune", "--method", "theseus", "--teacher", teacher, *data, "--layers", str(layers),
             "--replace-epochs", "1.5", "--finetune-epochs", "1"],
            "1.5 replacing + 1 fine-tuning epochs (the defaults' 3 + 2 would pass 15 minutes here), linear "
            "schedule from b = 0.3 reaching p = 1 at 60%, lr 5e-4 / 2e-4, CE only")
    table["smp-structured"] = (
        "SMP structured, 10% of heads / units remaining",
        ["prune", "--method", "smp", "--model", pretrained, *data, "--structured", "--remaining", "0.1"],
        "10% remaining is near CoFi's 0.9; " + SMP_WHY)
    table["smp-unstructured"] = (
        "SMP unstructured, 10% of weights remaining",
        ["prune", "--method", "smp", "--model", pretrained, *data, "--unstructured", "--remaining", "0.1"],
        SMP_WHY + "; dense matrices with zeros: no speed-up on dense hardware")
    for budget in ("E", "B"):
        for init in ("random", "pretrained-slice"):
            extra = ["--pretrained", pretrained] if init == "pretrained-slice" else []
            table[f"scratch-{budget}-{init}"] = (
                f"Scratch-{budget}, {init} init, CoFi 0.9's shapes",
                ["prune", "--method", "scratch", "--architecture", f"{out}/cofi-0.9", *data, "--budget", budget,
                 "--init", init, *extra],
                "method defaults (lr 1e-4, CE only); the epochs follow the budget rule")
    return table


def write_parts(out: str, data_file: str | None) -> None:
    """train / validation / test JSONL under OUT/data: the demo's BBC split, or a seeded split of ``data_file``."""
    os.makedirs(f"{out}/data", exist_ok=True)
    if data_file is None:
        train, validation, test = cli.default_splits()
    else:
        rest, test = split_held_out(read_examples(data_file), cli.DEFAULT_TEST_FRACTION, cli.DEFAULT_SPLIT_SEED)
        train, validation = split_held_out(rest, cli.DEFAULT_VALIDATION_FRACTION, cli.DEFAULT_SPLIT_SEED + 1)
    for name, part in (("train", train), ("validation", validation), ("test", test)):
        part.to_jsonl(f"{out}/data/{name}.jsonl")


def run_row(out: str, name: str, args: list[str]) -> float:
    """Runs one row's `cofi` command unless its run finished before (an unfinished one resumes);
    its training time in seconds: the trainer's own count in run.json, which adds up the parts of a
    resumed run (set-up and loading excluded)."""
    run_file = f"{out}/{name}/run.json"
    if not os.path.isfile(run_file):
        resume = ["--resume"] if os.path.isdir(f"{out}/{name}") else []
        cmd = [os.path.join(os.path.dirname(sys.executable), "cofi"), *args, "--out", f"{out}/{name}", *resume]
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        done = subprocess.run(cmd)
        if done.returncode != 0:
            raise SystemExit(f"compare_methods: row {name} failed (exit {done.returncode}); rerun to resume it")
    with open(run_file) as fh:
        return float(json.load(fh)["seconds"])


def plot(results: list[dict], path: str, title: str) -> None:
    """Held-out accuracy against examples/s, one labelled point per method; the teacher's accuracy dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    order = sorted(range(len(results)), key=lambda j: results[j]["examples_per_second"])
    fast = max(r["examples_per_second"] for r in results)
    for i, r in enumerate(results):
        teacher = r["row"] == "teacher"
        ax.scatter(r["examples_per_second"], 100 * r["score"], s=60 if teacher else 40,
                   marker="*" if teacher else "o", color="black" if teacher else "tab:blue", zorder=3)
        # Labels left of the point at the fast end (the axis ends there), staggered in height in
        # order of speed, so that neighbours of similar speed stay apart.
        k = order.index(i)
        right_end = r["examples_per_second"] > fast / 2
        ax.annotate(r["row"], (r["examples_per_second"], 100 * r["score"]), textcoords="offset points",
                    xytext=(-6 if right_end else 6, (6, -12, 16, -22)[k % 4]), fontsize=8,
                    ha="right" if right_end else "left")
        if teacher:
            ax.axhline(100 * r["score"], color="gray", linestyle="--", linewidth=1, label="dense teacher")
    ax.set_xscale("log")
    ax.set_xlabel("examples/s on this CPU (log scale; fp32, serving engine for pruned models)")
    ax.set_ylabel(f"held-out {results[0]['metric']} (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def table_md(results: list[dict], table: dict, title: str) -> str:
    lines = [f"# {title}", "",
             f"| method | held-out {results[0]['metric']} | realised sparsity | encoder weights | examples/s | training time |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {table[r['row']][0]} | {100 * r['score']:.2f}% | {r['sparsity']:.4f} | "
                     f"{r['encoder_parameters'] / 1e6:.3f}M | {r['examples_per_second']:.1f} | "
                     f"{r['seconds'] / 60:.1f} min |")
    lines += ["", "Settings and commands (`--out OUT/<row>` added to each):", ""]
    for r in results:
        label, args, why = table[r["row"]]
        lines.append(f"- **{r['row']}**: {why}. `cofi {' '.join(args)}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="CSV or JSONL with text and label (default: BBC News, the `cofi demo` split)")
    p.add_argument("--out", default="compare-methods", help="output directory (default ./compare-methods)")
    p.add_argument("--rows", help="comma-separated row names (default: all, in order)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    table = rows(out, str(cli.default_model_dir()))
    names = list(table) if args.rows is None else args.rows.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown rows {', '.join(unknown)}; known: {', '.join(table)}")
    write_parts(out, args.data)
    test = read_examples(f"{out}/data/test.jsonl")
    results = []
    for name in names:
        seconds = run_row(out, name, table[name][1])
        r = cli.evaluate_dir(f"{out}/{name}", test, batch_size=32)
        results.append({"row": name, "seconds": seconds, "score": r[r["metric"]], **r})
        print(f"[{name}] {r['metric']} {100 * r[r['metric']]:.2f}%, sparsity {r['sparsity']:.4f}, "
              f"{r['examples_per_second']:.1f} examples/s, {seconds / 60:.1f} min", flush=True)
    title = f"Pruning methods on {'BBC News' if args.data is None else os.path.basename(args.data)} ({len(test)} held-out examples)"
    stem = f"{out}/methods_" + ("bbc" if args.data is None else os.path.splitext(os.path.basename(args.data))[0])
    with open(f"{stem}.json", "w") as fh:
        json.dump(results, fh, indent=2)
    with open(f"{stem}.md", "w") as fh:
        fh.write(table_md(results, table, title))
    plot(results, f"{stem}.png", title)
    print(table_md(results, table, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
