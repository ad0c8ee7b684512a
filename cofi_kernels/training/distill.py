"""CoFi's distillation losses (DESIGN §4): prediction distillation and layerwise
distillation with dynamic layer matching.

    L = α_pred · KL(p_t ‖ p_s; T) · T² + α_layer · L_layer

``L_layer`` matches each of a few teacher layers, from the top down, to the
student layer below the previous match whose transformed hidden state is
closest (MSE) to it, among the student layers that are still alive; the
student's hidden states go through one shared linear map ``W`` (initialised to
the identity) before the comparison.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The prediction loss and task loss of classification live with their task; imported here for the callers
# that know them as the distillation losses.
from ..tasks.classification import prediction_loss, task_loss  # noqa: F401


def default_teacher_layers(num_layers: int) -> list[int]:
    """Teacher layers to match: every third of a 12-layer model (2, 5, 8, 11), scaled to
    ``num_layers`` as ``ceil((k+1)·L/4) − 1`` for k = 0..3 (6 layers: 1, 2, 4, 5)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return sorted({math.ceil((k + 1) * num_layers / 4) - 1 for k in range(4)})


class LayerDistiller(nn.Module):
    """Layerwise distillation with dynamic layer matching.

    Args:
        hidden_size: D of teacher and (unpruned) student.
        teacher_layers: indices of the teacher layers to match (default
            :func:`default_teacher_layers` of ``num_teacher_layers``).
        num_teacher_layers: used for the default.

    Attributes:
        transform: the shared map ``W`` (``nn.Linear(D, D)``, identity at start).
        teacher_layers: the matched teacher layers, ascending.
    """

    def __init__(self, hidden_size: int, num_teacher_layers: int, teacher_layers: Sequence[int] | None = None):
        super().__init__()
        layers = default_teacher_layers(num_teacher_layers) if teacher_layers is None else sorted(set(teacher_layers))
        bad = [i for i in layers if not 0 <= i < num_teacher_layers]
        if bad or not layers:
            raise ValueError(
                f"teacher_layers must be non-empty indices in [0, {num_teacher_layers}), got {list(teacher_layers or [])}"
            )
        self.teacher_layers = list(layers)
        self.transform = nn.Linear(hidden_size, hidden_size)
        with torch.no_grad():
            self.transform.weight.copy_(torch.eye(hidden_size))
            self.transform.bias.zero_()

    def forward(
        self,
        student_hidden: Sequence[torch.Tensor],
        teacher_hidden: Sequence[torch.Tensor],
        token_mask: torch.Tensor,
        alive: Sequence[bool] | None = None,
        hidden_index: torch.Tensor | None = None,
        *,
        tokens: int | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[int | None]]:
        """The layer loss and the matching.

        Args:
            student_hidden: the output of every student layer, ``[B, T, d]`` each
                (``d = D``, or the reduced size of a pruned model with ``hidden_index``).
            teacher_hidden: the output of every teacher layer, ``[B, T, D]`` each,
                as a sequence or a mapping layer index → tensor (only
                :attr:`teacher_layers` are read).
            token_mask: ``[B, T]``, 1 on real tokens; padding positions are not compared.
            alive: per student layer, False where both its attention and FFN gates
                are 0 (it cannot be matched); default all alive.
            hidden_index: for a pruned student, the original dim of each kept dim
                (``W`` is applied to those columns only).
            tokens: the real tokens the MSEs average over (default: those of
                ``token_mask``). A process holding part of a global batch passes the
                global batch's count, so its loss is its share of the global loss.
            reduce: sums a tensor over the processes (default: none); the matching is
                chosen on the summed MSEs, so every process matches the same layers as
                one process with the whole batch would.

        Returns:
            ``(loss, match)``: the sum of the matched MSEs, and for each teacher
            layer the student layer it matched (``None`` when no student layer
            below the previous match is alive; that teacher layer adds nothing).
        """
        L = len(student_hidden)
        alive = [True] * L if alive is None else list(alive)
        w, b = self.transform.weight, self.transform.bias
        if hidden_index is not None:
            w = w.index_select(1, hidden_index)
        m = token_mask.to(torch.float32)[..., None]
        denom = (m.sum() if tokens is None else float(tokens)) * w.shape[0]
        mapped = [F.linear(h.float(), w, b) for h in student_hidden]
        # mse[t][s]: masked mean squared error between teacher layer t and mapped student layer s.
        rows = []
        for t in self.teacher_layers:
            th = teacher_hidden[t].float()
            rows.append(torch.stack([((th - s) ** 2 * m).sum() / denom for s in mapped]))
        mse = torch.stack(rows)
        match: list[int | None] = []
        upper = L
        with torch.no_grad():
            whole = mse.detach() if reduce is None else reduce(mse.detach())
            for r in range(len(self.teacher_layers) - 1, -1, -1):
                best = None
                for s in torch.argsort(whole[r], stable=True).tolist():
                    if s < upper and alive[s]:
                        best = s
                        break
                match.append(best)
                if best is not None:
                    upper = best
        match.reverse()
        terms = [mse[r, s] for r, s in enumerate(match) if s is not None]
        loss = torch.stack(terms).sum() if terms else mse.sum() * 0.0
        return loss, match
