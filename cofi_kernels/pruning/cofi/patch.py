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

The gated computations themselves live in :mod:`cofi_kernels.modules.gated`
(attention through :func:`cofi_kernels.functional.gated_attention`, which
never materialises the attention probabilities: ``output_attentions``
therefore returns no maps, as HF's sdpa path); this module swaps the classes,
draws the gates and hands each layer its gates, live indices and the
key-padding part of HF's prepared mask (eager additive or sdpa boolean, or
``None``), so padded keys behave as in HF.

Live-only compute (``live_only=True``, the default): heads, FFN units,
sublayers and hidden dims whose gate is exactly 0 are not computed; every
hidden state the model returns still has the full hidden size.
``live_only=False`` computes everything and multiplies by the gates; it
exists for tests and benchmarks.

The supported models and configurations are those of
:mod:`cofi_kernels.models.arch` (encoders only: configs with ``is_decoder``
or ``add_cross_attention`` are refused); ``past_key_values`` is not used.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ...models.arch import SUPPORTED_MODELS, encoder_dims, supported_model
from ...modules.gated import HiddenGates, LayerGates, LiveLayer, gated_embedding_norm, gated_layer, live_layer
from .gates import TYPES, CoFiGates, mismatch_with

__all__ = [
    "apply_cofi",
    "cofi_gates",
    "is_cofi_patched",
    "remove_cofi",
    "set_live_only",
    "SUPPORTED_MODELS",
]

# ----------------------------------------------------------------------------- state


class _CoFiState:
    """Per-model patch state, held as a plain attribute by every patched module.

    Not an ``nn.Module``: the gates must stay outside the model's parameters.
    """

    def __init__(self, gates, config, live_only: bool) -> None:
        self.gates = gates
        self.live_only = bool(live_only)
        self.head_dim = encoder_dims(config).head_dim
        self.z: dict[str, torch.Tensor | None] | None = None
        self.plans: list[LiveLayer] | None = None
        self.hidden: HiddenGates | None = None
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
        host = _host_copy(z)
        self.plans = self._plan(host, device) if self.live_only else None
        kept = kept_gate = None
        if self.live_only and "hidden" in host:
            keep = host["hidden"] != 0
            # With no kept dim at all the full-width path gives the defined all-zero output.
            if keep.any() and not keep.all():
                kept = keep.nonzero().flatten().to(device)
                kept_gate = z["hidden"].index_select(0, kept)
        self.hidden = HiddenGates(z["hidden"], kept, kept_gate)
        self.z = z

    def _plan(self, host: dict[str, torch.Tensor], device: torch.device) -> list[LiveLayer]:
        g = self.gates

        def row(t, i):
            return host[t][i] if t in host else None

        return [live_layer(row("head", i), row("mha", i), row("int", i), row("ffn", i), g.num_heads, self.head_dim,
                           g.intermediate_size, device) for i in range(g.num_layers)]

    def layer_gates(self, i: int) -> LayerGates:
        z = self.z

        def row(t):
            return None if z[t] is None else z[t][i]

        return LayerGates(row("head"), row("mha"), row("int"), row("ffn"),
                          None if self.plans is None else self.plans[i])

    def key_padding_mask(self, attention_mask, batch: int) -> torch.Tensor | None:
        """[B, T] bool (True = attend) from HF's prepared mask; cached for the forward."""
        if attention_mask is self._mask_src and self._mask_src is not None:
            return self._mask_kpm
        kpm = _key_padding_from_hf_mask(attention_mask, batch)
        self._mask_src, self._mask_kpm = attention_mask, kpm
        return kpm


def _host_copy(z: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """The gates on the host, in one transfer (one small sync); NaN gates are refused."""
    present = [t for t in TYPES if z[t] is not None]
    if not present:
        return {}
    flat = torch.cat([z[t].detach().reshape(-1).float() for t in present]).cpu()
    if torch.isnan(flat).any():
        raise ValueError("apply_cofi: the gates contain NaN (the kept hidden dims would be undefined)")
    host, off = {}, 0
    for t in present:
        n = z[t].numel()
        host[t] = flat[off : off + n].reshape(z[t].shape)
        off += n
    return host


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


# --------------------------------------------------------------------- patched classes


class _CoFiLayerForward:
    """Mixin that replaces a BERT/RoBERTa encoder layer's forward with the gated one of :mod:`~cofi_kernels.modules.gated`."""

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
        kpm = st.key_padding_mask(attention_mask, hidden_states.shape[0])
        return gated_layer(hidden_states, kpm, self._cofi_attention, self._cofi_ffn,
                           st.layer_gates(self._cofi_layer), st.hidden)


class _CoFiEmbeddingNormForward:
    """Mixin for the embeddings' LayerNorm: ``LN_kept(e · z_hid) · z_hid`` (plain LN without a hidden gate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_embedding_norm(x, self, _state_of(self).z["hidden"])


_SUBCLASSES: dict[tuple[type, type], type] = {}
_LAYER_ATTRS = ("_cofi_state", "_cofi_layer", "_cofi_attention", "_cofi_ffn")


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
    """The base encoder of a supported model (the adapter's check, shared by every entry point)."""
    return supported_model(model)[2]


def _check_gates(gates, cfg) -> None:
    if not all(hasattr(gates, a) for a in ("current", "validate", "shapes")):
        raise TypeError(f"apply_cofi: gates must be a CoFiGates, got {type(gates).__name__}")
    why = mismatch_with(gates, cfg)
    if why is not None:
        raise ValueError(f"apply_cofi: the gates do not match the model config: {why}")


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
        UnsupportedModelError (a TypeError and a ValueError): a model class or
            configuration :mod:`cofi_kernels.models.arch` does not support
            (the same error as :func:`~cofi_kernels.pruning.cofi.fold.prune` gives).
        TypeError: ``gates`` is not a CoFiGates.
        ValueError: gates whose shapes do not match the config,
            ``gates`` together with ``learn``/``gate_kwargs``, or a model that
            is already patched (patching twice is an error; use
            :func:`cofi_gates` to get the existing gates or :func:`remove_cofi`
            first).
    """
    arch, _, base = supported_model(model)
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
    try:
        _swap_class(arch.embedding_parts(base).norm, _CoFiEmbeddingNormForward, st)
        for i, layer in enumerate(arch.layers(base)):
            # The weight views are taken before the class swap (they read the HF submodules).
            attention, ffn = arch.attention_parts(layer), arch.ffn_parts(layer, cfg)
            _swap_class(layer, _CoFiLayerForward, st)
            layer._cofi_layer, layer._cofi_attention, layer._cofi_ffn = i, attention, ffn
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
        for attr in _LAYER_ATTRS:
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
