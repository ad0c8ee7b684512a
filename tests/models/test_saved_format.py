"""A pruned directory written by earlier code loads and computes bit-identical outputs.

``tests/models/data/format_v1_{bert,roberta}`` were written at commit eb4eee1
(see ``make_format_v1.py`` there): irregular heads and FFN widths, a removed
attention and a removed FFN sublayer, a sublayer with no head and one with no
unit left, pruned hidden dims. Their logits and last hidden states were saved
beside them by the same code, on an Intel Xeon where ATen dispatched its AVX-512 kernels.

Bit-identical outputs are a promise of one machine kind, not across kinds:
ATen's vectorized softmax reduces in lanes of the instruction set it dispatches
to (16 floats for AVX-512, 8 for AVX2: ``ATEN_CPU_CAPABILITY=avx2`` changes the
bits), and MKL's sgemm runs other kernels on AMD CPUs than on Intel ones (on an
AMD EPYC with AVX-512 the classification head's two GEMMs alone move the saved
logits by 4e-9; ``MKL_ENABLE_INSTRUCTIONS`` does not change that). Elsewhere the
saved values are matched within float32's tolerance, and bit for bit against
the same weights built in this process.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import cofi_kernels
from tests.compare import FP32_TOL, rel_err

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
KINDS = ("bert", "roberta")


def _fixture(kind: str) -> tuple[str, dict]:
    path = os.path.join(DATA, f"format_v1_{kind}")
    return path, load_file(os.path.join(path, "expected.safetensors"))


# The CPU vendor and the instruction set ATen dispatched to where the expected outputs were computed.
EXPECTED_ON = ("GenuineIntel", "AVX512")


def _machine_kind() -> tuple[str, str]:
    vendor = ""
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    return vendor, torch.backends.cpu.get_cpu_capability()


def _reference_outputs(model, expected):
    # Bit-identical is a property of the reference forward (the engine rounds differently).
    with torch.no_grad():
        args = expected["input_ids"], expected["attention_mask"], expected["token_type_ids"]
        return model(*args, backend="reference"), model.encode(*args, backend="reference")


@pytest.mark.parametrize("kind", KINDS)
def test_v1_directory_gives_bit_identical_logits(kind):
    path, expected = _fixture(kind)
    model = cofi_kernels.PrunedModel.from_pretrained(path)
    logits, hidden = _reference_outputs(model, expected)
    built = cofi_kernels.PrunedModel(model.config)
    built.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    assert all(torch.equal(a, b) for a, b in zip(_reference_outputs(built.eval(), expected), (logits, hidden)))
    assert rel_err(logits, expected["logits"]) <= FP32_TOL and rel_err(hidden, expected["last_hidden"]) <= FP32_TOL
    if _machine_kind() == EXPECTED_ON:
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
