"""The Triton kernels compile for sm_80 and sm_90 with the tile sizes their launchers pick on a GPU,
and fit in the shared memory of those GPUs; checked without a GPU (see tests/triton_aot.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cofi_kernels.ops.triton import support as _triton_support
from tests import REPO_ROOT

ROOT = REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _triton_support.INSTALLED, reason="triton not installed")]


def _compile_in_child(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_gated_attention_kernels_compile_for_gpus():
    out = _compile_in_child(
        "import torch\n"
        "from tests import triton_aot\n"
        "from cofi_kernels.ops.triton import gated_attention\n"
        "run = triton_aot.gated_attention_launches(dtypes=(torch.bfloat16,), head_dims=(64, 128))\n"
        "lines = triton_aot.check(gated_attention, run)\n"
        "run = triton_aot.gated_attention_launches(dtypes=(torch.float32,), head_dims=(128,))\n"
        "lines += triton_aot.check(gated_attention, run)\n"
        "print('\\n'.join(lines))\n"
    )
    for kernel in ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dq"):
        for cap in (80, 90):
            assert f"gated_attention_{kernel}_kernel sm_{cap}" in out, out
