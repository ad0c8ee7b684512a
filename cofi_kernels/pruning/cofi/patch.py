"""CoFi gates on Hugging Face BERT / RoBERTa encoders (transformers 5.x), patched in place.

:func:`apply_cofi` turns a ``BertModel``, ``BertForSequenceClassification``,
``RobertaModel`` or ``RobertaForSequenceClassification`` into the gated model
of DESIGN.md §4 and returns its :class:`~cofi_kernels.pruning.cofi.gates.CoFiGates`::

    gates = apply_cofi(model)                 # model is changed in place
    out = model(input_ids, attention_mask=mask)  # one gate sample per forward

How the patch works:

- Every ``*Layer`` of the encoder and the embeddings' ``LayerNorm`` get their
  ``__class__`` swapped to a generated subclass of their own HF class (named
  ``CoFi<HFClass>``) that only overrides ``forward``. The modules keep their
  parameters, names and ``isinstance`` relations, so ``state_dict``, output
  capture (``output_hidden_states``), ``return_dict``, gradient checkpointing
  and the wrappers' heads keep working. The top-level model keeps its class.
- A forward pre-hook on the base model (``model.base_model``) calls
  ``gates.current(model.training)`` once per forward and stores the gate dict
  for the patched modules to read; in live-only mode it also copies the gates
  to the host once (one small sync) to find the live heads, units and
  sublayers.
- The gates are *not* a submodule of the model (so ``model.parameters()``
  does not contain log α or λ); the model only holds a plain reference,
  reachable with :func:`cofi_gates`.

Attention uses the key-padding part of HF's prepared mask (eager additive or
sdpa boolean, or ``None``), so padded keys behave as in HF; the attention core
is :func:`cofi_kernels.functional.gated_attention` (the FFN
:func:`~cofi_kernels.functional.gated_ffn`), which never materialises
the attention probabilities: ``output_attentions`` therefore returns no maps
(as HF's sdpa path). Attention-probability dropout, when the config has it
and the model trains, uses a plain PyTorch core instead.

Live-only compute (``live_only=True``, the default): heads, FFN units,
sublayers and hidden dims whose gate is exactly 0 are not computed. Each layer
gathers the kept hidden dims of its input (the dropped ones are exactly 0 in
every hidden state), runs both sublayers on them with the live rows / columns
cut out of the full weights by ``index_select`` (so gradients land in the
right entries of the full parameters and the dead ones get exactly 0, as in
the dense computation) and scatters its output back to the full width, so
every hidden state the model returns has the full hidden size. ``live_only=False`` computes everything and multiplies by
the gates, and turns a sublayer with layer gate 0 into the identity with a
``torch.where`` (no host sync); it exists for tests and benchmarks.

Only encoder models are supported: configs with ``is_decoder`` or
``add_cross_attention`` are refused, and ``past_key_values`` is not used.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ...functional import gated_attention, gated_ffn, masked_layer_norm
from .gates import TYPES, CoFiGates

__all__ = [
    "apply_cofi",
    "cofi_gates",
    "is_cofi_patched",
    "remove_cofi",
    "set_live_only",
    "SUPPORTED_MODELS",
]

SUPPORTED_MODELS = (
    "BertModel",
    "BertForSequenceClassification",
    "RobertaModel",
    "RobertaForSequenceClassification",
)


def _supported_classes() -> tuple[type, ...]:
    from transformers import (
        BertForSequenceClassification,
        BertModel,
        RobertaForSequenceClassification,
        RobertaModel,
    )

    return (BertModel, BertForSequenceClassification, RobertaModel, RobertaForSequenceClassification)


# ----------------------------------------------------------------------------- state


class _LayerPlan:
    """Which parts of one layer are live, from the host copy of the gates (live-only mode)."""

    __slots__ = ("mha_alive", "head_idx", "head_rows", "n_heads", "ffn_alive", "unit_idx", "n_units")

    def __init__(self) -> None:
        self.mha_alive = True
        self.head_idx: torch.Tensor | None = None  # None = every head live
        self.head_rows: torch.Tensor | None = None
        self.n_heads = 0
        self.ffn_alive = True
        self.unit_idx: torch.Tensor | None = None
        self.n_units = 0


class _CoFiState:
    """Per-model patch state, held as a plain attribute by every patched module.

    Not an ``nn.Module``: the gates must stay outside the model's parameters.
    """

    def __init__(self, gates, config, live_only: bool) -> None:
        self.gates = gates
        self.live_only = bool(live_only)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.z: dict[str, torch.Tensor | None] | None = None
        self.plans: list[_LayerPlan] | None = None
        self.hid_idx: torch.Tensor | None = None  # kept hidden dims (live-only), None = all
        self.z_hid_kept: torch.Tensor | None = None
        self.patched: list[tuple[nn.Module, type]] = []
        self._mask_src = None
        self._mask_kpm = None

    def begin(self, training: bool, device: torch.device) -> None:
        """Draw this forward's gates (once) and, in live-only mode, plan what to compute."""
        z = self.gates.current(training)
        # Checked here rather than only in fix(): a custom gates object or a
        # later change of the fixed dict must not reach the kernels unchecked.
        z = self.gates.validate(z, "apply_cofi forward")
        for t, v in z.items():
            if v is not None and v.device != device:
                raise ValueError(
                    f"apply_cofi: gate '{t}' is on {v.device} but the model is on {device}; "
                    f"move the gates with gates.to({str(device)!r})"
                )
        self.z = self.plans = None
        self._mask_src = self._mask_kpm = None
        present = [t for t in TYPES if z[t] is not None]
        host = {}
        if present:
            flat = torch.cat([z[t].detach().reshape(-1).float() for t in present]).cpu()
            if torch.isnan(flat).any():
                raise ValueError("apply_cofi: the gates contain NaN (the kept hidden dims would be undefined)")
            off = 0
            for t in present:
                n = z[t].numel()
                host[t] = flat[off : off + n].reshape(z[t].shape)
                off += n
        self.plans = self._plan(host, device) if self.live_only else None
        self.hid_idx = self.z_hid_kept = None
        if self.live_only and "hidden" in host:
            kept = host["hidden"] != 0
            # With no kept dim at all the full-width path gives the defined all-zero output.
            if kept.any() and not kept.all():
                self.hid_idx = kept.nonzero().flatten().to(device)
                self.z_hid_kept = z["hidden"].index_select(0, self.hid_idx)
        self.z = z

    def _plan(self, host: dict[str, torch.Tensor], device: torch.device) -> list[_LayerPlan]:
        num_layers = self.gates.num_layers
        dh = self.head_dim
        plans = []
        offsets = torch.arange(dh)
        for i in range(num_layers):
            p = _LayerPlan()
            if "mha" in host:
                p.mha_alive = bool(host["mha"][i] != 0)
            p.n_heads = self.num_heads
            if p.mha_alive and "head" in host:
                idx = _live_index(host["head"][i])
                if idx is not None:
                    p.n_heads = idx.numel()
                    p.head_idx = idx.to(device)
                    p.head_rows = (idx[:, None] * dh + offsets).flatten().to(device)
            if "ffn" in host:
                p.ffn_alive = bool(host["ffn"][i] != 0)
            p.n_units = self.gates.intermediate_size
            if p.ffn_alive and "int" in host:
                idx = _live_index(host["int"][i])
                if idx is not None:
                    p.n_units = idx.numel()
                    p.unit_idx = idx.to(device)
            plans.append(p)
        return plans

    def key_padding_mask(self, attention_mask, batch: int) -> torch.Tensor | None:
        """[B, T] bool (True = attend) from HF's prepared mask; cached for the forward."""
        if attention_mask is self._mask_src and self._mask_src is not None:
            return self._mask_kpm
        kpm = _key_padding_from_hf_mask(attention_mask, batch)
        self._mask_src, self._mask_kpm = attention_mask, kpm
        return kpm


