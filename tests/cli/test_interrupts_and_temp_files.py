"""Issue 23, items 9 and 10: Ctrl-C at any moment of a `cofi` command is one line and status 130,
and an ONNX export removes the temporary files that killed exports left beside its target.

The interrupts are made deterministic where they can be: a module on ``PYTHONPATH`` that raises
``KeyboardInterrupt`` when imported stands in for a Ctrl-C during that import, run through the
real console script and ``python -m cofi_kernels.cli``. Real SIGINTs, sent after a few delays,
check that whichever phase one lands in, no traceback comes out.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cofi_kernels import cli
from tests import REPO_ROOT
from tests.training_support import toy_rows, write_jsonl

COFI = os.path.join(os.path.dirname(sys.executable), "cofi")  # this environment's console script
INTERRUPTED = re.compile(r"cofi( [a-z]+)?: interrupted(; continue with --resume)?")


# ---------------------------------------------------------------------- Ctrl-C (item 9)


def fake_module(tmp_path, name: str) -> str:
    """A directory for ``PYTHONPATH`` whose package ``name`` raises KeyboardInterrupt when imported."""
    root = tmp_path / "fake"
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("raise KeyboardInterrupt  # a Ctrl-C during this import\n")
    return str(root)


def env_with(*paths: str) -> dict:
    """The environment with ``paths`` first on ``PYTHONPATH``, then this checkout (not another installed copy)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, REPO_ROOT]), "OMP_NUM_THREADS": "1"}


