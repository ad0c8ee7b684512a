"""CUDA graphs per (batch, length bucket) for a pruned model served on CUDA (DESIGN §7, "Overhead").

A 95%-sparse layer is microseconds of GPU work, so at small batches the host's
kernel launches dominate. :class:`GraphedPrunedModel` captures the serving
engine's forward once per (batch bucket, length bucket) on first use and
replays it afterwards: one launch of the whole model per call.

A graph replays fixed shapes and fixed memory, so a batch ``[B, T]`` is padded
up to the smallest buckets ``[Bb, Tb]`` with ``Bb >= B``, ``Tb >= T``
(:func:`bucket`, :func:`pad_to_bucket`), and the forward it captures,
:func:`padded_forward`, has static shapes and no device-to-host copy. It packs
*every* position of the padded batch without knowing how many are real, in
this order (:func:`static_packing`):

- the real tokens of sequence 0, 1, ..., Bb-1, exactly as the engine's
  ``PrunedModel._pack`` orders them (a batch-padding row ``b >= B`` gets one
  token, its first, so that every sequence is non-empty);
- then every padding position, plus one extra padding row, as one more
  "sequence" that is never empty (Bb + 1 sequences in all).

Each real sequence attends over its own tokens only, so its rows compute what
the un-graphed engine computes; the padding "sequence" attends among itself and
is dropped. The row positions of the real tokens come from a cumulative sum of
the mask (no ``nonzero``, whose output size would need the host). Padding is
exact: the real rows' results equal the un-graphed engine's up to the rounding
of GEMMs of a different row count (checked on the CPU in float64 to 1e-12, and
in float32 against the fp32 bar; on CUDA a replay equals the same padded forward
run eagerly, bit for bit).

Batches beyond the largest bucket run the un-graphed engine (graphs pay off at
small batches, and each bucket's graph holds its own activation memory).
"""

from __future__ import annotations

import torch

from ..models.arch import token_limit
from ..models.pruned_model import PrunedModel, _Packed
from ..ops import backends as _backends
from ..ops import varlen_attention as _varlen_op

__all__ = ["DEFAULT_BATCH_BUCKETS", "DEFAULT_LENGTH_BUCKETS", "GraphedPrunedModel", "bucket", "pad_to_bucket",
           "padded_forward", "static_packing", "unpad"]

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
DEFAULT_LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)


# The tasks whose padded forward (padded_forward) is written; token and pooled outputs are not yet.
GRAPHED_TASKS = ("sequence_classification", "base")


def bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest of ``buckets`` that is ``>= n``, or None when ``n`` exceeds them all."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"bucket: n must be an integer >= 1, got {n!r}")
    return next((b for b in sorted(buckets) if b >= n), None)


def _check_buckets(name: str, buckets) -> tuple[int, ...]:
    values = tuple(buckets)
    if not values or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in values):
        raise ValueError(f"GraphedPrunedModel: {name} must be a non-empty sequence of integers >= 1, got {buckets!r}")
    return tuple(sorted(set(values)))


def length_buckets_for(model: PrunedModel, buckets=DEFAULT_LENGTH_BUCKETS) -> tuple[int, ...]:
    """``buckets`` capped at the model's token limit (a padded position needs a position embedding)."""
    c = model.config
    limit = token_limit(c["model_type"], c["max_position_embeddings"], c["pad_token_id"])
    return tuple(sorted({min(b, limit) for b in _check_buckets("length_buckets", buckets)}))


