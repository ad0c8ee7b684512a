"""The compact model of a pruned encoder: :class:`PrunedModel` and its saved format.

A :class:`PrunedModel` has per-layer head counts and FFN widths, one reduced
hidden size, and removed sublayers. Its sublayers are the modules of
:mod:`cofi_kernels.modules.pruned`; it saves to ``model.safetensors`` +
``cofi_config.json`` and loads back without the original model class and
without pickle. Every pruning method builds one through
:func:`cofi_kernels.models.builder.build_pruned_model`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.pruned import (ACTIVATIONS, ClassificationHead, PrunedAttention, PrunedEmbeddings, PrunedFFN,
                              PrunedLayer, TokenHead)
from ..ops import backends as _backends
from ..ops import varlen_attention as _varlen_op
from .arch import ARCHS, UnsupportedModelError
from .size import encoder_size

__all__ = ["PrunedModel", "UnsupportedModelError", "FORMAT", "FORMAT_VERSION", "CONFIG_NAME", "WEIGHTS_NAME",
           "POOLINGS", "TASKS", "TOKEN_TASKS", "check_finite"]

FORMAT = "cofi-pruned"
FORMAT_VERSION = 1
CONFIG_NAME = "cofi_config.json"
WEIGHTS_NAME = "model.safetensors"

# The tasks a pruned model computes (config "task"), see PrunedModel.forward.
TOKEN_TASKS = ("token_classification", "question_answering")  # a TokenHead on every token
TASKS = ("base", "sequence_classification") + TOKEN_TASKS + ("embedding",)
POOLINGS = ("mean", "cls", "max")  # an embedding model's pooling of the last hidden state
# What a sequence classifier's head reads (config "pooling"; absent: "cls", the first token).
CLASSIFIER_POOLINGS = ("cls", "mean")

_REQUIRED_KEYS = (
    "format",
    "format_version",
    "model_type",
    "task",
    "hidden_size",
    "head_dim",
    "num_layers",
    "layers",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
    "hidden_act",
    "num_labels",
    "original_hidden_size",
    "original_num_heads",
    "original_intermediate_size",
    "original_size",
)

class PrunedModel(nn.Module):
    """A pruned BERT/RoBERTa encoder with per-layer head counts and FFN widths.

    Its task (config ``"task"``) says what :meth:`forward` returns: ``"base"`` the last
    hidden state ``[B, T, d]``; ``"sequence_classification"`` logits ``[B, num_labels]``
    from the first token (or, with config ``"pooling": "mean"``, from the mean of the last
    hidden state over the real tokens); ``"token_classification"`` logits ``[B, T, num_labels]`` for
    every token; ``"question_answering"`` ``[B, T, 2]`` (start logits ``[..., 0]``, end
    logits ``[..., 1]``); ``"embedding"`` a pooled sentence embedding ``[B, D]`` (config
    ``"pooling"``: ``"mean"``, ``"cls"`` or ``"max"``; ``"normalize"``: L2-normalised or not).

    Built by :func:`~cofi_kernels.models.builder.build_pruned_model` (which
    every pruning method uses, CoFi's :func:`~cofi_kernels.prune` among them)
    or :meth:`from_pretrained`; ``config`` is the dict
    written to ``cofi_config.json`` (see :meth:`save_pretrained`). Parameters do
    not require grad (an inference model); call ``requires_grad_()`` to fine-tune.

    State (names in ``model.safetensors``):
    ``embeddings.{word,position,token_type}_embeddings`` ``[*, d]``,
    ``embeddings.ln_{weight,bias}`` ``[d]``; per layer ``i`` with attention:
    ``layers.i.attention.qkv_weight`` ``[3·h_i·d_head, d]``, ``qkv_bias``,
    ``out_weight`` ``[d, h_i·d_head]`` (absent when ``h_i = 0``), ``out_bias``,
    ``ln_weight``, ``ln_bias`` ``[d]``; with an FFN: ``layers.i.ffn.in_weight``
    ``[w_i, d]``, ``in_bias``, ``out_weight`` ``[d, w_i]`` (absent when ``w_i = 0``),
    ``out_bias``, ``ln_weight``, ``ln_bias``; with a classification head:
    ``head.dense_weight`` ``[D, d]``, ``head.dense_bias`` ``[D]``,
    ``head.out_weight`` ``[num_labels, D]``, ``head.out_bias``; with a token head
    (token classification, question answering): ``head.out_weight`` ``[num_labels, d]``,
    ``head.out_bias`` ``[num_labels]``; and
    ``hidden_index`` (int64 ``[d]``): the original hidden dim of each kept dim.
    ``d`` is the reduced hidden size, ``D`` the original one.

    Initialisation (a model built from a config, before any weights are loaded):
    BERT's, as Hugging Face's ``BertPreTrainedModel`` draws it: every weight
    matrix and embedding table normal(0, 0.02), every bias 0, LayerNorm scales 1
    and shifts 0, and the word-embedding row of ``pad_token_id`` 0; ``hidden_index``
    is ``0, 1, ..., d − 1``. The draws come from torch's global generator, in
    module order (seed it first for a reproducible model; scratch training does).
    :meth:`reset_parameters` draws them again. Under ``torch.device("meta")``
    nothing is drawn (loading assigns every tensor).
    """

    def __init__(self, config: Mapping):
        super().__init__()
        cfg = dict(config)
        self.config = cfg
        d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.embeddings = PrunedEmbeddings(cfg["vocab_size"], cfg["max_position_embeddings"], cfg["type_vocab_size"],
                                           d, eps)
        self.layers = nn.ModuleList(
            PrunedLayer(
                None if spec["heads"] is None else PrunedAttention(spec["heads"], cfg["head_dim"], d, eps),
                None if spec["ffn_width"] is None else PrunedFFN(spec["ffn_width"], d, cfg["hidden_act"], eps),
            )
            for spec in cfg["layers"]
        )
        if cfg["task"] == "sequence_classification":
            self.head = ClassificationHead(d, cfg["original_hidden_size"], cfg["num_labels"])
        elif cfg["task"] in TOKEN_TASKS:
            self.head = TokenHead(d, cfg["num_labels"])
        else:
            self.head = None
        self.register_buffer("hidden_index", torch.arange(d, dtype=torch.long))
        self._zero_padding_row()  # the sublayers initialised themselves (modules.pruned._init)

    @torch.no_grad()
    def _zero_padding_row(self) -> None:
        pad, table = self.config["pad_token_id"], self.embeddings.word_embeddings
        if 0 <= pad < table.shape[0]:
            table[pad].zero_()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw every parameter again with BERT's initialisation (see the class docstring)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self._zero_padding_row()

    # ------------------------------------------------------------------ forward

    def _position_ids(self, input_ids):
        return ARCHS[self.config["model_type"]].position_ids(input_ids, self.config["pad_token_id"])

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states: bool = False,
               *, backend: str = "auto"):
        """Last hidden state ``[B, T, d]`` over the kept hidden dims (see :meth:`expand_hidden`).

        ``input_ids``: ``[B, T]`` long, ``B, T >= 1``; ``attention_mask``: ``[B, T]`` (1 = token,
        0 = padding, None = all tokens; every row needs a token); ``token_type_ids``: ``[B, T]``
        long or None (zeros). Inputs of another shape, dtype or device than that raise
        ``ValueError`` naming the input.
        Padding keys get ``finfo(dtype).min`` added to their scores, as HF does.
        With ``output_hidden_states``, returns ``(last, per_layer)`` where
        ``per_layer`` holds every layer's output ``[B, T, d]`` (a layer whose
        sublayers are both removed passes its input through).

        ``backend``: ``"reference"`` (every position, plain PyTorch), ``"engine"``
        (packed real tokens; padded positions come out 0; see :meth:`forward`) or
        ``"auto"`` (:meth:`engine_applies`).
        """
        B, T = self._check_inputs(input_ids, attention_mask, token_type_ids)
        if self._use_engine(backend, attention_mask, output_hidden_states):
            packed = self._pack(input_ids, attention_mask, token_type_ids)
            h = self._run_packed(packed, first_only=False)
            out = h.new_zeros(B * T, h.shape[-1])
            out[packed.rows] = h
            return out.view(B, T, -1)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.embeddings(input_ids, token_type_ids, self._position_ids(input_ids))
        key_padding_mask = None if attention_mask is None else attention_mask.bool()
        per_layer = []
        for layer in self.layers:
            h = layer(h, key_padding_mask)
            if output_hidden_states:
                per_layer.append(h)
        return (h, per_layer) if output_hidden_states else h

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states: bool = False,
                *, backend: str = "auto"):
        """The task's output (arguments as :meth:`encode`), by config ``"task"``:

        - ``"sequence_classification"``: logits ``[B, num_labels]`` from the first token, or with
          config ``"pooling": "mean"`` from the last hidden state's mean over the real tokens
          (pooled as an embedding's ``"mean"``, then the head in the model's dtype);
        - ``"token_classification"``: logits ``[B, T, num_labels]``, the token head on every
          position's last hidden state;
        - ``"question_answering"``: ``[B, T, 2]``, start logits in ``[..., 0]``, end logits in
          ``[..., 1]``;
        - ``"embedding"``: ``[B, D]`` (the original hidden size): the last hidden state pooled
          over the real tokens (``"pooling"``: ``"mean"``, the sum over tokens with mask 1
          divided by their count, as sentence-transformers; ``"cls"``, the first token;
          ``"max"``, the maximum over real tokens), scattered to ``D`` dims by
          :meth:`expand_hidden` (pruned dims 0), then divided by its L2 norm (``F.normalize``,
          eps 1e-12) when ``"normalize"``; pooled in float32 (bf16/fp16 models), returned in the
          model's dtype;
        - ``"base"``: the last hidden state ``[B, T, d]``.

        With ``output_hidden_states``, returns ``(that, per_layer)`` as :meth:`encode` does.
        The reference computes the token tasks' logits at padded positions too (they mean
        nothing); the engine leaves them 0.

        ``backend``:

        - ``"reference"``: the plain PyTorch forward over the padded batch (differentiable).
        - ``"engine"``: the serving engine (DESIGN §7), forward only: the real tokens are
          packed (``[N_real, d]``), each sequence attends over its own tokens
          (:func:`~cofi_kernels.functional.varlen_attention`), each layer is one call of
          :func:`~cofi_kernels.functional.pruned_layer` on the CPU (compiled) and runs
          sublayer by sublayer on CUDA (Triton attention; an aligned copy's masked
          LayerNorms, see :func:`cofi_kernels.serving.aligned_copy`), and a
          classification head's logits (and a ``"cls"`` embedding) need each sequence's
          first token only, so from the last attention's output projection on only those
          rows are computed. Token tasks run every real token through every layer and
          apply their head to the packed rows (padded positions come out 0); embeddings
          pool the packed rows of each sequence. Needs every sequence's first token to be
          real (right padding); ``ValueError`` otherwise.
        - ``"auto"`` (default): the engine when :meth:`engine_applies`, else the reference.
        """
        B, T = self._check_inputs(input_ids, attention_mask, token_type_ids)
        if self.config["task"] in TOKEN_TASKS or self.config["task"] == "embedding" or self.mean_pooled_head:
            return self._task_forward(input_ids, attention_mask, token_type_ids, output_hidden_states, backend, B, T)
        if self.head is not None and self._use_engine(backend, attention_mask, output_hidden_states):
            packed = self._pack(input_ids, attention_mask, token_type_ids)
            return self.head.classify(self._run_packed(packed, first_only=True))
        if self.head is None and not output_hidden_states:
            return self.encode(input_ids, attention_mask, token_type_ids, backend=backend)
        h, per_layer = self.encode(input_ids, attention_mask, token_type_ids, output_hidden_states=True,
                                   backend="reference" if self.head is not None else backend)
        out = h if self.head is None else self.head(h)
        return (out, per_layer) if output_hidden_states else out

    @property
    def mean_pooled_head(self) -> bool:
        """True for a sequence classifier whose head reads the mean over the real tokens."""
        return self.config["task"] == "sequence_classification" and self.config.get("pooling", "cls") == "mean"

    def _task_forward(self, input_ids, attention_mask, token_type_ids, output_hidden_states, backend, B, T):
        """:meth:`forward` of the token tasks, of embeddings and of mean-pooled classifiers."""
        embedding = self.config["task"] == "embedding"
        classify = self.mean_pooled_head
        if self._use_engine(backend, attention_mask, output_hidden_states):
            packed = self._pack(input_ids, attention_mask, token_type_ids)
            if embedding and self.config["pooling"] == "cls":
                return self._embed(self._run_packed(packed, first_only=True))
            h = self._run_packed(packed, first_only=False)
            if embedding:
                return self._embed(self._pool_packed(h, packed, B, T))
            if classify:
                return self.head.classify(self._pool_packed(h, packed, B, T).to(h.dtype))
            logits = self.head(h)
            out = logits.new_zeros(B * T, logits.shape[-1])
            out[packed.rows] = logits
            return out.view(B, T, -1)
        h, per_layer = self.encode(input_ids, attention_mask, token_type_ids, output_hidden_states=True,
                                   backend="reference")
        if embedding:
            out = self._embed(self._pool(h, attention_mask))
        elif classify:
            out = self.head.classify(self._pool(h, attention_mask).to(h.dtype))
        else:
            out = self.head(h)
        return (out, per_layer) if output_hidden_states else out

    def _pool(self, h: torch.Tensor, attention_mask) -> torch.Tensor:
        """The embedding pooling of a padded last hidden state ``[B, T, d]`` → ``[B, d]`` (in float32,
        float64 for a float64 model), over the tokens with ``attention_mask`` 1 (every token where
        it is None)."""
        pooling = self.config["pooling"]
        h = h.to(torch.promote_types(h.dtype, torch.float32))
        if pooling == "cls":
            return h[:, 0]
        if attention_mask is None:
            return h.mean(1) if pooling == "mean" else h.amax(1)
        real = attention_mask.bool().unsqueeze(-1)
        if pooling == "mean":
            count = real.sum(1).to(h.dtype).clamp_min(1e-9)  # sentence-transformers' clamp
            return (h * real.to(h.dtype)).sum(1) / count
        return h.masked_fill(~real, float("-inf")).amax(1)

    def _pool_packed(self, h: torch.Tensor, packed: "_Packed", B: int, T: int) -> torch.Tensor:
        """:meth:`_pool` over packed rows ``[N, d]`` (``"mean"`` or ``"max"``) → ``[B, d]``."""
        h = h.to(torch.promote_types(h.dtype, torch.float32))
        seq = torch.div(packed.rows, T, rounding_mode="floor")  # each row's sequence (no host sync)
        if self.config["pooling"] == "mean":
            lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).to(h.dtype)
            return h.new_zeros(B, h.shape[1]).index_add_(0, seq, h) / lengths[:, None]
        index = seq[:, None].expand(-1, h.shape[1])
        return h.new_full((B, h.shape[1]), float("-inf")).scatter_reduce_(0, index, h, "amax", include_self=False)

    def _embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled rows ``[B, d]`` → the embedding ``[B, D]``: expanded, normalised when asked, in the
        model's dtype."""
        dtype = self.embeddings.word_embeddings.dtype
        out = self.expand_hidden(pooled)
        if self.config["normalize"]:
            out = F.normalize(out, p=2.0, dim=-1, eps=1e-12)
        return out.to(dtype)

    # ------------------------------------------------------------------ serving engine

    def _check_inputs(self, input_ids, attention_mask, token_type_ids=None) -> tuple[int, int]:
        """``(batch, seq)`` of the inputs, after checking every one (``ValueError`` naming it): tensors of
        one shape ``[batch, seq]`` with both at least 1, on the model's device, int64 ids and token
        types, a mask (integer or bool) of 0 and 1 with at least one real token per row."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"PrunedModel: input_ids must be [batch, seq], got {shape}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"PrunedModel: input_ids must hold at least one sequence of at least one token, "
                             f"got shape {[B, T]}")
        device = self.embeddings.word_embeddings.device
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask),
                        ("token_type_ids", token_type_ids)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, T):
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"PrunedModel: {name} must have the shape of input_ids {[B, T]}, got {got}")
            if name != "attention_mask" and t.dtype != torch.long:
                raise ValueError(f"PrunedModel: {name} must be an int64 (torch.long) tensor, got {t.dtype}")
            if t.is_floating_point() or t.is_complex():
                raise ValueError(f"PrunedModel: {name} must be an integer or bool tensor, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"PrunedModel: {name} is on {t.device} but the model is on {device}")
        # The values are data: checked when run, not while torch.export / torch.compile trace the forward.
        if attention_mask is not None and not torch.compiler.is_compiling():
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("PrunedModel: attention_mask must hold 0 (padding) and 1 (token) only")
            empty = (~attention_mask.bool().any(1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"PrunedModel: attention_mask row(s) {empty[:8]} have no real token; "
                                 "every sequence needs at least one")
        return B, T

    def engine_applies(self, attention_mask=None, output_hidden_states: bool = False) -> bool:
        """Whether ``backend="auto"`` runs the serving engine for these inputs: when no gradient
        is wanted (``torch.no_grad`` / ``inference_mode``, or parameters without
        ``requires_grad``), without ``output_hidden_states``, with every sequence's first token
        real, and

        - on the CPU: float32 or bfloat16, not an aligned copy (the compiled layer has no
          masked LayerNorm);
        - on CUDA: float32, bfloat16 or float16, aligned copy or not, when the ``triton``
          backend of :func:`~cofi_kernels.functional.varlen_attention` can run there
          (Triton installed, not under ``TRITON_INTERPRET=1``).

        Elsewhere (other devices, float16 on the CPU, training) the reference runs."""
        p = self.embeddings.word_embeddings
        if output_hidden_states or p.dtype not in SERVING_DTYPES.get(p.device.type, ()):
            return False
        if p.device.type == "cpu" and getattr(self, "aligned_from", None) is not None:
            return False
        if p.device.type == "cuda" and not self._triton_attention_runs(p):
            return False
        if torch.is_grad_enabled() and any(q.requires_grad for q in self.parameters()):
            return False
        return attention_mask is None or bool(attention_mask[:, 0].all())

    def _triton_attention_runs(self, p: torch.Tensor) -> bool:
        """Whether every attention sublayer's varlen attention runs the ``triton`` backend on ``p``'s device."""
        head_dim = self.config["head_dim"]
        inputs = _backends.Inputs(p.device, p.dtype, head_dim)
        return not _varlen_op.SPEC.backend("triton").not_supported_reasons(inputs)

    def _use_engine(self, backend: str, attention_mask, output_hidden_states: bool) -> bool:
        if backend not in ("auto", "reference", "engine"):
            raise ValueError(f"PrunedModel: backend must be 'auto', 'reference' or 'engine', got {backend!r}")
        if backend == "engine" and output_hidden_states:
            raise ValueError("PrunedModel: backend='engine' does not return per-layer hidden states; "
                             "use backend='reference' for output_hidden_states")
        if backend == "engine" and attention_mask is not None and not bool(attention_mask[:, 0].all()):
            raise ValueError("PrunedModel: backend='engine' needs every sequence's first token to be real "
                             "(attention_mask[:, 0] all 1: right padding)")
        if (backend == "engine" and getattr(self, "aligned_from", None) is not None
                and self.embeddings.word_embeddings.device.type == "cpu"):
            raise ValueError("PrunedModel: backend='engine' on the CPU runs unpadded models; this is an aligned "
                             "copy (serving.aligned_copy, meant for CUDA): use backend='reference' or the "
                             "original model")
        return backend == "engine" or (backend == "auto" and self.engine_applies(attention_mask, output_hidden_states))

    def _pack(self, input_ids, attention_mask, token_type_ids) -> "_Packed":
        """The real tokens of a padded batch, embedded: ``[N_real, d]`` rows and their offsets."""
        B, T = input_ids.shape
        positions = self._position_ids(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None or bool(attention_mask.all()):
            lengths = torch.full((B,), T, dtype=torch.long, device=input_ids.device)
            rows = torch.arange(B * T, device=input_ids.device)
            ids, types, positions = input_ids.reshape(-1), token_type_ids.reshape(-1), positions.reshape(-1)
        else:
            real = attention_mask.reshape(-1).bool()
            rows = real.nonzero().squeeze(1)
            lengths = attention_mask.bool().sum(1)
            ids, types, positions = input_ids.reshape(-1)[rows], token_type_ids.reshape(-1)[rows], positions.reshape(-1)[rows]
        cu_seqlens = torch.zeros(B + 1, dtype=torch.long, device=input_ids.device)
        torch.cumsum(lengths, 0, out=cu_seqlens[1:])
        return _Packed(self.embeddings.forward_packed(ids, types, positions), cu_seqlens, rows)

    def _run_packed(self, packed: "_Packed", *, first_only: bool) -> torch.Tensor:
        """The layers over packed rows; with ``first_only``, each sequence's first row ``[B, d]``."""
        h, cu = packed.hidden, packed.cu_seqlens
        mixing = [i for i, l in enumerate(self.layers) if l.attention is not None and l.attention.heads]
        # After the last attention that mixes tokens, every layer is position-wise.
        reduce_at = (mixing[-1] if mixing else -1) if first_only else len(self.layers)
        if reduce_at < 0:
            h, cu = h[cu[:-1]], torch.arange(cu.numel(), device=cu.device)
        for i, layer in enumerate(self.layers):
            if layer.attention is None and layer.ffn is None:
                continue
            h = layer.forward_packed(h, cu, first_only=i == reduce_at)
            if i == reduce_at:
                cu = torch.arange(cu.numel(), device=cu.device)
        return h

    def linear_sublayers(self) -> list[nn.Module]:
        """Every sublayer with linear maps (attention, FFN, classification or token head), for serving to override
        them (see ``linear_overrides`` in :mod:`cofi_kernels.modules.pruned`)."""
        subs = [s for l in self.layers for s in (l.attention, l.ffn) if s is not None]
        return subs + ([self.head] if self.head is not None else [])

    def layer_alive(self) -> list[bool]:
        """Per layer: False where both its attention and its FFN sublayer were removed."""
        return [l.attention is not None or l.ffn is not None for l in self.layers]

    def expand_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Scatter ``[..., d]`` back to the original hidden size ``[..., D]`` (pruned dims 0).

        On an aligned copy (:func:`cofi_kernels.serving.aligned_copy`) the padded dims (index
        -1, always 0) are left out."""
        index = self.hidden_index
        real = getattr(self, "aligned_from", None)
        if real is not None:
            h, index = h[..., :real], index[:real]
        out = h.new_zeros(*h.shape[:-1], self.config["original_hidden_size"])
        out[..., index] = h
        return out

    # ------------------------------------------------------------------ shapes

    def layer_shapes(self) -> list[dict]:
        """Per layer: ``{"heads": int | None, "ffn_width": int | None, "hidden": d}``; None = sublayer removed."""
        return [
            {
                "heads": None if l.attention is None else l.attention.heads,
                "ffn_width": None if l.ffn is None else l.ffn.width,
                "hidden": self.config["hidden_size"],
            }
            for l in self.layers
        ]

    def num_parameters(self) -> int:
        """Total number of stored parameters (embeddings, encoder, LayerNorms, biases, head)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def encoder_size(self) -> int:
        """The DESIGN §4 count: Σ over live sublayers of ``4·d_head·heads·d + 2·width·d``
        (Q, K, V, O and W1, W2 weights only)."""
        heads = [0 if l.attention is None else l.attention.heads for l in self.layers]
        widths = [0 if l.ffn is None else l.ffn.width for l in self.layers]
        return encoder_size(heads, widths, self.config["hidden_size"], self.config["head_dim"])

    @property
    def target_sparsity(self) -> float | None:
        """The sparsity the pruning run was asked for (``target_sparsity`` in the saved config), or None
        when the method had no target or the model was built without one."""
        return self.config.get("target_sparsity")

    @property
    def sparsity(self) -> float:
        """Realised sparsity ``1 − encoder_size / M`` against the original model's count M."""
        return 1.0 - self.encoder_size / self.config["original_size"]

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameter counts: ``embeddings`` (tables + LayerNorm), ``encoder_counted``
        (:attr:`encoder_size`), ``encoder_other`` (encoder biases and LayerNorms),
        ``head`` (pooler/classifier) and ``total``."""
        emb = sum(p.numel() for p in self.embeddings.parameters())
        enc = sum(p.numel() for p in self.layers.parameters())
        head = 0 if self.head is None else sum(p.numel() for p in self.head.parameters())
        return {
            "embeddings": emb,
            "encoder_counted": self.encoder_size,
            "encoder_other": enc - self.encoder_size,
            "head": head,
            "total": emb + enc + head,
        }

    def summary(self) -> str:
        """A readable multi-line description: shapes per layer, sizes and sparsity."""
        c = self.config
        task = {
            "sequence_classification": f"sequence classification ({c['num_labels']} labels"
                                       f"{', mean pooling' if c.get('pooling') == 'mean' else ''})",
            "token_classification": f"token classification ({c['num_labels']} labels)",
            "question_answering": "question answering (start/end logits)",
            "embedding": f"sentence embedding ({c.get('pooling')} pooling"
                         f"{', normalized' if c.get('normalize') else ''})",
        }.get(c["task"], "encoder")
        lines = [
            f"PrunedModel({c['model_type']}, {task}, hidden {c['hidden_size']}/{c['original_hidden_size']}, "
            f"head_dim {c['head_dim']}, sparsity {100 * self.sparsity:.2f}%, "
            f"encoder size {self.encoder_size:,} of {c['original_size']:,}, parameters {self.num_parameters():,})"
        ]
        H, I = c["original_num_heads"], c["original_intermediate_size"]
        for i, s in enumerate(self.layer_shapes()):
            att = "attention removed" if s["heads"] is None else f"heads {s['heads']}/{H}"
            ffn = "FFN removed" if s["ffn_width"] is None else f"FFN {s['ffn_width']}/{I}"
            lines.append(f"  layer {i}: {att}, {ffn}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        """Same as :meth:`summary`."""
        return self.summary()

    # ------------------------------------------------------------------ export

    def export_onnx(self, path: str | os.PathLike, *, opset: int | None = None):
        """Write the reference forward as a self-contained ONNX file at ``path`` (needs ``cofi-kernels[onnx]``).

        Inputs: ``input_ids``, ``attention_mask`` (1 = token, 0 = padding) and
        ``token_type_ids``, int64 ``[batch, sequence]``, all three required.
        Outputs (float32), by task: ``logits`` ``[batch, num_labels]`` for sequence
        classification; ``logits`` ``[batch, sequence, num_labels]`` for token
        classification; ``start_logits`` and ``end_logits`` ``[batch, sequence]`` (two
        outputs) for question answering; ``embedding`` ``[batch, D]`` for a sentence
        embedding; else ``last_hidden_state`` ``[batch, sequence, d]`` over the kept
        hidden dims. ``batch`` and ``sequence`` are dynamic axes (sequence up to the
        model's token limit).
        ``opset``: the ONNX opset, an integer from 18 to the highest the
        installed ``onnx`` knows; ``None`` = the exporter's default (20 with
        torch 2.14). The graph is the plain PyTorch reference forward in fp32
        (a CPU fp32 copy is exported when the model is elsewhere; the model is
        not changed) and holds standard ONNX ops only, no ``cofi::`` op.

        The file is written under a temporary name in the same directory and
        renamed at the end: an error leaves no file behind (and an existing
        ``path`` untouched). Raises ``ValueError`` naming the argument for a
        ``path`` that does not end in ``.onnx`` or whose directory does not
        exist, or a bad ``opset``; ``ImportError`` without ``onnx`` /
        ``onnxscript``. Returns an
        :class:`~cofi_kernels.models.onnx_export.OnnxExport` (path, size in
        bytes, opset, output name(s)). Exporter and choices:
        :mod:`cofi_kernels.models.onnx_export`.
        """
        from .onnx_export import export_onnx

        return export_onnx(self, path, opset=opset)

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``model.safetensors`` (every tensor above) and ``cofi_config.json`` into ``directory``."""
        from safetensors.torch import save_file

        if getattr(self, "aligned_from", None) is not None:
            raise ValueError("PrunedModel.save_pretrained: this is an aligned copy (serving.aligned_copy) whose "
                             "padded sizes are not a pruned model's; save the original model")
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt", "cofi_format": FORMAT})
        cfg = dict(self.config)
        cfg["encoder_size"] = self.encoder_size
        cfg["dtype"] = str(self.embeddings.word_embeddings.dtype).replace("torch.", "")
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")

    @classmethod
    def read_config(cls, directory: str | os.PathLike) -> dict:
        """The validated ``cofi_config.json`` of a saved model, without touching its weights.

        Raises ``FileNotFoundError`` when the directory or the file is missing and
        ``ValueError`` naming the file for a config this version cannot build
        (missing keys, wrong types, sizes larger than the original model's).
        """
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"PrunedModel: directory {directory!r} does not exist")
        cfg_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"PrunedModel: config file {cfg_path!r} is missing")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
        _validate_config(cfg, cfg_path)
        return cfg

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "PrunedModel":
        """Load a model written by :meth:`save_pretrained` (safetensors only, no pickle).

        ``dtype`` is the dtype of the floating-point parameters once loaded:
        ``torch.float32`` or ``torch.bfloat16`` anywhere, ``torch.float16`` on CUDA
        only (a CPU has no fast float16 GEMM); ``ValueError`` otherwise.

        The config is checked first (:meth:`read_config`), then the names,
        shapes and dtypes in the weights file's header, before any tensor is
        read or allocated. Raises ``FileNotFoundError`` for a missing directory
        or file and ``ValueError`` (naming the file) for a bad config or a
        weights file whose tensors do not match the config (missing,
        unexpected or wrong shape).
        """
        from safetensors.torch import load_file

        check_serving_dtype(dtype, torch.device(device))
        cfg = cls.read_config(directory)
        w_path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
        if not os.path.isfile(w_path):
            raise FileNotFoundError(f"PrunedModel.from_pretrained: weights file {w_path!r} is missing")
        with torch.device("meta"):  # no allocation: only the expected shapes are needed
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        _check_header(w_path, expected)
        try:
            tensors = load_file(w_path, device="cpu")
        except Exception as e:  # safetensors raises its own error types for a corrupt file
            raise ValueError(f"{w_path}: cannot be read as safetensors ({e})") from None
        check_finite(tensors.items(), w_path)
        model.load_state_dict({k: _own_aligned(t) for k, t in tensors.items()}, strict=True, assign=True)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.to(device=device, dtype=dtype).eval()


