"""The mechanics of static model pruning (SMP, DESIGN §8): scores, top-v masks, the straight-through
estimator and the two cubic schedules.

Every pruned linear weight ``W`` (Q, K, V, attention output, FFN in, FFN out of every layer) gets a
score matrix ``S`` of its shape, started at ``|W| / mean |W|`` (or at 0, :data:`SCORE_INITS`). The
forward pass uses ``W' = M ⊙ W`` where ``M`` is a 0/1 mask computed from ``S``:

- unstructured: ``M`` keeps the ``k = kept_count(v, numel)`` entries of ``S`` with the largest
  scores, per matrix;
- structured: a head's score is the sum of ``S`` over its rows of Q, K and V and its columns of the
  attention output; an FFN unit's is the sum over its row of W1 and its column of W2. Per layer the
  ``kept_count(v, H)`` heads and ``kept_count(v, I)`` units with the largest scores are kept, and
  ``M`` is 1 on their rows / columns. (A head's Q/K/V biases and a unit's W1 bias stay, but the
  zeroed output columns stop them from reaching the output, so the masked model equals the model
  with those heads and units removed.)

Ties are broken towards the lower index (flattened, row-major), so masks are a pure function of
``S`` and ``v``. The backward pass treats ``M`` as the identity of ``S``:
``∂L/∂S = (∂L/∂W') ⊙ W`` (:class:`StraightThroughMask`), a first-order, movement-style score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...models.arch import encoder_dims, supported_model
from ...tasks.embedding import pool

__all__ = [
    "MaskedClassifier",
    "StraightThroughMask",
    "POOLINGS",
    "SCORE_INITS",
    "Target",
    "kept_count",
    "kept_overlap",
    "regulariser_weight",
    "remaining_fraction",
    "top_count_mask",
]


def kept_count(v: float, n: int) -> int:
    """How many of ``n`` entries a remaining fraction ``v`` keeps: ``floor(v·n + 1/2)`` (round half up,
    so that ``0.29·100`` keeps 29, not the 28 that flooring its float product would give)."""
    return max(0, min(n, math.floor(v * n + 0.5)))


def remaining_fraction(step: int, final: float, schedule_steps: int) -> float:
    """``v(t) = v_f + (1 − v_f)(1 − t/T_s)³`` for ``t < T_s``, ``v_f`` from ``T_s`` on."""
    t = min(max(step, 0), schedule_steps)
    return final + (1.0 - final) * (1.0 - t / schedule_steps) ** 3


def regulariser_weight(step: int, lambda_max: float, total_steps: int) -> float:
    """``λ(t) = λ_max(1 − (1 − t/T)³)``: 0 at the first step, ``λ_max`` at the last."""
    t = min(max(step, 0), total_steps)
    return lambda_max * (1.0 - (1.0 - t / total_steps) ** 3)


def top_count_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask of ``scores``' shape that is True on exactly ``k`` entries: those with the largest
    scores, ties broken towards the lower (row-major) index.

    ``O(n)``: the k-th largest value from ``kthvalue``, every entry above it, then the first entries
    equal to it until ``k`` are kept.
    """
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("top_count_mask: the scores hold NaN or infinite values")
    threshold = torch.kthvalue(flat, n - k + 1).values
    above = flat > threshold
    tie = flat == threshold
    need = k - int(above.sum())
    keep = above | (tie & (torch.cumsum(tie, 0) <= need))
    return keep.view(scores.shape)


