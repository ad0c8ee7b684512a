"""Run the serving benchmarks (benchmarks/test_bench_serving.py) and write their report.

    .venv/bin/python benchmarks/serving_report.py            # full run, about 10 minutes on 2 cores
    .venv/bin/python benchmarks/serving_report.py --quick    # few rounds: a smoke run, numbers not for keeping

Runs the benchmark module through pytest (``--benchmark-json``, ``--junitxml`` for
the skip and failure reasons; ``OMP_WAIT_POLICY=PASSIVE`` unless the environment
sets it), then prints and writes ``benchmarks/results/serving_<cpu>.md`` (with the
raw ``serving_<cpu>.json`` beside it; ``--quick`` writes ``serving_<cpu>_quick.md``
only): the machine line, per model and workload a table of medians and of each
row's speed-up against the reference forward, torch.compile, ONNX Runtime and the
dense HF model (baseline median / row median, same run), and the issue's
Done-when checks as PASS / FAIL lines. ``-k EXPR`` selects benchmarks as pytest's
``-k`` does. The exit status is pytest's when it is not 0, else 1 when a check
fails or cannot be evaluated, else 0. conftest.py also writes its generic table
``serving_cpu_<cpu>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
MODULE = os.path.join(HERE, "test_bench_serving.py")

sys.path.insert(0, HERE)
import test_bench_serving as bench  # noqa: E402 - the module's models, workloads and rows, for order and labels

BASELINES = [("reference", "reference"), ("torch.compile", "torch.compile"), ("onnxruntime", "ONNX Runtime"),
             ("dense HF", "dense HF")]
FLAGS = ("avx512f", "avx512_bf16", "amx_bf16")

# The Done-when: (model, workload, row, baseline row, baseline workload, minimum speed-up, what it says).
CHECKS = [
    ("demo", "32 realistic", "engine fp32", "reference", None, 1.5, "demo shapes fp32, 32 realistic texts: engine vs reference"),
    ("demo", "32 realistic", "engine fp32", "onnxruntime", None, 1.3, "demo shapes fp32, 32 realistic texts: engine vs ONNX Runtime"),
    ("demo", "1x128", "engine fp32", "reference", None, 1.25, "demo shapes fp32, 1 x 128: engine vs reference"),
    ("demo", "32x128", "engine fp32", "reference", None, 1.1, "demo shapes fp32, 32 x 128: engine vs reference"),
    ("demo", "32x128", "engine fp32", "torch.compile", None, 1.0, "demo shapes fp32, 32 x 128: engine vs torch.compile"),
    ("demo", "32x128", "engine bf16", "reference", None, 2.0, "demo shapes, 32 x 128: engine bf16 vs the fp32 reference"),
    ("s95", "8x128", "engine fp32", "dense HF", None, 20.0, "s95, 8 x 128: engine fp32 vs dense HF BERT-base"),
]


def cpu_info() -> tuple[str, set[str]]:
    """(model name, flags) from lscpu, else /proc/cpuinfo."""
    name, flags = "", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and not name:
                name = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.CalledProcessError):
        pass
    if not name or not flags:
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    if key.strip() == "model name" and not name:
                        name = value.strip()
                    elif key.strip() == "flags" and not flags:
                        flags = set(value.split())
        except OSError:
            pass
    return name or "unknown CPU", flags


def cpu_kind(name: str) -> str:
    """A short file-name form of the CPU: "Intel(R) Xeon(R) Processor" -> "intel_xeon"."""
    short = re.sub(r"\(.*?\)|@.*$|\b(Processor|CPU)\b", " ", name)
    return re.sub(r"[^a-z0-9]+", "_", short.lower()).strip("_")[:40] or "cpu"


def run_pytest(json_path: str, junit_path: str, quick: bool, select: str | None) -> int:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if quick:
        env["COFI_SERVING_QUICK"] = "1"
    cmd = [sys.executable, "-m", "pytest", MODULE, "-p", "no:cacheprovider", "-q", "-rsfE",
           f"--benchmark-json={json_path}", f"--junitxml={junit_path}", "--benchmark-group-by=group",
           "--benchmark-columns=median,min,max,rounds", "--benchmark-sort=name"]
    if select:
        cmd += ["-k", select]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def read_results(json_path: str) -> tuple[dict, dict]:
    """({(model, workload, row): (median s, rounds, extra_info)}, the JSON's machine_info)."""
    if not os.path.exists(json_path):
        return {}, {}
    with open(json_path) as fh:
        data = json.load(fh)
    results = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if info.get("suite") == "serving":
            results[(info["model"], info["workload"], info["variant"])] = (b["stats"]["median"], b["stats"]["rounds"], info)
    return results, data.get("machine_info", {})


def read_outcomes(junit_path: str) -> dict:
    """{(model, workload, row): "skipped: ..." / "failed: ..."} from pytest's JUnit XML."""
    outcomes = {}
    if not os.path.exists(junit_path):
        return outcomes
    for case in ET.parse(junit_path).iter("testcase"):
        m = re.fullmatch(r"test_serving\[(.+)\]", case.get("name", ""))
        if not m:
            continue
        key = tuple(m.group(1).split("-", 2))
        for tag, word in (("skipped", "skipped"), ("failure", "failed"), ("error", "error")):
            el = case.find(tag)
            if el is not None:
                message = (el.get("message") or el.text or "").strip().splitlines()
                outcomes[key] = f"{word}: {message[0] if message else ''}"[:400]
    return outcomes


def fmt_ratio(base, median) -> str:
    return f"{base / median:.2f}x" if base and median else "–"


def build_report(results: dict, outcomes: dict, quick: bool, rc: int) -> tuple[str, bool]:
    name, flags = cpu_info()
    import torch

    any_info = next((info for _, _, info in results.values()), {})
    threads = any_info.get("torch_threads", torch.get_num_threads())
    flag_text = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in FLAGS)
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    lines = [
        f"# End-to-end serving on {name} ({os.cpu_count()} CPUs)", "",
        f"Machine: {name}; {flag_text}; torch {any_info.get('torch_version', torch.__version__)}, "
        f"{threads} torch threads; OMP_WAIT_POLICY={any_info.get('omp_wait_policy', os.environ.get('OMP_WAIT_POLICY', '(unset)'))}; "
        f"{datetime.date.today().isoformat()}{', commit ' + commit if commit else ''}.",
        "",
        ("**Quick run (few rounds): smoke numbers, not for comparison.**" if quick else
         "Full run."),
        "",
        "Medians of pytest-benchmark rounds (one call a round, after a checking call and a warm-up), all rows "
        "of a table measured one after the other in the same process. `vs X` = X's median / the row's median "
        "(above 1: the row is faster). fp32 unless the row says otherwise; every torch row under "
        "`torch.inference_mode()`. Max |Δ logit| = largest difference from the reference forward's logits "
        "on the same batch (fp32 rows must stay within 1e-4 of the logit scale). Rows and models: "
        "benchmarks/test_bench_serving.py.",
    ]
    seen = set(results) | set(outcomes)
    for model in bench.MODELS:
        if not any(k[0] == model for k in seen):
            continue  # not selected (-k)
        spec = bench.MODELS[model]()
        sparsity = next((info.get("sparsity") for (m, _, _), (_, _, info) in results.items() if m == model), None)
        lines += ["", f"## {model}: {spec['label']}" + (f", sparsity {sparsity:.4f}" if sparsity is not None else ""), ""]
        for workload in bench.WORKLOADS:
            if not any(k[:2] == (model, workload) for k in seen):
                continue
            batch = len(bench.WORKLOADS[workload])
            real = sum(bench.WORKLOADS[workload])
            pad = bench.padding_fraction(workload)
            lines += [f"### {model} · {workload}: {batch} x {bench.SEQ} positions, {real} real tokens "
                      f"({100 * pad:.1f}% padding)", "",
                      "| row | median (ms) | rounds | " + " | ".join(f"vs {label}" for _, label in BASELINES)
                      + " | max abs Δ logit |",
                      "|---|---:|---:|" + "---:|" * len(BASELINES) + "---:|"]
            medians = {row: results[(model, workload, row)][0] for row in bench.ROWS if (model, workload, row) in results}
            for row in bench.ROWS:
                key = (model, workload, row)
                if key not in results:
                    why = outcomes.get(key, "not run").replace("|", "\\|")
                    lines.append(f"| {row} | {why} |  |" + " |" * len(BASELINES) + " |")
                    continue
                median, rounds, info = results[key]
                ratios = " | ".join(fmt_ratio(medians.get(base), median) for base, _ in BASELINES)
                diff = info.get("max_abs_diff")
                lines.append(f"| {row} | {median * 1e3:.2f} | {rounds} | {ratios} | "
                             f"{'' if diff is None else f'{diff:.2g}'} |")
            lines.append("")

    lines += ["## Done-when checks", ""]
    all_pass = True
    for model, workload, row, base, base_workload, minimum, what in CHECKS:
        a = results.get((model, workload, row))
        b = results.get((model, base_workload or workload, base))
        if a is None or b is None:
            missing = [(r, outcomes.get((model, workload, r), "not run")) for r, v in ((row, a), (base, b)) if v is None]
            lines.append(f"- n/a  {what} ≥ {minimum}x: " + "; ".join(f"{r} {why}" for r, why in missing))
            all_pass = False
            continue
        ratio = b[0] / a[0]
        ok = ratio >= minimum
        all_pass &= ok
        lines.append(f"- {'PASS' if ok else 'FAIL'} {what}: {ratio:.3f}x (≥ {minimum}x; "
                     f"{a[0] * 1e3:.2f} ms vs {b[0] * 1e3:.2f} ms)")
    if rc != 0:
        lines += ["", f"pytest exited with status {rc} (see the failed / skipped rows above)."]
    return "\n".join(lines) + "\n", all_pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (smoke run); writes serving_<cpu>_quick.md")
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression to run a subset")
    args = parser.parse_args(argv)

    name, _ = cpu_info()
    stem = f"serving_{cpu_kind(name)}" + ("_quick" if args.quick else "")
    os.makedirs(RESULTS, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        json_path = os.path.join(tmp, "serving.json") if args.quick else os.path.join(RESULTS, stem + ".json")
        junit_path = os.path.join(tmp, "junit.xml")
        rc = run_pytest(json_path, junit_path, args.quick, args.select)
        results, _ = read_results(json_path)
        outcomes = read_outcomes(junit_path)
    report, all_pass = build_report(results, outcomes, args.quick, rc)
    path = os.path.join(RESULTS, stem + ".md")
    with open(path, "w") as fh:
        fh.write(report)
    print()
    print(report)
    print(f"written: {os.path.relpath(path, ROOT)}")
    return rc if rc != 0 else (0 if all_pass else 1)


if __name__ == "__main__":
    sys.exit(main())
