"""The generic compact-model builder: an HF encoder plus kept index sets and scales → :class:`PrunedModel`.

Every pruning method ends here: it decides, per layer, which attention heads
and FFN units stay (or that a sublayer goes), which hidden dims stay, and
optionally scales, and :func:`build_pruned_model` cuts and folds the weights.

What the result computes: the HF model in which

- each kept head's attention context is multiplied by its ``head_scale``
  and each kept FFN unit's activation by its ``unit_scale``;
- each sublayer's output (after its output projection, bias included) is
  multiplied by its layer scale (``attention_scale``, ``ffn_scale``) and by
  the hidden scale;
- every LayerNorm normalises over the kept hidden dims only and its output is
  multiplied by the hidden scale (so are the embeddings, before their
  LayerNorm);
- removed heads, units and hidden dims contribute nothing, and a removed
  sublayer is the identity.

That is DESIGN §4's gated model with those scales as gates. Folding rules
(``K`` = kept hidden dims, ``s`` = their scale; per layer ``Hk`` = kept
heads, ``J`` = kept units):

- embeddings: every table keeps columns ``K`` scaled by ``s``; LayerNorm
  ``γ[K]·s``, ``β[K]·s``;
- attention: Q, K, V keep the rows of heads ``Hk`` and the input columns
  ``K`` (fused into one ``[3·|Hk|·d_head, |K|]`` matrix);
  ``W_o[K, cols(Hk)] · head_scale (per column) · attention_scale·s (per row)``;
  ``b_o[K]·attention_scale·s``; LayerNorm ``γ[K]·s``, ``β[K]·s``;
- FFN: ``W1[J, K]``, ``b1[J]``; ``W2[K, J] · unit_scale (per column) ·
  ffn_scale·s (per row)``; ``b2[K]·ffn_scale·s``; LayerNorm ``γ[K]·s``, ``β[K]·s``;
- a sublayer with no head / unit left keeps only its output bias and LayerNorm;
- classification head (BERT pooler + classifier, RoBERTa dense + out_proj,
  both ``out(tanh(dense(h[:, 0])))``): the dense input columns keep ``K``
  unscaled (the hidden state already carries ``s``); its output size stays
  the original hidden size;
- token head (``*ForTokenClassification``'s ``classifier``, ``*ForQuestionAnswering``'s
  ``qa_outputs``, applied to every token's last hidden state): ``W[:, K]`` unscaled,
  ``b`` as is (the gated last hidden state is 0 on the pruned dims, so this is exact);
- sentence embedding (a bare encoder built with ``embedding=``): no head tensor; the
  pooler of a ``BertModel`` is dropped (the embedding pools the last hidden state).

Products are formed in float64 and rounded once to the model's dtype. Head
dim and the attention scale ``d_head**-0.5`` stay those of the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..modules.gated import head_rows
from .arch import encoder_dims, supported_model
from .pruned_model import CLASSIFIER_POOLINGS, FORMAT, FORMAT_VERSION, POOLINGS, TOKEN_TASKS, PrunedModel
from .size import dense_encoder_size

__all__ = ["KeptLayer", "build_pruned_model"]

Indices = Sequence[int] | torch.Tensor
Scale = float | torch.Tensor


@dataclass
class KeptLayer:
    """What one encoder layer keeps.

    Attributes:
        heads: the kept attention heads, ascending original indices (may be
            empty); ``None`` removes the attention sublayer.
        units: the kept FFN units, ascending (may be empty); ``None`` removes
            the FFN sublayer.
        head_scale: ``[len(heads)]``, multiplies each kept head's context; None = 1.
        attention_scale: scalar, multiplies the attention sublayer's output; None = 1.
        unit_scale: ``[len(units)]``, multiplies each kept unit's activation; None = 1.
        ffn_scale: scalar, multiplies the FFN sublayer's output; None = 1.
    """

    heads: Indices | None
    units: Indices | None
    head_scale: Scale | None = None
    attention_scale: Scale | None = None
    unit_scale: Scale | None = None
    ffn_scale: Scale | None = None


def _indices(where: str, name: str, value: Indices, size: int) -> torch.Tensor:
    raw = torch.as_tensor(value)
    if raw.dim() > 1 or raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
        if not (raw.numel() == 0 and raw.dim() == 1):
            raise ValueError(f"{where}: {name} must be a 1-D sequence of integer indices, got {raw.dtype} "
                             f"of shape {list(raw.shape)}")
    idx = raw.detach().to("cpu", torch.long).reshape(-1)
    if idx.numel() and (idx.min() < 0 or idx.max() >= size):
        raise ValueError(f"{where}: {name} must be indices in [0, {size}), got {idx.tolist()}")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{where}: {name} must be strictly increasing, got {idx.tolist()}")
    return idx


def _scale(where: str, name: str, value: Scale | None, length: int | None) -> torch.Tensor | None:
    """A float64 CPU tensor ``[length]`` (or 0-d for ``length=None``), or None."""
    if value is None:
        return None
    t = torch.as_tensor(value).detach().to("cpu", torch.float64)
    want = () if length is None else (length,)
    if tuple(t.shape) != want and not (length is None and t.numel() == 1):
        raise ValueError(f"{where}: {name} must have shape {list(want)}, got {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{where}: {name} has non-finite values")
    return t.reshape(want)


def _times(t: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return t if scale is None else t * scale


def _row_scale(layer_scale: torch.Tensor | None, hidden_scale: torch.Tensor | None) -> torch.Tensor | None:
    if layer_scale is None:
        return hidden_scale
    return layer_scale if hidden_scale is None else layer_scale * hidden_scale


def _as_float64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


@torch.no_grad()
def build_pruned_model(
    model,
    layers: Sequence[KeptLayer],
    hidden: Indices | None = None,
    hidden_scale: Scale | None = None,
    *,
    embedding: dict | None = None,
    pooling: str = "cls",
) -> PrunedModel:
    """Cut and fold a BERT/RoBERTa model into a :class:`PrunedModel` (see the module docstring).

    Args:
        model: ``BertModel``, ``RobertaModel`` or their ``*ForSequenceClassification``,
            ``*ForTokenClassification`` or ``*ForQuestionAnswering`` (not modified), as
            :mod:`cofi_kernels.models.arch` supports them. The pruned model's task
            (config ``"task"``) is the model's: ``"base"``, ``"sequence_classification"``,
            ``"token_classification"`` or ``"question_answering"``.
        layers: one :class:`KeptLayer` per encoder layer.
        hidden: the kept hidden dims, ascending (default: all); at least one.
        hidden_scale: ``[len(hidden)]``, multiplies every hidden state's kept dims; None = 1.
        embedding: for a bare encoder only: ``{"pooling": "mean" | "cls" | "max",
            "normalize": bool}`` makes a sentence-embedding model (task ``"embedding"``, see
            :meth:`PrunedModel.forward`); None (default) keeps task ``"base"``.
        pooling: for a sequence classifier only: what its head reads, ``"cls"`` (default: the
            first token, as the Hugging Face model's head) or ``"mean"`` (the mean of the last
            hidden state over the real tokens; config ``"pooling": "mean"``).

    Returns:
        A :class:`PrunedModel` in eval mode, on the CPU, in the model's dtype,
        with parameters that do not require grad.

    Raises:
        UnsupportedModelError: a model or configuration the adapter does not support.
        ValueError: a wrong number of layers, indices out of range or not
            increasing, no hidden dim kept, scales of the wrong shape, a bad
            ``embedding`` or one given for a model with a head.
    """
    where = "build_pruned_model"
    arch, task, enc = supported_model(model)
    if embedding is not None:
        _check_embedding(where, embedding, task)
    if pooling not in CLASSIFIER_POOLINGS:
        raise ValueError(f"{where}: pooling must be one of {', '.join(map(repr, CLASSIFIER_POOLINGS))}, "
                         f"got {pooling!r}")
    if pooling != "cls" and task != "sequence_classification":
        raise ValueError(f"{where}: pooling= is for a sequence classifier, got a model with task {task!r}")
    cfg = enc.config
    dims = encoder_dims(cfg)
    L, H, dh, I, D = dims.num_layers, dims.num_heads, dims.head_dim, dims.intermediate_size, dims.hidden_size
    if len(layers) != L:
        raise ValueError(f"{where}: layers must have one entry per encoder layer ({L}), got {len(layers)}")
    K = torch.arange(D) if hidden is None else _indices(where, "hidden", hidden, D)
    if K.numel() == 0:
        raise ValueError(f"{where}: hidden keeps no dim; the pruned model would have hidden size 0")
    zh = _scale(where, "hidden_scale", hidden_scale, K.numel())
    emb = arch.embedding_parts(enc)
    dtype = emb.word.weight.dtype

    tensors: dict[str, torch.Tensor] = {}
    for name, table in (("word_embeddings", emb.word), ("position_embeddings", emb.position),
                        ("token_type_embeddings", emb.token_type)):
        # Select before widening: the word table is the largest tensor of the model.
        tensors[f"embeddings.{name}"] = _times(_as_float64(table.weight.detach()[:, K.to(table.weight.device)]), zh)
    tensors["embeddings.ln_weight"] = _times(_as_float64(emb.norm.weight)[K], zh)
    tensors["embeddings.ln_bias"] = _times(_as_float64(emb.norm.bias)[K], zh)

    specs = []
    for i, (layer, keep) in enumerate(zip(arch.layers(enc), layers)):
        spec = {"heads": None, "ffn_width": None}
        if keep.heads is not None:
            heads = _indices(where, f"layers[{i}].heads", keep.heads, H)
            col = _scale(where, f"layers[{i}].head_scale", keep.head_scale, heads.numel())
            row = _row_scale(_scale(where, f"layers[{i}].attention_scale", keep.attention_scale, None), zh)
            spec["heads"] = int(heads.numel())
            tensors.update(_attention_tensors(f"layers.{i}.attention.", arch.attention_parts(layer), heads, dh, K,
                                              col, row, zh))
        if keep.units is not None:
            units = _indices(where, f"layers[{i}].units", keep.units, I)
            col = _scale(where, f"layers[{i}].unit_scale", keep.unit_scale, units.numel())
            row = _row_scale(_scale(where, f"layers[{i}].ffn_scale", keep.ffn_scale, None), zh)
            spec["ffn_width"] = int(units.numel())
            tensors.update(_ffn_tensors(f"layers.{i}.ffn.", arch.ffn_parts(layer, cfg), units, K, col, row, zh))
        specs.append(spec)

    if task == "sequence_classification":
        dense, out = arch.classification_head(model)
        tensors["head.dense_weight"] = _as_float64(dense.weight)[:, K]
        tensors["head.dense_bias"] = _as_float64(dense.bias)
        tensors["head.out_weight"] = _as_float64(out.weight)
        tensors["head.out_bias"] = _as_float64(out.bias)
    elif task in TOKEN_TASKS:
        out = arch.token_head(model)
        if task == "question_answering" and out.weight.shape[0] != 2:
            raise ValueError(f"{where}: a question-answering head must have 2 outputs (start, end), "
                             f"got {out.weight.shape[0]}")
        tensors["head.out_weight"] = _as_float64(out.weight)[:, K]
        tensors["head.out_bias"] = (_as_float64(out.bias) if out.bias is not None
                                    else torch.zeros(out.weight.shape[0], dtype=torch.float64))

    config = _config(arch.model_type, task, model, cfg, dims, int(K.numel()), specs)
    if task in TOKEN_TASKS:  # the head's own output count (2 for question answering: start, end)
        config["num_labels"] = int(tensors["head.out_bias"].shape[0])
    if embedding is not None:
        config.update(task="embedding", pooling=embedding["pooling"], normalize=embedding["normalize"])
    if pooling == "mean":
        config["pooling"] = "mean"
    with torch.device("meta"):  # no initialisation: every tensor is assigned next
        pruned = PrunedModel(config)
    state = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    state["hidden_index"] = K.clone()
    pruned.load_state_dict(state, strict=True, assign=True)
    for p in pruned.parameters():
        p.requires_grad_(False)
    return pruned.eval()


def _attention_tensors(prefix, parts, heads, dh, K, col, row, zh) -> dict[str, torch.Tensor]:
    out = {}
    if heads.numel():
        rows = head_rows(heads, dh)
        out[prefix + "qkv_weight"] = torch.cat([_as_float64(lin.weight)[rows][:, K]
                                                for lin in (parts.query, parts.key, parts.value)])
        out[prefix + "qkv_bias"] = torch.cat([_as_float64(lin.bias)[rows] for lin in (parts.query, parts.key, parts.value)])
        w = _as_float64(parts.output.weight)[K][:, rows]
        if col is not None:
            w = w * col.repeat_interleave(dh)[None, :]
        out[prefix + "out_weight"] = w if row is None else w * row[:, None]
    out[prefix + "out_bias"] = _times(_as_float64(parts.output.bias)[K], row)
    out[prefix + "ln_weight"] = _times(_as_float64(parts.norm.weight)[K], zh)
    out[prefix + "ln_bias"] = _times(_as_float64(parts.norm.bias)[K], zh)
    return out


def _ffn_tensors(prefix, parts, units, K, col, row, zh) -> dict[str, torch.Tensor]:
    out = {}
    if units.numel():
        out[prefix + "in_weight"] = _as_float64(parts.up.weight)[units][:, K]
        out[prefix + "in_bias"] = _as_float64(parts.up.bias)[units]
        w = _as_float64(parts.down.weight)[K][:, units]
        if col is not None:
            w = w * col[None, :]
        out[prefix + "out_weight"] = w if row is None else w * row[:, None]
    out[prefix + "out_bias"] = _times(_as_float64(parts.down.bias)[K], row)
    out[prefix + "ln_weight"] = _times(_as_float64(parts.norm.weight)[K], zh)
    out[prefix + "ln_bias"] = _times(_as_float64(parts.norm.bias)[K], zh)
    return out


def _check_embedding(where: str, embedding, task: str) -> None:
    if task != "base":
        raise ValueError(f"{where}: embedding= is for a bare encoder (BertModel, RobertaModel), "
                         f"got a model with task {task!r}")
    if not isinstance(embedding, dict) or set(embedding) != {"pooling", "normalize"}:
        got = sorted(embedding) if isinstance(embedding, dict) else type(embedding).__name__
        raise ValueError(f"{where}: embedding must be a dict with exactly the keys 'pooling' and 'normalize', "
                         f"got {got}")
    if embedding["pooling"] not in POOLINGS:
        raise ValueError(f"{where}: embedding['pooling'] must be one of {', '.join(map(repr, POOLINGS))}, "
                         f"got {embedding['pooling']!r}")
    if not isinstance(embedding["normalize"], bool):
        raise ValueError(f"{where}: embedding['normalize'] must be True or False, got {embedding['normalize']!r}")


def _config(model_type, task, model, cfg, dims, hidden_size, specs) -> dict:
    classifier = task in ("sequence_classification",) + TOKEN_TASKS
    num_labels = getattr(model.config, "num_labels", None) if classifier else None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": model_type,
        "task": task,
        "hidden_size": hidden_size,
        "head_dim": dims.head_dim,
        "num_layers": dims.num_layers,
        "layers": specs,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": float(cfg.layer_norm_eps),
        "pad_token_id": int(cfg.pad_token_id if cfg.pad_token_id is not None else 0),
        "hidden_act": cfg.hidden_act,
        "num_labels": num_labels,
        "problem_type": getattr(model.config, "problem_type", None) if classifier else None,
        "id2label": _id2label(model.config) if classifier else None,
        "original_hidden_size": dims.hidden_size,
        "original_num_heads": dims.num_heads,
        "original_intermediate_size": dims.intermediate_size,
        "original_size": dense_encoder_size(dims.num_layers, dims.num_heads, dims.head_dim,
                                            dims.intermediate_size, dims.hidden_size),
    }


def _id2label(config) -> dict | None:
    id2label = getattr(config, "id2label", None)
    return None if id2label is None else {str(k): v for k, v in id2label.items()}