def check_finite(named_tensors, where: str) -> None:
    """``ValueError`` naming ``where`` and the first tensor of ``(name, tensor)`` pairs that holds a NaN or
    an infinity: such weights give NaN outputs everywhere, which must not pass for predictions."""
    for name, t in named_tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: tensor {name!r} holds {bad:,} non-finite value(s) (NaN or infinity); "
                             "the model cannot compute anything meaningful")


_ALIGNMENT = 64  # bytes; torch's CPU allocator aligns every allocation so


def _own_aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in storage of its own at an aligned address: safetensors hands out tensors at 4- or
    8-byte offsets, and MKL's GEMMs sum in an order that depends on their operands' alignment, so a
    reloaded model would differ from the saved one in the last bits."""
    return t if t.data_ptr() % _ALIGNMENT == 0 else t.clone()


class _Packed(NamedTuple):
    """Packed real tokens: ``hidden`` ``[N, d]``, ``cu_seqlens`` ``[B + 1]`` and ``rows``, the
    index of each packed token in the flattened ``[B·T]`` batch."""

    hidden: torch.Tensor
    cu_seqlens: torch.Tensor
    rows: torch.Tensor


SERVING_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}


def check_serving_dtype(dtype, device: torch.device) -> None:
    """``ValueError`` unless ``dtype`` is one a pruned model can be served in on ``device``'s type."""
    allowed = SERVING_DTYPES.get(device.type, SERVING_DTYPES["cpu"])
    if dtype not in allowed:
        names = ", ".join(str(t).replace("torch.", "") for t in allowed)
        raise ValueError(f"PrunedModel: dtype must be one of {names} on {device.type}, got {dtype!r}")


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes a weight may be stored in
# The largest size a config may give (vocabulary, positions, hidden size, ...): the tables' sizes are
# products of two of them, which then fit in int64, so a hand-edited 2**62 is refused here rather
# than overflowing inside torch while the model is built.
MAX_CONFIG_SIZE = 2**31 - 1