def pad_to_bucket(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None,
                  batch: int, length: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, T]`` inputs padded to ``[batch, length]``: ids with ``pad_token_id``, the mask with 0
    (an all-ones mask when None), token types with 0. Returns int64 (ids, mask, types)."""
    B, T = input_ids.shape
    if batch < B or length < T:
        raise ValueError(f"pad_to_bucket: the bucket [{batch}, {length}] is smaller than the batch [{B}, {T}]")
    pad = (0, length - T, 0, batch - B)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    return (torch.nn.functional.pad(input_ids.long(), pad, value=pad_token_id),
            torch.nn.functional.pad(mask.long(), pad, value=0),
            torch.nn.functional.pad(types.long(), pad, value=0))


def static_packing(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packing of every position of a ``[Bb, Tb]`` batch, with static shapes (module docstring).

    ``attention_mask`` must have every row's first token real (1). Returns ``(src, dest, cu_seqlens)``:
    ``src`` ``[Bb·Tb + 1]``, the flat position each packed row takes its token from (``Bb·Tb`` =
    the extra padding row); ``dest`` ``[Bb·Tb]``, the packed row of each flat position;
    ``cu_seqlens`` ``[Bb + 2]`` int64: the Bb sequences' real tokens, then the padding.
    """
    Bb, Tb = attention_mask.shape
    m = Bb * Tb
    real = attention_mask.reshape(-1) != 0
    n_real = real.sum()
    dest = torch.where(real, torch.cumsum(real, 0) - 1, n_real + torch.cumsum(~real, 0) - 1)
    positions = torch.arange(m + 1, device=attention_mask.device)
    src = positions.clone()  # row m (the extra padding row) stays m
    src.scatter_(0, dest, positions[:m])
    cu = torch.empty(Bb + 2, dtype=torch.long, device=attention_mask.device)
    cu[0] = 0
    torch.cumsum((attention_mask != 0).sum(1), 0, out=cu[1:Bb + 1])
    cu[Bb + 1] = m + 1
    return src, dest, cu


def padded_forward(model: PrunedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   token_type_ids: torch.Tensor) -> torch.Tensor:
    """The engine's forward over a whole padded ``[Bb, Tb]`` batch, with static shapes and no
    device-to-host copy (what :class:`GraphedPrunedModel` captures; it runs on any device).

    Every row's first token is taken as real (a batch-padding row becomes a one-token
    sequence; a real row's first token must already be real). Returns logits ``[Bb, labels]``
    for a model with a classification head, else the hidden states ``[Bb, Tb, d]`` with
    padded positions 0.
    """
    Bb, Tb = input_ids.shape
    mask = attention_mask.clone()
    mask[:, 0] = 1
    src, dest, cu = static_packing(mask)
    flat = lambda t, fill: torch.cat([t.reshape(-1), t.new_full((1,), fill)])  # noqa: E731 - + the extra row
    ids = flat(input_ids, model.config["pad_token_id"])[src]
    types = flat(token_type_ids, 0)[src]
    positions = flat(model._position_ids(input_ids), 0)[src]
    hidden = model.embeddings(ids, types, positions)
    packed = _Packed(hidden, cu, None)
    if model.head is not None:
        return model.head.classify(model._run_packed(packed, first_only=True)[:Bb])
    h = model._run_packed(packed, first_only=False)[dest]
    real = (mask.reshape(-1) != 0)[:, None]
    return torch.where(real, h, torch.zeros((), dtype=h.dtype, device=h.device)).view(Bb, Tb, -1)


