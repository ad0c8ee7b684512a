"""Every GPU test and GPU benchmark of cofi_kernels in one run, within a time budget.

On a lent CUDA machine, from the repository root, run first:

    pip install --no-build-isolation -e . && python benchmarks/gpu_check.py

(``python benchmarks/gpu_check.py --dry-run`` prints the exact commands with their
timeouts and exits 0 anywhere; without ``--dry-run`` and without a CUDA GPU the
script exits 2 with one line.)

Steps, each a subprocess with its own timeout, run in this order; a failure does
not stop the run, and when the overall budget (``--budget``, default 480 s) is
spent the remaining steps are skipped with that reason:

1. environment: versions, device, capability (``--env-report``), then
   ``python -m cofi_kernels.info`` (what was built, which backend ``auto`` picks);
2. GPU tests (``-rfEs``, no ``-x``), three pytest runs that do not overlap:
   the files whose Triton tests run on the GPU without "cuda" in their ids
   (they use ``requires_cuda`` / ``TRITON_DEVICE``: ``tests/ops/test_gated_attention.py``,
   ``tests/ops/test_gated_ffn.py``) whole, those of them under ``tests/serving``
   (the varlen attention kernel, the engine on CUDA, CUDA graphs) whole in a step
   of their own, and everything else in ``tests``
   selected by ``-k "cuda or triton or gpu"`` (the cuda-parametrized cases of
   test_ops / test_registration, the CUDA error and backend checks, the CLI's
   "device" messages that differ with a GPU; ``-k`` also matches marker and
   module names, so every ``-m gpu`` test is in one of the two runs); both with
   ``-m "gpu or not slow"`` (the slow tests are CPU-only: ahead-of-time Triton
   compilation checks for machines without a GPU);
3. GPU benchmarks: ``benchmarks/gpu_row_ops.py --out OUT`` and each
   ``benchmarks/test_bench_*.py`` with CUDA cases (a file that skips without
   CUDA runs whole, one with a cuda parameter runs with ``-k cuda``; a file that
   never mentions cuda, such as the CPU-only CoFi step, is listed as skipped),
   with ``--benchmark-json`` into a temporary folder. Rounds: the benchmarks
   fix their own in ``benchmark.pedantic`` (30 for gated attention, 50 for
   gated FFN, 200 for the sub-millisecond row ops), which is already short;
   ``benchmarks/test_bench_serving_gpu.py`` (GPU only) runs first of them: the
   serving engine on CUDA (s95 at 128 x 128 bf16 against dense HF in bf16; 1 x 128
   latency of the reference, the engine and the engine with CUDA graphs; the Triton
   varlen attention against padded SDPA and the reference);
4. the CPU serving benchmark: ``benchmarks/test_bench_serving.py`` with ``-k cuda``,
   ``COFI_SERVING_QUICK=1`` (few rounds), if it has CUDA cases; otherwise the
   summary says "serving: no GPU cases yet" (its GPU rows are in
   test_bench_serving_gpu.py).

Writes into ``--out`` (default ``benchmarks/results``), ``<device>`` being
``torch.cuda.get_device_name()`` with every non-alphanumeric character
replaced by ``_`` (e.g. ``NVIDIA_H200``):

- ``gpu_check_<device>.md``: each step's status (pass / fail / timeout / skip),
  duration, timeout, the pytest summary line or the failures' first lines,
  the commands, the environment report and the output tails of failed steps;
  rewritten after every step, so an interrupted run leaves what it had;
- ``<suite>_gpu_check_<device>.md`` and ``.json`` for each pytest benchmark
  file (medians, IQR, rounds, speed-up against the group's baseline, TFLOP/s);
- ``row_ops_<device>.md`` / ``.json`` from ``gpu_row_ops.py``.

benchmarks/conftest.py also writes its own ``<suite>_cuda_<device>.md`` into
benchmarks/results. Full logs stay in a temporary folder whose path is printed.
The summary table is printed at the end. Exit status: 0 when every step that ran
passed, 1 when a test, benchmark or step failed or timed out, 2 without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from tables import cell, speedup_table  # noqa: E402 - benchmarks/tables.py, beside this script
DEFAULT_OUT = os.path.join(HERE, "results")

BUDGET_S = 480  # the whole run: 8 minutes of the lent machine's 15
MIN_STEP_S = 20  # a step is not started with less of the budget left
TAIL_LINES = 40  # lines of output kept in the summary for a step that did not pass

# Test files whose GPU tests are not all named for the GPU (Triton tests run on
# cuda when a GPU is present, on the interpreter otherwise): run whole.
WHOLE_FILE_MARK = re.compile(r"\brequires_cuda\b|\bTRITON_DEVICE\b")
GPU_KEYWORDS = "cuda or triton or gpu"
TEST_MARKERS = "gpu or not slow"

# Benchmark files: GPU-only when the module skips without CUDA, GPU cases when cuda appears at all.
GPU_ONLY_MARK = re.compile(r"pytestmark\s*=.*skipif\(\s*not\s+torch\.cuda\.is_available\(\)")
CUDA_MARK = re.compile(r"[\"']cuda[\"']|torch\.cuda\.")
# Benchmark files in order of interest (the Triton kernels' targets are still open); others follow by name.
# serving_gpu first: the GPU figures of the serving issue (s95 128 x 128 bf16 against dense HF, 1 x 128
# latency, Triton against SDPA for varlen attention) are the ones still open there.
BENCH_ORDER = ["serving_gpu", "gated_attention", "gated_ffn", "row_ops", "cofi_step"]
BENCH_TIMEOUT = {"gated_attention": 150, "gated_ffn": 120, "row_ops": 60, "serving": 150, "serving_gpu": 180}
SERVING = "serving"
SERVING_TESTS = os.path.join("tests", "serving") + os.sep  # whole-file GPU tests of serving: a step of their own
SELF_TEST = "tests/test_gpu_check.py"  # this script's own CPU test: "gpu" in its name, nothing for the GPU


# --------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass
class Step:
    name: str
    kind: str  # env | tests | bench
    argv: list[str] | None  # None: skipped at planning time (skip_reason says why)
    timeout: int
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    skip_reason: str = ""
    pytest: bool = False
    bench_json: str | None = None  # pytest-benchmark JSON path, converted to markdown after the run
    suite: str | None = None

    def command(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + shlex.join(self.argv or [])


@dataclasses.dataclass
class Result:
    name: str
    kind: str
    status: str  # pass | fail | timeout | skip
    duration: float
    timeout: int
    command: str
    detail: str = ""
    tail: str = ""
    files: list[str] = dataclasses.field(default_factory=list)


def whole_test_files(root: str = ROOT) -> list[str]:
    files = []
    for folder, _, names in os.walk(os.path.join(root, "tests")):
        for name in names:
            if name.startswith("test_") and name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as fh:
                    if WHOLE_FILE_MARK.search(fh.read()):
                        files.append(os.path.relpath(path, root))
    return sorted(files)


def bench_files(root: str = ROOT) -> list[tuple[str, str]]:
    """(suite, path relative to root) of every benchmarks/test_bench_*.py, in BENCH_ORDER, serving last."""
    found = {}
    folder = os.path.join(root, "benchmarks")
    for name in os.listdir(folder):
        if name.startswith("test_bench_") and name.endswith(".py"):
            found[name[len("test_bench_"):-3]] = os.path.join("benchmarks", name)

    def key(suite):
        return (suite == SERVING, BENCH_ORDER.index(suite) if suite in BENCH_ORDER else len(BENCH_ORDER), suite)

    return [(s, found[s]) for s in sorted(found, key=key)]


def gpu_cases(path: str) -> str:
    """'whole' (skips without CUDA), 'k' (has cuda parameters: run -k cuda) or '' (no GPU cases)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if GPU_ONLY_MARK.search(text):
        return "whole"
    return "k" if CUDA_MARK.search(text) else ""


