"""Training on several processes (DESIGN §9): torchrun + gloo on this CPU, against one process.

Every multi-process run here is a real ``torchrun`` job of the ``cofi`` command (OMP_NUM_THREADS=1).
"2 processes × b equal 1 process × 2b" is checked in float64 weights: in float32 the
order of the sums changes a few near-zero gradient entries (the key biases' gradients are
zero in exact arithmetic) in their last bits, and AdamW's first steps turn such an entry
into a step of ±lr whatever its size, so float32 runs differ by ~lr in those entries after a
few steps whichever way the sums are reordered (one process on 1 or 2 threads as well).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from cofi_kernels.training import distributed
from cofi_kernels.training import finetune as ft
from cofi_kernels.training.distributed import World
from tests.training_support import FAST_FINETUNE, dataset, files_equal_tensors, tiny_bert_dir, toy_rows, write_jsonl

ENTRY = os.path.join(os.path.dirname(__file__), "torchrun_entry.py")
LIMIT_S = 300  # no job here takes a tenth of that; a hang fails instead of blocking the suite
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")


# ---------------------------------------------------------------------- launching


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR")
    env.update(extra)
    return env


def _cofi(args, **env) -> subprocess.CompletedProcess:
    """One process: the plain ``cofi`` command."""
    return subprocess.run([sys.executable, "-m", "cofi_kernels.cli", *args], env=_env(**env), capture_output=True,
                          text=True, timeout=LIMIT_S)


def _torchrun_cmd(n: int, args, entry=None) -> list[str]:
    target = ["-m", "cofi_kernels.cli"] if entry is None else [entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *target, *args]


def _torchrun(n: int, args, entry=None, **env) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(n, args, entry), env=_env(**env), capture_output=True, text=True,
                          timeout=LIMIT_S)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(out) -> dict:
    return torch.load(os.path.join(out, "checkpoint", "state.pt"), map_location="cpu", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def _steps(out) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["event"] == "step"]


# ---------------------------------------------------------------------- models and data


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Data files, dropout-free tiny BERTs (float32 and float64) and a teacher fine-tuned from the first."""
    d = tmp_path_factory.mktemp("ddp")
    train, held = toy_rows(48, 1), toy_rows(24, 2)
    files = {"train": write_jsonl(d / "train.jsonl", train), "eval": write_jsonl(d / "eval.jsonl", held)}
    base32 = tiny_bert_dir(d / "base32", dropout=0.0)
    base64 = tiny_bert_dir(d / "base64", dropout=0.0, dtype=torch.float64)
    teacher32 = str(d / "teacher32")
    ft.finetune(base32, dataset(train), dataset(held), teacher32, ft.FinetuneConfig(**FAST_FINETUNE), progress=False)
    teacher64 = str(d / "teacher64")
    shutil.copytree(teacher32, teacher64)
    import transformers as tf

    tf.AutoModelForSequenceClassification.from_pretrained(teacher32).double().save_pretrained(teacher64)
    data = ["--data", files["train"], "--eval-data", files["eval"], "--max-length", "16", "--quiet"]
    return {"dir": d, "data": data, "base32": base32, "base64": base64, "teacher32": teacher32, "teacher64": teacher64}


def _cofi_args(job, teacher: str, out) -> list[str]:
    return ["prune", "--teacher", job[teacher], *job["data"], "--out", str(out), "--target-sparsity", "0.6",
            "--distill-epochs", "0.5", "--prune-epochs", "6", "--sparsity-warmup-epochs", "2", "--finetune-epochs", "1",
            "--lr", "1e-3", "--reg-lr", "0.3", "--finetune-lr", "1e-3", "--checkpoint-every", "4",
            "--eval-every", "3", "--epsilon", "0.05", "--batch-size", "8"]


def _masks(teacher: str, gates_state: dict) -> dict:
    """The deterministic gates' zero patterns of a CoFi checkpoint's gates."""
    from cofi_kernels.pruning.cofi.patch import apply_cofi
    from cofi_kernels.training.model_io import load_task_model

    gates = apply_cofi(load_task_model(teacher))
    gates.load_state_dict(gates_state)
    return {t: v == 0 for t, v in gates.deterministic().items() if v is not None}


# ---------------------------------------------------------------------- equal to one process


