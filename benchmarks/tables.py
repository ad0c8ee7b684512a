"""The one markdown table of benchmark medians and speed-ups (benchmarks/conftest.py and gpu_check.py).

A group holds the variants measured together; each row gives the chosen
statistics and ``baseline median / this median``. The baseline is the variant
whose ``info`` says ``baseline: True``, else the one named ``eager``. With
``flops`` (work of one call) in a variant's info the table adds TFLOP/s, and
with ``peak_tflops`` (the device's peak measured in the same run) its share.
"""

from __future__ import annotations

# statistic → (column title, formatter of pytest-benchmark's stats in seconds)
STATS = {
    "median": ("median (ms)", lambda s: f"{s['median'] * 1e3:.3f}"),
    "iqr": ("IQR (ms)", lambda s: f"{s['iqr'] * 1e3:.3f}"),
    "min": ("min (ms)", lambda s: f"{s['min'] * 1e3:.3f}"),
    "rounds": ("rounds", lambda s: str(s["rounds"])),
}


def cell(text: str, newline: str = " ") -> str:
    """``text`` safe inside a markdown table cell (line breaks become ``newline``)."""
    return str(text).replace("|", "\\|").replace("\n", newline)


def speedup_table(groups: dict[str, list[tuple[str, dict, dict]]], stats: tuple[str, ...] = ("median",)) -> list[str]:
    """Markdown lines: ``groups`` maps a group name to ``(variant, stats, info)`` per variant."""
    with_flops = any("flops" in info for variants in groups.values() for _, _, info in variants)
    head = "| group | variant | " + " | ".join(STATS[s][0] for s in stats) + " | speed-up vs baseline |"
    rule = "|---|---|" + "---|" * len(stats) + "---|"
    if with_flops:
        head += " TFLOP/s | % of measured peak |"
        rule += "---|---|"
    lines = [head, rule]
    for group in sorted(groups):
        variants = groups[group]
        base = next((s["median"] for _, s, info in variants if info.get("baseline")), None)
        if base is None:
            base = next((s["median"] for v, s, _ in variants if v == "eager"), None)
        for variant, s, info in sorted(variants, key=lambda v: v[0]):
            ratio = f"{base / s['median']:.2f}x" if base and s["median"] else ""
            row = f"| {cell(group)} | {cell(variant)} | " + " | ".join(STATS[k][1](s) for k in stats) + f" | {ratio} |"
            if with_flops:
                tflops = info["flops"] / s["median"] / 1e12 if "flops" in info and s["median"] else None
                peak = info.get("peak_tflops")
                row += f" {tflops:.1f} |" if tflops else " |"
                row += f" {100 * tflops / peak:.0f}% |" if tflops and peak else " |"
            lines.append(row)
    return lines