def _live_index(gate_row: torch.Tensor) -> torch.Tensor | None:
    """Host indices of the non-zero entries of ``gate_row``; None when every entry is live."""
    live = gate_row != 0
    return None if bool(live.all()) else live.nonzero().flatten()


def _key_padding_from_hf_mask(mask, batch: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"apply_cofi: unsupported prepared attention mask of type {type(mask).__name__} "
            "(use attn_implementation 'eager' or 'sdpa')"
        )
    if mask.dim() == 4:
        # Encoder masks only mask keys, so every query row is the same.
        mask = mask[:, 0, 0, :]
    elif mask.dim() != 2:
        raise ValueError(f"apply_cofi: expected a 2-D or 4-D attention mask, got shape {list(mask.shape)}")
    if mask.dtype == torch.bool:
        kpm = mask
    elif mask.is_floating_point():
        kpm = mask == 0  # HF eager masks are additive: 0 = attend, dtype min = padded
    else:
        kpm = mask != 0  # 2-D 0/1 masks (flash-style paths)
    return kpm.expand(batch, -1) if kpm.shape[0] != batch else kpm


def _state_of(module) -> _CoFiState:
    st = module._cofi_state
    if st.z is None:
        raise RuntimeError(
            f"{type(module).__name__}: CoFi gates have not been drawn; call the patched model, not its layers"
        )
    return st


