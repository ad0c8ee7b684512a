"""`cofi export`: a pruned model directory → an ONNX file that ONNX Runtime runs to the same outputs;
bad input is one line `cofi export: error: ...`, exit status 2, and nothing written."""

from __future__ import annotations

import os
import re

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from cofi_kernels.models.pruned_model import PrunedModel  # noqa: E402
from tests.cofi_model_ref import small_model  # noqa: E402
from tests.models.test_onnx_export import SMALL, pruned_model, random_batch, run_onnx, reference  # noqa: E402
from tests.cli.test_bad_input import run_cli_full  # noqa: E402
from tests.training_support import tree_snapshot  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


run_cli = run_cli_full  # (status, stdout lines, stderr lines, warnings that escaped)


@pytest.fixture
def pruned_dir(tmp_path):
    """A saved random-weight RoBERTa PrunedModel with a classification head (the files `cofi prune` loads from)."""
    path = tmp_path / "pruned"
    pruned_model("roberta", True, SMALL).save_pretrained(path)
    return str(path)


def test_export_writes_an_onnx_file_that_onnx_runtime_runs_to_the_same_logits(tmp_path, capsys, pruned_dir):
    out = tmp_path / "exported" / "model.onnx"
    out.parent.mkdir()
    status, stdout, stderr, _ = run_cli(["export", "--model", pruned_dir, "--out", str(out)], capsys)
    assert status == 0, stderr
    assert os.listdir(out.parent) == ["model.onnx"]
    assert len(stdout) == 1 and str(out) in stdout[0], stdout
    assert re.search(r"\d+\.\d\d MiB, opset \d+, output logits", stdout[0]), stdout[0]
    model = PrunedModel.from_pretrained(pruned_dir)
    for batch, seq in ((1, 9), (4, 23)):
        ids, mask, types = random_batch(model, batch, seq)
        got, want = run_onnx(str(out), ids, mask, types), reference(model, ids, mask, types)
        assert got.shape == want.shape == (batch, model.config["num_labels"])
        assert torch.isfinite(got).all() and float((got - want).abs().max()) <= 1e-4


def dense_dir(c) -> str:
    """A Hugging Face classifier directory (config.json + model.safetensors, no cofi_config.json)."""
    path = c.tmp / "dense"
    small_model("bert", True, layers=1, seed=0).save_pretrained(path)
    return str(path)


def existing_dir(c, name) -> str:
    (c.tmp / name).mkdir()
    return str(c.tmp / name)


CASES = [
    ("missing-model", lambda c: ["export", "--out", c.out], r"required: --model"),
    ("missing-out", lambda c: ["export", "--model", c.pruned], r"required: --out"),
    ("model-not-there", lambda c: ["export", "--model", str(c.tmp / "nowhere"), "--out", c.out],
     r"--model .*nowhere' does not exist"),
    ("dense-model", lambda c: ["export", "--model", dense_dir(c), "--out", c.out],
     r"--model .*dense' has no cofi_config\.json, so it is not a pruned model.*`cofi prune`"),
    ("out-directory-missing", lambda c: ["export", "--model", c.pruned, "--out", str(c.tmp / "no" / "m.onnx")],
     r"--out .*m\.onnx' cannot be written: its directory .* does not exist"),
    ("out-not-onnx", lambda c: ["export", "--model", c.pruned, "--out", str(c.tmp / "model.bin")],
     r"--out .*model\.bin' must be a file name ending in \.onnx"),
    ("out-is-a-directory", lambda c: ["export", "--model", c.pruned, "--out", existing_dir(c, "d.onnx")],
     r"--out .*d\.onnx' is a directory"),
    ("out-empty", lambda c: ["export", "--model", c.pruned, "--out", ""], r"--out path is empty"),
    ("opset-too-low", lambda c: ["export", "--model", c.pruned, "--out", c.out, "--opset", "12"],
     r"opset must be an integer in \[18, \d+\] or None, got 12"),
    ("opset-not-an-int", lambda c: ["export", "--model", c.pruned, "--out", c.out, "--opset", "new"],
     r"expected an integer"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys, pruned_dir):
    _, argv, pattern = case

    class C:
        tmp = tmp_path
        pruned = pruned_dir
        out = str(tmp_path / "model.onnx")

    argv = argv(C)
    capsys.readouterr()  # what building the inputs printed (Hugging Face's save progress bar)
    before = tree_snapshot(tmp_path)
    status, _, err, caught = run_cli(argv, capsys)
    assert status == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("cofi export: error: "), err
    assert re.search(pattern, err[0]), err[0]
    assert caught == [], caught
    after = tree_snapshot(tmp_path)
    assert after == before, sorted(set(after) ^ set(before))


def test_without_the_onnx_packages_the_error_says_what_to_install(tmp_path, capsys, monkeypatch, pruned_dir):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` raises ImportError
    before = tree_snapshot(tmp_path)
    status, _, err, _ = run_cli(["export", "--model", pruned_dir, "--out", str(tmp_path / "m.onnx")], capsys)
    assert status == 2 and len(err) == 1, err
    assert re.fullmatch(r"cofi export: error: ONNX export needs the package\(s\) onnxscript: "
                        r"pip install 'cofi-kernels\[onnx\]'.*", err[0]), err[0]
    assert tree_snapshot(tmp_path) == before
