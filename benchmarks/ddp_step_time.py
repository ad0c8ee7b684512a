"""Step time of training on this CPU: 2 processes × 1 thread (torchrun, gloo) against 1 process × 2 threads,
for the same global batch.

    python benchmarks/ddp_step_time.py [--steps 14] [--rounds 2] [--out benchmarks/results]

Runs the demo's shapes (all-MiniLM-L6-v2, BBC News, 128 tokens, global batch 32): a fine-tuning
run and a CoFi prune run (gates sampled from the first step), each stopped after ``--steps``
steps (``--stop-at-step``). A step's time is the difference of consecutive ``seconds`` in
``log.jsonl`` (rank 0's clock); the first two steps of each run are left out (warm-up). The
configurations alternate, ``--rounds`` times, so a drift of the machine's load hits both;
the table gives the median step time of each and their ratio. Writes ``ddp_step_time_cpu.md``
and ``.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

WARMUP = 2


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    return env


def _run(cmd: list[str], threads: int) -> None:
    proc = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def _step_times(out: str) -> list[float]:
    with open(os.path.join(out, "log.jsonl")) as f:
        seconds = [r["seconds"] for r in map(json.loads, f) if r["event"] == "step"]
    return [b - a for a, b in zip(seconds, seconds[1:])][WARMUP - 1:]


def _cli(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "cofi_kernels.cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "cofi_kernels.cli"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="ddp-steps-")
    teacher = os.path.join(work, "teacher")
    # A teacher with the demo's shapes; its accuracy does not matter for step times.
    _run(_cli(1) + ["finetune", "--out", teacher, "--epochs", "0.02", "--quiet", "--max-length", "128"], 2)
    jobs = {
        "finetune": ["finetune", "--epochs", "1", "--max-length", "128", "--batch-size", "32", "--quiet"],
        "cofi prune": ["prune", "--teacher", teacher, "--target-sparsity", "0.9", "--distill-epochs", "0",
                       "--prune-epochs", "2", "--sparsity-warmup-epochs", "1", "--max-length", "128",
                       "--batch-size", "32", "--quiet"],
    }
    configs = {"1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}
    times: dict[str, dict[str, list[float]]] = {j: {c: [] for c in configs} for j in jobs}
    for r in range(args.rounds):
        for job, flags in jobs.items():
            for name, (procs, threads) in configs.items():
                out = os.path.join(work, f"{job.replace(' ', '-')}-{procs}x{threads}-{r}")
                _run(_cli(procs) + flags + ["--out", out, "--stop-at-step", str(args.steps)], threads)
                times[job][name] += _step_times(out)
                print(f"round {r + 1}: {job}, {name}: median {statistics.median(_step_times(out)):.3f} s/step",
                      flush=True)
    rows, summary = [], {}
    for job in jobs:
        one, two = (statistics.median(times[job][c]) for c in configs)
        summary[job] = {"one_process_two_threads_s": one, "two_processes_one_thread_s": two,
                        "steps_each": len(times[job]["2 processes x 1 thread"]), "ratio": one / two}
        rows.append(f"| {job} | {one:.3f} | {two:.3f} | {one / two:.2f}x |")
    cpu = _cpu_model()
    md = "\n".join([
        "# Training step time: 2 processes x 1 thread against 1 process x 2 threads",
        "",
        f"CPU: {cpu}, {os.cpu_count()} logical cores; torch gloo; OMP_WAIT_POLICY=PASSIVE.",
        "Demo shapes: all-MiniLM-L6-v2, BBC News, 128 tokens, global batch 32 (16 per process on 2).",
        f"Median seconds per step over {args.rounds} alternating rounds of {args.steps} steps "
        f"(the first {WARMUP} of each run left out); command: `python benchmarks/ddp_step_time.py`.",
        "",
        "| run | 1 process x 2 threads (s/step) | 2 processes x 1 thread (s/step) | speed of 2 processes |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ddp_step_time_cpu.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "ddp_step_time_cpu.json"), "w") as f:
        json.dump({"cpu": cpu, "steps": args.steps, "rounds": args.rounds, "results": summary, "raw": times}, f,
                  indent=2)
    print(md)


if __name__ == "__main__":
    main()
