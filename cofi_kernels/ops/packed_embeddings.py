"""``cofi::packed_embeddings``: the embedding layer of a pruned model over packed tokens (serving).

Kernel: csrc/cpu/packed_embeddings.cpp (gather of the three embedding rows, sum
and LayerNorm in one float32 pass per token, AVX-512 or AVX2 build chosen at
run time: csrc/cpu/row_kernels.h). Forward only. This file holds the launcher,
the fake kernel and the op's :class:`~cofi_kernels.ops.backends.OpSpec`; its
definition is :func:`cofi_kernels.ops.reference.packed_embeddings`.
"""

from __future__ import annotations

import torch

from . import _extension, reference
from .backends import OpSpec, reference_backend
from .varlen_attention import serving_backend

KERNELS = ("packed_embeddings",)


def packed_embeddings_cpu(ids, positions, types, word, position_table, type_table, ln_weight, ln_bias, eps):
    """The ``cpu`` backend: the C++ op (inputs and index ranges checked)."""
    return torch.ops.cofi.packed_embeddings(ids, positions, types, word, position_table, type_table,
                                            ln_weight, ln_bias, eps)


def _fake(ids, positions, types, word, *rest):
    return word.new_empty(ids.shape[0], word.shape[1])


if _extension.available():
    torch.library.register_fake("cofi::packed_embeddings")(_fake)


SPEC = OpSpec(
    "packed_embeddings",
    backends=(
        reference_backend(reference.packed_embeddings),
        serving_backend("cpu", packed_embeddings_cpu, op="packed_embeddings", kernels=KERNELS, arg="word"),
    ),
    auto_order=("cpu",),
)


def serving_cpu_isa() -> str | None:
    """The instruction set of the CPU serving kernels' row passes on this machine (``"avx512"``,
    ``"avx2"`` or ``"default"``; ATen's ``ATEN_CPU_CAPABILITY`` narrows it), or None without
    the extension."""
    if not _extension.available() or not hasattr(torch.ops.cofi, "serving_cpu_isa"):
        return None
    return torch.ops.cofi.serving_cpu_isa()