def assert_one_interrupted_line(status: int, stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert status == 130, (status, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and INTERRUPTED.fullmatch(lines[0]), lines


def command_lines() -> list[list[str]]:
    """The two ways to start `cofi`: the console script and ``python -m cofi_kernels.cli``."""
    if not os.path.exists(COFI):
        pytest.skip(f"no console script at {COFI} (package not installed in this environment)")
    return [[COFI], [sys.executable, "-m", "cofi_kernels.cli"]]


def test_ctrl_c_while_the_parser_is_built_is_one_line_and_status_130(capsys, monkeypatch):
    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    try:
        status = cli.main(["eval", "--model", "m"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped cli.main")
    assert_one_interrupted_line(status, capsys.readouterr().err)


def test_ctrl_c_while_transformers_is_imported_is_one_line_and_status_130(tmp_path):
    """transformers is imported after the arguments are parsed, before the command runs."""
    env = env_with(fake_module(tmp_path, "transformers"))
    for start in command_lines():
        done = subprocess.run([*start, "eval", "--model", "m", "--data", "d.csv"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert_one_interrupted_line(done.returncode, done.stderr)


def test_ctrl_c_while_torch_is_imported_is_one_line_and_status_130(tmp_path):
    env = env_with(fake_module(tmp_path, "torch"))
    for start in command_lines():
        done = subprocess.run([*start, "eval", "--model", "m"], env=env, capture_output=True, text=True, timeout=300)
        assert_one_interrupted_line(done.returncode, done.stderr)


def test_ctrl_c_while_a_library_user_imports_the_package_stays_a_keyboard_interrupt(tmp_path):
    """Only the `cofi` command turns an interrupt during the package's imports into its one line;
    a program importing cofi_kernels gets the KeyboardInterrupt as from any import."""
    code = "import cofi_kernels"
    done = subprocess.run([sys.executable, "-c", code], env=env_with(fake_module(tmp_path, "torch")),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGINT and "KeyboardInterrupt" in done.stderr, (done.returncode, done.stderr)


def interrupt_after(argv: list[str], delay: float, *, ready: str | None = None) -> tuple[int, str]:
    """``(status, stderr)`` of ``argv`` sent SIGINT ``delay`` seconds after it starts (with ``ready``:
    after it printed that line)."""
    proc = subprocess.Popen(argv, env=env_with(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if ready is not None:
            assert proc.stdout.readline().strip() == ready
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, stderr


@pytest.fixture(scope="module")
def eval_command(tmp_path_factory, teacher_dir) -> list[str]:
    """`eval` of the tiny teacher: runs for seconds after its imports, so a SIGINT can land in it too."""
    data = write_jsonl(tmp_path_factory.mktemp("sigint") / "eval.jsonl", toy_rows(24, seed=2))
    return ["eval", "--model", teacher_dir, "--data", data]


# Once the console script imported cofi_kernels.cli (the package's __init__ with torch, then the module, which
# imports nothing heavy): building the parser, importing transformers, the command itself, its end.
AFTER_IMPORT = "import sys, cofi_kernels.cli; print('imported', flush=True); sys.exit(cofi_kernels.cli.main())"


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0, 3.0])
def test_sigint_once_the_package_is_imported_never_prints_a_traceback(eval_command, delay):
    status, stderr = interrupt_after([sys.executable, "-c", AFTER_IMPORT, *eval_command], delay, ready="imported")
    assert "Traceback" not in stderr, stderr
    if status in (0, -signal.SIGINT):
        # The command had ended: before the signal, or it came while the interpreter exited (which
        # restores the default handler: the process ends by the signal, silently; a shell shows 130).
        assert stderr == "", stderr
    else:
        assert_one_interrupted_line(status, stderr)


def test_sigint_0_2_s_after_start_never_prints_a_traceback(eval_command):
    start = command_lines()[0]
    status, stderr = interrupt_after([*start, *eval_command], 0.2)
    assert "Traceback" not in stderr, stderr
    assert_one_interrupted_line(status, stderr)


# ---------------------------------------------------------------------- temporary files of killed exports (item 10)


def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped): no process has it now."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def pruned_dir(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from tests.models.test_onnx_export import SMALL, pruned_model

    path = tmp_path / "pruned"
    pruned_model("bert", True, SMALL).save_pretrained(path)
    return str(path)


def export(model_dir: str, out: str, capsys) -> None:
    assert cli.main(["export", "--model", model_dir, "--out", out]) == 0, capsys.readouterr().err


KILLED_CHILD = """
import os, signal, sys
import onnx
from cofi_kernels.models.pruned_model import PrunedModel

# SIGKILL once the temporary file is written, before it is checked and renamed into place.
onnx.checker.check_model = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
PrunedModel.from_pretrained(sys.argv[1]).export_onnx(sys.argv[2])
"""


def test_the_temporary_file_of_a_killed_export_is_removed_by_the_next_export(tmp_path, capsys, pruned_dir):
    out = tmp_path / "exported"
    out.mkdir()
    child = subprocess.run([sys.executable, "-c", KILLED_CHILD, pruned_dir, str(out / "model.onnx")], env=env_with(),
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr
    [left] = os.listdir(out)
    assert re.fullmatch(r"\.model\.onnx\.\d+\.[0-9a-f]{8}\.tmp", left) and os.path.getsize(out / left) > 0, left
    export(pruned_dir, str(out / "model.onnx"), capsys)
    assert os.listdir(out) == ["model.onnx"]


def test_only_files_of_the_exact_pattern_with_a_dead_pid_are_removed(tmp_path, capsys, pruned_dir):
    out = tmp_path / "exported"
    out.mkdir()
    dead, alive = dead_pid(), os.getpid()
    stale = [f".model.onnx.{dead}.0123abcd.tmp"]
    kept = [
        f".model.onnx.{alive}.89abcdef.tmp",  # a live process's export (this one's)
        f".model.onnx.{dead}.0123ABCD.tmp",  # not what token_hex writes
        f".model.onnx.{dead}.0123abc.tmp",  # 7 hex digits
        f".model.onnx.{dead}.0123abcd.tmp.keep",
        f"model.onnx.{dead}.0123abcd.tmp",  # not hidden
        f".model.onnx.0{dead}.0123abcd.tmp",  # a PID is never written with a leading 0
        f".model.onnx.{dead}.x.0123abcd.tmp",
        f".other.onnx.{dead}.0123abcd.tmp",  # another target's
        f".model.onnx.{dead}.fedcba98.tmp.d",
    ]
    for name in stale + kept:
        (out / name).write_bytes(b"partial")
    special = {f".model.onnx.{dead}.aaaaaaaa.tmp": "directory", f".model.onnx.{dead}.bbbbbbbb.tmp": "link"}
    (out / f".model.onnx.{dead}.aaaaaaaa.tmp").mkdir()  # the pattern, but not a regular file: never removed
    os.symlink(out / kept[0], out / f".model.onnx.{dead}.bbbbbbbb.tmp")
    export(pruned_dir, str(out / "model.onnx"), capsys)
    assert sorted(os.listdir(out)) == sorted(["model.onnx", *kept, *special])
