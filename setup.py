"""Build of the compiled extension ``cofi_kernels._C``.

C++ CPU operators are always built. CUDA C++ operators are built when nvcc and
a CUDA build of torch are present, also on a machine without a GPU.

Environment switches:
  COFI_BUILD_CUDA=auto|0|1   skip (0) or force (1, an error if impossible) the CUDA part; default auto
  TORCH_CUDA_ARCH_LIST       CUDA archs, default "8.0;9.0"
  COFI_CPU_AVX2=auto|0|1     AVX2/FMA CPU kernels; auto = if this build machine has them
  MAX_JOBS                   parallel compile jobs (honoured by torch's ninja build)
  CUDA_HOME                  the CUDA toolkit; found from the nvcc on PATH when unset,
                             also when that nvcc is a wrapper script

Install with ``pip install --no-build-isolation .`` (the build needs the torch
it will run with).
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import re
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _is_toolkit(folder: str | None) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h")) and (
        os.path.isfile(os.path.join(folder, "bin", "nvcc"))
    )


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder, also when ``nvcc`` on PATH is a wrapper script.

    torch guesses ``dirname(dirname(which nvcc))``, which is wrong for a
    wrapper such as ``/usr/local/bin/nvcc`` that execs the real compiler.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    guess = os.path.dirname(os.path.dirname(real))
    if _is_toolkit(guess):
        return guess
    # A wrapper script: look for the real compiler's path in its text.
    try:
        with open(real, "rb") as fh:
            text = fh.read(65536).decode("utf-8", "replace")
        for match in re.finditer(r"(/[^\s\"'$;]+)/bin/nvcc\b", text):
            if _is_toolkit(match.group(1)):
                return match.group(1)
    except OSError:
        pass
    # Last resort: nvcc's own dry run names its top folder.
    try:
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
        match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if match and _is_toolkit(os.path.normpath(os.path.join(match.group(1), ".."))):
            return os.path.normpath(os.path.join(match.group(1), ".."))
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be auto, 0 or 1, got {value!r}")
    return value


def _cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return all(flag in flags for flag in ("avx2", "fma", "f16c"))


BUILD_CUDA = _switch("COFI_BUILD_CUDA")
CPU_AVX2 = _switch("COFI_CPU_AVX2")

cuda_home = find_cuda_home() if BUILD_CUDA != "0" else None
if cuda_home:
    # cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

with_cuda = bool(cuda_home) and torch.version.cuda is not None
if BUILD_CUDA == "1" and not with_cuda:
    why = "no CUDA toolkit (nvcc) found" if not cuda_home else f"torch {torch.__version__} is not a CUDA build"
    raise SystemExit(f"COFI_BUILD_CUDA=1 but the CUDA part cannot be built: {why}")
with_avx2 = CPU_AVX2 == "1" or (CPU_AVX2 == "auto" and _cpu_has_avx2())

OPS = ["gelu_gate_fwd", "gelu_gate_bwd", "masked_layer_norm_fwd", "masked_layer_norm_bwd"]
CPU_ONLY_OPS = ["varlen_attention", "pruned_layer", "bias_activation_", "bias_residual_layer_norm_", "packed_embeddings",
                "serving_cpu_isa"]  # serving: forward only, CPU kernels so far
cpu_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))

cxx_flags = ["-O3", "-DNDEBUG", "-Wno-unknown-pragmas", "-fopenmp"]  # at::parallel_for is OpenMP inline
if with_avx2:
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
# Files built once more per wider instruction set, each with its own flags (as ATen builds its
# kernels per CPU capability); the code chooses at run time. Only on top of an AVX2 build: without
# one they are built with the common flags and hold no kernels.
ISA_SOURCES = {
    "csrc/cpu/isa/row_kernels_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                                            "-mf16c", "-DCPU_CAPABILITY_AVX512", "-DCOFI_BUILD_AVX512",
                                            # GCC 12's AVX-512 intrinsics trip these with -Wall
                                            "-Wno-uninitialized", "-Wno-maybe-uninitialized"],
}
isa_builds = ["avx512"] if with_avx2 else []
nvcc_flags = ["-O3", "-DNDEBUG", "-lineinfo", "--expt-relaxed-constexpr"]

if with_cuda:
    extension = cpp_extension.CUDAExtension(
        "cofi_kernels._C",
        cpu_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
else:
    extension = cpp_extension.CppExtension("cofi_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})


def _nvcc_version() -> str | None:
    if not cuda_home:
        return None
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
        match = re.search(r"release (\S+),", out.stdout)
        return match.group(1) if match else None
    except OSError:
        return None


def build_info() -> dict:
    return {
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_built": with_cuda,
        "cuda_home": cuda_home,
        "nvcc": _nvcc_version() if with_cuda else None,
        "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None,
        "cpu_avx2": with_avx2,
        "cpu_isa_builds": isa_builds,
        "cpu_ops": OPS + CPU_ONLY_OPS,
        "cuda_ops": OPS if with_cuda else [],
        "sources": cpu_sources + (cuda_sources if with_cuda else []),
    }


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension that also builds ``ISA_SOURCES`` with their own flags (linked after
    the other objects) and writes ``_build_info.json`` beside ``_C``."""

    def build_extensions(self):
        for ext in self.extensions:
            for source in sorted(ISA_SOURCES):
                flags = [f for f in cxx_flags if f != "-DCPU_CAPABILITY_AVX2"] + (ISA_SOURCES[source] if isa_builds else []) + [
                    "-std=c++20", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
                ext.extra_objects += self.compiler.compile([source], output_dir=self.build_temp,
                                                           include_dirs=ext.include_dirs, extra_postargs=flags)
        super().build_extensions()

    def run(self):
        print(
            f"cofi_kernels: building CPU ops (avx2={with_avx2})"
            + (f" and CUDA ops for archs {os.environ['TORCH_CUDA_ARCH_LIST']} with {cuda_home}" if with_cuda else
               f"; CUDA part skipped (COFI_BUILD_CUDA={BUILD_CUDA}, toolkit={cuda_home},"
               f" torch CUDA={torch.version.cuda})"),
            flush=True,
        )
        super().run()
        target_dir = os.path.dirname(self.get_ext_fullpath("cofi_kernels._C"))
        os.makedirs(target_dir, exist_ok=True)
        with open(os.path.join(target_dir, "_build_info.json"), "w") as fh:
            json.dump(build_info(), fh, indent=2)


setup(
    packages=find_packages(include=["cofi_kernels", "cofi_kernels.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
    package_data={"cofi_kernels": ["_build_info.json"]},
)
