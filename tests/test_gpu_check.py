"""benchmarks/gpu_check.py on the CPU: its dry run, its exit without CUDA, its markdown writers and its run loop."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "gpu_check.py")
BENCH_DIR = os.path.join(REPO_ROOT, "benchmarks")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gc = _load()


def _run(*args, env=None):
    env = dict(os.environ if env is None else env)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=120)


def test_dry_run_lists_the_gpu_tests_and_every_gpu_benchmark():
    res = _run("--dry-run")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    commands = [line for line in lines if "(timeout " in line]
    skips = [line for line in lines if ": skip (" in line]

    # The GPU tests: the Triton files whole and the keyword selection over tests/, both keeping -m gpu tests.
    triton = [c for c in commands if "tests/ops/test_gated_attention.py" in c and "--ignore" not in c]
    assert triton and "-m 'gpu or not slow'" in triton[0] and "tests/ops/test_gated_ffn.py" in triton[0]
    keyword = [c for c in commands if "-k 'cuda or triton or gpu'" in c]
    assert keyword and keyword[0].endswith(" tests") and "-rfEs" in keyword[0] and " -x" not in keyword[0]
    assert "--ignore=tests/ops/test_gated_attention.py" in keyword[0]
    assert any("python -m cofi_kernels.info" in c for c in commands)
    assert any("gpu_check.py --env-report" in c for c in commands)

    # Every benchmark file: run when it mentions cuda, listed as skipped otherwise.
    assert any("benchmarks/gpu_row_ops.py --out" in c for c in commands)
    files = sorted(f for f in os.listdir(BENCH_DIR) if f.startswith("test_bench_") and f.endswith(".py"))
    assert files
    for name in files:
        with open(os.path.join(BENCH_DIR, name)) as fh:
            has_cuda = re.search(r"[\"']cuda[\"']|torch\.cuda\.", fh.read()) is not None
        ran = [c for c in commands if f"benchmarks/{name}" in c]
        skipped = [s for s in skips if name in s]
        if has_cuda:
            assert len(ran) == 1 and "--benchmark-json=" in ran[0] and not skipped, name
        else:
            assert not ran and len(skipped) == 1, name
            if name == "test_bench_serving.py":
                assert "serving: no GPU cases yet" in skipped[0]
    # Every command has a timeout, and the numbered steps are all there.
    assert len(commands) + len(skips) == int(re.search(r"dry run: (\d+) steps", lines[0]).group(1))


def test_without_cuda_it_exits_2_with_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    res = _run()
    assert res.returncode == 2
    out = (res.stdout + res.stderr).strip().splitlines()
    assert len(out) == 1 and "a CUDA GPU is needed" in out[0], out


def _results():
    R = gc.Result
    return [
        R("env", "env", "pass", 3.2, 60, "python benchmarks/gpu_check.py --env-report", detail="NVIDIA H200 (sm_90)"),
        R("tests: Triton files whole", "tests", "fail", 201.5, 270, "python -m pytest -rfEs tests/ops/x.py",
          detail="1 failed, 40 passed in 200.1s; FAILED tests/ops/x.py::test_a[cuda] - AssertionError: a | b",
          tail="line 1\nFAILED tests/ops/x.py::test_a[cuda] - AssertionError"),
        R("bench: test_bench_gated_ffn.py", "bench", "timeout", 120.0, 120, "python -m pytest benchmarks/y.py",
          detail="killed after 120 s (the step's timeout); last line: x", tail="still running"),
        R("bench: test_bench_row_ops.py", "bench", "pass", 12.0, 60, "python -m pytest -k cuda z.py",
          detail="8 passed in 11.0s", tail="should not be shown", files=["row_ops_gpu_check_NVIDIA_H200.md"]),
        R("bench: test_bench_serving.py", "bench", "skip", 0.0, 150, "", detail="serving: no GPU cases yet"),
    ]


def test_summary_markdown_of_fake_results():
    text = gc.summary_markdown("NVIDIA H200", _results(), started="2026-01-01 00:00 UTC", commit="abc1234",
                               budget=480, used=337, env_report="torch 2.11", log_dir="/tmp/logs")
    lines = text.splitlines()
    assert lines[0] == "# GPU check on NVIDIA H200"
    assert "**FAIL** (2 of 5 steps failed or timed out)" in text and "used 337 s" in text
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| step")]
    assert len(rows) == 5
    cells = [row.strip("|").split(" | ") for row in rows]
    assert [c[1] for c in cells] == ["pass", "fail", "timeout", "pass", "skip"]
    assert cells[1][2] == "201.5" and cells[1][3] == "270"
    assert "a \\| b" in rows[1]  # a pipe in a failure line does not split the cell
    assert "serving: no GPU cases yet" in rows[4] and "row_ops_gpu_check_NVIDIA_H200.md" in rows[3]
    # Output tails of the failed and timed-out steps only; commands of the steps that have one.
    assert "## tests: Triton files whole: fail" in text and "## bench: test_bench_gated_ffn.py: timeout" in text
    assert "still running" in text and "should not be shown" not in text
    assert "- env: `python benchmarks/gpu_check.py --env-report`" in text
    assert "```text\ntorch 2.11\n```" in text

    passing = [r for r in _results() if r.status in ("pass", "skip")]
    text = gc.summary_markdown("NVIDIA H200", passing, started="s", commit="c", budget=480, used=10)
    assert "**PASS**" in text and "## Environment" not in text
    text = gc.summary_markdown("NVIDIA H200", passing, started="s", commit="c", budget=480, used=10, finished=False)
    assert "**INCOMPLETE**" in text


def test_bench_markdown_ratios_and_tflops():
    def bench(group, variant, median, baseline=False, flops=None):
        info = {"variant": variant, "baseline": baseline, "peak_tflops": 800.0}
        if flops:
            info["flops"] = flops
        return {"group": group, "name": f"test[{variant}]", "extra_info": info,
                "stats": {"median": median, "iqr": median / 10, "min": median * 0.9, "rounds": 30}}

    data = {"version": "5.1.0", "datetime": "now", "benchmarks": [
        bench("g1", "cofi triton", 0.002, flops=8e12), bench("g1", "sdpa + eager gate", 0.004, baseline=True),
        bench("g2", "eager", 0.010), bench("g2", "fused", 0.005)]}
    text = gc.bench_markdown(data, "gated_attention", "NVIDIA H200", "python -m pytest x")
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in text.splitlines()
            if line.startswith("| g")}
    assert "| 2.000 | 0.200 | 1.800 | 30 | 2.00x | 4000.0 | 500% |" in rows[("g1", "cofi triton")]
    assert "| 1.00x |" in rows[("g1", "sdpa + eager gate")]
    assert "| 2.00x |" in rows[("g2", "fused")] and "| 1.00x |" in rows[("g2", "eager")]
    assert "no benchmark finished" in gc.bench_markdown({"benchmarks": []}, "s", "d", "c")


def test_pytest_output_parsing_and_slug():
    out = ("....F\n=========================== short test summary info ============================\n"
           "FAILED tests/a.py::test_x[cuda] - AssertionError: boom\nERROR tests/b.py::test_y - RuntimeError\n"
           "=================== 1 failed, 4 passed, 1 error in 3.21s ===================\n")
    assert gc.summary_line(out) == "1 failed, 4 passed, 1 error in 3.21s"
    assert gc.failure_lines(out) == ["FAILED tests/a.py::test_x[cuda] - AssertionError: boom",
                                     "ERROR tests/b.py::test_y - RuntimeError"]
    assert gc.failure_lines(out, limit=1)[-1] == "... and 1 more"
    assert gc.slug("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert gc.slug("NVIDIA H200") == "NVIDIA_H200"


def test_run_loop_records_pass_fail_timeout_and_budget(tmp_path, monkeypatch, capsys):
    py = sys.executable
    report = {"version": "5", "datetime": "now", "benchmarks": [
        {"group": "g", "name": "t", "extra_info": {"variant": "eager"},
         "stats": {"median": 0.001, "iqr": 0.0, "min": 0.001, "rounds": 3, "data": [0.001] * 3}}]}
    json_path = str(tmp_path / "b.json")
    fake_pytest = ("import sys; print('FAILED tests/a.py::test_x - AssertionError: no'); "
                   "print('====== 1 failed, 2 passed in 0.1s ======'); sys.exit(1)")
    write_json = f"import json; json.dump({report!r}, open({json_path!r}, 'w'))"
    steps = [
        gc.Step("env", "env", [py, "-c", "print('Fake GPU (sm_90)')"], 30),
        gc.Step("tests: fake", "tests", [py, "-c", fake_pytest], 30, pytest=True),
        gc.Step("bench: slow", "bench", [py, "-c", "import time; time.sleep(60)"], 1),
        gc.Step("bench: fake", "bench", [py, "-c", write_json], 30, pytest=True, bench_json=json_path, suite="fake"),
        gc.Step("bench: serving", "bench", None, 30, skip_reason="serving: no GPU cases yet"),
    ]
    monkeypatch.setattr(gc, "plan", lambda out, tmp: steps)
    monkeypatch.setattr(gc, "probe_cuda", lambda python: ("Fake GPU 1", ""))
    runs = []

    def log_dir(prefix):  # the logs of each run under tmp_path, not in /tmp
        runs.append(tmp_path / f"logs{len(runs)}")
        runs[-1].mkdir()
        return str(runs[-1])

    monkeypatch.setattr(gc.tempfile, "mkdtemp", log_dir)
    out = tmp_path / "out"
    assert gc.main(["--out", str(out)]) == 1
    summary = (out / "gpu_check_Fake_GPU_1.md").read_text()
    statuses = [line.split(" | ")[1] for line in summary.splitlines() if line.startswith("| ")][1:]
    assert statuses == ["pass", "fail", "timeout", "pass", "skip"]
    assert "1 failed, 2 passed in 0.1s; FAILED tests/a.py::test_x - AssertionError: no" in summary
    assert "killed after 1 s (the step's timeout)" in summary and "Fake GPU (sm_90)" in summary
    assert (out / "fake_gpu_check_Fake_GPU_1.md").exists()
    assert sorted(os.listdir(runs[0])) == ["01_env.log", "02_tests__fake.log", "03_bench__slow.log",
                                           "04_bench__fake.log"]
    kept = json.loads((out / "fake_gpu_check_Fake_GPU_1.json").read_text())
    assert "data" not in kept["benchmarks"][0]["stats"]
    printed = capsys.readouterr().out
    assert "| step | status |" in printed and "written:" in printed

    # No budget left: every step is skipped with the reason, nothing failed.
    assert gc.main(["--out", str(out), "--budget", "0"]) == 0
    summary = (out / "gpu_check_Fake_GPU_1.md").read_text()
    assert summary.count("the overall budget of 0 s is spent") == 4 and "**PASS**" in summary


def test_serving_gpu_tests_and_benchmark_have_their_own_steps(tmp_path):
    """The serving GPU test files run whole in a step of their own, and the GPU serving benchmark
    (the serving issue's open GPU figures) runs first of the benchmarks."""
    steps = gc.plan(str(tmp_path / "out"), str(tmp_path))
    names = [s.name for s in steps]
    serving = steps[names.index("tests: serving GPU files whole")]
    for f in ("tests/serving/test_varlen_triton.py", "tests/serving/test_cuda_serving.py"):
        assert f in serving.argv
        kernel_whole = steps[names.index("tests: Triton files whole")].argv
        assert f not in kernel_whole
        assert f"--ignore={f}" in steps[names.index('tests: -k "cuda or triton or gpu"')].argv
    benches = [n for n in names if n.startswith("bench: ") and steps[names.index(n)].argv]
    assert benches[0] == "bench: test_bench_serving_gpu.py"
    assert steps[names.index(benches[0])].timeout == gc.BENCH_TIMEOUT["serving_gpu"]
