"""cofi_kernels: fused kernels for CoFi structured pruning of BERT-family encoders.

Public functions (see each docstring for shapes and semantics):

- :func:`gated_ffn` — ``(GELU_erf(x w_inᵀ + b_in) · int_gate) w_outᵀ + b_out`` (Triton on GPUs)
- :func:`gelu_gate` — ``GELU_erf(x + bias) * gate``
- :func:`masked_layer_norm` — gated residual LayerNorm over the kept hidden dims

:mod:`cofi_kernels.reference` holds the PyTorch definitions every kernel is
tested against. ``python -m cofi_kernels.info`` shows what was built and which
backend each op uses here.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _extension, backends, reference
from . import ops as _ops  # noqa: F401  (registers fake kernels and autograd)
from .backends import BackendUnavailableError
from .functional import gated_ffn, gelu_gate, masked_layer_norm

__version__ = "0.1.0"


def extension_available() -> bool:
    """True when the compiled extension ``cofi_kernels._C`` is loaded."""
    return _extension.available()


__all__ = [
    "BackendUnavailableError",
    "backends",
    "extension_available",
    "gated_ffn",
    "gelu_gate",
    "masked_layer_norm",
    "reference",
    "__version__",
]
