"""The model BERT-of-Theseus trains (DESIGN §8): a frozen predecessor cut into modules, and
one trainable successor layer per module.

:class:`TheseusModel` wraps the fine-tuned Hugging Face classifier (the
predecessor: n encoder layers, cut into m modules of n/m consecutive layers)
and holds m successor layers, successor j a copy of predecessor layer j. A
forward runs the predecessor's embeddings, then module by module either the
successor layer or the module's predecessor layers, then the predecessor's
classification head. :func:`successor_pruned_model` turns the successor into
a :class:`~cofi_kernels.models.pruned_model.PrunedModel` of m full layers
through the generic builder.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ...models.arch import encoder_dims, supported_model
from ...models.builder import KeptLayer, build_pruned_model
from ...models.pruned_model import PrunedModel
from ...models.size import dense_encoder_size

__all__ = ["TheseusModel", "successor_pruned_model"]


class TheseusModel(nn.Module):
    """Predecessor (a BERT/RoBERTa ``*ForSequenceClassification``) plus successor layers.

    Args:
        net: the predecessor; kept as ``self.net`` (not copied). Its depth n must
            be a multiple of ``num_modules``.
        num_modules: m, the successor's depth.

    Attributes:
        net: the predecessor model (embeddings, n layers, classification head).
        successor: ``nn.ModuleList`` of m layers, successor j a deep copy of predecessor layer j.
        ratio: n/m, predecessor layers per module.

    Nothing here sets ``requires_grad``; the training loop freezes what it does not train.
    """

    def __init__(self, net: nn.Module, num_modules: int):
        super().__init__()
        arch, _, encoder = supported_model(net)
        n = encoder_dims(encoder.config).num_layers
        if not isinstance(num_modules, int) or num_modules < 1 or n % num_modules:
            raise ValueError(f"TheseusModel: num_modules must be a divisor of the predecessor's {n} layers, "
                             f"got {num_modules!r}")
        self.net = net
        self.ratio = n // num_modules
        predecessor = arch.layers(encoder)
        # Successor module j starts as predecessor layer j (the first m layers), as in the paper.
        self.successor = nn.ModuleList(copy.deepcopy(predecessor[j]) for j in range(num_modules))
        # Where the encoder keeps its layer list; a plain tuple so it is not registered twice.
        self._encoder = (encoder.encoder,)

    @property
    def num_modules(self) -> int:
        return len(self.successor)

    def predecessor_layers(self) -> nn.ModuleList:
        """The predecessor's n encoder layers."""
        return self._encoder[0].layer

    def module_layers(self, j: int) -> list[nn.Module]:
        """Predecessor layers ``j·r .. (j+1)·r − 1`` of module j (r = n/m)."""
        return list(self.predecessor_layers()[j * self.ratio:(j + 1) * self.ratio])

    def layers_for(self, use_successor: Sequence[bool] | torch.Tensor | None) -> list[nn.Module]:
        """The layers a forward runs: per module its successor layer (True) or its predecessor
        layers (False); None runs every successor layer."""
        if use_successor is None:
            return list(self.successor)
        flags = [bool(x) for x in (use_successor.tolist() if isinstance(use_successor, torch.Tensor)
                                   else use_successor)]
        if len(flags) != self.num_modules:
            raise ValueError(f"TheseusModel: use_successor needs one entry per module ({self.num_modules}), "
                             f"got {len(flags)}")
        out: list[nn.Module] = []
        for j, s in enumerate(flags):
            out.extend([self.successor[j]] if s else self.module_layers(j))
        return out

    @contextmanager
    def _running(self, layers: list[nn.Module]):
        # The HF encoder loops over its `layer` list; it runs these layers for one forward.
        holder = self._encoder[0]
        original = holder.layer
        holder.layer = nn.ModuleList(layers)
        try:
            yield
        finally:
            holder.layer = original

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, output_hidden_states: bool = False,
                use_successor: Sequence[bool] | torch.Tensor | None = None, predecessor: bool = False):
        """The Hugging Face output (``.logits``) of the mixed model.

        ``use_successor``: per module, True runs its successor layer, False its
        predecessor layers; None (evaluation, p = 1) runs the successor alone.
        ``predecessor=True`` runs the unchanged predecessor (the teacher of ``--distill``).
        """
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                  output_hidden_states=output_hidden_states)
        if predecessor:
            return self.net(**kw)
        with self._running(self.layers_for(use_successor)):
            return self.net(**kw)


@torch.no_grad()
def successor_pruned_model(model: TheseusModel) -> PrunedModel:
    """The successor alone (predecessor embeddings, successor layers, predecessor head) as a
    :class:`PrunedModel` of m full layers, built by :func:`~cofi_kernels.models.builder.build_pruned_model`.

    Its realised sparsity is counted against the predecessor (DESIGN §4: the
    original model is the n-layer teacher), so 6 → 3 layers is 0.5.
    """
    net = model.net
    arch, _, encoder = supported_model(net)
    dims = encoder_dims(encoder.config)
    # A copy of the predecessor whose encoder holds the successor layers: the builder reads an HF model.
    with model._running(list(model.successor)):
        small = copy.deepcopy(net)
    small.config.num_hidden_layers = model.num_modules
    arch_s, _, enc_s = supported_model(small)
    enc_s.config.num_hidden_layers = model.num_modules
    layers = [KeptLayer(heads=list(range(dims.num_heads)), units=list(range(dims.intermediate_size)))
              for _ in range(model.num_modules)]
    pruned = build_pruned_model(small, layers)
    pruned.config["original_size"] = dense_encoder_size(dims.num_layers, dims.num_heads, dims.head_dim,
                                                        dims.intermediate_size, dims.hidden_size)
    return pruned