def unpad(out: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The real rows of :func:`padded_forward`'s output: logits ``[:batch]``, hidden ``[:batch, :length]``."""
    return out[:batch] if out.dim() == 2 else out[:batch, :length]


class _Captured:
    """One bucket's graph: its static inputs (written before each replay) and its static output."""

    def __init__(self, graph, ids, mask, types, out):
        self.graph, self.ids, self.mask, self.types, self.out = graph, ids, mask, types, out


class GraphedPrunedModel:
    """A :class:`PrunedModel` on CUDA whose engine forward replays one CUDA graph per
    (batch bucket, length bucket), captured on first use.

    Call it as the model: ``graphed(input_ids, attention_mask=None, token_type_ids=None)`` →
    logits ``[B, labels]`` (or the hidden states ``[B, T, d]``, padded positions 0, for a
    model without a head), a fresh tensor each call. Inference only (runs under
    ``torch.inference_mode``). Inputs go through :func:`pad_to_bucket` into the bucket's
    static buffers; a batch larger than the largest bucket (or longer than the largest
    length bucket) runs ``model(..., backend="engine")`` un-graphed.

    Args:
        model: a PrunedModel on a CUDA device in float32, bfloat16 or float16 (an
            aligned copy or not, see :func:`cofi_kernels.serving.aligned_copy`), whose
            varlen attention runs the ``triton`` backend (the reference copies offsets
            to the host, which a graph cannot capture).
        batch_buckets: batch sizes graphs are captured for (default 1, 2, 4, ..., 32).
        length_buckets: sequence lengths (default 16, 32, ..., 512), capped at the
            model's token limit.
        warmup: eager runs of a bucket's forward on a side stream before its capture
            (compiles the Triton kernels and sets up cuBLAS outside the graph).

    Raises ``ValueError`` (naming the argument) for a model that is not on CUDA, a
    dtype CUDA does not serve, a model whose attention cannot run Triton (with the
    reasons), or bad buckets.
    """

    def __init__(self, model: PrunedModel, batch_buckets=DEFAULT_BATCH_BUCKETS, length_buckets=DEFAULT_LENGTH_BUCKETS,
                 warmup: int = 2):
        if not isinstance(model, PrunedModel):
            raise TypeError(f"GraphedPrunedModel: model must be a PrunedModel, got {type(model).__name__}")
        if model.config["task"] not in GRAPHED_TASKS or model.mean_pooled_head:
            what = "mean-pooled sequence_classification" if model.mean_pooled_head else model.config["task"]
            raise ValueError(f"GraphedPrunedModel: a {what} model is not captured yet (graphs are built for "
                             f"{' and '.join(GRAPHED_TASKS)} models reading the first token); serve it without "
                             "cuda_graphs")
        p = model.embeddings.word_embeddings
        if p.device.type != "cuda":
            raise ValueError(f"GraphedPrunedModel: model must be on a CUDA device (CUDA graphs replay GPU work), "
                             f"got {p.device}; move it with model.to('cuda') or load it with "
                             "load_for_inference(..., device='cuda')")
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"GraphedPrunedModel: model dtype must be float32, bfloat16 or float16, got {p.dtype}")
        reasons = _varlen_op.SPEC.backend("triton").not_supported_reasons(
            _backends.Inputs(p.device, p.dtype, model.config["head_dim"]))
        if reasons and any(l.attention is not None and l.attention.heads for l in model.layers):
            raise ValueError("GraphedPrunedModel: the model's attention cannot run the triton backend of "
                             f"varlen_attention ({'; '.join(reasons)}), and no other backend can be captured")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise ValueError(f"GraphedPrunedModel: warmup must be an integer >= 1, got {warmup!r}")
        self.model = model.eval()
        self.batch_buckets = _check_buckets("batch_buckets", batch_buckets)
        self.length_buckets = length_buckets_for(model, length_buckets)
        self.warmup = warmup
        self._graphs: dict[tuple[int, int], _Captured] = {}

    @property
    def captured(self) -> tuple[tuple[int, int], ...]:
        """The (batch, length) buckets captured so far."""
        return tuple(sorted(self._graphs))

    def buckets_for(self, batch: int, length: int) -> tuple[int, int] | None:
        """The (batch, length) bucket a ``[batch, length]`` input replays, or None (runs un-graphed)."""
        b, t = bucket(batch, self.batch_buckets), bucket(length, self.length_buckets)
        return None if b is None or t is None else (b, t)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        B, T = self.model._check_inputs(input_ids, attention_mask, token_type_ids)  # shapes, dtypes, devices
        if attention_mask is not None and not bool(attention_mask[:, 0].all()):
            raise ValueError("GraphedPrunedModel: every sequence's first token must be real "
                             "(attention_mask[:, 0] all 1: right padding)")
        buckets = self.buckets_for(B, T)
        with torch.inference_mode():
            if buckets is None:
                return self.model(input_ids, attention_mask, token_type_ids, backend="engine")
            g = self._graphs.get(buckets) or self._capture(*buckets)
            ids, mask, types = pad_to_bucket(input_ids, attention_mask, token_type_ids, *buckets,
                                             self.model.config["pad_token_id"])
            g.ids.copy_(ids)
            g.mask.copy_(mask)
            g.types.copy_(types)
            g.graph.replay()
            return unpad(g.out, B, T).clone()

    def _capture(self, batch: int, length: int) -> _Captured:
        device = self.model.embeddings.word_embeddings.device
        pad = self.model.config["pad_token_id"]
        ids = torch.full((batch, length), pad, dtype=torch.long, device=device)
        mask = torch.zeros((batch, length), dtype=torch.long, device=device)
        mask[:, 0] = 1
        types = torch.zeros((batch, length), dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                padded_forward(self.model, ids, mask, types)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = padded_forward(self.model, ids, mask, types)
        captured = _Captured(graph, ids, mask, types, out)
        self._graphs[(batch, length)] = captured
        return captured

    def __repr__(self) -> str:
        return (f"GraphedPrunedModel(batch_buckets={self.batch_buckets}, length_buckets={self.length_buckets}, "
                f"captured={self.captured})")