def _check_header(w_path: str, expected: Mapping[str, tuple]) -> None:
    """The weights file's header names exactly the ``expected`` tensors with their shapes."""
    from safetensors import safe_open

    try:
        with safe_open(w_path, framework="pt") as f:
            found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{w_path}: cannot be read as safetensors ({e})") from None
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise ValueError(f"{w_path}: tensor(s) required by {CONFIG_NAME} are missing: {missing}")
    if unexpected:
        raise ValueError(f"{w_path}: unexpected tensor(s) not described by {CONFIG_NAME}: {unexpected}")
    for k, shape in expected.items():
        if found[k][0] != shape:
            raise ValueError(
                f"{w_path}: tensor {k!r} has the wrong shape for {CONFIG_NAME}: "
                f"expected {list(shape)}, got {list(found[k][0])}"
            )
    if found["hidden_index"][1] != "I64":
        raise ValueError(f"{w_path}: tensor 'hidden_index' must be int64, got {found['hidden_index'][1]}")
    for k in expected:
        if k != "hidden_index" and found[k][1] not in _FLOAT_DTYPES:
            raise ValueError(f"{w_path}: tensor {k!r} must be floating point ({', '.join(_FLOAT_DTYPES)}), "
                             f"got {found[k][1]}")


def _validate_config(cfg, path):
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{path}: config is missing key(s) {missing}")
    if cfg["format"] != FORMAT:
        raise ValueError(f"{path}: 'format' is {cfg['format']!r}, expected {FORMAT!r}")
    if cfg["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported format_version {cfg['format_version']!r} (this version reads {FORMAT_VERSION})"
        )
    if cfg["model_type"] not in ARCHS:
        raise ValueError(f"{path}: model_type {cfg['model_type']!r} is not one of {sorted(ARCHS)}")
    if cfg["task"] not in TASKS:
        raise ValueError(f"{path}: task {cfg['task']!r} is not one of {', '.join(map(repr, TASKS))}")
    if cfg["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"{path}: hidden_act {cfg['hidden_act']!r} is not one of {sorted(ACTIVATIONS)}")
    for k in ("hidden_size", "head_dim", "vocab_size", "max_position_embeddings", "type_vocab_size",
              "original_hidden_size", "original_num_heads", "original_intermediate_size", "original_size"):
        v = cfg[k]
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_CONFIG_SIZE:
            raise ValueError(f"{path}: {k!r} must be a positive integer up to {MAX_CONFIG_SIZE:,}, got {v!r}")
    if cfg["task"] in ("sequence_classification",) + TOKEN_TASKS:
        n = cfg["num_labels"]
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_CONFIG_SIZE:
            raise ValueError(f"{path}: 'num_labels' must be a positive integer up to {MAX_CONFIG_SIZE:,}, got {n!r}")
        if cfg["task"] == "question_answering" and n != 2:
            raise ValueError(f"{path}: 'num_labels' of a question-answering model must be 2 (start, end), got {n!r}")
    if cfg["task"] == "sequence_classification" and cfg.get("pooling", "cls") not in CLASSIFIER_POOLINGS:
        raise ValueError(f"{path}: 'pooling' of a sequence classifier must be one of "
                         f"{', '.join(map(repr, CLASSIFIER_POOLINGS))} (absent: 'cls'), got {cfg.get('pooling')!r}")
    if cfg["task"] == "embedding":
        if cfg.get("pooling") not in POOLINGS:
            raise ValueError(f"{path}: 'pooling' of an embedding model must be one of "
                             f"{', '.join(map(repr, POOLINGS))}, got {cfg.get('pooling')!r}")
        if not isinstance(cfg.get("normalize"), bool):
            raise ValueError(f"{path}: 'normalize' of an embedding model must be true or false, "
                             f"got {cfg.get('normalize')!r}")
    layers = cfg["layers"]
    if not isinstance(cfg["num_layers"], int) or isinstance(cfg["num_layers"], bool) or cfg["num_layers"] < 0:
        raise ValueError(f"{path}: 'num_layers' must be an integer >= 0, got {cfg['num_layers']!r}")
    if not isinstance(layers, list) or len(layers) != cfg["num_layers"]:
        raise ValueError(f"{path}: 'layers' must be a list of num_layers={cfg['num_layers']!r} entries")
    if cfg["hidden_size"] > cfg["original_hidden_size"]:
        raise ValueError(f"{path}: 'hidden_size' {cfg['hidden_size']} exceeds the original model's "
                         f"{cfg['original_hidden_size']}")
    # A pruned layer is never wider than the original one; this bounds what the model allocates.
    bounds = {"heads": ("original_num_heads", cfg["original_num_heads"]),
              "ffn_width": ("original_intermediate_size", cfg["original_intermediate_size"])}
    for i, spec in enumerate(layers):
        if not isinstance(spec, dict) or "heads" not in spec or "ffn_width" not in spec:
            raise ValueError(f"{path}: layers[{i}] must be an object with 'heads' and 'ffn_width', got {spec!r}")
        for k, (name, bound) in bounds.items():
            v = spec[k]
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{path}: layers[{i}].{k} must be null or an integer >= 0, got {v!r}")
            if v is not None and v > bound:
                raise ValueError(f"{path}: layers[{i}].{k} is {v}, more than the original model's {name} {bound}")
    target = cfg.get("target_sparsity")
    if target is not None and (not isinstance(target, (int, float)) or isinstance(target, bool)
                               or not 0 < target < 1):
        raise ValueError(f"{path}: 'target_sparsity' must be null or a number in (0, 1), got {target!r}")
    eps = cfg["layer_norm_eps"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < float("inf"):
        raise ValueError(f"{path}: 'layer_norm_eps' must be a positive number, got {cfg['layer_norm_eps']!r}")
    if not isinstance(cfg["pad_token_id"], int) or isinstance(cfg["pad_token_id"], bool):
        raise ValueError(f"{path}: 'pad_token_id' must be an integer, got {cfg['pad_token_id']!r}")
