"""pytest-benchmark set-up: a markdown summary per device in benchmarks/results/.

For every benchmark group, the summary lists each variant's median and its
ratio to the eager PyTorch composition measured in the same run.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

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
    by_device: dict[str, dict[str, dict[str, float]]] = {}
    for bench in bs.benchmarks:
        if not bench.stats:
            continue
        device = bench.extra_info.get("device", "cpu")
        variant = bench.extra_info.get("variant", bench.name)
        by_device.setdefault(device, {}).setdefault(bench.group or bench.name, {})[variant] = bench.stats.median
    os.makedirs(RESULTS, exist_ok=True)
    for device, groups in by_device.items():
        name = device_name(device)
        lines = [f"# Row-op microbenchmarks on {name}", "",
                 "Medians from pytest-benchmark; ratio = eager median / this median, same run.", "",
                 "| group | variant | median (ms) | speed-up vs eager |", "|---|---|---|---|"]
        for group, variants in sorted(groups.items()):
            eager = variants.get("eager")
            for variant, median in sorted(variants.items()):
                ratio = f"{eager / median:.2f}x" if eager else ""
                lines.append(f"| {group} | {variant} | {median * 1e3:.3f} | {ratio} |")
        path = os.path.join(RESULTS, f"row_ops_{device}_{_slug(name)}.md")
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
