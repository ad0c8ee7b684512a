"""Registered ``cofi::`` ops: fake kernels and autograd for the compiled operators.

Importing this package registers them when the extension is loaded; without
the extension it registers nothing and the reference backend still works.
"""

from . import (  # noqa: F401
    gated_attention,
    gated_ffn,
    gelu_gate,
    masked_layer_norm,
    packed_embeddings,
    pruned_layer,
    varlen_attention,
)