def _cofi_pair(job, tmp_path, teacher: str, steps: int, entry=None, nproc: int = 2, extra=(), **env):
    """The checkpoints after ``steps`` steps of one plain process and of ``nproc`` under torchrun."""
    one, two = tmp_path / "one", tmp_path / "two"
    stop = ["--stop-at-step", str(steps), *extra]
    _ok(_cofi(_cofi_args(job, teacher, one) + stop))
    _ok(_torchrun(nproc, _cofi_args(job, teacher, two) + stop, entry, **env))
    return _state(one), _state(two)


def _cofi_differences(a: dict, b: dict) -> dict:
    am, bm = a["method"], b["method"]
    gates = {k: v for k, v in am["gates"].items() if k.startswith("log_alpha")}
    lambdas = {k: v for k, v in am["gates"].items() if k.startswith("lambda")}
    return {"params": _max_diff(am["student"], bm["student"]),
            "log_alpha": _max_diff(gates, {k: bm["gates"][k] for k in gates}),
            "lambda": _max_diff(lambdas, {k: bm["gates"][k] for k in lambdas}),
            "W": _max_diff(am["distiller"], bm["distiller"])}


def test_cofi_on_two_processes_equals_one_with_twice_the_batch(job, tmp_path):
    """20 CoFi steps with prediction and layer distillation (3 distill, 17 prune): 2 processes × 4
    examples against 1 process × 8; parameters, log α, λ and W within 1e-5, identical masks."""
    a, b = _cofi_pair(job, tmp_path, "teacher64", 20)
    assert a["trainer"]["step"] == b["trainer"]["step"] == 20
    assert (a["world_size"], b["world_size"]) == (1, 2)
    diff = _cofi_differences(a, b)
    assert all(v <= 1e-5 for v in diff.values()), diff
    # The gates moved (the comparison is not of two untouched states).
    assert float(a["method"]["gates"]["lambda_1"].abs()) > 0.1
    ma, mb = _masks(job["teacher64"], a["method"]["gates"]), _masks(job["teacher64"], b["method"]["gates"])
    assert ma.keys() == mb.keys() and all(torch.equal(ma[t], mb[t]) for t in ma)
    assert any(bool(m.any()) for m in ma.values())  # some gate is 0: the masks say something
    # The logged global values agree too, the layer matching exactly.
    sa, sb = _steps(tmp_path / "one"), _steps(tmp_path / "two")
    assert [r["match"] for r in sa] == [r["match"] for r in sb]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 * max(1.0, abs(x["loss"])) for x, y in zip(sa, sb))


def test_float32_steps_agree_to_rounding(job, tmp_path):
    """In float32 (the fused kernels' path) the first step agrees to rounding."""
    a, b = _cofi_pair(job, tmp_path, "teacher32", 1)
    diff = _cofi_differences(a, b)
    assert all(v <= 1e-6 for v in diff.values()), diff


# A mark of its own, not conftest's: benchmarks/gpu_check.py runs every file that uses that one whole on the
# GPU machine, and only this case needs a GPU (it is picked by `-k cuda` there: the 1-process NCCL job).
_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_GPU)])
def test_one_process_under_torchrun_equals_the_plain_command(job, tmp_path, device):
    """``torchrun --nproc_per_node 1`` forms a group of one (gloo, or NCCL on a GPU) and trains through
    DDP; it equals the plain command, and runs a whole CoFi job (prune, compact model, fine-tuning)."""
    dev = ["--device", device]
    a, b = _cofi_pair(job, tmp_path, "teacher32", 6, nproc=1, extra=dev)
    diff = _cofi_differences(a, b)
    assert all(v <= 1e-6 for v in diff.values()), diff
    whole = tmp_path / "whole"
    _ok(_torchrun(1, _cofi_args(job, "teacher32", whole) + dev))
    run = json.loads((whole / "run.json").read_text())
    assert (run["world_size"], run["global_batch"], run["steps"]) == (1, 8, 45)


def test_negative_control_gates_outside_the_wrapped_module_diverge(job, tmp_path):
    """The same comparison fails when the gates' gradients are not averaged over the processes."""
    a, b = _cofi_pair(job, tmp_path, "teacher64", 20, entry=ENTRY, COFI_TEST_FAULT="gates-outside-ddp")
    diff = _cofi_differences(a, b)
    assert diff["log_alpha"] > 1e-3, diff