# ------------------------------------------------------------------------- sublayers


def _core(sa, q, k, v, head_gate, kpm):
    """Gated attention core; a plain PyTorch path only when attention dropout is active."""
    if head_gate is not None and head_gate.dtype != q.dtype:
        head_gate = head_gate.to(q.dtype)
    p = sa.dropout.p if sa.training else 0.0
    if p == 0.0:
        return gated_attention(q, k, v, head_gate, kpm, scale=sa.scaling)
    scores = torch.matmul(q, k.transpose(-1, -2)) * sa.scaling
    if kpm is not None:
        scores = scores.masked_fill(~kpm[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = F.dropout(torch.softmax(scores, dim=-1), p=p, training=True)
    out = torch.matmul(probs, v)
    return out if head_gate is None else out * head_gate[None, :, None, None]


def _take(w: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    # index_select (not a mask) so the backward scatters into the right rows and
    # columns of the full parameter and leaves exact zeros elsewhere.
    if rows is not None:
        w = w.index_select(0, rows)
    if cols is not None:
        w = w.index_select(-1, cols)
    return w


def _attention_sublayer(attn, x, kpm, st: _CoFiState, i: int, hid, z_hid) -> torch.Tensor:
    """Attention sublayer on ``x`` ([B, T, D] or, with ``hid``, only the kept hidden dims)."""
    z, plan = st.z, (st.plans[i] if st.plans is not None else None)
    z_mha = None if z["mha"] is None else z["mha"][i]
    if plan is not None and not plan.mha_alive:
        return x
    sa, so, ln = attn.self, attn.output, attn.output.LayerNorm
    dh = sa.attention_head_size
    z_head = None if z["head"] is None else z["head"][i]
    n, rows = sa.num_attention_heads, None
    if plan is not None and plan.head_idx is not None:
        n, rows = plan.n_heads, plan.head_rows
        z_head = z_head.index_select(0, plan.head_idx)
    bo = _take(so.dense.bias, hid, None)
    batch, seq, _ = x.shape
    if n > 0:

        def proj(lin):
            w, b = _take(lin.weight, rows, hid), _take(lin.bias, rows, None)
            return F.linear(x, w, b).view(batch, seq, n, dh).transpose(1, 2)

        ctx = _core(sa, proj(sa.query), proj(sa.key), proj(sa.value), z_head, kpm)
        out = F.linear(ctx.transpose(1, 2).reshape(batch, seq, n * dh), _take(so.dense.weight, hid, rows), bo)
    else:
        # No live head but a live layer gate: the sublayer still adds its bias and normalises (§4).
        out = bo.expand(batch, seq, bo.shape[0])
    return _gated_residual_norm(so.dropout(out), x, ln, hid, z_mha, z_hid, dense=plan is None)


def _ffn_sublayer(layer, x, st: _CoFiState, i: int, hid, z_hid) -> torch.Tensor:
    """FFN sublayer on ``x`` ([B, T, D] or, with ``hid``, only the kept hidden dims)."""
    z, plan = st.z, (st.plans[i] if st.plans is not None else None)
    z_ffn = None if z["ffn"] is None else z["ffn"][i]
    if plan is not None and not plan.ffn_alive:
        return x
    inter, outm, ln = layer.intermediate, layer.output, layer.output.LayerNorm
    z_int = None if z["int"] is None else z["int"][i]
    n, units = inter.dense.weight.shape[0], None
    if plan is not None and plan.unit_idx is not None:
        n, units = plan.n_units, plan.unit_idx
        z_int = z_int.index_select(0, units)
    b2 = _take(outm.dense.bias, hid, None)
    if n > 0:
        w1, b1 = _take(inter.dense.weight, units, hid), _take(inter.dense.bias, units, None)
        w2 = _take(outm.dense.weight, hid, units)
        if layer._cofi_erf_gelu:
            out = gated_ffn(x, w1, b1, w2, b2, z_int)
        else:
            act = inter.intermediate_act_fn(F.linear(x, w1, b1))
            out = F.linear(act if z_int is None else act * z_int, w2, b2)
    else:
        out = b2.expand(*x.shape[:-1], b2.shape[0])
    return _gated_residual_norm(outm.dropout(out), x, ln, hid, z_ffn, z_hid, dense=plan is None)


def _gated_residual_norm(out, x, ln, hid, layer_gate, z_hid, *, dense: bool) -> torch.Tensor:
    """``LN_kept(x + out · layer_gate · z_hid) · z_hid``; in dense mode a layer gate of 0 keeps ``x`` (§4)."""
    y = masked_layer_norm(
        out, x, _take(ln.weight, hid, None), _take(ln.bias, hid, None), layer_gate, z_hid, ln.eps, check_gates=False
    )
    if dense and layer_gate is not None:
        # Live-only mode skips a dead sublayer before computing it; dense mode selects without a host sync.
        y = torch.where(layer_gate == 0, x, y)
    return y


# --------------------------------------------------------------------- patched classes


class _CoFiLayerForward:
    """Mixin that replaces a BERT/RoBERTa encoder layer's forward with the gated one."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        **kwargs,
    ) -> torch.Tensor:
        st = _state_of(self)
        i = self._cofi_layer
        plan = st.plans[i] if st.plans is not None else None
        if plan is not None and not (plan.mha_alive or plan.ffn_alive):
            return hidden_states
        kpm = st.key_padding_mask(attention_mask, hidden_states.shape[0])
        hid = st.hid_idx if plan is not None else None
        # Live-only: work on the kept hidden dims only. The dropped dims of every
        # hidden state are exactly 0 (trailing ·z_hid), so gathering them here and
        # scattering back below loses nothing.
        x = hidden_states if hid is None else hidden_states.index_select(-1, hid)
        z_hid = st.z["hidden"] if hid is None else st.z_hid_kept
        h = _attention_sublayer(self.attention, x, kpm, st, i, hid, z_hid)
        h = _ffn_sublayer(self, h, st, i, hid, z_hid)
        if hid is not None:
            h = hidden_states.new_zeros(hidden_states.shape).index_copy(-1, hid, h)
        return h


class _CoFiEmbeddingNormForward:
    """Mixin for the embeddings' LayerNorm: ``LN_kept(e · z_hid) · z_hid`` (plain LN without a hidden gate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z_hid = _state_of(self).z["hidden"]
        if z_hid is None:
            return super().forward(x)
        return masked_layer_norm(x, torch.zeros_like(x), self.weight, self.bias, None, z_hid, self.eps, check_gates=False)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _cofi_subclass(cls: type, mixin: type) -> type:
    key = (cls, mixin)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"CoFi{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _SUBCLASSES[key]


def _swap_class(module: nn.Module, mixin: type, st: _CoFiState) -> None:
    st.patched.append((module, type(module)))
    module.__class__ = _cofi_subclass(type(module), mixin)
    module._cofi_state = st


# ------------------------------------------------------------------------- public API


def _check_model(model) -> nn.Module:
    supported = _supported_classes()
    if not isinstance(model, supported):
        raise TypeError(
            f"apply_cofi: unsupported model class {type(model).__name__}; supported: {', '.join(SUPPORTED_MODELS)}"
        )
    base = model.base_model
    cfg = base.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise ValueError(
            f"apply_cofi: {type(model).__name__} is configured as a decoder (is_decoder / add_cross_attention); "
            "CoFi gates are supported on encoders only"
        )
    return base


def _check_gates(gates, cfg) -> None:
    if not all(hasattr(gates, a) for a in ("current", "validate", "shapes")):
        raise TypeError(f"apply_cofi: gates must be a CoFiGates, got {type(gates).__name__}")
    heads = cfg.num_attention_heads
    expected = {
        "head": (cfg.num_hidden_layers, heads),
        "mha": (cfg.num_hidden_layers,),
        "int": (cfg.num_hidden_layers, cfg.intermediate_size),
        "ffn": (cfg.num_hidden_layers,),
        "hidden": (cfg.hidden_size,),
    }
    got = {t: tuple(s) for t, s in gates.shapes.items()}
    if got != expected or getattr(gates, "head_dim", cfg.hidden_size // heads) != cfg.hidden_size // heads:
        raise ValueError(f"apply_cofi: the gates' shapes {got} do not match the model config (expected {expected})")


def apply_cofi(
    model: nn.Module,
    *,
    learn: Iterable[str] | None = None,
    gates: CoFiGates | None = None,
    live_only: bool = True,
    **gate_kwargs,
) -> CoFiGates:
    """Patch a BERT / RoBERTa model in place with CoFi gates and return the gates.

    Args:
        model: a transformers 5.x ``BertModel``, ``BertForSequenceClassification``,
            ``RobertaModel`` or ``RobertaForSequenceClassification`` (encoder
            config). Modules keep their HF classes (as bases of the patched
            classes), so outputs, ``return_dict`` and ``output_hidden_states``
            behave as before.
        learn: gate types to learn when the gates are created here (default:
            all of ``("head", "mha", "int", "ffn", "hidden")``).
        gates: an existing :class:`CoFiGates` matching ``model.config``; when
            given, ``learn`` and ``gate_kwargs`` must not be.
        live_only: compute only heads, FFN units and sublayers with a non-zero
            gate (see the module docstring); False computes everything and
            multiplies by the gates (same values and gradients, full cost).
        **gate_kwargs: passed to :meth:`CoFiGates.from_config` (e.g.
            ``droprate_init``, ``temperature``).

    Returns:
        The gates (created from ``model.config`` on the model's device unless
        given). They are not a submodule of ``model``: optimise their
        parameters separately. Retrieve them later with :func:`cofi_gates`.

    Every forward of the patched model calls ``gates.current(model.training)``
    exactly once (a fresh sample in training, the deterministic gates in eval,
    or the dict given to ``gates.fix``); the whole batch shares it.

    Raises:
        TypeError: unsupported model class, or ``gates`` is not a CoFiGates.
        ValueError: decoder config, gates whose shapes do not match the config,
            ``gates`` together with ``learn``/``gate_kwargs``, or a model that
            is already patched (patching twice is an error; use
            :func:`cofi_gates` to get the existing gates or :func:`remove_cofi`
            first).
    """
    base = _check_model(model)
    if is_cofi_patched(model):
        raise ValueError(
            f"apply_cofi: {type(model).__name__} is already patched with CoFi gates; "
            "use cofi_gates(model) to get them, or remove_cofi(model) before patching again"
        )
    cfg = base.config
    try:
        device = next(base.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    if gates is None:
        gates = CoFiGates.from_config(cfg, learn=TYPES if learn is None else learn, **gate_kwargs).to(device)
    elif learn is not None or gate_kwargs:
        raise ValueError("apply_cofi: pass either gates or learn/gate options, not both")
    _check_gates(gates, cfg)

    st = _CoFiState(gates, cfg, live_only)
    erf_gelu = cfg.hidden_act == "gelu"  # gated_ffn uses exact-erf GELU; other activations use HF's function
    try:
        _swap_class(base.embeddings.LayerNorm, _CoFiEmbeddingNormForward, st)
        for i, layer in enumerate(base.encoder.layer):
            _swap_class(layer, _CoFiLayerForward, st)
            layer._cofi_layer = i
            layer._cofi_erf_gelu = erf_gelu
    except Exception:
        _undo(base, st)
        raise

    base.register_forward_pre_hook(_draw_gates_hook)
    base._cofi_state = st
    return gates


def _draw_gates_hook(module, args):
    # Reads the state from the module (not a closure) so a deep copy of the
    # patched model draws into its own copy of the state and gates.
    module._cofi_state.begin(module.training, _device_of(module))


def _device_of(module: nn.Module) -> torch.device:
    # CPU for a module without parameters.
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _undo(base, st: _CoFiState) -> None:
    for module, cls in reversed(st.patched):
        module.__class__ = cls
        for attr in ("_cofi_state", "_cofi_layer", "_cofi_erf_gelu"):
            module.__dict__.pop(attr, None)
    st.patched.clear()
    for key, fn in list(base._forward_pre_hooks.items()):
        if fn is _draw_gates_hook:
            del base._forward_pre_hooks[key]
    base.__dict__.pop("_cofi_state", None)


def _patched_state(model) -> _CoFiState:
    base = _check_model(model)
    st = base.__dict__.get("_cofi_state")
    if st is None:
        raise ValueError(f"{type(model).__name__} is not patched with CoFi gates (call apply_cofi first)")
    return st


def is_cofi_patched(model: nn.Module) -> bool:
    """True when :func:`apply_cofi` has patched ``model`` (or the base model inside it)."""
    base = getattr(model, "base_model", model)
    return "_cofi_state" in getattr(base, "__dict__", {})


def cofi_gates(model: nn.Module) -> CoFiGates:
    """The gates :func:`apply_cofi` attached to ``model``; ``ValueError`` if it is not patched."""
    return _patched_state(model).gates


def set_live_only(model: nn.Module, live_only: bool) -> None:
    """Switch a patched model between live-only compute (True) and dense compute-then-multiply (False)."""
    _patched_state(model).live_only = bool(live_only)


def remove_cofi(model: nn.Module) -> CoFiGates:
    """Undo :func:`apply_cofi`: restore the HF classes, drop the hook; returns the gates it used."""
    st = _patched_state(model)
    _undo(model.base_model, st)
    st.z = st.plans = None
    return st.gates
