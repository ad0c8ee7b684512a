"""Sublayers of a pruned encoder: each owns its parameters, their initialisation and its forward.

A pruned layer has its own head count and FFN width (either may be 0), one
reduced hidden size ``d`` shared by every layer, and may have lost either
sublayer. Every gate value is already folded into the weights, so these are
plain post-LayerNorm BERT sublayers. Their forward runs the ops of
:mod:`cofi_kernels.functional` (today their PyTorch reference: the serving
engine's kernels become backends of those ops). Parameter names are those of
the saved format of :class:`~cofi_kernels.models.pruned_model.PrunedModel`.

The constructors allocate with ``torch.empty`` and then call
``reset_parameters`` (BERT's initialisation: normal(0, 0.02) weights, zero
biases, LayerNorm 1 and 0); build under ``torch.device("meta")`` to skip both
when the weights are loaded next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional
from ..ops.reference import LAYER_ACTIVATIONS

__all__ = ["ACTIVATIONS", "ClassificationHead", "PrunedAttention", "PrunedEmbeddings", "PrunedFFN", "PrunedLayer",
           "TokenHead"]

# The FFN activations a pruned model can compute: Hugging Face's name → the name the compiled
# layer takes (functional.pruned_layer), whose definition is ops.reference.LAYER_ACTIVATIONS.
LAYER_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
ACTIVATIONS = {hf: LAYER_ACTIVATIONS[name] for hf, name in LAYER_ACTIVATION.items()}

INIT_STD = 0.02


def _param(*shape: int) -> nn.Parameter:
    # Inference models: fine-tuning turns gradients on with requires_grad_().
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


@torch.no_grad()
def _init(module: nn.Module) -> None:
    """BERT's initialisation for the parameters of ``module`` by name."""
    for name, p in module.named_parameters(recurse=False):
        if name.startswith("ln_weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, INIT_STD)


def residual_norm(sub: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``LayerNorm(residual + x)`` with ``sub``'s ``ln_weight``, ``ln_bias`` and ``eps``.

    When ``sub`` carries a ``hidden_mask`` buffer (a model padded to aligned hidden
    sizes, :func:`cofi_kernels.serving.aligned_copy`), the statistics run over the
    real dims only and the padded dims come out 0, so padding changes nothing.
    """
    mask = getattr(sub, "hidden_mask", None)
    if mask is None:
        return functional.layer_norm(x, sub.ln_weight, sub.ln_bias, sub.eps, residual=residual)
    if residual is None:
        residual = torch.zeros_like(x)
    x = x.expand_as(residual)
    return functional.masked_layer_norm(x, residual, sub.ln_weight, sub.ln_bias, None, mask, sub.eps,
                                        check_gates=False)


class _WithLinears(nn.Module):
    """A sublayer whose linear maps (named in ``LINEARS``: weight ``<name>_weight``, bias
    ``<name>_bias``) run through :meth:`linear`, so that serving can replace any of them by
    a callable (``linear_overrides[name]``, e.g. an int8 quantized linear)."""

    LINEARS: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.linear_overrides: dict = {}

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + b`` for the linear map ``name``, or its override."""
        override = self.linear_overrides.get(name)
        if override is not None:
            return override(x)
        return F.linear(x, getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias"))


class PrunedEmbeddings(nn.Module):
    """Word + position + token-type embeddings over the kept hidden dims, then LayerNorm."""

    def __init__(self, vocab_size: int, max_positions: int, type_vocab_size: int, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.word_embeddings = _param(vocab_size, hidden_size)
        self.position_embeddings = _param(max_positions, hidden_size)
        self.token_type_embeddings = _param(type_vocab_size, hidden_size)
        self.ln_weight = _param(hidden_size)
        self.ln_bias = _param(hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init(self)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` ids of each kind → ``[B, T, d]``."""
        x = F.embedding(input_ids, self.word_embeddings) + F.embedding(token_type_ids, self.token_type_embeddings)
        x = x + F.embedding(position_ids, self.position_embeddings)
        return residual_norm(self, x)

    def forward_packed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                       position_ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` ids of each kind (packed real tokens) → ``[N, d]``: one pass of
        :func:`cofi_kernels.functional.packed_embeddings` (the CPU kernel where it runs), or
        :meth:`forward` when the LayerNorm is masked (an aligned copy's padded dims)."""
        if getattr(self, "hidden_mask", None) is not None:
            return self.forward(input_ids, token_type_ids, position_ids)
        return functional.packed_embeddings(input_ids, position_ids, token_type_ids, self.word_embeddings,
                                            self.position_embeddings, self.token_type_embeddings,
                                            self.ln_weight, self.ln_bias, eps=self.eps)


class PrunedAttention(_WithLinears):
    """Self-attention with ``heads`` heads (fused QKV), output projection and residual LayerNorm.

    With ``heads == 0`` only the output bias and the LayerNorm remain:
    ``LN(h + b_out)``, which is what a sublayer with a live layer gate and no
    live head computes.
    """

    def __init__(self, heads: int, head_dim: int, hidden_size: int, eps: float):
        super().__init__()
        self.heads, self.head_dim, self.eps = heads, head_dim, eps
        self.LINEARS = ("qkv", "out") if heads else ()
        if heads:
            self.qkv_weight = _param(3 * heads * head_dim, hidden_size)
            self.qkv_bias = _param(3 * heads * head_dim)
            self.out_weight = _param(hidden_size, heads * head_dim)
        self.out_bias = _param(hidden_size)
        self.ln_weight = _param(hidden_size)
        self.ln_bias = _param(hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init(self)

    def forward(self, h: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """``h`` ``[B, T, d]``; ``key_padding_mask`` ``[B, T]`` bool (True = attend) or None."""
        if not self.heads:
            return residual_norm(self, self.out_bias, h)
        B, T, _ = h.shape
        dh = self.head_dim
        qkv = self.linear("qkv", h).view(B, T, 3, self.heads, dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        ctx = functional.attention(q, k, v, key_padding_mask, scale=dh**-0.5)
        out = self.linear("out", ctx.transpose(1, 2).reshape(B, T, self.heads * dh))
        return residual_norm(self, out, h)

    def forward_packed(self, h: torch.Tensor, cu_seqlens: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """Packed tokens: ``h`` ``[N, d]``, the rows of sequence ``b`` at ``cu_seqlens[b]:cu_seqlens[b+1]``.

        Returns ``[N, d]``, or ``[B, d]`` (each sequence's first row only) with ``first_only``.
        """
        residual = h[cu_seqlens[:-1]] if first_only else h
        if not self.heads:
            return residual_norm(self, self.out_bias, residual)
        qkv = self.linear("qkv", h)
        ctx = functional.varlen_attention(qkv, cu_seqlens, self.heads, self.head_dim, first_only=first_only)
        out = self.linear("out", ctx)
        return residual_norm(self, out, residual)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}"


class PrunedFFN(_WithLinears):
    """FFN of ``width`` units with residual LayerNorm; ``width == 0`` leaves ``LN(h + b_out)``."""

    def __init__(self, width: int, hidden_size: int, activation: str, eps: float):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"PrunedFFN: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.width, self.activation, self.eps = width, activation, eps
        self.LINEARS = ("in", "out") if width else ()
        if width:
            self.in_weight = _param(width, hidden_size)
            self.in_bias = _param(width)
            self.out_weight = _param(hidden_size, width)
        self.out_bias = _param(hidden_size)
        self.ln_weight = _param(hidden_size)
        self.ln_bias = _param(hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init(self)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` → ``[..., d]``."""
        if not self.width:
            return residual_norm(self, self.out_bias, h)
        if self.linear_overrides:
            out = self.linear("out", ACTIVATIONS[self.activation](self.linear("in", h)))
        else:
            out = functional.ffn(h, self.in_weight, self.in_bias, self.out_weight, self.out_bias,
                                 ACTIVATIONS[self.activation])
        return residual_norm(self, out, h)

    def extra_repr(self) -> str:
        return f"width={self.width}"


class PrunedLayer(nn.Module):
    """One encoder layer: attention then FFN, either of which may be removed (``None``)."""

    def __init__(self, attention: PrunedAttention | None, ffn: PrunedFFN | None):
        super().__init__()
        self.attention = attention
        self.ffn = ffn

    def forward(self, h: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        if self.attention is not None:
            h = self.attention(h, key_padding_mask)
        if self.ffn is not None:
            h = self.ffn(h)
        return h

    def forward_packed(self, h: torch.Tensor, cu_seqlens: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """Packed tokens ``[N, d]`` (see :meth:`PrunedAttention.forward_packed`); with ``first_only``
        returns each sequence's first row ``[B, d]``, computing only those rows after the attention.

        On the CPU, one call of :func:`cofi_kernels.functional.pruned_layer` (the compiled
        layer). Sublayer by sublayer (the module's linear maps, :func:`~cofi_kernels.functional.varlen_attention`,
        :func:`residual_norm`) on any other device (CUDA: Triton attention, cuBLAS GEMMs; no
        device-to-host copy, so CUDA-graph safe), when a linear map is overridden (int8
        serving), or when the sublayers carry a ``hidden_mask`` (an aligned copy: the compiled
        layer has no masked LayerNorm).
        """
        subs = [s for s in (self.attention, self.ffn) if s is not None]
        one_call = (h.device.type == "cpu" and not any(s.linear_overrides for s in subs)
                    and not any(getattr(s, "hidden_mask", None) is not None for s in subs))
        if one_call:
            return functional.pruned_layer(h, cu_seqlens, *self._weights(), first_only=first_only,
                                           **self._shape_args())
        if self.attention is not None:
            h = self.attention.forward_packed(h, cu_seqlens, first_only)
        elif first_only:
            h = h[cu_seqlens[:-1]]
        if self.ffn is not None:
            h = self.ffn(h)
        return h


    def _weights(self) -> tuple[dict | None, dict | None]:
        def named(sub):
            return None if sub is None else {k: v for k, v in sub.named_parameters(recurse=False)}
        return named(self.attention), named(self.ffn)

    def _shape_args(self) -> dict:
        att = self.attention
        return {
            "heads": 0 if att is None else att.heads,
            "head_dim": 1 if att is None else att.head_dim,
            "activation": LAYER_ACTIVATION[self.ffn.activation] if self.ffn is not None else "gelu",
            "eps": (att or self.ffn).eps if (att or self.ffn) is not None else 0.0,
        }


class ClassificationHead(_WithLinears):
    """``out(tanh(dense(h[:, 0])))``: BERT's pooler + classifier, or RoBERTa's classification head.

    The dense layer reads the kept hidden dims (``d``) and keeps the original
    hidden size ``D`` as its output: the pooled vector is not hidden-gated.
    """

    LINEARS = ("dense", "out")

    def __init__(self, hidden_size: int, pooled_size: int, num_labels: int):
        super().__init__()
        self.dense_weight = _param(pooled_size, hidden_size)
        self.dense_bias = _param(pooled_size)
        self.out_weight = _param(num_labels, pooled_size)
        self.out_bias = _param(num_labels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init(self)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]`` → logits ``[B, num_labels]`` from the first token."""
        return self.classify(h[:, 0])

    def classify(self, first: torch.Tensor) -> torch.Tensor:
        """The first token's rows ``[B, d]`` → logits ``[B, num_labels]``."""
        return self.linear("out", torch.tanh(self.linear("dense", first)))


class TokenHead(_WithLinears):
    """``out(h)`` on every row: a token classifier (``num_outputs`` = labels) or extractive QA's
    ``qa_outputs`` (``num_outputs = 2``: start logits, end logits).

    The linear map reads the kept hidden dims (``d``); ``out_weight`` ``[num_outputs, d]``,
    ``out_bias`` ``[num_outputs]``.
    """

    LINEARS = ("out",)

    def __init__(self, hidden_size: int, num_outputs: int):
        super().__init__()
        self.out_weight = _param(num_outputs, hidden_size)
        self.out_bias = _param(num_outputs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init(self)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` (every token, padded ``[B, T, d]`` or packed ``[N, d]``) → ``[..., num_outputs]``."""
        return self.linear("out", h)
