"""Pictures of a pruned model: ``shapes.png``, the kept heads and FFN units per layer.

Every pruning method writes it beside the model it saves (DESIGN §8, issue 13),
so that a user sees at a glance where the pruning run kept capacity. Drawn with
matplotlib's Agg canvas directly (no ``pyplot``): no display is needed, and the
global pyplot state of a caller (a notebook) is left alone.
"""

from __future__ import annotations

import os
import tempfile

from .pruned_model import PrunedModel

__all__ = ["SHAPES_NAME", "save_figure", "write_shapes_png"]

SHAPES_NAME = "shapes.png"

_KEPT = "#2b6cb0"      # kept heads / units
_ORIGINAL = "#e2e8f0"  # the original layer's capacity, behind the kept bar
_REMOVED = "#c53030"   # a removed sublayer


def write_shapes_png(model: PrunedModel, directory: str | os.PathLike) -> str:
    """Write ``shapes.png`` into ``directory`` (created if missing) and return its path.

    Two bar charts share the layer axis: kept attention heads per layer (out of
    the original head count) and kept FFN units per layer (out of the original
    width); a light bar behind each shows the original capacity and each bar is
    labelled with its count. A removed sublayer (``None`` in
    :meth:`PrunedModel.layer_shapes`) is marked with a red ✕ and "removed"; a kept
    sublayer with 0 heads / units (only its output bias and LayerNorm remain) shows
    the label "0". The title gives the model type, the reduced hidden size out of
    the original and the realised sparsity (DESIGN §4 count).

    The file is written under a temporary name in ``directory`` and renamed, so a
    reader never sees a half-written PNG. Needs matplotlib (a core dependency).
    """
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(model, PrunedModel):
        raise TypeError(f"write_shapes_png: model must be a PrunedModel, got {type(model).__name__}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    cfg = model.config
    shapes = model.layer_shapes()
    n = len(shapes)
    panels = (("heads", "attention heads", cfg["original_num_heads"]),
              ("ffn_width", "FFN units", cfg["original_intermediate_size"]))

    fig = Figure(figsize=(max(6.0, 0.55 * n + 2.0), 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    xs = list(range(n))
    for ax, (key, label, original) in zip(axes, panels):
        values = [s[key] for s in shapes]
        ax.bar(xs, [original] * n, color=_ORIGINAL, width=0.8, label=f"original ({original})")
        ax.bar(xs, [0 if v is None else v for v in values], color=_KEPT, width=0.8, label="kept")
        removed = [i for i, v in enumerate(values) if v is None]
        if removed:
            # Marked at the bottom of the axis, where a kept bar would start, in a colour no bar has.
            ax.scatter(removed, [0.04 * original] * len(removed), marker="X", s=90, color=_REMOVED,
                       zorder=3, label="sublayer removed")
        for i, v in enumerate(values):
            text, colour = ("removed", _REMOVED) if v is None else (str(v), "black")
            ax.annotate(text, (i, 0 if v is None else v), xytext=(0, 12 if v is None else 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7, color=colour,
                        rotation=90 if v is None else 0)
        ax.set_ylim(0, original * 1.18)
        ax.set_ylabel(f"kept {label}")
        ax.legend(loc="upper right", fontsize=7, ncols=3, frameon=False)
    axes[-1].set_xticks(xs, [str(i) for i in xs])
    axes[-1].set_xlabel("layer")
    axes[-1].set_xlim(-0.6, n - 0.4 if n else 0.6)
    fig.suptitle(
        f"{cfg['model_type']} pruned: hidden {cfg['hidden_size']}/{cfg['original_hidden_size']}, "
        f"sparsity {100 * model.sparsity:.1f}%\n"  # two lines: a shallow model's figure is narrow
        f"(encoder weights {model.encoder_size:,} of {cfg['original_size']:,})",
        fontsize=10,
    )

    return save_figure(fig, directory, SHAPES_NAME)


def save_figure(fig, directory: str, name: str) -> str:
    """Write a matplotlib ``fig`` as ``directory/name`` (PNG, 110 dpi) under a temporary name that is then
    renamed, so a reader never sees a half-written picture; return the path."""
    path = os.path.join(directory, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".png", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