def plan(out: str, tmp: str, python: str = sys.executable, root: str = ROOT) -> list[Step]:
    have_benchmark = importlib.util.find_spec("pytest_benchmark") is not None
    pytest = [python, "-m", "pytest", "-rfEs", "-p", "no:cacheprovider"]
    steps = [
        Step("env", "env", [python, os.path.join("benchmarks", "gpu_check.py"), "--env-report"], 60),
        Step("cofi_kernels.info", "env", [python, "-m", "cofi_kernels.info"], 60),
    ]
    whole = whole_test_files(root)
    serving_whole = [f for f in whole if f.startswith(SERVING_TESTS)]
    kernel_whole = [f for f in whole if f not in serving_whole]
    steps.append(Step("tests: Triton files whole", "tests",
                      pytest + ["--durations=15", "-m", TEST_MARKERS] + kernel_whole, 270, pytest=True)
                 if kernel_whole else Step("tests: Triton files whole", "tests", None, 270,
                                           skip_reason="no test file uses requires_cuda or TRITON_DEVICE"))
    if serving_whole:  # their own step and timeout: a slow kernel file cannot take the serving tests with it
        steps.append(Step("tests: serving GPU files whole", "tests",
                          pytest + ["--durations=15", "-m", TEST_MARKERS] + serving_whole, 180, pytest=True))
    steps.append(Step(f'tests: -k "{GPU_KEYWORDS}"', "tests",
                      pytest + ["--durations=15", "-m", TEST_MARKERS, "-k", GPU_KEYWORDS]
                      + [f"--ignore={f}" for f in whole + [SELF_TEST]] + ["tests"], 150, pytest=True))
    row_ops_script = Step("bench: gpu_row_ops.py", "bench",
                          [python, os.path.join("benchmarks", "gpu_row_ops.py"), "--out", out], 90)
    for suite, path in bench_files(root):
        if suite == "row_ops" or (suite not in BENCH_ORDER and row_ops_script not in steps):
            steps.append(row_ops_script)  # the CUDA-graph timings of the row ops, before their pytest benchmarks
        name = f"bench: {os.path.basename(path)}"
        cases = gpu_cases(os.path.join(root, path))
        timeout = BENCH_TIMEOUT.get(suite, 120)
        if not cases:
            reason = "serving: no GPU cases yet" if suite == SERVING else f"{suite}: no GPU cases (CPU only)"
            steps.append(Step(name, "bench", None, timeout, skip_reason=reason, suite=suite))
            continue
        json_path = os.path.join(tmp, f"{suite}.json")
        argv = pytest + ([] if cases == "whole" else ["-k", "cuda"]) + [path, f"--benchmark-json={json_path}"]
        env = {"COFI_SERVING_QUICK": "1", "OMP_WAIT_POLICY": "PASSIVE"} if suite == SERVING else {}
        step = Step(name, "bench", argv, timeout, env=env, pytest=True, bench_json=json_path, suite=suite)
        if not have_benchmark:
            step.argv, step.skip_reason = None, "pytest-benchmark is not installed (pip install pytest-benchmark)"
        steps.append(step)
    if row_ops_script not in steps and os.path.exists(os.path.join(root, "benchmarks", "gpu_row_ops.py")):
        steps.append(row_ops_script)
    return steps


