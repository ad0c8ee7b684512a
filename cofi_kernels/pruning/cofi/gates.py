"""Hard-concrete L0 gates of CoFi (DESIGN.md §4) and the sparsity Lagrangian.

One :class:`CoFiGates` holds every gate of a BERT-family encoder:

======== ============ ===============================================
type     shape        governs
======== ============ ===============================================
head     ``[L, H]``   one attention head of one layer (its context)
mha      ``[L]``      a whole attention sublayer
int      ``[L, I]``   one FFN unit (after the activation)
ffn      ``[L]``      a whole FFN sublayer
hidden   ``[D]``      one hidden dim, shared by every layer
======== ============ ===============================================

A *gate dict* maps each type in :data:`TYPES` to a tensor of that shape, or to
``None`` meaning "all ones" (the type is not gated). Every method that returns
gates returns a dict with all five keys.

Usage in a training step (``model`` patched by :func:`cofi_kernels.apply_cofi`,
which calls ``gates.current(model.training)`` once per forward)::

    loss = task_loss(model(**batch)) + gates.lagrangian(target)
    loss.backward()
    gates.lambda_1.grad.neg_(); gates.lambda_2.grad.neg_()   # λ ascends
    opt.step(); gates.clamp_()
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...models.arch import encoder_dims, gate_shapes
from ...models.size import dense_encoder_size, encoder_size

__all__ = ["CoFiGates", "TYPES"]

TYPES = ("head", "mha", "int", "ffn", "hidden")

# Soft value of a deterministic gate is sigmoid(log α / β · this); the factor
# is the one of the original CoFi code, kept so learned gates prune the same.
_SOFT_FACTOR = 0.8

_LOG_ALPHA_MIN = math.log(1e-2)
_LOG_ALPHA_MAX = math.log(1e2)


def mismatch_with(gates: "CoFiGates", config) -> str | None:
    """How ``gates`` do not fit an encoder config (the first gate type of the wrong shape, or
    the head size), or None when they fit."""
    for t, want in gate_shapes(config).items():
        got = tuple(gates.shapes[t])
        if got != want:
            return f"gate type '{t}': expected shape {list(want)}, got {list(got)}"
    head_dim = encoder_dims(config).head_dim
    got_head_dim = getattr(gates, "head_dim", head_dim)
    if got_head_dim != head_dim:
        return f"head_dim: expected {head_dim}, got {got_head_dim}"
    return None


class CoFiGates(nn.Module):
    """All L0 gates of a CoFi-pruned encoder, with their sampling rules and size model.

    Args:
        num_layers: L, number of encoder layers.
        num_heads: H, attention heads per layer (of the original model).
        head_dim: size of one head (``hidden_size // num_heads`` for BERT).
        intermediate_size: I, FFN width per layer.
        hidden_size: D.
        learn: the gate types that get a learnable log α; every other type is
            constant 1 (``None`` in gate dicts). Any subset of :data:`TYPES`.
        droprate_init: initial drop probability p of the ``int`` gates; their
            log α starts at ``log((1-p)/p)``. The other types start at 10.
        temperature: β of the hard-concrete distribution.
        limit_l, limit_r: stretch limits l < 0 and r > 1.
        eps: u is drawn from ``U(eps, 1-eps)``.

    Attributes:
        log_alpha: ``nn.ParameterDict`` type → log α of that type's shape, for the
            learned types only (float32, initialised normal(mean, 0.01)).
        lambda_1, lambda_2: scalar Lagrange multipliers, 0 at start. They must be
            *maximised*: negate their gradients before the optimizer step.
    """

    TYPES = TYPES

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        intermediate_size: int,
        hidden_size: int,
        *,
        learn: Iterable[str] = TYPES,
        droprate_init: float = 0.5,
        temperature: float = 2.0 / 3.0,
        limit_l: float = -0.1,
        limit_r: float = 1.1,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("intermediate_size", intermediate_size),
            ("hidden_size", hidden_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CoFiGates: {name} must be a positive int, got {value!r}")
        learn = tuple(learn) if not isinstance(learn, str) else (learn,)
        unknown = [t for t in learn if t not in TYPES]
        if unknown:
            raise ValueError(f"CoFiGates: unknown gate type(s) {unknown} in learn; known types are {TYPES}")
        if not 0.0 < droprate_init < 1.0:
            raise ValueError(f"CoFiGates: droprate_init must be in (0, 1), got {droprate_init}")
        if not (limit_l < 0.0 and limit_r > 1.0):
            raise ValueError(f"CoFiGates: need limit_l < 0 < 1 < limit_r, got l={limit_l}, r={limit_r}")
        if temperature <= 0.0:
            raise ValueError(f"CoFiGates: temperature must be > 0, got {temperature}")
        if not 0.0 < eps < 0.5:
            raise ValueError(f"CoFiGates: eps must be in (0, 0.5), got {eps}")

        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.hidden_size = hidden_size
        self.learn = tuple(t for t in TYPES if t in learn)
        self.droprate_init = float(droprate_init)
        self.temperature = float(temperature)
        self.limit_l = float(limit_l)
        self.limit_r = float(limit_r)
        self.eps = float(eps)

        self.log_alpha = nn.ParameterDict()
        int_mean = math.log((1.0 - droprate_init) / droprate_init)
        for t in self.learn:
            mean = int_mean if t == "int" else 10.0
            self.log_alpha[t] = nn.Parameter(torch.empty(self.shapes[t]).normal_(mean, 0.01))
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))
        self._fixed: dict[str, torch.Tensor | None] | None = None

    # ------------------------------------------------------------------ shapes

    @classmethod
    def from_config(cls, hf_config, **kw) -> "CoFiGates":
        """Gates for a BERT/RoBERTa config (``num_hidden_layers``, ``num_attention_heads``,
        ``hidden_size``, ``intermediate_size``); ``kw`` go to the constructor."""
        try:
            d = encoder_dims(hf_config)
        except ValueError as e:
            raise ValueError(f"CoFiGates.from_config: {e}") from None
        return cls(d.num_layers, d.num_heads, d.head_dim, d.intermediate_size, d.hidden_size, **kw)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Type → shape of that gate tensor."""
        L = self.num_layers
        return {
            "head": (L, self.num_heads),
            "mha": (L,),
            "int": (L, self.intermediate_size),
            "ffn": (L,),
            "hidden": (self.hidden_size,),
        }

    def _ref_tensor(self) -> torch.Tensor:
        return self.lambda_1

    def ones(self) -> dict[str, torch.Tensor]:
        """A gate dict of all ones (float32, on the gates' device), every type filled in."""
        ref = self._ref_tensor()
        return {t: torch.ones(s, dtype=ref.dtype, device=ref.device) for t, s in self.shapes.items()}

    def filled(self, z: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """``z`` with every missing or ``None`` entry replaced by ones of its shape."""
        ones = self.ones()
        return {t: (z.get(t) if z.get(t) is not None else ones[t]) for t in TYPES}

    # ---------------------------------------------------------------- sampling

    def sample(self) -> dict[str, torch.Tensor | None]:
        """One hard-concrete sample of every learned gate (shared by the whole batch).

        ``u ~ U(eps, 1-eps)``, ``s = sigmoid((log u - log(1-u) + log α)/β)``,
        ``z = clamp(s·(r-l) + l, 0, 1)``. Values lie in [0, 1] with exact 0s and 1s;
        differentiable w.r.t. log α (zero gradient where the clamp is active).
        Types not learned are ``None``.
        """
        out: dict[str, torch.Tensor | None] = dict.fromkeys(TYPES)
        for t in self.learn:
            la = self.log_alpha[t]
            u = torch.empty_like(la).uniform_(self.eps, 1.0 - self.eps)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / self.temperature)
            out[t] = (s * (self.limit_r - self.limit_l) + self.limit_l).clamp(0.0, 1.0)
        return out

    def keep_prob(self) -> dict[str, torch.Tensor | None]:
        """P(z > 0) = sigmoid(log α − β·log(−l/r)) per learned gate (differentiable); ``None`` = 1."""
        shift = self.temperature * math.log(-self.limit_l / self.limit_r)
        out: dict[str, torch.Tensor | None] = dict.fromkeys(TYPES)
        for t in self.learn:
            # exp(log σ(x)) rather than σ(x): σ's backward forms σ·(1 − σ) from the rounded σ, and
            # near p = 1 (log α ≈ 10, where most gates start) 1 − σ keeps few bits in float32
            # (relative gradient error up to ~1e-3); log σ's backward computes σ(−x) directly.
            out[t] = torch.exp(F.logsigmoid(self.log_alpha[t] - shift))
        return out

    @torch.no_grad()
    def deterministic(self, target_sparsity: float | None = None) -> dict[str, torch.Tensor | None]:
        """The eval / pruning gates of DESIGN §4 (detached).

        CoFi's rule: per group of n gates (each layer's row for ``head`` and ``int``,
        the whole vector for ``hidden``), the number of zeros is ``round(n − Σ P(z>0))``
        (Python ``round``, half to even, Σ in float64); the gates with the smallest
        *keep score* ``sigmoid(log α/β·0.8)`` become exactly 0 (ties: the lower index
        first) and the rest keep their score as their value. Whole-sublayer gates
        ``mha`` and ``ffn`` are 0 where P(z>0) < 0.5, else their score. Types not
        learned are ``None``.

        With ``target_sparsity`` t, the gates are then moved so the realised sparsity
        (:meth:`realised_sparsity`, the DESIGN §4 count) is as close to t as the
        granularity allows (within 0.005 for BERT-base and MiniLM shapes): each
        group's own rounding misses t (the count multiplies heads and units by the
        kept hidden dims), so the zeros are re-counted globally. The hidden and
        sublayer gates keep CoFi's rule; heads and FFN units of live sublayers are
        zeroed (too large) or restored to their score (too small) one at a time in
        the order of their keep scores across all layers, lowest first to go and
        highest first to return, stopping where the size is nearest the target.
        Every group still has its zeros at its lowest scores. Only when the kept
        hidden dims and live sublayers are too few to reach t even with every head
        and unit are dropped hidden dims and sublayers restored first, highest score
        first.
        """
        keep = self.keep_prob()
        out: dict[str, torch.Tensor | None] = dict.fromkeys(TYPES)
        for t in self.learn:
            soft = self._keep_score(t)
            p = keep[t].detach()
            if t in ("mha", "ffn"):
                out[t] = torch.where(p < 0.5, torch.zeros_like(soft), soft)
                continue
            rows = soft.reshape(-1, soft.shape[-1]).clone()
            prow = p.reshape(-1, p.shape[-1]).double()
            n = rows.shape[-1]
            for r in range(rows.shape[0]):
                num_zeros = round(n - prow[r].sum().item())
                num_zeros = min(max(num_zeros, 0), n)
                if num_zeros:
                    order = torch.sort(rows[r], stable=True).indices
                    rows[r, order[:num_zeros]] = 0.0
            out[t] = rows.reshape(soft.shape)
        if target_sparsity is not None:
            if not 0.0 <= float(target_sparsity) < 1.0:
                raise ValueError(f"CoFiGates.deterministic: target_sparsity must be in [0, 1), got {target_sparsity!r}")
            out = self._meet_target(out, float(target_sparsity))
        return out

    def _keep_score(self, t: str) -> torch.Tensor:
        """CoFi's keep score ``sigmoid(log α/β·0.8)`` of type ``t``: the value a kept deterministic gate takes."""
        return torch.sigmoid(self.log_alpha[t].detach() / self.temperature * _SOFT_FACTOR)

    def _meet_target(self, z: dict, target: float) -> dict:
        """``z`` (CoFi's deterministic gates) with heads and units, and hidden dims and sublayers only when
        needed, moved so the realised size is nearest ``(1 − target)·M`` (see :meth:`deterministic`)."""
        z = {t: (None if v is None else v.clone()) for t, v in z.items()}
        goal = (1.0 - target) * self.full_size()
        pieces = [t for t in ("head", "int") if t in self.learn]
        scores = {t: self._keep_score(t) for t in self.learn}
        self._restore_capacity(z, goal, pieces, scores)
        kept_hidden = self.hidden_size if z["hidden"] is None else int((z["hidden"] > 0).sum())
        if pieces and kept_hidden:
            self._move_pieces(z, goal / kept_hidden, pieces, scores)
        return z

    def _restore_capacity(self, z: dict, goal: float, pieces: list[str], scores: dict) -> None:
        """While even every head and unit of the live sublayers would leave the model below ``goal``,
        restore dropped hidden dims and whole sublayers of ``z`` (in place), highest keep score first."""
        dropped = []
        for t in ("hidden", "mha", "ffn"):
            if t in self.learn:
                score = scores[t].tolist()
                dropped += [(score[k], k, t) for k in (z[t] == 0).nonzero().flatten().tolist()]
        dropped.sort(reverse=True)
        ones = self.ones()
        every_piece = {t: ones[t] for t in pieces}
        while dropped and self.realised_size({**z, **every_piece}) < goal:
            _, k, t = dropped.pop(0)
            z[t][k] = scores[t][k]

    def _move_pieces(self, z: dict, want: float, pieces: list[str], scores: dict) -> None:
        """Zero (or restore) heads and units of live sublayers of ``z`` in place, lowest (highest) keep score
        first across layers, stopping where the counted weights per kept hidden dim are nearest ``want``."""
        have = self.realised_size({**z, "hidden": None}) / self.hidden_size
        shrink = have > want
        cost = {"head": 4 * self.head_dim, "int": 2}
        cands = []
        for t in pieces:
            layer_gate = z["mha" if t == "head" else "ffn"]
            alive = torch.ones(self.num_layers, dtype=torch.bool) if layer_gate is None else (layer_gate > 0).cpu()
            movable = ((z[t] > 0) if shrink else (z[t] == 0)).cpu() & alive[:, None]
            score = scores[t].tolist()
            cands += [(score[i][j], TYPES.index(t), i, j, t) for i, j in movable.nonzero().tolist()]
        cands.sort(reverse=not shrink)  # ties: the order CoFi's rule zeros in, or its reverse
        steps = torch.tensor([0] + [cost[c[4]] for c in cands], dtype=torch.float64).cumsum(0)
        take = int((have + (-steps if shrink else steps) - want).abs().argmin())
        for _, _, i, j, t in cands[:take]:
            z[t][i, j] = 0.0 if shrink else scores[t][i, j]

    @torch.no_grad()
    def hold_expected_sparsity_(self, low: float, high: float) -> float:
        """Shift every learned log α by one common amount, in place, so ŝ lies in ``[low, high]``; return it.

        Nothing moves (and 0.0 is returned) when ŝ is already in the band. Otherwise the shift is
        the one that puts ŝ on the nearer edge (bisection; log α stays clamped to its range), so the
        order of every keep score is unchanged. When no shift reaches the band (a type that is not
        learned caps ŝ), the largest one is applied.
        """
        if not low <= high:
            raise ValueError(f"CoFiGates.hold_expected_sparsity_: need low <= high, got {low} > {high}")
        s_hat = float(self.expected_sparsity())
        if low <= s_hat <= high or not self.learn:
            return 0.0
        goal = high if s_hat > high else low
        base = {t: p.detach().clone() for t, p in self.log_alpha.items()}
        span = _LOG_ALPHA_MAX - _LOG_ALPHA_MIN

        def apply(c: float) -> float:
            for t, p in self.log_alpha.items():
                p.copy_((base[t] + c).clamp(_LOG_ALPHA_MIN, _LOG_ALPHA_MAX))
            return float(self.expected_sparsity())

        # ŝ falls as c grows. Keep the bracket end on the band's side of the goal.
        inside, outside = (span, 0.0) if s_hat > high else (-span, 0.0)
        if (apply(inside) > goal) if s_hat > high else (apply(inside) < goal):
            return inside
        for _ in range(48):
            mid = 0.5 * (inside + outside)
            s_mid = apply(mid)
            if (s_mid <= goal) if s_hat > high else (s_mid >= goal):
                inside = mid
            else:
                outside = mid
        apply(inside)
        return inside

    def current(self, training: bool) -> dict[str, torch.Tensor | None]:
        """The gates a forward pass should use: :attr:`fixed` if set, else
        :meth:`sample` when ``training`` else :meth:`deterministic`."""
        if self._fixed is not None:
            return dict(self._fixed)
        return self.sample() if training else self.deterministic()

    # ------------------------------------------------------------- fixed gates

    def validate(self, z: Mapping[str, torch.Tensor | None], where: str = "CoFiGates") -> dict[str, torch.Tensor | None]:
        """Check a gate dict's keys and shapes; return it with all five keys (``None`` where absent).

        Raises ``ValueError`` naming the key for an unknown key, a value that is
        not a tensor, or a tensor of the wrong shape (expected and got shape).
        """
        if not isinstance(z, Mapping):
            raise ValueError(f"{where}: gates must be a dict type -> tensor, got {type(z).__name__}")
        unknown = [k for k in z if k not in TYPES]
        if unknown:
            raise ValueError(f"{where}: unknown gate key(s) {unknown}; known keys are {TYPES}")
        shapes = self.shapes
        out: dict[str, torch.Tensor | None] = dict.fromkeys(TYPES)
        for t in TYPES:
            v = z.get(t)
            if v is None:
                continue
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{where}: gate '{t}' must be a torch.Tensor, got {type(v).__name__}")
            if tuple(v.shape) != shapes[t]:
                raise ValueError(
                    f"{where}: gate '{t}' has the wrong shape: expected {list(shapes[t])}, got {list(v.shape)}"
                )
            if not (v.is_floating_point() or v.dtype == torch.bool):
                raise ValueError(f"{where}: gate '{t}' must be a floating-point (or bool) tensor, got {v.dtype}")
            out[t] = v
        return out

    def fix(self, z: Mapping[str, torch.Tensor | None]) -> None:
        """Use ``z`` for every forward pass until :meth:`unfix`.

        Keys are gate types; a missing key or ``None`` value means that type is
        all ones (not gated), whether or not it is learned. Values are stored as
        given (not copied, not detached), so a tensor that requires grad keeps
        its graph. Raises ``ValueError`` on an unknown key or a wrong shape.
        """
        self._fixed = self.validate(z, "CoFiGates.fix")

    def unfix(self) -> None:
        """Return to sampled (training) / deterministic (eval) gates."""
        self._fixed = None

    @property
    def fixed(self) -> dict[str, torch.Tensor | None] | None:
        """The dict given to :meth:`fix` (all five keys, ``None`` = ones), or ``None`` if not fixed."""
        return None if self._fixed is None else dict(self._fixed)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp every log α to [log 0.01, log 100] in place (call after each optimizer step)."""
        for p in self.log_alpha.values():
            p.clamp_(_LOG_ALPHA_MIN, _LOG_ALPHA_MAX)

    # ------------------------------------------------------------ size model

    def _size(self, p: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
        """The size model of DESIGN §4 with per-gate keep values ``p`` (``None`` = 1): per layer,
        Σ_h p_mha·p_head heads and Σ_j p_ffn·p_int units, times Σ_k p_hid kept dims."""
        L, H, I, D = self.num_layers, self.num_heads, self.intermediate_size, self.hidden_size
        ref = self._ref_tensor()

        head, mha, inter, ffn, hid = (None if p.get(t) is None else p[t].to(ref.dtype) for t in TYPES)
        heads_alive = head.sum(-1) if head is not None else torch.full((L,), float(H), dtype=ref.dtype, device=ref.device)
        units_alive = inter.sum(-1) if inter is not None else torch.full((L,), float(I), dtype=ref.dtype, device=ref.device)
        if mha is not None:
            heads_alive = heads_alive * mha
        if ffn is not None:
            units_alive = units_alive * ffn
        hid_alive = hid.sum() if hid is not None else torch.tensor(float(D), dtype=ref.dtype, device=ref.device)
        return encoder_size(heads_alive, units_alive, hid_alive, self.head_dim)

    def expected_size(self) -> torch.Tensor:
        """E[number of counted encoder weights] under the keep probabilities (0-d, differentiable in log α).

        Counts Q, K, V, O (``4·d_head·D`` per head) and W1, W2 (``2·D`` per unit);
        embeddings, biases, LayerNorms, pooler and classifier are not counted.
        """
        return self._size(self.keep_prob())

    def full_size(self) -> int:
        """M: the counted size with every gate 1 (BERT-base: 84,934,656)."""
        return dense_encoder_size(self.num_layers, self.num_heads, self.head_dim, self.intermediate_size,
                                  self.hidden_size)

    def expected_sparsity(self) -> torch.Tensor:
        """ŝ = 1 − E[size]/M (0-d, differentiable in log α)."""
        return 1.0 - self.expected_size() / self.full_size()

    def lagrangian(self, target: float | torch.Tensor) -> torch.Tensor:
        """L_c = λ1·(ŝ − t) + λ2·(ŝ − t)² (0-d), differentiable in log α, λ1 and λ2.

        The model and log α minimise it; λ1 and λ2 must *maximise* it: negate
        their gradients (e.g. ``gates.lambda_1.grad.neg_()``) before the
        optimizer step, rather than using a negative learning rate.
        """
        diff = self.expected_sparsity() - target
        return self.lambda_1 * diff + self.lambda_2 * diff * diff

    @torch.no_grad()
    def realised_size(self, z: Mapping[str, torch.Tensor | None]) -> int:
        """Counted size of the model the gate dict ``z`` prunes to (z > 0 counts as 1, ``None`` = all kept)."""
        z = self.validate(z, "CoFiGates.realised_size")
        kept = {t: (None if v is None else (v > 0).cpu()) for t, v in z.items()}

        def per_layer(sub: str, unit: str, full: int) -> list[int]:
            counts = [full] * self.num_layers if kept[unit] is None else kept[unit].sum(-1).tolist()
            if kept[sub] is not None:
                counts = [c if alive else 0 for c, alive in zip(counts, kept[sub].tolist())]
            return counts

        heads = per_layer("mha", "head", self.num_heads)
        units = per_layer("ffn", "int", self.intermediate_size)
        hidden = self.hidden_size if kept["hidden"] is None else int(kept["hidden"].sum())
        return encoder_size(heads, units, hidden, self.head_dim)

    def realised_sparsity(self, z: Mapping[str, torch.Tensor | None]) -> float:
        """1 − realised_size(z)/M."""
        return 1.0 - self.realised_size(z) / self.full_size()

    def extra_repr(self) -> str:
        """Shapes, learned types, distribution parameters and whether gates are fixed."""
        return (
            f"layers={self.num_layers}, heads={self.num_heads}, head_dim={self.head_dim}, "
            f"intermediate={self.intermediate_size}, hidden={self.hidden_size}, learn={self.learn}, "
            f"temperature={self.temperature:.4g}, limits=({self.limit_l}, {self.limit_r}), "
            f"fixed={self._fixed is not None}"
        )
