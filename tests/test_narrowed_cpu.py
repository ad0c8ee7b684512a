"""The engine, serving, model and module tests once more with the CPU narrowed to AVX2.

CI runs on whichever CPU the machine has (an AMD EPYC with AVX2 only, or an Intel Xeon with
AVX-512, AVX512-BF16 and AMX). So that a difference between CPU kinds shows wherever the
suite runs, this test runs those test folders again in a subprocess where every library we
use dispatches as on an AVX2-only CPU without VNNI:

- ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorized kernels, and our own row passes, which
  follow ATen's choice (``python -m cofi_kernels.info``);
- ``MKL_ENABLE_INSTRUCTIONS=AVX2``: MKL's GEMMs;
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN (bf16 GEMMs, attention);
- ``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``: FBGEMM's int8 GEMMs (16-bit sums that saturate).

On an AVX2-only machine this repeats the first run; it is kept, not skipped, so that the
command is the same everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NARROWED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
FOLDERS = ["tests/serving", "tests/models", "tests/modules", "tests/pruning/test_cofi_workflow.py"]

pytestmark = pytest.mark.skipif(not torch.cpu._is_avx2_supported(), reason="an AVX2 run needs an AVX2 CPU")

WHAT_RUNS = """
import torch
from cofi_kernels.ops import packed_embeddings
from cofi_kernels.serving import int8_sums_saturate
print(torch.backends.cpu.get_cpu_capability(), packed_embeddings.serving_cpu_isa(), int8_sums_saturate())
"""


def _narrowed_env() -> dict:
    return {**os.environ, **NARROWED, "PYTHONPATH": ROOT}


def test_the_narrowing_takes_effect():
    out = subprocess.run([sys.executable, "-c", WHAT_RUNS], env=_narrowed_env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    aten, rows, saturates = out.stdout.split()
    assert (aten, rows, saturates) == ("AVX2", "avx2", "True"), out.stdout


def test_engine_serving_and_model_tests_pass_on_avx2():
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-r", "fE", *FOLDERS]
    out = subprocess.run(argv, env=_narrowed_env(), cwd=ROOT, capture_output=True, text=True, timeout=1500)
    tail = "\n".join((out.stdout + out.stderr).splitlines()[-40:])
    assert out.returncode == 0, f"the AVX2-narrowed run failed:\n{tail}"
    print(tail.splitlines()[-1])  # the summary line, shown with -rP / -s