# --------------------------------------------------------------------------------------------- run


def slug(text: str) -> str:
    """A device name as the files in benchmarks/results are named (as benchmarks/conftest.py does)."""
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")[:60]


def probe_cuda(python: str) -> tuple[str | None, str]:
    """(device name, '') with a CUDA GPU, else (None, why); in a child so this process holds no CUDA context."""
    code = ("import torch\n"
            "print('CUDA' if torch.cuda.is_available() else 'NOCUDA', torch.cuda.get_device_name() "
            "if torch.cuda.is_available() else torch.__version__)\n")
    try:
        res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, "checking for CUDA with torch took over 120 s"
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"torch could not be imported ({last})"
    state, _, value = lines[-1].partition(" ")
    if state != "CUDA":
        return None, f"torch {value} sees none (torch.cuda.is_available() is False)"
    return value, ""


def summary_line(output: str) -> str:
    """pytest's final line ('3 failed, 97 passed in 12.3s'), or ''."""
    for line in reversed(output.splitlines()):
        m = re.match(r"^=+ (.*\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b.*?) =+$", line.strip())
        if m:
            return m.group(1)
    return ""


def failure_lines(output: str, limit: int = 5) -> list[str]:
    """The first lines of pytest's short summary for failures and errors (-rfE)."""
    found = [line.strip() for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    lines = [line[:200] for line in found[:limit]]
    if len(found) > limit:
        lines.append(f"... and {len(found) - limit} more")
    return lines


def _last_line(output: str) -> str:
    return next((line.strip()[:200] for line in reversed(output.splitlines()) if line.strip()), "no output")


def _kill(proc: subprocess.Popen) -> None:
    """End the child's process group (it was started in its own session), politely first."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, timeout: int, log_path: str, by_budget: bool) -> Result:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled Triton on the GPU
    env.update(step.env, PYTHONUNBUFFERED="1")
    start = time.monotonic()
    timed_out = False
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
            rc = proc.returncode
        except KeyboardInterrupt:
            _kill(proc)
            raise
    duration = time.monotonic() - start
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        output = fh.read()
    tail = "\n".join(output.rstrip().splitlines()[-TAIL_LINES:])
    result = Result(step.name, step.kind, "pass", duration, timeout, step.command(), tail=tail)
    summary = summary_line(output) if step.pytest else ""
    if timed_out:
        why = "the overall budget" if by_budget else "the step's timeout"
        result.status = "timeout"
        result.detail = f"killed after {timeout} s ({why}); last line: {_last_line(output)}"
    elif step.pytest and rc == 5:
        result.status, result.detail = "skip", f"no tests selected ({summary or 'exit 5'})"
    elif rc != 0:
        result.status = "fail"
        parts = [summary or f"exit {rc}"] + (failure_lines(output) if step.pytest else [])
        if not step.pytest or not failure_lines(output):
            parts.append(_last_line(output))
        result.detail = "; ".join(parts)
    elif step.pytest:
        result.detail = summary
    else:
        result.detail = next((line.strip()[:200] for line in output.splitlines() if line.strip()), "")
    return result


# --------------------------------------------------------------------------------------------- markdown


def summary_markdown(device: str, results: list[Result], *, started: str, commit: str, budget: float,
                     used: float, env_report: str = "", log_dir: str = "", finished: bool = True) -> str:
    """The gpu_check_<device>.md text for step results (a pure function of its arguments)."""
    failed = [r for r in results if r.status in ("fail", "timeout")]
    if not finished:
        verdict = "**INCOMPLETE** (the run was interrupted or is still going)"
    elif failed:
        verdict = f"**FAIL** ({len(failed)} of {len(results)} steps failed or timed out)"
    else:
        verdict = "**PASS** (every step that ran passed)"
    lines = [f"# GPU check on {device}", "",
             f"`python benchmarks/gpu_check.py` started {started}, commit {commit}; "
             f"budget {budget:.0f} s, used {used:.0f} s. Result: {verdict}.", "",
             "| step | status | time (s) | timeout (s) | detail |", "|---|---|---|---|---|"]
    for r in results:
        detail = r.detail + (f" → {', '.join(r.files)}" if r.files else "")
        duration = f"{r.duration:.1f}" if r.status != "skip" or r.duration else ""
        lines.append(f"| {cell(r.name, '<br>')} | {r.status} | {duration} | {r.timeout} | {cell(detail, '<br>')} |")
    lines += ["", "## Commands", ""]
    lines += [f"- {r.name}: `{r.command}`" for r in results if r.command]
    if env_report:
        lines += ["", "## Environment", "", "```text", env_report.rstrip(), "```"]
    for r in results:
        if r.status in ("fail", "timeout") and r.tail:
            lines += ["", f"## {r.name}: {r.status}, last {TAIL_LINES} lines of output", "", "```text", r.tail, "```"]
    if log_dir:
        lines += ["", f"Full logs on the machine that ran this: `{log_dir}`."]
    return "\n".join(lines) + "\n"


def bench_markdown(data: dict, suite: str, device: str, command: str) -> str:
    """A pytest-benchmark JSON report as a markdown table: medians, spread, speed-up against each group's baseline."""
    groups: dict[str, list] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        groups.setdefault(bench.get("group") or bench["name"], []).append(
            (str(info.get("variant", bench["name"])), bench["stats"], info))
    lines = [f"# {suite} benchmarks on {device} (gpu_check)", "",
             f"pytest-benchmark {data.get('version', '?')}, {data.get('datetime', '?')}; rounds as each benchmark's "
             "`pedantic` call sets them; speed-up = the group's baseline median / this median (baseline: the "
             "variant with `baseline: True`, else `eager`).", "", f"Command: `{command}`", ""]
    lines += speedup_table(groups, ("median", "iqr", "min", "rounds"))
    if not groups:
        lines.append("| (no benchmark finished) | | | | | | |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- env report


def env_report() -> None:
    """Printed by the first step (`--env-report`): versions, device, capability, driver."""
    import platform

    import torch

    def version(module):
        try:
            from importlib.metadata import version as v
            return v(module)
        except Exception:  # noqa: BLE001 - a report line, whatever went wrong
            return "not installed"

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        cap = "".join(map(str, torch.cuda.get_device_capability()))
        print(f"{p.name} (sm_{cap}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs), "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {version('triton')}")
        print(f"devices: {torch.cuda.device_count()}; L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
    else:
        print(f"no CUDA GPU visible; torch {torch.__version__}")
    print(f"python {platform.python_version()} ({sys.executable}), {platform.platform()}, {os.cpu_count()} CPUs")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    for module in ("triton", "transformers", "safetensors", "pytest", "pytest-benchmark", "numpy", "cofi-kernels"):
        print(f"{module} {version(module)}")
    for var in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET", "COFI_BACKEND", "TORCH_CUDA_ARCH_LIST"):
        if var in os.environ:
            print(f"{var}={os.environ[var]}")
    for argv in (["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                  "--format=csv,noheader"], ["nvcc", "--version"]):
        if shutil.which(argv[0]):
            try:
                res = subprocess.run(argv, capture_output=True, text=True, timeout=20)
                print(f"{argv[0]}: {_last_line(res.stdout + res.stderr)}")
            except subprocess.TimeoutExpired:
                print(f"{argv[0]}: timed out")
        else:
            print(f"{argv[0]}: not on PATH")


# --------------------------------------------------------------------------------------------- main


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (sha + (" with uncommitted changes" if dirty else "")) if sha else "unknown (no git checkout)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the commands and their timeouts, run nothing")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the markdown and JSON results")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run (default 480)")
    parser.add_argument("--only", default="", help="comma-separated parts of step names: run only those steps")
    parser.add_argument("--env-report", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.env_report:
        env_report()
        return 0

    t0 = time.monotonic()
    out = os.path.abspath(args.out)
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    steps = plan(out, tmp)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        steps = [s for s in steps if any(w in s.name for w in wanted)]

    if args.dry_run:
        os.rmdir(tmp)
        print(f"gpu_check dry run: {len(steps)} steps, run in this order from {ROOT}, each with its own timeout "
              f"and together within {args.budget:.0f} s; results into {out}")
        for i, s in enumerate(steps, 1):
            if s.argv is None:
                print(f"{i:2d}. [{s.kind}] {s.name}: skip ({s.skip_reason})")
            else:
                print(f"{i:2d}. [{s.kind}] {s.name} (timeout {s.timeout} s): {s.command()}")
        return 0

    device, why = probe_cuda(sys.executable)
    if device is None:
        print(f"gpu_check: a CUDA GPU is needed and {why}; `--dry-run` lists the commands", file=sys.stderr)
        os.rmdir(tmp)
        return 2

    os.makedirs(out, exist_ok=True)
    dev_slug = slug(device)
    summary_path = os.path.join(out, f"gpu_check_{dev_slug}.md")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = _commit()
    results: list[Result] = []
    env_text = ""
    print(f"gpu_check on {device}: {len(steps)} steps within {args.budget:.0f} s; logs in {tmp}", flush=True)

    def write_summary(finished: bool) -> str:
        text = summary_markdown(device, results, started=started, commit=commit, budget=args.budget,
                                used=time.monotonic() - t0, env_report=env_text, log_dir=tmp, finished=finished)
        with open(summary_path, "w") as fh:
            fh.write(text)
        return text

    try:
        for i, step in enumerate(steps, 1):
            left = args.budget - (time.monotonic() - t0)
            if step.argv is None:
                results.append(Result(step.name, step.kind, "skip", 0.0, step.timeout, "", detail=step.skip_reason))
            elif left < MIN_STEP_S:
                results.append(Result(step.name, step.kind, "skip", 0.0, step.timeout, step.command(),
                                      detail=f"the overall budget of {args.budget:.0f} s is spent ({left:.0f} s left)"))
            else:
                timeout = int(min(step.timeout, left))
                print(f"[{i}/{len(steps)}] {step.name} (timeout {timeout} s): {step.command()}", flush=True)
                log = os.path.join(tmp, f"{i:02d}_{slug(step.name)}.log")
                result = run_step(step, timeout, log, by_budget=timeout < step.timeout)
                if step.name == "env":
                    env_text = result.tail
                elif step.name == "cofi_kernels.info":
                    env_text += "\n\n$ python -m cofi_kernels.info\n" + result.tail
                if step.bench_json:
                    result.files = _bench_outputs(step, result, out, device, dev_slug)
                results.append(result)
            r = results[-1]
            print(f"    {r.status} {r.duration:.1f} s {r.detail[:300]}", flush=True)
            write_summary(finished=False)
    except KeyboardInterrupt:
        write_summary(finished=False)
        print(f"interrupted; partial summary in {summary_path}", file=sys.stderr)
        return 130

    text = write_summary(finished=True)
    table = text.split("## Commands")[0]
    print("\n" + table.rstrip())
    results_dir = os.path.join(HERE, "results")
    conftest_md = sorted(f for f in os.listdir(results_dir) if f.endswith(f"_cuda_{dev_slug}.md")) \
        if os.path.isdir(results_dir) else []
    written = [summary_path] + [os.path.join(out, f) for r in results for f in r.files]
    print("\nwritten: " + "\n         ".join(written))
    if conftest_md:
        print("benchmarks/conftest.py's tables: " + ", ".join(f"benchmarks/results/{f}" for f in conftest_md))
    print(f"logs: {tmp}")
    return 1 if any(r.status in ("fail", "timeout") for r in results) else 0


def _bench_outputs(step: Step, result: Result, out: str, device: str, dev_slug: str) -> list[str]:
    """Markdown (and a copy of the JSON) of one pytest benchmark file, if it wrote its JSON."""
    try:
        with open(step.bench_json) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        result.detail += f" (no benchmark JSON: {type(exc).__name__})"
        return []
    base = f"{step.suite}_gpu_check_{dev_slug}"
    with open(os.path.join(out, base + ".md"), "w") as fh:
        fh.write(bench_markdown(data, step.suite, device, step.command()))
    for bench in data.get("benchmarks", []):
        bench["stats"].pop("data", None)  # per-round times: not kept in the results folder
    with open(os.path.join(out, base + ".json"), "w") as fh:
        json.dump(data, fh, indent=1)
    return [base + ".md", base + ".json"]


if __name__ == "__main__":
    sys.exit(main())
