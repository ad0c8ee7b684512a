"""Build helpers of setup.py: finding the CUDA toolkit behind an nvcc wrapper script."""

from __future__ import annotations

import os
import stat
from tests import REPO_ROOT

ROOT = REPO_ROOT


def _setup_helpers() -> dict:
    """setup.py's definitions before it starts configuring the build."""
    path = os.path.join(ROOT, "setup.py")
    with open(path) as fh:
        source = fh.read().split("\nBUILD_CUDA = _switch")[0]
    namespace = {"__file__": path, "__name__": "setup_helpers"}
    exec(compile(source, path, "exec"), namespace)
    return namespace


def _fake_toolkit(folder):
    (folder / "bin").mkdir(parents=True)
    (folder / "include").mkdir()
    (folder / "include" / "cuda_runtime.h").write_text("")
    nvcc = folder / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.0'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return folder


def test_finds_toolkit_behind_wrapper_script(tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper_dir = tmp_path / "wrappers" / "bin"
    wrapper_dir.mkdir(parents=True)
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert _setup_helpers()["find_cuda_home"]() == str(toolkit)


def test_cuda_home_wins_and_missing_nvcc_gives_none(tmp_path, monkeypatch):
    helpers = _setup_helpers()
    toolkit = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert helpers["find_cuda_home"]() == str(toolkit)
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert helpers["find_cuda_home"]() is None
