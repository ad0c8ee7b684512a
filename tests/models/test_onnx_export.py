"""ONNX export of a PrunedModel (DESIGN §7 "Export"): ONNX Runtime on the file computes the reference forward.

Random-weight pruned models with every irregular layer shape (heads and FFN
units kept in part, 0 heads, 0 units, attention removed, FFN removed, both
removed), BERT and RoBERTa, with and without a classification head; each
exported file is run at two batch sizes and sequence lengths with random
padding, so the axes are shown to be dynamic.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from cofi_kernels.models import onnx_export  # noqa: E402
from cofi_kernels.models.builder import KeptLayer, build_pruned_model  # noqa: E402
from cofi_kernels.models.pruned_model import PrunedModel  # noqa: E402
from tests.cofi_model_ref import small_model  # noqa: E402

H, I, D = 4, 48, 32
# (heads, FFN units) per layer, None = sublayer removed: kept in part, attention removed with an FFN of
# 0 units, 0 heads with the FFN removed, both removed. (The export's time grows with the layer count.)
EVERY_SHAPE = ((3, 30), (None, 0), (0, None), (None, None))
SMALL = ((2, 7),)
TOL = 1e-4  # max abs difference, fp32
SHAPES = ((2, 7), (5, 19))  # (batch, sequence) pairs run on one exported file


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def pruned_model(kind: str, classifier: bool, plan=EVERY_SHAPE) -> PrunedModel:
    """A random-weight pruned model (random LayerNorms and biases too) with the layer shapes of ``plan``."""
    plan = list(plan)
    model = small_model(kind, classifier, layers=len(plan), heads=H, hidden=D, inter=I, seed=_seed())

    def subset(n, k):
        return torch.randperm(n)[:k].sort().values

    layers = [KeptLayer(heads=None if h is None else subset(H, h), units=None if u is None else subset(I, u))
              for h, u in plan]
    pruned = build_pruned_model(model, layers, hidden=subset(D, 25))
    assert [(s["heads"], s["ffn_width"]) for s in pruned.layer_shapes()] == plan
    return pruned


def random_batch(model: PrunedModel, batch: int, seq: int):
    """Fresh random ``(input_ids, attention_mask, token_type_ids)``, int64, with random right padding
    (every row keeps at least one token; one row is full length)."""
    cfg = model.config
    pad = cfg["pad_token_id"]
    ids = torch.randint(pad + 1, cfg["vocab_size"], (batch, seq))
    lengths = torch.randint(1, seq + 1, (batch,))
    lengths[torch.randint(0, batch, ())] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    types = torch.randint(0, cfg["type_vocab_size"], (batch, seq)) * mask
    return ids, mask, types


def has_backend(model: PrunedModel) -> bool:
    """Whether ``forward`` takes the ``backend`` keyword (being added alongside this export)."""
    return "backend" in inspect.signature(model.forward).parameters


def reference(model: PrunedModel, ids, mask, types) -> torch.Tensor:
    kw = {"backend": "reference"} if has_backend(model) else {}
    with torch.no_grad():
        return model(ids, mask, types, **kw)


def run_onnx(path: str, ids, mask, types) -> torch.Tensor:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()}
    return torch.from_numpy(session.run(None, feed)[0])


def assert_matches(path: str, model: PrunedModel, shapes=SHAPES) -> None:
    for batch, seq in shapes:
        ids, mask, types = random_batch(model, batch, seq)
        got, want = run_onnx(path, ids, mask, types), reference(model, ids, mask, types)
        assert got.dtype == torch.float32 and got.shape == want.shape, (got.shape, want.shape)
        assert torch.isfinite(got).all()
        err = float((got - want.float()).abs().max())
        assert err <= TOL, (batch, seq, err)


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("classifier", [True, False], ids=["classifier", "encoder"])
def test_onnx_runtime_computes_the_reference_forward_at_any_batch_and_length(tmp_path, kind, classifier):
    model = pruned_model(kind, classifier)
    path = str(tmp_path / "model.onnx")
    result = model.export_onnx(path)
    assert os.listdir(tmp_path) == ["model.onnx"]  # self-contained: no external data file, no temporary left
    assert result.path == path and result.size == os.path.getsize(path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == result.opset
    # Standard ONNX ops only: no cofi:: (or any other custom-domain) op, no local function.
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, sorted({n.domain for n in proto.graph.node})
    assert len(proto.functions) == 0
    inputs = {i.name: i for i in proto.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    for i in inputs.values():
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64 and dims(i) == ["batch", "sequence"]
    [out] = proto.graph.output
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    if classifier:
        assert result.output == out.name == "logits" and dims(out) == ["batch", model.config["num_labels"]]
    else:
        assert result.output == out.name == "last_hidden_state"
        assert dims(out) == ["batch", "sequence", model.config["hidden_size"]]
    assert_matches(path, model)


def test_a_bf16_model_is_exported_in_fp32_and_left_as_it_was(tmp_path):
    model = pruned_model("bert", True, SMALL).to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = str(tmp_path / "bf16.onnx")
    result = model.export_onnx(path, opset=18)
    assert result.opset == 18 and {o.domain: o.version for o in onnx.load(path).opset_import}[""] == 18
    assert model.training and all(torch.equal(before[k], v) and before[k].dtype == v.dtype
                                  for k, v in model.state_dict().items())
    fp32 = PrunedModel(model.config)
    fp32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in before.items()})
    assert_matches(path, fp32.eval())


def test_the_reference_forward_is_what_is_exported():
    """Once PrunedModel.forward has a ``backend`` keyword, the export asks for "reference" explicitly."""
    seen = []

    plain = pruned_model("bert", True, SMALL)
    passed_on = has_backend(plain)

    class WithBackend(PrunedModel):
        def forward(self, input_ids, attention_mask=None, token_type_ids=None, backend="auto"):
            seen.append(backend)
            return super().forward(input_ids, attention_mask, token_type_ids,
                                   **({"backend": backend} if passed_on else {}))

    model = WithBackend(plain.config)
    model.load_state_dict(plain.state_dict())
    batch = random_batch(model, 2, 5)
    got = onnx_export._Reference(model)(*batch)
    assert seen == ["reference"] and torch.equal(got, reference(plain, *batch))
    assert onnx_export._Reference(plain).kwargs == ({"backend": "reference"} if has_backend(plain) else {})


@pytest.mark.parametrize(
    "where, kw, match",
    [
        ("model.txt", {}, r"path .* must end in \.onnx"),
        ("model.onnx.bak", {}, r"path .* must end in \.onnx"),
        ("missing/model.onnx", {}, r"path .*directory .* does not exist"),
        ("a_dir.onnx", {}, r"path .* is a directory"),
        ("", {}, r"path '' is empty"),
        ("model.onnx", {"opset": 17}, r"opset must be an integer in \[18, \d+\] or None, got 17"),
        ("model.onnx", {"opset": 10**4}, r"opset must be an integer in \[18, \d+\]"),
        ("model.onnx", {"opset": True}, r"opset must be an integer"),
        ("model.onnx", {"opset": "20"}, r"opset must be an integer"),
    ],
)
def test_bad_arguments_raise_naming_the_argument_and_write_nothing(tmp_path, where, kw, match):
    model = pruned_model("roberta", False, SMALL)
    (tmp_path / "a_dir.onnx").mkdir()
    path = str(tmp_path / where) if where else ""
    with pytest.raises(ValueError, match=match):
        model.export_onnx(path, **kw)
    assert sorted(os.listdir(tmp_path)) == ["a_dir.onnx"] and os.listdir(tmp_path / "a_dir.onnx") == []


def test_a_path_that_is_not_a_path_raises():
    model = pruned_model("bert", False, SMALL)
    with pytest.raises(ValueError, match="path must be a str or os.PathLike, got int"):
        model.export_onnx(3)


def test_an_error_during_export_leaves_no_file_and_an_existing_file_as_it_was(tmp_path, monkeypatch):
    model = pruned_model("bert", True, SMALL)
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"a previous export")
    written = []

    def fail(path, *a, **kw):  # runs once the temporary file is complete, before the rename
        written.append((os.path.dirname(path), os.path.getsize(path)))
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(onnx.checker, "check_model", fail)
    with pytest.raises(RuntimeError, match="simulated failure"):
        model.export_onnx(str(existing))
    assert written and written[0][0] == str(tmp_path) and written[0][1] > 0  # a temporary file was there
    assert os.listdir(tmp_path) == ["model.onnx"] and existing.read_bytes() == b"a previous export"
    monkeypatch.undo()

    def fail_early(*a, **kw):  # the exporter itself fails
        raise RuntimeError("exporter failure")

    monkeypatch.setattr(torch.onnx, "export", fail_early)
    with pytest.raises(RuntimeError, match="exporter failure"):
        model.export_onnx(str(tmp_path / "other.onnx"))
    assert os.listdir(tmp_path) == ["model.onnx"]