def test_theseus_on_two_processes_equals_one(job, tmp_path):
    """20 Theseus steps with prediction distillation (18 replacing, 2 fine-tuning), evaluations sharded."""
    def args(out):
        return ["prune", "--method", "theseus", "--teacher", job["teacher64"], *job["data"], "--out", str(out),
                "--layers", "2", "--replace-epochs", "3", "--finetune-epochs", "1", "--lr", "1e-3",
                "--finetune-lr", "1e-3", "--distill", "--eval-every", "3", "--checkpoint-every", "4",
                "--batch-size", "8", "--stop-at-step", "20"]

    _ok(_cofi(args(tmp_path / "one")))
    _ok(_torchrun(2, args(tmp_path / "two")))
    a, b = _state(tmp_path / "one")["method"], _state(tmp_path / "two")["method"]
    assert _max_diff(a["successor"], b["successor"]) <= 1e-5
    sa, sb = _steps(tmp_path / "one"), _steps(tmp_path / "two")
    assert [r["successor"] for r in sa if "successor" in r] == [r["successor"] for r in sb if "successor" in r]
    assert any(0 < sum(r["successor"]) < 2 for r in sa if "successor" in r)  # steps that mix modules


def test_smp_and_scratch_on_two_processes_equal_one(job, tmp_path):
    """The other two methods: structured SMP with a teacher (10 steps), then Scratch-E from a CoFi run's
    shapes (10 steps), 2 processes × 4 against 1 process × 8."""
    from cofi_kernels.pruning.cofi.loop import PruneConfig, cofi_prune
    from tests.training_support import FAST_PRUNE

    def smp(out):
        return ["prune", "--method", "smp", "--model", job["base64"], "--teacher", job["teacher64"], *job["data"],
                "--out", str(out), "--structured", "--remaining", "0.3", "--epochs", "2", "--schedule-epochs", "1",
                "--lr", "5e-2", "--head-lr", "1e-2", "--eval-every", "3", "--batch-size", "8", "--stop-at-step", "10"]

    _ok(_cofi(smp(tmp_path / "smp1")))
    _ok(_torchrun(2, smp(tmp_path / "smp2")))
    a, b = _state(tmp_path / "smp1")["method"], _state(tmp_path / "smp2")["method"]
    assert _max_diff(a["scores"], b["scores"]) <= 1e-5 and _max_diff(a["head"], b["head"]) <= 1e-5

    arch = str(tmp_path / "arch")
    train, held = dataset(toy_rows(48, 1)), dataset(toy_rows(24, 2))
    cofi_prune(job["teacher64"], train, held, arch, PruneConfig(**FAST_PRUNE), progress=False)

    def scratch(out):
        return ["prune", "--method", "scratch", "--architecture", arch, *job["data"], "--out", str(out),
                "--budget", "E", "--batch-size", "8", "--eval-every", "3", "--stop-at-step", "10"]

    _ok(_cofi(scratch(tmp_path / "s1")))
    _ok(_torchrun(2, scratch(tmp_path / "s2")))
    a, b = _state(tmp_path / "s1")["method"], _state(tmp_path / "s2")["method"]
    assert _max_diff(a["model"], b["model"]) <= 1e-5


def test_finetune_on_two_machines_equals_one_process(job, tmp_path):
    """Fine-tuning through torchrun's multi-node rendezvous (two agents, c10d backend, one process
    each) against one process: 20 steps, weights within 1e-5; evaluations give the same metrics."""
    def args(out):
        return ["finetune", "--model", job["base64"], *job["data"], "--out", str(out), "--epochs", "4",
                "--lr", "3e-3", "--batch-size", "8", "--eval-every", "4", "--checkpoint-every", "5",
                "--stop-at-step", "20"]

    _ok(_cofi(args(tmp_path / "one")))
    port = _free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cofi-test",
         "-m", "cofi_kernels.cli", *args(tmp_path / "two")],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in agents:
        out, err = p.communicate(timeout=LIMIT_S)
        assert p.returncode == 0, err[-3000:]
    a, b = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert b["world_size"] == 2
    assert _max_diff(a["method"]["model"], b["method"]["model"]) <= 1e-5
    evals = [[r for r in map(json.loads, open(tmp_path / o / "log.jsonl")) if r["event"] == "eval"]
             for o in ("one", "two")]
    assert len(evals[0]) == 5 and [e["accuracy"] for e in evals[0]] == [e["accuracy"] for e in evals[1]]


