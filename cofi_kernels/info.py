"""``python -m cofi_kernels.info``: what was built, and which backend each op uses here."""

from __future__ import annotations

import torch

from . import __version__
from .ops import _extension, backends
from .ops.triton import support as _triton_support
from .ops import gated_attention, gated_ffn, gelu_gate, masked_layer_norm, packed_embeddings, pruned_layer, varlen_attention

OP_SPECS = (gated_attention.SPEC, gated_ffn.SPEC, gelu_gate.SPEC, masked_layer_norm.SPEC,
            varlen_attention.SPEC, pruned_layer.SPEC, packed_embeddings.SPEC)


def report() -> str:
    """The text that ``python -m cofi_kernels.info`` prints."""
    lines = [f"cofi_kernels {__version__}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    mode = " (interpreter: TRITON_INTERPRET=1)" if _triton_support.INTERPRET else ""
    lines.append(f"triton {_triton_support.version() or 'not installed'}{mode}")
    if _extension.available():
        lines.append("extension cofi_kernels._C: loaded")
    else:
        lines.append(f"extension cofi_kernels._C: NOT LOADED ({_extension.load_error()})")
        lines.append("  only the reference (PyTorch) backend can run; rebuild with "
                     "`pip install --no-build-isolation -e .` and read its log")
    info = _extension.build_info()
    if info:
        lines.append(f"built {info['built_at']} with torch {info['torch']} (CUDA {info['torch_cuda']})")
        lines.append(f"  C++ CPU ops: {', '.join(info['cpu_ops'])} (avx2: {info['cpu_avx2']}, wider builds: {', '.join(info.get('cpu_isa_builds', [])) or 'none'})")
        if info["cuda_built"]:
            lines.append(f"  CUDA ops: {', '.join(info['cuda_ops'])} (nvcc {info['nvcc']}, archs {info['cuda_archs']})")
        else:
            lines.append("  CUDA ops: not built")
    elif _extension.available():
        lines.append("build record _build_info.json is missing")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        lines.append(f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("GPU: none visible")
    env = backends.requested("auto")
    if env != "auto":
        lines.append(f"{backends.ENV_VAR}={env} forces that backend for every op")
    lines.append("backend `auto` picks:")
    for spec in OP_SPECS:
        picks = ", ".join(f"{d.type} -> {backends.auto_choice(spec, d)}" for d in devices)
        lines.append(f"  {spec.name:<20} {picks}")
    isa = packed_embeddings.serving_cpu_isa()
    if isa is not None:
        lines.append(f"serving row passes on this CPU: {isa} build (ATEN_CPU_CAPABILITY narrows it)")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