class StraightThroughMask(torch.autograd.Function):
    """``W' = mask ⊙ W`` forward; ``∂L/∂S = (∂L/∂W') ⊙ W`` backward (no gradient for ``W`` or the mask).

    ``scores`` is an input only to receive the gradient: the mask was computed from it outside.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad * weight, None, None


@dataclass(frozen=True)
class Target:
    """One pruned weight: its parameter name in the model, its layer, and its kind
    (``query``, ``key``, ``value``, ``attn_out``, ``ffn_in``, ``ffn_out``)."""

    name: str
    layer: int
    kind: str


_KINDS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")

#: how the scores start: ``"magnitude"``, ``|W| / mean |W|`` of each matrix (the first masks are
#: magnitude pruning's), or ``"zero"`` (every entry tied: the first masks keep the lowest indices)
SCORE_INITS = ("magnitude", "zero")

#: what the classification head reads: ``"mean"``, the mean of the last hidden state over the real
#: tokens (what a sentence-transformers model was trained for), or ``"cls"``, the first token
POOLINGS = ("mean", "cls")


def kept_overlap(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """The share of the entries kept in ``before`` (bool masks) that ``after`` keeps too: 1 when the
    kept sets are equal, about ``v`` for two independent random top-v sets."""
    kept = sum(int(b.sum()) for b in before)
    both = sum(int((b & a).sum()) for b, a in zip(before, after))
    return both / kept if kept else 1.0


class MaskedClassifier(nn.Module):
    """A BERT/RoBERTa classifier whose six linear weights per layer run as ``W' = M ⊙ W``.

    The model's own parameters are frozen (``requires_grad`` off) except its classification head,
    which trains beside the scores. ``forward`` substitutes the masked weights through
    :func:`torch.func.functional_call`, so the model's tensors are never written.

    Args:
        model: ``BertForSequenceClassification`` or ``RobertaForSequenceClassification``.
        structured: masks of whole heads and FFN units (see the module docstring) instead of
            per-matrix top-v entries.
        pooling: what the head reads (:data:`POOLINGS`). ``"cls"``: the model's own forward, the
            first token (BERT: through its frozen pre-trained pooler; the trained head is
            ``model.classifier``). ``"mean"``: ``out(tanh(dense(mean of the last hidden state over
            the real tokens)))`` with the (dense, out) pair of the model's classification head
            (BERT: pooler dense and classifier; RoBERTa: classifier dense and out_proj), both
            trained, no dropout: the head of a ``PrunedModel`` with ``"pooling": "mean"``.

    Attributes:
        scores: one ``S`` per :attr:`targets` entry, same shape as its weight, started by
            :func:`initial_scores` (``score_init``).
        remaining: the current remaining fraction ``v`` (set by the training loop before each step).
    """

    def __init__(self, model: nn.Module, *, structured: bool, pooling: str = "cls", score_init: str = "zero"):
        super().__init__()
        arch, task, enc = supported_model(model)
        if task != "sequence_classification":
            raise ValueError("MaskedClassifier: needs a *ForSequenceClassification model")
        if pooling not in POOLINGS:
            raise ValueError(f"MaskedClassifier: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if score_init not in SCORE_INITS:
            raise ValueError(f"MaskedClassifier: score_init must be one of {', '.join(SCORE_INITS)}, "
                             f"got {score_init!r}")
        self.model = model
        self.structured = structured
        self.pooling = pooling
        self.head_dense, self.head_out = arch.classification_head(model)
        dims = encoder_dims(enc.config)
        self.num_layers, self.num_heads, self.head_dim = dims.num_layers, dims.num_heads, dims.head_dim
        self.intermediate_size = dims.intermediate_size
        names = {id(m): n for n, m in model.named_modules()}
        targets = []
        for i, layer in enumerate(arch.layers(enc)):
            a, f = arch.attention_parts(layer), arch.ffn_parts(layer, enc.config)
            for kind, lin in zip(_KINDS, (a.query, a.key, a.value, a.output, f.up, f.down)):
                targets.append(Target(f"{names[id(lin)]}.weight", i, kind))
        self.targets: list[Target] = targets
        model.requires_grad_(False)
        for p in self.head_parameters():
            p.requires_grad_(True)
        self.scores = nn.ParameterList(nn.Parameter(initial_scores(w, score_init)) for w in self.weights())
        self.remaining = 1.0
        self._cache = None

    def weights(self) -> list[torch.Tensor]:
        """The frozen weights of :attr:`targets`, looked up by name (so they follow ``.to()``)."""
        return [self.model.get_parameter(t.name) for t in self.targets]

    def head_modules(self) -> list[nn.Module]:
        """The modules of the classification head trained beside the scores: ``model.classifier``
        (``"cls"`` pooling), or the head's dense and out layers (``"mean"``)."""
        if self.pooling == "cls":
            return [self.model.classifier]
        return [self.head_dense, self.head_out]

    def head_parameters(self) -> list[nn.Parameter]:
        """The classification head's parameters (trained beside the scores)."""
        return [p for m in self.head_modules() for p in m.parameters()]

    def head_state(self) -> dict[str, torch.Tensor]:
        """The trained head's tensors by their names in the model (a checkpoint's part)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: p.detach().clone() for p in self.head_parameters()}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`head_state`'s tensors (``ValueError`` when the names differ)."""
        params = dict(self.model.named_parameters())
        own = {n for n, p in params.items() if any(p is q for q in self.head_parameters())}
        if set(state) != own:
            raise ValueError(f"MaskedClassifier: head state names {sorted(state)} are not the head's {sorted(own)}")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    # ------------------------------------------------------------------ masks

    def unit_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(head scores [L, H], unit scores [L, I])``: sums of ``S`` over each head's Q/K/V rows and
        attention-output columns, and over each unit's W1 row and W2 column."""
        L, H, dh = self.num_layers, self.num_heads, self.head_dim
        heads, units = [], []
        with torch.no_grad():
            for i in range(L):
                s = {t.kind: self.scores[6 * i + j] for j, t in enumerate(self.targets[6 * i: 6 * i + 6])}
                rows = sum(s[k].view(H, dh, -1).sum(dim=(1, 2)) for k in ("query", "key", "value"))
                heads.append(rows + s["attn_out"].view(s["attn_out"].shape[0], H, dh).sum(dim=(0, 2)))
                units.append(s["ffn_in"].sum(dim=1) + s["ffn_out"].sum(dim=0))
        return torch.stack(heads), torch.stack(units)

    def kept_units(self, v: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Structured masks at remaining fraction ``v`` (default :attr:`remaining`): bool
        ``(heads [L, H], units [L, I])`` with exactly ``kept_count(v, H)`` / ``kept_count(v, I)`` per layer."""
        v = self.remaining if v is None else v
        head_s, unit_s = self.unit_scores()
        heads = torch.stack([top_count_mask(r, kept_count(v, self.num_heads)) for r in head_s])
        units = torch.stack([top_count_mask(r, kept_count(v, self.intermediate_size)) for r in unit_s])
        return heads, units

    def masks(self, v: float | None = None) -> list[torch.Tensor]:
        """One bool mask per :attr:`targets` entry at remaining fraction ``v`` (default :attr:`remaining`)."""
        v = self.remaining if v is None else v
        if not self.structured:
            return [top_count_mask(s, kept_count(v, s.numel())) for s in self.scores]
        heads, units = self.kept_units(v)
        out = []
        for t, w in zip(self.targets, self.weights()):
            if t.kind in ("query", "key", "value"):
                m = heads[t.layer].repeat_interleave(self.head_dim)[:, None].expand(w.shape)
            elif t.kind == "attn_out":
                m = heads[t.layer].repeat_interleave(self.head_dim)[None, :].expand(w.shape)
            elif t.kind == "ffn_in":
                m = units[t.layer][:, None].expand(w.shape)
            else:
                m = units[t.layer][None, :].expand(w.shape)
            out.append(m.contiguous())
        return out

    def regulariser(self) -> torch.Tensor:
        """``mean σ(S)``: the mean over the score matrices of each one's mean sigmoid (SMP's form)."""
        return torch.stack([torch.sigmoid(s).mean() for s in self.scores]).mean()

    # ------------------------------------------------------------------ forward

    def _current_masks(self) -> list[torch.Tensor]:
        """:meth:`masks` at :attr:`remaining`; in eval mode kept until ``v`` or a score changes (an
        evaluation runs many batches on one state, and top-v over every matrix is not free)."""
        if self.training:
            self._cache = None
            return self.masks()
        key = (self.remaining, tuple(s._version for s in self.scores), tuple(id(s) for s in self.scores))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.masks())
        return self._cache[1]

    def masked_weights(self, masks: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Parameter name → ``M ⊙ W`` (through :class:`StraightThroughMask` when scores need grad)."""
        masks = self._current_masks() if masks is None else masks
        out = {}
        for t, s, w, m in zip(self.targets, self.scores, self.weights(), masks):
            m = m.to(w.dtype)
            out[t.name] = StraightThroughMask.apply(s, w, m) if torch.is_grad_enabled() else w * m
        return out

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states: bool = False):
        """The Hugging Face output of the model with masked weights (``.logits``, ``.hidden_states``);
        with ``"mean"`` pooling its ``logits`` are replaced by the mean-pooled head's."""
        mean = self.pooling == "mean"
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                      output_hidden_states=output_hidden_states or mean)
        out = torch.func.functional_call(self.model, self.masked_weights(), args=(), kwargs=kwargs)
        if mean:
            h = out.hidden_states[-1]
            pooled = pool(h, attention_mask, "mean", normalize=False).to(h.dtype)  # sentence-transformers' mean
            out.logits = self.head_out(torch.tanh(self.head_dense(pooled)))
            if not output_hidden_states:
                out.hidden_states = None
        return out


def initial_scores(weight: torch.Tensor, how: str) -> torch.Tensor:
    """A score matrix's start (:data:`SCORE_INITS`): ``|W| / mean |W|`` (float32, mean 1), or zeros."""
    if how == "zero":
        return torch.zeros_like(weight)
    w = weight.detach().abs().float()
    return (w / w.mean().clamp_min(torch.finfo(torch.float32).tiny)).to(weight.dtype)

