"""Run the test suite (or a selection of it) under many torch seeds, in one process.

    .venv/bin/python tests/seed_sweep.py --seeds 200 [--first S] [--jobs J] [pytest args: paths, -k ...]

Not a test module (pytest does not collect ``seed_sweep.py``; it defines no ``test*``
names, and ``__test__ = False``), and not part of the default run.

tests/conftest.py seeds torch's global generator per test from ``COFI_TEST_SEED`` or,
unset, a fresh random seed, so CI draws new inputs on every run and a bar that fails on
1 seed in 300 turns CI red now and then. This script runs each collected test once per
seed ``S, S+1, ..., S+N-1`` (``--first S``, default 0; ``--seeds N``, default 200;
``--seed-list 5,24,82`` for given seeds) with ``COFI_TEST_SEED`` set, inside one pytest
session: a ``pytest_runtest_protocol`` plugin calls ``_pytest.runner.runtestprotocol`` once
per seed. Between the runs of one test only its function-scoped fixtures are torn down
(the runs pass the test's parent node as ``nextitem``); module and session fixtures are
reused, except the ones that draw from the global generator (below).

Which tests depend on the seed (detected, conservatively)
--------------------------------------------------------
The global generator is watched while a test runs. ``torch.manual_seed``, ``torch.seed``,
``torch.initial_seed``, ``torch.get_rng_state`` and ``torch.set_rng_state`` (under ``torch``
and ``torch.random``; ``fork_rng`` goes through them) are wrapped for the whole sweep, and
the watcher keeps one flag: whether the generator's current state may derive from the seed
("tainted"), with the state it had when last known (``last``). It is tainted when a run
starts and after conftest's ``_fresh_seed`` has seeded it; ``torch.seed()`` and
``set_rng_state`` (a state that may have been saved while tainted) taint it; only
``manual_seed(constant)`` clears it. Every random draw moves the generator's state, so at
each wrapped call and at the end of the test: tainted and state != ``last`` means the test
drew from the seeded stream (a dependence). Reading the seed or the state while tainted
(``initial_seed``, ``get_rng_state``: the value could be copied into another generator or
used as data) also counts as a dependence. The state compared is the CPU generator's, plus
every CUDA generator's once CUDA is initialised (a CUDA initialisation between two checks
reads as a change, i.e. as a dependence). A test without any such event read nothing that
comes from the seed before it replaced it with constants: it runs the same way under every
seed, so it runs once (with the first seed) and is counted as seed-independent.

Module- and session-scoped fixtures are set up before ``_fresh_seed`` and draw from
whatever state the previous test left (in CI: from the previous test's random seed). Each
such fixture's setup is watched the same way (the state at its start counts as tainted). A
fixture that drew is torn down (``FixtureDef.finish``) before every run of a test that uses
it, so it is rebuilt each seed: before each run the global generator is seeded with
``2**31 + seed`` (a stream distinct from the test's own ``seed``), standing in for the state
the previous test would leave. A test that uses such a fixture is seed-dependent.

Not covered: randomness outside torch's global generators (Python's ``random``, NumPy,
time, thread timing, ``torch.seed()``'s entropy); code that calls methods of
``torch.default_generator`` directly (none in this repository); other accelerators' (MPS,
XPU) generators; subprocesses (they start with their own generator; they inherit
``COFI_TEST_SEED``, which only tests/conftest.py reads). Tests that fail by time are out of
scope: a seed-independent test runs once.

``--jobs J`` starts J worker processes; each collects the same selection and takes whole test
files in turn (a claim file per test file in a shared folder; files with more tests first),
so the files spread by how long they take. Workers write their pytest output to
``<dir>/worker-<i>.log`` and their results to JSON, merged into one summary. With ``J > 1``
and ``OMP_NUM_THREADS`` unset, each worker gets ``cores // J`` threads: float reductions then
split differently, so rerun a failure of such a sweep with the same ``OMP_NUM_THREADS``.

pytest's own report shows each test once: the reports of its first failing run, else of its
last. The summary after it lists tests, runs, seed-independent tests (run once), outcomes
over all runs, each failure (test id, seed, the assertion's first line; rerun it with
``COFI_TEST_SEED=<seed> pytest <test id>``), the slowest tests of the sweep and the total
wall time. The exit status is 1 when a run failed, else pytest's. pytest's cache is off
(``-p no:cacheprovider``), so ``--lf`` in the same checkout never sees a sweep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter, OrderedDict

import pytest

__test__ = False

SEED_ENV = "COFI_TEST_SEED"
SEED_FIXTURE = "_fresh_seed"  # tests/conftest.py's autouse fixture that seeds from SEED_ENV
PRE_SEED_OFFSET = 2**31  # seeds the state "the previous test left": 2**31 + seed, never a test seed (< 2**31)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- the watcher


class _Watch:
    """One watched span (a test run or a fixture's setup): did it read the seeded stream?"""

    def __init__(self, what: str, attribute: bool = True):
        self.what = what
        self.attribute = attribute  # False: events inside are not dependences (conftest's seeding)
        self.dependent = False
        self.why: str | None = None

    def mark(self, why: str) -> None:
        if self.attribute and not self.dependent:
            self.dependent, self.why = True, why


class RngWatcher:
    """Wraps torch's global-generator functions and tracks taint (see the module docstring)."""

    NAMES = ("manual_seed", "seed", "initial_seed", "get_rng_state", "set_rng_state")

    def __init__(self):
        import torch

        self.torch = torch
        self.tainted = True
        self.last = None
        self.stack: list[_Watch] = []
        self.real = {}
        for name in self.NAMES:
            self.real[name] = getattr(torch.random, name)
        self._install()
        self.last = self.state()

    # The state: CPU generator, plus CUDA generators once CUDA is up.
    def state(self) -> bytes:
        torch = self.torch
        parts = [self.real["get_rng_state"]().numpy().tobytes()]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            parts += [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
        return b"|".join(parts)

    def _event(self, why: str) -> None:
        if self.stack:
            self.stack[-1].mark(why)

    def check(self, where: str) -> None:
        if self.tainted and self.state() != self.last:
            self._event(f"drew from the seeded generator (seen at {where})")

    def taint(self) -> None:
        self.tainted, self.last = True, self.state()

    def _install(self) -> None:
        torch, real, w = self.torch, self.real, self

        def manual_seed(seed):
            w.check("manual_seed")
            out = real["manual_seed"](seed)
            w.tainted = False
            return out

        def seed():
            w.check("torch.seed")
            out = real["seed"]()
            w.taint()
            return out

        def initial_seed():
            w.check("initial_seed")
            if w.tainted:
                w._event("read initial_seed() of the seeded generator")
            return real["initial_seed"]()

        def get_rng_state():
            w.check("get_rng_state")
            if w.tainted:
                w._event("read get_rng_state() of the seeded generator")
            return real["get_rng_state"]()

        def set_rng_state(new_state):
            w.check("set_rng_state")
            out = real["set_rng_state"](new_state)
            w.taint()
            return out

        for name, fn in (("manual_seed", manual_seed), ("seed", seed), ("initial_seed", initial_seed),
                         ("get_rng_state", get_rng_state), ("set_rng_state", set_rng_state)):
            fn.__name__ = fn.__qualname__ = name
            fn.__doc__ = real[name].__doc__
            setattr(torch.random, name, fn)
            setattr(torch, name, fn)

    def push(self, watch: _Watch) -> _Watch:
        self.stack.append(watch)
        return watch

    def pop(self, watch: _Watch, where: str) -> None:
        self.check(where)
        assert self.stack and self.stack[-1] is watch
        self.stack.pop()


# ---------------------------------------------------------------- the pytest plugin

_hookimpl = pytest.hookimpl


def _message(report) -> str:
    """The first line of a failed report's message (the assertion's one line)."""
    lr = report.longrepr
    crash = getattr(lr, "reprcrash", None)
    if crash is not None and crash.message:
        text = crash.message
    elif isinstance(lr, tuple) and len(lr) == 3:
        text = str(lr[2])
    else:
        text = str(lr)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0].strip() if lines else "(no message)"


class SweepPlugin:
    def __init__(self, seeds: list[int], claim_dir: str | None = None):
        import torch

        self.torch = torch
        self.seeds = seeds
        self.claim_dir = claim_dir
        self.watcher = RngWatcher()
        self.drawing: dict[int, tuple[object, object]] = {}  # id(fixturedef) -> (fixturedef, request)
        self.drawing_names: dict[int, str] = {}
        self.results: "OrderedDict[str, dict]" = OrderedDict()
        self.terminal = None

    def pytest_configure(self, config):
        self.terminal = config.pluginmanager.get_plugin("terminalreporter")

    def _say(self, line: str) -> None:
        if self.terminal is not None:
            self.terminal.write_line(line)
        else:
            print(line, flush=True)

    @_hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        w = self.watcher
        if fixturedef.argname == SEED_FIXTURE:
            watch = w.push(_Watch(SEED_FIXTURE, attribute=False))
            try:
                return (yield)
            finally:
                w.pop(watch, SEED_FIXTURE)
                w.taint()  # the generator now holds the test's seed
        if fixturedef.scope == "function":
            return (yield)  # part of the test's own watch
        w.taint()  # what the previous test left counts as seeded
        watch = w.push(_Watch(f"fixture {fixturedef.argname}"))
        try:
            return (yield)
        finally:
            w.pop(watch, f"end of fixture {fixturedef.argname}")
            if watch.dependent:
                self.drawing[id(fixturedef)] = (fixturedef, request)
                self.drawing_names[id(fixturedef)] = f"{fixturedef.argname} ({fixturedef.scope}): {watch.why}"

    def _drawing_fixtures_of(self, item):
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            return []
        out = []
        for defs in info.name2fixturedefs.values():
            for d in defs:
                if id(d) in self.drawing:
                    out.append(self.drawing[id(d)])
        return out

    # -- one test, every seed
    def _run_once(self, item, seed: int, nextitem):
        from _pytest.runner import runtestprotocol

        w = self.watcher
        for fixturedef, request in self._drawing_fixtures_of(item):
            fixturedef.finish(request=request)  # rebuilt below from this seed's state
        os.environ[SEED_ENV] = str(seed)
        self.torch.manual_seed((PRE_SEED_OFFSET + seed) % 2**32)  # the CPU generator keeps 32 bits
        w.taint()
        watch = w.push(_Watch(item.nodeid))
        item._report_sections = []
        t0 = time.perf_counter()
        try:
            reports = runtestprotocol(item, log=False, nextitem=nextitem)
        finally:
            w.pop(watch, "end of test")
        dt = time.perf_counter() - t0
        return reports, watch, dt

    @_hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        keep = item.parent  # between seeds: tear down the test's own fixtures only
        res = {"runs": 0, "outcomes": Counter(), "failures": [], "seconds": 0.0, "independent": None, "why": None}
        self.results[item.nodeid] = res
        shown = None  # the reports pytest logs for this test: the first failing run's, else the last run's
        saved_env = os.environ.get(SEED_ENV)
        try:
            for k, seed in enumerate(self.seeds):
                reports, watch, dt = self._run_once(item, seed, keep)
                res["runs"] += 1
                res["seconds"] += dt
                if k == 0:
                    fixtures = self._drawing_fixtures_of(item)
                    res["independent"] = not watch.dependent and not fixtures
                    res["why"] = watch.why or (
                        "uses fixture " + ", ".join(self.drawing_names[id(d)] for d, _ in fixtures) if fixtures else None
                    )
                failed = [r for r in reports if r.failed]
                for r in reports:
                    if r.when == "call" or r.failed or (r.when == "setup" and r.skipped):
                        res["outcomes"][("error" if r.when != "call" else "failed") if r.failed else r.outcome] += 1
                for r in failed:
                    seed_txt = seed if not res["independent"] else f"{seed} (any: seed-independent)"
                    res["failures"].append({"seed": seed, "when": r.when, "message": _message(r),
                                            "independent": bool(res["independent"])})
                    self._say(f"FAILED {item.nodeid} [{r.when}] seed {seed_txt}: {_message(r)}")
                if failed and shown is None:
                    shown = reports
                if res["independent"]:
                    break
                if item.session.shouldfail or item.session.shouldstop:
                    break
            # Now the teardown pytest would have done after the test: up to what nextitem shares.
            # (Directly: the teardown hooks already ran for this test and must not run twice.)
            try:
                item.session._setupstate.teardown_exact(nextitem)
            except Exception as e:  # a module/session fixture's teardown failed
                msg = f"{type(e).__name__}: {e}".splitlines()[0]
                res["failures"].append({"seed": None, "when": "teardown", "message": msg,
                                        "independent": bool(res["independent"])})
                res["outcomes"]["error"] += 1
                self._say(f"ERROR {item.nodeid} [teardown of module/session fixtures]: {msg}")
            if shown is None:
                shown = reports
            for r in shown:
                ihook.pytest_runtest_logreport(report=r)
        finally:
            if saved_env is None:
                os.environ.pop(SEED_ENV, None)
            else:
                os.environ[SEED_ENV] = saved_env
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def summary_data(self) -> dict:
        return {
            "results": {k: {**v, "outcomes": dict(v["outcomes"])} for k, v in self.results.items()},
            "drawing_fixtures": sorted(set(self.drawing_names.values())),
        }


class WorkerSweepPlugin(SweepPlugin):
    """A worker of --jobs: runs the test files it claims first in the shared folder."""

    def _claim(self, key: str) -> bool:
        name = hashlib.sha1(key.encode()).hexdigest()
        try:
            fd = os.open(os.path.join(self.claim_dir, "claim-" + name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, f"{os.getpid()} {key}\n".encode())
        os.close(fd)
        return True

    @_hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session):
        if session.testsfailed and not session.config.option.continue_on_collection_errors:
            raise session.Interrupted(f"{session.testsfailed} errors during collection")
        if session.config.option.collectonly:
            return True
        groups: "OrderedDict[str, list]" = OrderedDict()
        for item in session.items:
            groups.setdefault(item.nodeid.split("::")[0], []).append(item)
        order = sorted(groups, key=lambda f: -len(groups[f]))  # larger files first: better balance

        def claimed():
            for f in order:
                if self._claim(f):
                    yield from groups[f]

        it = claimed()
        cur = next(it, None)
        while cur is not None:
            nxt = next(it, None)
            cur.config.hook.pytest_runtest_protocol(item=cur, nextitem=nxt)
            if session.shouldfail:
                raise session.Failed(session.shouldfail)
            if session.shouldstop:
                raise session.Interrupted(session.shouldstop)
            cur = nxt
        return True


# ---------------------------------------------------------------- summary


def _fmt_time(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def _seed_range(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}..{seeds[-1]} ({len(seeds)} seeds)"
    return ",".join(map(str, seeds)) + f" ({len(seeds)} seeds)"


def print_summary(data: dict, seeds: list[int], wall: float, out=sys.stdout) -> int:
    results = data["results"]
    n_tests = len(results)
    runs = sum(r["runs"] for r in results.values())
    indep = [k for k, r in results.items() if r["independent"]]
    dep = [k for k, r in results.items() if not r["independent"]]
    outcomes = Counter()
    for r in results.values():
        outcomes.update(r["outcomes"])
    indep_skipped = sum(1 for k in indep if results[k]["outcomes"].get("skipped") and results[k]["runs"] == 1)
    failing = {k: r for k, r in results.items() if r["failures"]}
    n_fail_runs = sum(len(r["failures"]) for r in failing.values())
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p("=" * 78)
    p(f"seed sweep: seeds {_seed_range(seeds)}")
    p(f"tests: {n_tests}   runs: {runs}   wall time: {_fmt_time(wall)} ({wall:.0f} s)")
    p(f"seed-dependent tests: {len(dep)} (run once per seed)")
    p(f"seed-independent tests: {len(indep)} (run once; {indep_skipped} of them skipped)")
    p("outcomes over all runs: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    if data.get("drawing_fixtures"):
        p("module/session fixtures that draw from the global generator (rebuilt every seed):")
        for f in data["drawing_fixtures"]:
            p(f"  {f}")
    p(f"failures: {n_fail_runs} failing runs in {len(failing)} tests")
    for k, r in failing.items():
        for f in r["failures"]:
            seed = "final teardown" if f["seed"] is None else (
                f"seed {f['seed']} (seed-independent)" if f["independent"] else f"seed {f['seed']}")
            when = "" if f["when"] == "call" else f" [{f['when']}]"
            p(f"  {k}{when}  {seed}: {f['message']}")
    slow = sorted(results.items(), key=lambda kv: -kv[1]["seconds"])[:10]
    p("slowest tests of the sweep (total seconds, runs):")
    for k, r in slow:
        p(f"  {r['seconds']:8.1f} s {r['runs']:5d}  {k}")
    p("=" * 78)
    return 1 if n_fail_runs else 0


# ---------------------------------------------------------------- main


def _parse(argv):
    ap = argparse.ArgumentParser(
        description="Run tests under many torch seeds (COFI_TEST_SEED); other arguments go to pytest.",
        allow_abbrev=False,
    )
    ap.add_argument("--seeds", type=int, default=200, help="number of seeds (default 200)")
    ap.add_argument("--first", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--seed-list", default=None, help="comma-separated seeds (instead of --seeds/--first)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--json", default=None, help="also write the merged results to this JSON file")
    ap.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.seed_list:
        seeds = [int(s) for s in args.seed_list.split(",") if s.strip()]
    else:
        seeds = list(range(args.first, args.first + args.seeds))
    if not seeds:
        ap.error("no seeds")
    return args, seeds, rest


def _pytest_args(rest):
    # No cache writes (others run pytest in this checkout; --lf must not see sweep failures).
    return ["-p", "no:cacheprovider", *rest]


def _run_here(seeds, rest, claim_dir=None):
    plugin = SweepPlugin(seeds) if claim_dir is None else WorkerSweepPlugin(seeds, claim_dir)
    code = pytest.main(_pytest_args(rest), plugins=[plugin])
    return int(code), plugin.summary_data()


def _merge(datas):
    merged = {"results": OrderedDict(), "drawing_fixtures": set()}
    for d in datas:
        merged["results"].update(d["results"])
        merged["drawing_fixtures"].update(d["drawing_fixtures"])
    merged["drawing_fixtures"] = sorted(merged["drawing_fixtures"])
    return merged


def main(argv=None) -> int:
    args, seeds, rest = _parse(sys.argv[1:] if argv is None else argv)
    os.chdir(REPO)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    t0 = time.perf_counter()

    if args.worker_dir is not None:  # a worker of --jobs
        code, data = _run_here(seeds, rest, claim_dir=args.worker_dir)
        data["exit"] = code
        with open(os.path.join(args.worker_dir, f"result-{args.worker_index}.json"), "w") as f:
            json.dump(data, f)
        return code

    if args.jobs <= 1:
        code, data = _run_here(seeds, rest)
        wall = time.perf_counter() - t0
    else:
        work = tempfile.mkdtemp(prefix="seed_sweep_")
        env = dict(os.environ)
        if "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
        procs = []
        for i in range(args.jobs):
            log = open(os.path.join(work, f"worker-{i}.log"), "w")
            cmd = [sys.executable, os.path.abspath(__file__), "--seed-list", ",".join(map(str, seeds)),
                   "--worker-dir", work, "--worker-index", str(i), *rest]
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), log, i))
        print(f"seed sweep: {args.jobs} workers, logs in {work}/worker-<i>.log", flush=True)
        datas, codes = [], []
        for proc, log, i in procs:
            rc = proc.wait()
            log.close()
            print(f"worker {i} done (exit {rc}) after {_fmt_time(time.perf_counter() - t0)}", flush=True)
            path = os.path.join(work, f"result-{i}.json")
            if os.path.exists(path):
                with open(path) as f:
                    datas.append(json.load(f))
            codes.append(rc)
        wall = time.perf_counter() - t0
        data = _merge(datas)
        missing = [i for i in range(args.jobs) if not os.path.exists(os.path.join(work, f"result-{i}.json"))]
        if missing:
            print(f"workers without results: {missing} (see their logs)")
        code = max(codes) if not missing else 3

    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    failed = print_summary(data, seeds, wall)
    return failed or (0 if code in (0, 5) else code)


if __name__ == "__main__":
    sys.exit(main())