# ---------------------------------------------------------------------- kill, resume, errors


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def test_killed_two_process_run_resumes_to_the_uninterrupted_result(job, tmp_path):
    """A 2-process CoFi run (45 steps: distill, prune, compact fine-tuning) SIGKILLed mid-way with
    its launcher, then continued with --resume on 2 processes, ends with the uninterrupted run's
    model and gates, bit for bit. A resume on another number of processes is refused unless
    --allow-world-size-change says otherwise."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _ok(_torchrun(2, _cofi_args(job, "teacher32", whole)))
    agent = subprocess.Popen(_torchrun_cmd(2, _cofi_args(job, "teacher32", killed)), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + LIMIT_S
    try:
        while time.monotonic() < deadline and agent.poll() is None:
            steps = _steps(killed) if (killed / "log.jsonl").exists() else []
            if steps and steps[-1]["step"] >= 14:
                break
            time.sleep(0.02)
    finally:
        for pid in _descendants(agent.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        agent.wait()
    assert not (killed / "run.json").exists(), "the run ended before it could be killed"
    done = _state(killed)["trainer"]["step"]
    assert 12 <= done < 45

    refused = _cofi(_cofi_args(job, "teacher32", killed) + ["--resume"])
    assert refused.returncode == 2
    assert "written by 2 process(es), this run has 1" in refused.stderr
    assert "--allow-world-size-change" in refused.stderr

    _ok(_torchrun(2, _cofi_args(job, "teacher32", killed) + ["--resume"]))
    for name in ("model.safetensors", "gates.safetensors"):
        assert files_equal_tensors(str(whole / name), str(killed / name)), name
    run = json.loads((killed / "run.json").read_text())
    assert (run["world_size"], run["global_batch"]) == (2, 8)


def test_resume_on_another_number_of_processes_when_allowed(job, tmp_path):
    """--allow-world-size-change continues a 1-process checkpoint on 2 processes, to within rounding
    of the run that went on alone."""
    alone, moved = tmp_path / "alone", tmp_path / "moved"
    _ok(_cofi(_cofi_args(job, "teacher64", alone) + ["--stop-at-step", "12"]))
    shutil.copytree(alone, moved)
    _ok(_cofi(_cofi_args(job, "teacher64", alone) + ["--resume", "--stop-at-step", "16"]))
    refused = _torchrun(2, _cofi_args(job, "teacher64", moved) + ["--resume", "--stop-at-step", "16"])
    assert refused.returncode != 0 and "written by 1 process(es), this run has 2" in refused.stderr
    _ok(_torchrun(2, _cofi_args(job, "teacher64", moved) + ["--resume", "--allow-world-size-change",
                                                            "--stop-at-step", "16"]))
    diff = _cofi_differences(_state(alone), _state(moved))
    assert all(v <= 1e-5 for v in diff.values()), diff


def test_a_failing_process_brings_the_job_down_with_its_message(job, tmp_path):
    t0 = time.monotonic()
    proc = _torchrun(2, _cofi_args(job, "teacher32", tmp_path / "o"), ENTRY, COFI_TEST_FAULT="fail-rank-1")
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 120
    assert "injected failure of process 1 at step 3" in proc.stdout + proc.stderr


@pytest.mark.parametrize("rank", [0, 1], ids=["host-waits-for-a-missing-peer", "peer-cannot-reach-the-host"])
def test_unreachable_rendezvous_fails_within_the_timeout(job, tmp_path, rank):
    port = _free_port()
    t0 = time.monotonic()
    proc = _cofi(_cofi_args(job, "teacher32", tmp_path / "o") + ["--dist-timeout", "3"], RANK=str(rank),
                 LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"could not join the process group at 127.0.0.1:{port} within 3 s" in lines[0]
    assert not (tmp_path / "o").exists()


def test_commands_that_run_on_one_process_refuse_torchrun(job, tmp_path):
    proc = _cofi(["eval", "--model", job["teacher32"], "--data", job["data"][1]], WORLD_SIZE="2")
    assert proc.returncode == 2 and "only finetune and prune run on several processes" in proc.stderr
    proc = _cofi(_cofi_args(job, "teacher32", tmp_path / "o") + ["--allow-world-size-change"])
    assert proc.returncode == 2 and "needs --resume" in proc.stderr


# ---------------------------------------------------------------------- the pieces, in one process


def test_parts_split_the_global_batch_and_their_shares_add_up():
    lengths = list(range(5, 25))
    index = [3, 1, 4, 15, 9, 2, 6]
    parts = [World(r, 3, r, "gloo").part(index, lengths, seed=1, step=2) for r in range(3)]
    assert [p.index for p in parts] == [[3, 1], [4, 15], [9, 2, 6]]
    assert all(p.examples == 7 and p.tokens == sum(lengths[i] for i in index) for p in parts)
    per_example = torch.rand(20, dtype=torch.float64)
    shares = [p.share(per_example[p.index].sum()) for p in parts]
    torch.testing.assert_close(sum(shares), per_example[index].mean(), rtol=1e-12, atol=0)
    # A last batch smaller than the processes: a stand-in with weight 0, whose share is 0.
    small = [World(r, 3, r, "gloo").part([8, 5], lengths, seed=1, step=2) for r in range(3)]
    assert [(p.index, p.weight) for p in small] == [([8], 0.0), ([8], 1.0), ([5], 1.0)]
    assert float(small[0].share(torch.tensor(3.0))) == 0.0
    assert small[0].backward_loss(torch.tensor(2.0), 1.5) == 2.0 * 3 + 1.5


def test_batch_smaller_than_the_processes_is_refused(tmp_path):
    from cofi_kernels.training import trainer as tr

    run = tr.RunDirectory(str(tmp_path / "o"), {"config": {"batch_size": 1}}, False, "x", World())
    run.world = World(0, 2, 0, "gloo")
    with pytest.raises(tr.RunError, match="batch_size .* is 1 but 2 processes"):
        tr.Trainer(run, tr.TrainerHooks(), [tr.Phase("p", 1)], None, seed=0, batch_size=1, device="cpu",
                   checkpoint_every=1, description="x")


def test_dropout_noise_differs_between_processes_and_is_untouched_for_one():
    one = World().part([0, 1], [3, 3], seed=5, step=7)
    torch.manual_seed(11)
    one.local_noise()
    assert float(torch.rand(())) == float(torch.rand((), generator=torch.Generator().manual_seed(11)))
    draws = []
    for r in range(2):
        World(r, 2, r, "gloo").part([0, 1], [3, 3], seed=5, step=7).local_noise()
        draws.append(float(torch.rand(())))
    assert draws[0] != draws[1]


# ---------------------------------------------------------------------- find_unused_parameters, measured


@pytest.fixture
def wraps(monkeypatch):
    """Every module a method hands to World.wrap, with the parameters that got a gradient at each step."""
    seen = []

    def wrap(self, module, *, varying):
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        record = {"module": type(module).__name__, "varying": varying, "trainable": trainable, "steps": []}
        module.register_forward_pre_hook(lambda m, args: record["steps"].append(set()))
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p, name=name: record["steps"][-1].add(name))
        seen.append(record)
        return module

    monkeypatch.setattr(distributed.World, "wrap", wrap)
    return seen


def _check_declared(records) -> None:
    for r in records:
        steps = [s for s in r["steps"]]
        assert steps, r["module"]
        static = all(s == r["trainable"] for s in steps)
        assert r["varying"] == (not static), (r["module"], r["varying"], [len(s) for s in steps])


def test_find_unused_parameters_is_set_where_the_set_of_parameters_varies(job, tmp_path, wraps):
    """Each method's wrapped loss, run in one process: where it declares a fixed set of parameters
    every trainable parameter gets a gradient at every step; where it declares a varying set,
    some step leaves some out (so DDP needs find_unused_parameters there)."""
    from cofi_kernels.pruning import get_method
    from tests.training_support import FAST_PRUNE

    train, held = dataset(toy_rows(48, 1)), dataset(toy_rows(24, 2))
    cofi = get_method("cofi")
    cofi.run(train, held, str(tmp_path / "cofi"), cofi.config(**FAST_PRUNE), progress=False, teacher=job["teacher32"])
    theseus = get_method("theseus")
    theseus.run(train, held, str(tmp_path / "theseus"), theseus.config(layers=2, replace_epochs=2.0, batch_size=8,
                max_length=16, finetune_epochs=0.5), progress=False, teacher=job["teacher32"])
    smp = get_method("smp")
    smp.run(train, held, str(tmp_path / "smp"), smp.config(remaining=0.3, epochs=1.0, schedule_epochs=0.5,
            batch_size=8, max_length=16), progress=False, model=job["base32"],
            structured=True)
    scratch = get_method("scratch")
    scratch.run(train, held, str(tmp_path / "scratch"), scratch.config(batch_size=8, max_length=16,
                budget="E"), progress=False, architecture=str(tmp_path / "cofi"))
    ft.finetune(job["base64"], train, held, str(tmp_path / "ft"), ft.FinetuneConfig(**{**FAST_FINETUNE, "epochs": 1.0}),
                progress=False)
    names = [(r["module"], r["varying"]) for r in wraps]
    assert names == [("CoFiLoss", True), ("CoFiLoss", False), ("TheseusLoss", True), ("SMPLoss", False),
                     ("TaskLoss", False), ("TaskLoss", False)]
    _check_declared(wraps)
