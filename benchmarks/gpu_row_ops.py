"""GPU timings of the CUDA row ops against the device's measured bandwidth.

Run on a CUDA machine after building the extension:

    python benchmarks/gpu_row_ops.py --out benchmarks/results

Each op is captured N times in one CUDA graph over N different input sets
(together larger than L2), the graph is replayed, and the median replay time
over N is the op's time. Bandwidth % = minimal bytes (each input read once,
each output written once) / time / the copy bandwidth measured in the same run.
The eager PyTorch composition (cofi_kernels.reference) is timed the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import cofi_kernels
from cofi_kernels.ops import reference
from row_inputs import gelu_inputs, mln_inputs

L2_MULTIPLE = 4  # input sets together at least this many times the L2 size


def time_ms(make_call, sets: int, graph: bool, replays: int = 20) -> float:
    """Median time of one call over `sets` different input sets.

    graph=True: the `sets` calls are captured in one CUDA graph and the graph
    is replayed (kernel time, launch overhead removed). graph=False: the calls
    run back to back between two events (what an eager caller sees; autograd
    passes are timed this way since a leaf's grad accumulator cannot join a
    capture made on another stream).
    """
    calls = [make_call(i) for i in range(sets)]

    def run():
        for call in calls:
            call()

    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for call in calls[:3]:
                call()  # warm-up outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            run()
        run = cuda_graph.replay  # noqa: F811
    else:
        for _ in range(2):
            run()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / sets)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = 1 << 28  # 1 GiB of float32
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n * 4 / statistics.median(times)


def sets_for(bytes_per_set: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(4, min(64, -(-L2_MULTIPLE * l2 // max(bytes_per_set, 1))))


def time_passes(op, shape, dtype, n, bw, passes, eager_forward, eager_forward_backward):
    """Rows of the results table for one op: `passes` is [(name, make_call, minimal bytes)]
    for forward, backward and forward+backward; the eager baselines go beside the first and last."""
    rows_out = []
    for name, make, nbytes in passes:
        graph = name != "forward+backward"
        t = time_ms(make, n, graph)
        rows_out.append({"op": op, "pass": name, "shape": list(shape), "dtype": str(dtype),
                         "ms": t, "graph": graph, "bandwidth_pct": 100 * nbytes / (t / 1e3) / bw})
    rows_out[0]["eager_ms"] = time_ms(eager_forward, n, graph=True)
    rows_out[-1]["eager_ms"] = time_ms(eager_forward_backward, n, graph=False)
    return rows_out


def bench_gelu(rows, cols, dtype, bw):
    size = rows * cols * dtype.itemsize
    n = sets_for(3 * size)
    data = [gelu_inputs(rows, cols, dtype, "cuda") for _ in range(n)]
    ops = torch.ops.cofi
    mask = [True, True, True]

    def fwd(i):
        x, b, g, _ = data[i]
        return lambda: ops.gelu_gate_fwd(x, b, g)

    def bwd(i):
        x, b, g, go = data[i]
        return lambda: ops.gelu_gate_bwd(go, x, b, g, mask)

    def fused_fb(i):
        x, b, g, go = data[i]
        return lambda: torch.autograd.grad(cofi_kernels.gelu_gate(x, b, g, backend="cuda"), (x, b, g), go)

    def eager_f(i):
        x, b, g, _ = data[i]
        return lambda: reference.gelu_gate(x, b, g)

    def eager_fb(i):
        x, b, g, go = data[i]
        return lambda: torch.autograd.grad(reference.gelu_gate(x, b, g), (x, b, g), go)

    passes = [("forward", fwd, 2 * size), ("backward", bwd, 3 * size), ("forward+backward", fused_fb, 5 * size)]
    return time_passes("gelu_gate", (rows, cols), dtype, n, bw, passes, eager_f, eager_fb)


def bench_mln(rows, dims, dtype, bw):
    size = rows * dims * dtype.itemsize
    n = sets_for(5 * size)
    data = [mln_inputs(rows, dims, dtype, "cuda") for _ in range(n)]
    ops = torch.ops.cofi
    saved = [ops.masked_layer_norm_fwd(*d[:6], 1e-12) for d in data]
    mask = [True] * 6

    def fwd(i):
        return lambda: ops.masked_layer_norm_fwd(*data[i][:6], 1e-12)

    def bwd(i):
        x, r, w, b, lg, hg, go = data[i]
        _, mean, rstd = saved[i]
        return lambda: ops.masked_layer_norm_bwd(go, x, r, w, b, lg, hg, mean, rstd, mask)

    def fused_fb(i):
        x, r, w, b, lg, hg, go = data[i]
        return lambda: torch.autograd.grad(
            cofi_kernels.masked_layer_norm(x, r, w, b, lg, hg, backend="cuda", check_gates=False),
            (x, r, w, b, lg, hg), go)

    def eager_f(i):
        return lambda: reference.masked_layer_norm(*data[i][:6])

    def eager_fb(i):
        x, r, w, b, lg, hg, go = data[i]
        return lambda: torch.autograd.grad(reference.masked_layer_norm(x, r, w, b, lg, hg), (x, r, w, b, lg, hg), go)

    passes = [("forward", fwd, 3 * size), ("backward", bwd, 5 * size), ("forward+backward", fused_fb, 8 * size)]
    return time_passes("masked_layer_norm", (rows, dims), dtype, n, bw, passes, eager_f, eager_fb)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        for rows in (8 * 128, 32 * 128):
            results += bench_gelu(rows, 3072, dtype, bw)
            results += bench_mln(rows, 768, dtype, bw)
        results += bench_mln(8 * 128, 757, dtype, bw)  # the s95 profile's hidden size: generic path
    lines = [f"# CUDA row ops on {device}", "",
             f"copy bandwidth measured in this run: {bw / 1e12:.2f} TB/s (read + write)", "",
             "forward and backward: raw ops replayed from a CUDA graph (kernel time);",
             "forward+backward: through autograd, back to back without a graph (launch overhead included),",
             "eager forward+backward likewise.", "",
             "| op | pass | rows x cols | dtype | time (us) | % of copy bandwidth | eager (us) | speed-up vs eager |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        eager = r.get("eager_ms")
        lines.append(
            f"| {r['op']} | {r['pass']} | {r['shape'][0]}x{r['shape'][1]} | {r['dtype'].removeprefix('torch.')} "
            f"| {r['ms'] * 1e3:.1f} | {r['bandwidth_pct']:.0f}% | "
            + (f"{eager * 1e3:.1f} | {eager / r['ms']:.2f}x |" if eager else "| |"))
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    slug = device.replace(" ", "_")
    with open(os.path.join(args.out, f"row_ops_{slug}.md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(args.out, f"row_ops_{slug}.json"), "w") as fh:
        json.dump({"device": device, "copy_bandwidth_Bps": bw, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
