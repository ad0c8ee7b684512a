"""A pruned directory written by earlier code loads and computes bit-identical outputs.

``tests/models/data/format_v1_{bert,roberta}`` were written at commit eb4eee1
(see ``make_format_v1.py`` there): irregular heads and FFN widths, a removed
attention and a removed FFN sublayer, a sublayer with no head and one with no
unit left, pruned hidden dims. Their logits and last hidden states were saved
beside them by the same code.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import cofi_kernels

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
KINDS = ("bert", "roberta")


def _fixture(kind: str) -> tuple[str, dict]:
    path = os.path.join(DATA, f"format_v1_{kind}")
    return path, load_file(os.path.join(path, "expected.safetensors"))


@pytest.mark.parametrize("kind", KINDS)
def test_v1_directory_gives_bit_identical_logits(kind):
    path, expected = _fixture(kind)
    model = cofi_kernels.PrunedModel.from_pretrained(path)
    with torch.no_grad():
        # Bit-identical is a property of the reference forward (the engine rounds differently).
        logits = model(expected["input_ids"], expected["attention_mask"], expected["token_type_ids"],
                       backend="reference")
        hidden = model.encode(expected["input_ids"], expected["attention_mask"], expected["token_type_ids"],
                              backend="reference")
    assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
    assert torch.equal(hidden, expected["last_hidden"]), (hidden - expected["last_hidden"]).abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_v1_directory_keeps_its_shapes_and_sizes(kind):
    path, _ = _fixture(kind)
    with open(os.path.join(path, "cofi_config.json")) as f:
        saved = json.load(f)
    model = cofi_kernels.PrunedModel.from_pretrained(path)
    assert model.layer_shapes() == [
        {"heads": 3, "ffn_width": 26, "hidden": 38},
        {"heads": None, "ffn_width": 0, "hidden": 38},
        {"heads": 0, "ffn_width": None, "hidden": 38},
    ]
    assert model.encoder_size == saved["encoder_size"] == 7448
    assert model.config["original_size"] == 39168


@pytest.mark.parametrize("kind", KINDS)
def test_v1_directory_saves_back_in_the_same_format(tmp_path, kind):
    path, _ = _fixture(kind)
    model = cofi_kernels.PrunedModel.from_pretrained(path)
    model.save_pretrained(tmp_path)
    old, new = load_file(os.path.join(path, "model.safetensors")), load_file(tmp_path / "model.safetensors")
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) and old[k].dtype == new[k].dtype for k in old)
    with open(os.path.join(path, "cofi_config.json")) as f:
        old_cfg = json.load(f)
    with open(tmp_path / "cofi_config.json") as f:
        assert json.load(f) == old_cfg
