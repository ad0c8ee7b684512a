"""A frozen teacher's outputs on the training examples, computed once (:class:`TeacherCache`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..tasks.base import Features, gather_rows
from .evaluation import autocast

__all__ = ["TeacherCache"]

# Outputs of a batch: the task's outputs ([B, C], or [B, T, C] per token) and, when layers are cached, every
# layer's hidden states [B, T, D].
Outputs = Callable[[dict], tuple[torch.Tensor, Sequence[torch.Tensor] | None]]


class TeacherCache:
    """The teacher's outputs and the hidden states of ``layers`` for the examples ``examples``.

    Computed once, over the fixed batches of ``chunk`` examples in index order
    (only those holding a wanted example), so an example's values never depend on
    which examples a process or a resumed run asks for; padding positions are not
    stored.

    Args:
        outputs: runs the teacher (in eval mode, without gradients) on a batch.
        enc: the encoded training data.
        examples: the examples to keep (a process's own, :meth:`TrainerHooks.on_start`).
        layers: the teacher layers whose hidden states are kept (none: logits only).
        device, bf16: where the teacher runs, and whether under bf16 autocast.
        per_token: the outputs are per token (``[B, T, C]``): only the example's own tokens are kept.
    """

    def __init__(self, outputs: Outputs, enc: Features, examples: Sequence[int], layers: Sequence[int], device,
                 bf16: bool, chunk: int = 64, per_token: bool = False):
        self.layers = list(layers)
        self.logits: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, dict[int, torch.Tensor]] = {}
        wanted = set(examples)
        with torch.no_grad(), autocast(device, bf16):
            for index in enc.in_order(chunk):
                if wanted.isdisjoint(index):
                    continue
                logits, hidden = outputs(enc.batch(index, device))
                for r, i in enumerate(index):
                    if i not in wanted:
                        continue
                    n = len(enc.input_ids[i])
                    self.logits[i] = (logits[r, :n] if per_token else logits[r]).float().cpu()
                    self.hidden[i] = {t: hidden[t][r, :n].float().cpu() for t in self.layers}

    @staticmethod
    def size_mb(enc: Features, examples: Sequence[int], num_layers: int, hidden_size: int) -> float:
        """Memory the hidden states of ``num_layers`` layers for ``examples`` would take."""
        tokens = sum(len(enc.input_ids[i]) for i in examples)
        return tokens * num_layers * hidden_size * 4 / 2**20

    def batch_logits(self, index: Sequence[int], device, seq_len: int | None = None) -> torch.Tensor:
        """``[B, C]`` outputs of the examples ``index`` (per token: ``[B, seq_len, C]``, zero-padded)."""
        return gather_rows([self.logits[i] for i in index], seq_len).to(device)

    def batch(self, index: Sequence[int], seq_len: int, device):
        """``(outputs [B, C] or [B, T, C], {layer: [B, T, D]})`` for the examples ``index`` padded to ``seq_len``."""
        hidden = {}
        for t in self.layers:
            rows = [self.hidden[i][t] for i in index]
            h = rows[0].new_zeros(len(index), seq_len, rows[0].shape[-1])
            for r, x in enumerate(rows):
                h[r, : x.shape[0]] = x
            hidden[t] = h.to(device)
        return self.batch_logits(index, device, seq_len), hidden
