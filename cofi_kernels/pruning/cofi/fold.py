"""Turn learned CoFi gates into a compact encoder with irregular layers (DESIGN.md §4 "Pruning").

:func:`prune` reads a BERT/RoBERTa encoder (optionally with its
sequence-classification head) and a gate dict and builds a :class:`PrunedModel`
whose output equals the gated model's output under those gates (fp32: within
1e-5 max abs). The compact model is plain PyTorch (``F.linear``,
``F.layer_norm``, ``F.scaled_dot_product_attention``), saves to
``model.safetensors`` + ``cofi_config.json`` and loads back without the
original model class and without pickle.

Folding rules (``K`` = hidden dims with ``z_hid != 0``, ``zh = z_hid[K]``;
for layer ``i``, ``Hk`` = heads with ``z_head != 0``, ``J`` = units with ``z_int != 0``):

- embeddings: word, position and token-type tables keep columns ``K``, each
  scaled by ``zh``; LayerNorm ``γ[K]·zh``, ``β[K]·zh``;
- attention (only where ``z_mha != 0``): Q, K, V keep the rows of heads ``Hk``
  and the input columns ``K`` (fused into one ``[3·|Hk|·d_head, |K|]`` matrix);
  ``W_o[K, cols(Hk)] · z_head[h] (per column) · z_mha·zh (per row)``;
  ``b_o[K]·z_mha·zh``; LayerNorm ``γ[K]·zh``, ``β[K]·zh``;
- FFN (only where ``z_ffn != 0``): ``W1[J, K]``, ``b1[J]``;
  ``W2[K, J] · z_int[j] (per column) · z_ffn·zh (per row)``; ``b2[K]·z_ffn·zh``;
  LayerNorm ``γ[K]·zh``, ``β[K]·zh``;
- a sublayer whose layer gate is 0 is removed; one with a live layer gate and no
  head / unit left keeps only its output bias and LayerNorm;
- classification head (BERT pooler + classifier, RoBERTa dense + out_proj, both
  ``out(tanh(dense(h[:, 0])))``): the dense input columns keep ``K`` unscaled
  (the hidden state already carries ``zh``); its output size stays the original
  hidden size, because the pooled vector is not hidden-gated.

Products are formed in float64 and rounded once to the model's dtype.
Head dim and the attention scale ``d_head**-0.5`` stay those of the original.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...models.pruned_model import _ACTIVATIONS, FORMAT, FORMAT_VERSION, PrunedModel, UnsupportedModelError

__all__ = ["prune"]


def _inspect(model):
    """(encoder, kind, task, classification-head getter) or UnsupportedModelError."""
    import transformers as tf

    supported = {
        tf.BertModel: ("bert", "base"),
        tf.RobertaModel: ("roberta", "base"),
        tf.BertForSequenceClassification: ("bert", "sequence_classification"),
        tf.RobertaForSequenceClassification: ("roberta", "sequence_classification"),
    }
    kind_task = supported.get(type(model))
    if kind_task is None:
        names = ", ".join(c.__name__ for c in supported)
        raise UnsupportedModelError(f"prune: unsupported model {type(model).__name__}; supported: {names}")
    kind, task = kind_task
    enc = model if task == "base" else getattr(model, kind)
    cfg = enc.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError("prune: decoder / cross-attention configurations are not supported")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(
            f"prune: position_embedding_type {cfg.position_embedding_type!r} is not supported (only 'absolute')"
        )
    if cfg.hidden_act not in _ACTIVATIONS:
        raise UnsupportedModelError(f"prune: hidden_act {cfg.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UnsupportedModelError("prune: hidden_size is not a multiple of num_attention_heads")
    return enc, kind, task


def _model_shapes(cfg):
    L, H, I, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_size
    return {"head": (L, H), "mha": (L,), "int": (L, I), "ffn": (L,), "hidden": (D,)}


def _resolve_gates(gates, z, cfg):
    shapes = _model_shapes(cfg)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if gates is not None:
        gshapes = gates.shapes
        for t, s in shapes.items():
            if tuple(gshapes[t]) != s:
                raise ValueError(
                    f"prune: gates of type '{t}' do not fit the model: expected shape {list(s)}, got {list(gshapes[t])}"
                )
        if gates.head_dim != head_dim:
            raise ValueError(f"prune: gates head_dim does not fit the model: expected {head_dim}, got {gates.head_dim}")
        if z is None:
            z = gates.fixed if gates.fixed is not None else gates.deterministic()
    elif z is None:
        raise ValueError("prune: give gates (a CoFiGates) or a gate dict z")
    if not isinstance(z, Mapping):
        raise ValueError(f"prune: z must be a dict gate type -> tensor, got {type(z).__name__}")
    unknown = [k for k in z if k not in shapes]
    if unknown:
        raise ValueError(f"prune: unknown gate key(s) {unknown}; known keys are {tuple(shapes)}")
    out = {}
    for t, s in shapes.items():
        v = z.get(t)
        if v is None:
            out[t] = torch.ones(s, dtype=torch.float64)
            continue
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"prune: gate '{t}' must be a torch.Tensor, got {type(v).__name__}")
        if tuple(v.shape) != s:
            raise ValueError(f"prune: gate '{t}' has the wrong shape for the model: expected {list(s)}, got {list(v.shape)}")
        v = v.detach().to("cpu", torch.float64)
        if not torch.isfinite(v).all():
            raise ValueError(f"prune: gate '{t}' has non-finite values")
        out[t] = v
    return out


@torch.no_grad()
def prune(model, gates=None, z: Mapping[str, torch.Tensor | None] | None = None) -> PrunedModel:
    """Build the compact model that computes what ``model`` gated by ``z`` computes (DESIGN §4).

    Args:
        model: ``BertModel``, ``RobertaModel``, ``BertForSequenceClassification``
            or ``RobertaForSequenceClassification`` (unpatched weights; not modified).
        gates: a :class:`~cofi_kernels.pruning.cofi.gates.CoFiGates` for this model's shapes, or None when ``z`` is given.
        z: gate dict (``head`` [L, H], ``mha`` [L], ``int`` [L, I], ``ffn`` [L],
            ``hidden`` [D]; missing / None = ones). Default: ``gates.fixed`` if
            fixed, else ``gates.deterministic()``.

    A gate is *kept* where it is non-zero (gates are expected in [0, 1], as
    :class:`CoFiGates` produces them); kept soft values are folded into the
    weights (see the module docstring for the exact rules). Returns a
    :class:`PrunedModel` in eval mode with the model's dtype on the CPU.

    Raises:
        UnsupportedModelError (a TypeError and ValueError): any other model class or an unsupported config.
        ValueError: gates / z of the wrong shape (names the type, expected and got shape), or
            every hidden dim pruned.
    """
    enc, kind, task = _inspect(model)
    cfg = enc.config
    g = _resolve_gates(gates, z, cfg)
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    D, I = cfg.hidden_size, cfg.intermediate_size
    dh = D // H
    dtype = enc.embeddings.word_embeddings.weight.dtype

    zhid = g["hidden"]
    K = torch.nonzero(zhid != 0).flatten()
    if K.numel() == 0:
        raise ValueError("prune: every hidden dim has gate 0; the pruned model would have hidden size 0")
    zh = zhid[K]

    def w(t):
        return t.detach().to("cpu", torch.float64)

    layer_specs = []
    tensors: dict[str, torch.Tensor] = {}
    emb = enc.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        # Select before widening: the word table is the largest tensor of the model.
        tensors[f"embeddings.{name}"] = w(getattr(emb, name).weight.detach()[:, K.to(emb.word_embeddings.weight.device)]) * zh
    tensors["embeddings.ln_weight"] = w(emb.LayerNorm.weight)[K] * zh
    tensors["embeddings.ln_bias"] = w(emb.LayerNorm.bias)[K] * zh

    for i, layer in enumerate(enc.encoder.layer):
        spec = {"heads": None, "ffn_width": None}
        z_mha = g["mha"][i]
        if z_mha != 0:
            heads = torch.nonzero(g["head"][i] != 0).flatten()
            spec["heads"] = int(heads.numel())
            sa, so = layer.attention.self, layer.attention.output
            p = f"layers.{i}.attention."
            row_scale = z_mha * zh
            if heads.numel():
                rows = (heads[:, None] * dh + torch.arange(dh)[None, :]).flatten()
                tensors[p + "qkv_weight"] = torch.cat([w(lin.weight)[rows][:, K] for lin in (sa.query, sa.key, sa.value)])
                tensors[p + "qkv_bias"] = torch.cat([w(lin.bias)[rows] for lin in (sa.query, sa.key, sa.value)])
                col_scale = g["head"][i][heads].repeat_interleave(dh)
                tensors[p + "out_weight"] = w(so.dense.weight)[K][:, rows] * col_scale[None, :] * row_scale[:, None]
            tensors[p + "out_bias"] = w(so.dense.bias)[K] * row_scale
            tensors[p + "ln_weight"] = w(so.LayerNorm.weight)[K] * zh
            tensors[p + "ln_bias"] = w(so.LayerNorm.bias)[K] * zh
        z_ffn = g["ffn"][i]
        if z_ffn != 0:
            units = torch.nonzero(g["int"][i] != 0).flatten()
            spec["ffn_width"] = int(units.numel())
            fi, fo = layer.intermediate.dense, layer.output
            p = f"layers.{i}.ffn."
            row_scale = z_ffn * zh
            if units.numel():
                tensors[p + "in_weight"] = w(fi.weight)[units][:, K]
                tensors[p + "in_bias"] = w(fi.bias)[units]
                tensors[p + "out_weight"] = w(fo.dense.weight)[K][:, units] * g["int"][i][units][None, :] * row_scale[:, None]
            tensors[p + "out_bias"] = w(fo.dense.bias)[K] * row_scale
            tensors[p + "ln_weight"] = w(fo.LayerNorm.weight)[K] * zh
            tensors[p + "ln_bias"] = w(fo.LayerNorm.bias)[K] * zh
        layer_specs.append(spec)

    if task == "sequence_classification":
        if kind == "bert":
            dense, out = model.bert.pooler.dense, model.classifier
        else:
            dense, out = model.classifier.dense, model.classifier.out_proj
        tensors["head.dense_weight"] = w(dense.weight)[:, K]
        tensors["head.dense_bias"] = w(dense.bias)
        tensors["head.out_weight"] = w(out.weight)
        tensors["head.out_bias"] = w(out.bias)

    num_labels = getattr(model.config, "num_labels", None) if task == "sequence_classification" else None
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": kind,
        "task": task,
        "hidden_size": int(K.numel()),
        "head_dim": dh,
        "num_layers": L,
        "layers": layer_specs,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": float(cfg.layer_norm_eps),
        "pad_token_id": int(cfg.pad_token_id if cfg.pad_token_id is not None else 0),
        "hidden_act": cfg.hidden_act,
        "num_labels": num_labels,
        "problem_type": getattr(model.config, "problem_type", None) if task == "sequence_classification" else None,
        "id2label": (
            {str(k): v for k, v in model.config.id2label.items()} if task == "sequence_classification" else None
        ),
        "original_hidden_size": D,
        "original_num_heads": H,
        "original_intermediate_size": I,
        "original_size": (4 * dh * L * H + 2 * L * I) * D,
    }
    pruned = PrunedModel(config)
    state = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    state["hidden_index"] = K.clone()
    pruned.load_state_dict(state, strict=True, assign=True)
    for p in pruned.parameters():
        p.requires_grad_(False)
    return pruned.eval()
