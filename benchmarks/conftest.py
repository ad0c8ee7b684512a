"""pytest-benchmark set-up: a markdown summary per suite and device in benchmarks/results/.

A benchmark says where it belongs through ``benchmark.extra_info``: ``suite``
(the file name stem, default ``row_ops``), ``device``, ``variant`` and, for
the baseline, ``baseline: True`` (default: the variant named ``eager``).
With ``flops`` (work of one call) and ``peak_tflops`` (the device's peak
measured in the same run) the summary adds TFLOP/s and % of peak. For every
group it lists each variant's median and the baseline median / its median.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

from tables import speedup_table

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} threads, torch {torch.get_num_threads()} threads)"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")[:60]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["cofi_devices"] = {d: device_name(d) for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available()}


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    suites: dict[tuple[str, str], dict[str, dict[str, tuple[float, dict]]]] = {}
    for bench in bs.benchmarks:
        if not bench.stats:
            continue
        info = bench.extra_info
        key = (info.get("suite", "row_ops"), info.get("device", "cpu"))
        variant = info.get("variant", bench.name)
        suites.setdefault(key, {}).setdefault(bench.group or bench.name, {})[variant] = (bench.stats.median, info)
    os.makedirs(RESULTS, exist_ok=True)
    for (suite, device), groups in suites.items():
        _write_summary(suite, device, groups)


def _write_summary(suite: str, device: str, groups: dict[str, dict[str, tuple[float, dict]]]) -> None:
    name = device_name(device)
    lines = [f"# {suite} microbenchmarks on {name}", "",
             "Medians from pytest-benchmark; speed-up = baseline median / this median, same run.", ""]
    lines += speedup_table({g: [(v, {"median": m}, info) for v, (m, info) in variants.items()]
                            for g, variants in groups.items()})
    path = os.path.join(RESULTS, f"{suite}_{device}_{_slug(name)}.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def cuda_peak_tflops() -> float:
    """The bf16 tensor-core peak measured on this GPU now: median of 8192³ cuBLAS matmuls."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12
