"""models.plots.write_shapes_png: the file is written beside the model and is a valid PNG."""

from __future__ import annotations

import os

import matplotlib.image
import pytest
import torch

from cofi_kernels.models.plots import SHAPES_NAME, write_shapes_png
from cofi_kernels.models.shapes import shaped_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CASES = {
    # removed attention and FFN sublayers, 0-head and 0-unit sublayers that keep bias + LayerNorm
    "removed_and_empty": ([4, None, 0, 2], [50, 0, None, None], 48),
    "dense": ([4, 4], [128, 128], 64),
    "all_removed": ([None, None, None], [None, None, None], 32),
    "zero_layers_kept": ([0, 0], [0, 0], 16),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_writes_valid_png(tmp_path, name):
    heads, widths, hidden = CASES[name]
    model = shaped_model(heads, widths, hidden, head_dim=16, original_hidden_size=64, original_num_heads=4,
                         original_intermediate_size=128, vocab_size=100, max_position_embeddings=32,
                         generator=torch.Generator().manual_seed(0))
    out = tmp_path / "model"  # not there yet: created
    path = write_shapes_png(model, out)
    assert path == os.path.join(str(out), SHAPES_NAME)
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image.std() > 0  # something was drawn
    assert os.listdir(out) == [SHAPES_NAME]  # no temporary file left behind


def test_replaces_existing_file_and_rejects_other_models(tmp_path):
    model = shaped_model([1, None], [8, 0], 16, head_dim=8, original_hidden_size=16, original_num_heads=2,
                         original_intermediate_size=16, vocab_size=50, max_position_embeddings=16)
    (tmp_path / SHAPES_NAME).write_bytes(b"stale")
    path = write_shapes_png(model, tmp_path)
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with pytest.raises(TypeError, match="model must be a PrunedModel"):
        write_shapes_png(torch.nn.Linear(2, 2), tmp_path)
