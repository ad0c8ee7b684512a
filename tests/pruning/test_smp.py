"""Static model pruning (SMP) on tiny random models: the straight-through gradient, exact kept counts,
frozen weights, the exact structured compaction, packed-bit masks, resume, and the command line."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from cofi_kernels import cli
from cofi_kernels.models.pruned_model import PrunedModel
from cofi_kernels.pruning.static import loop as sl
from cofi_kernels.pruning.static import scores as sc
from cofi_kernels.training import model_io
from cofi_kernels.training import trainer as tr
from cofi_kernels.data.text import LabelSpace
from cofi_kernels.tasks.classification import Encoded
from tests.training_support import (
    Killed,
    files_equal_tensors,
    kill_at,
    one_process_part,
    read_log,
    strip_times,
    stub_run,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# 48 examples, batch 8: 6 steps an epoch; the head alone trains 3 steps, the schedule reaches v_f 6 steps
# later, the run ends after 12.
FAST_SMP = dict(remaining=0.3, epochs=2.0, schedule_epochs=1.0, head_warmup_epochs=0.5, batch_size=8, max_length=16,
                checkpoint_every=3, eval_every=2, lr=5e-2, head_lr=1e-2, lambda_max=2.0)
LABELS = LabelSpace.from_labels(["money", "music", "sport"])


def _masked(base_dir, structured: bool, pooling: str = "cls") -> sc.MaskedClassifier:
    model = model_io.load_task_model(base_dir, LABELS)
    return sc.MaskedClassifier(model, structured=structured, pooling=pooling)


def _head_logits(masked: sc.MaskedClassifier, out, mask) -> torch.Tensor:
    """The logits the masked classifier's head computes from a Hugging Face output (computed with
    ``output_hidden_states``): the model's own (``"cls"``), or ``out(tanh(dense(·)))`` of each sequence's
    mean over its real tokens, one sequence at a time (``"mean"``)."""
    if masked.pooling == "cls":
        return out.logits
    h = out.hidden_states[-1]
    pooled = torch.stack([h[b, mask[b].bool()].mean(0) for b in range(h.shape[0])])
    return masked.head_out(torch.tanh(masked.head_dense(pooled)))


def _random_scores(masked: sc.MaskedClassifier) -> None:
    with torch.no_grad():
        for s in masked.scores:
            s.normal_()


def _batch(vocab: int = 30000, B: int = 5, T: int = 12) -> dict:
    ids = torch.randint(1000, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0  # padding in one row
    mask[3, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_dir, toy):
    """One finished structured and one unstructured run on the toy data."""
    root = tmp_path_factory.mktemp("smp")
    out = {}
    for structured in (True, False):
        d = str(root / ("structured" if structured else "unstructured"))
        sl.smp_prune(base_dir, *toy, d, sl.SMPConfig(**FAST_SMP), structured=structured, progress=False)
        out[structured] = d
    return out


# ---------------------------------------------------------------------- masks and the estimator


def test_top_count_mask_keeps_exactly_k_largest_with_ties_to_the_lower_index():
    for trial in range(20):
        n = random.randint(1, 300)
        # Few distinct values: many ties.
        s = torch.randint(-3, 4, (n,)).float() if trial % 2 else torch.randn(n)
        for k in {0, 1, n // 3, n // 2, n - 1, n}:
            got = sc.top_count_mask(s.view(1, n), k).view(n)
            order = sorted(range(n), key=lambda i: (-float(s[i]), i))  # largest first, lower index first
            want = torch.zeros(n, dtype=torch.bool)
            want[order[:k]] = True
            assert torch.equal(got, want), (n, k)


def test_kept_count_rounds_half_up_without_float_trouble():
    assert sc.kept_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996
    assert sc.kept_count(0.1, 12) == 1 and sc.kept_count(0.125, 12) == 2 and sc.kept_count(0.1, 4) == 0
    assert sc.kept_count(1.0, 7) == 7


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("pooling", sc.POOLINGS)
def test_straight_through_gradient_is_the_masked_products_gradient_times_w(base_dir, structured, pooling):
    """∂L/∂S = (∂L/∂W') ⊙ W, with ∂L/∂W' from autograd of the model run on W' = M ⊙ W as leaves."""
    masked = _masked(base_dir, structured, pooling)
    _random_scores(masked)
    masked.remaining = 0.4
    masked.eval()  # no dropout: both passes see the same function
    b = _batch(masked.model.config.vocab_size)
    upstream = torch.randn(b["input_ids"].shape[0], LABELS.num_labels)
    (masked(**b).logits * upstream).sum().backward()
    masks = masked.masks()
    leaves = {t.name: (m * w).detach().requires_grad_(True)
              for t, m, w in zip(masked.targets, masks, masked.weights())}
    out = torch.func.functional_call(masked.model, leaves, args=(), kwargs={**b, "output_hidden_states": True})
    (_head_logits(masked, out, b["attention_mask"]) * upstream).sum().backward()
    for t, s, w in zip(masked.targets, masked.scores, masked.weights()):
        want = leaves[t.name].grad * w
        assert want.abs().max() > 0, t.name  # the comparison has something to compare
        torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-8, msg=t.name)
        assert w.grad is None


@pytest.mark.parametrize("structured", [False, True])
def test_scores_start_at_each_matrix_magnitude_or_at_zero(base_dir, structured):
    """"magnitude": S = |W| / mean |W| per matrix, so the first unstructured masks are magnitude pruning's;
    "zero": every entry tied, so a top-v keeps the lowest indices (what the magnitude start avoids)."""
    model = model_io.load_task_model(base_dir, LABELS)
    masked = sc.MaskedClassifier(model, structured=structured, score_init="magnitude")
    for s, w in zip(masked.scores, masked.weights()):
        torch.testing.assert_close(s.detach(), w.abs() / w.abs().mean(), rtol=1e-6, atol=0)
        assert s.requires_grad and not torch.equal(s, torch.zeros_like(s))
    if not structured:
        for m, w in zip(masked.masks(0.3), masked.weights()):
            assert torch.equal(m, sc.top_count_mask(w.abs(), sc.kept_count(0.3, w.numel())))
    zero = sc.MaskedClassifier(model_io.load_task_model(base_dir, LABELS), structured=structured, score_init="zero")
    assert all(not s.detach().any() for s in zero.scores)
    first = zero.masks(0.5)[0].reshape(-1)
    assert bool(first[: int(first.sum())].all())  # the tie keeps the first entries (or first heads' rows)
    with pytest.raises(ValueError, match="score_init must be one of magnitude, zero, got 'ones'"):
        sc.MaskedClassifier(model, structured=structured, score_init="ones")


def test_straight_through_function_alone():
    s = torch.zeros(6, 5, requires_grad=True)
    w, m = torch.randn(6, 5), (torch.rand(6, 5) > 0.5).float()
    g = torch.randn(6, 5)
    out = sc.StraightThroughMask.apply(s, w, m)
    assert torch.equal(out, w * m)
    out.backward(g)
    assert torch.equal(s.grad, g * w)


@pytest.mark.parametrize("structured", [False, True])
def test_kept_count_per_matrix_is_exactly_the_scheduled_one(base_dir, structured):
    masked = _masked(base_dir, structured)
    _random_scores(masked)
    H, dh, I = masked.num_heads, masked.head_dim, masked.intermediate_size
    T_s = 10
    for step in (0, 1, 3, 6, 9, 10, 15):
        v = sc.remaining_fraction(step, 0.2, T_s)
        assert v == pytest.approx(0.2 + 0.8 * (1 - min(step, T_s) / T_s) ** 3)
        for t, m in zip(masked.targets, masked.masks(v)):
            if not structured:
                assert int(m.sum()) == sc.kept_count(v, m.numel()), (step, t)
                continue
            heads, units = sc.kept_count(v, H), sc.kept_count(v, I)
            per_row = {"query": heads * dh * m.shape[1], "key": heads * dh * m.shape[1],
                       "value": heads * dh * m.shape[1], "attn_out": heads * dh * m.shape[0],
                       "ffn_in": units * m.shape[1], "ffn_out": units * m.shape[0]}[t.kind]
            assert int(m.sum()) == per_row, (step, t)


@pytest.mark.parametrize("structured", [False, True])
def test_the_run_masks_every_step_at_its_scheduled_count(tmp_path, monkeypatch, base_dir, toy, structured):
    """Inside a real run: each training forward's masks hold exactly kept_count(v(t), n) entries
    (per matrix, or per layer's heads and units) with v(t) of the cubic schedule."""
    seen = []
    original = sc.MaskedClassifier.masks

    def spy(self, v=None):
        out = original(self, v)
        if self.training:
            seen.append((self.remaining, [int(m.sum()) for m in out]))
        return out

    monkeypatch.setattr(sc.MaskedClassifier, "masks", spy)
    cfg = sl.SMPConfig(**FAST_SMP)
    sl.smp_prune(base_dir, *toy, str(tmp_path / "run"), cfg, structured=structured, progress=False)
    monkeypatch.undo()
    plan = sl.SMPPlan(cfg, len(toy[0]))
    assert len(seen) == plan.total
    masked = _masked(base_dir, structured)
    assert plan.warmup == 3 and plan.final_from == 9
    for step, (v, counts) in enumerate(seen):
        want = 1.0 if step < 3 else sc.remaining_fraction(step - 3, cfg.remaining, plan.schedule_steps)
        assert v == want
        _random_scores(masked)
        assert counts == [int(m.sum()) for m in masked.masks(v)], step  # counts depend on v only
    steps = [r for r in read_log(str(tmp_path / "run")) if r["event"] == "step"]
    assert [r["remaining"] for r in steps] == [v for v, _ in seen]
    assert [r["lambda"] for r in steps] == [0.0] * 3 + [sc.regulariser_weight(t, cfg.lambda_max, plan.total - 3)
                                                       for t in range(plan.total - 3)]


def test_the_head_warms_up_alone_then_the_scores_train(base_dir, toy):
    """During the warm-up the scores stay 0 (no gradient reaches Adam) and v is 1; the head trains from
    step 0; the learning-rate factors decay to 0 at the end, the scores' from the warm-up's end."""
    cfg = sl.SMPConfig(**FAST_SMP)
    masked = _masked(base_dir, structured=False, pooling="mean")
    plan = sl.SMPPlan(cfg, 48)
    assert [plan.lr_factors(t) for t in (0, 2, 3, 11)] == [(0.0, 1.0), (0.0, 10 / 12), (1.0, 9 / 12), (1 / 9, 1 / 12)]
    enc = Encoded(toy[0], LABELS, model_io.load_tokenizer(base_dir), 16)
    hooks = sl._SMPRun(cfg, plan, stub_run(), masked, None, LABELS, enc, enc, torch.device("cpu"))
    head = [p.detach().clone() for p in masked.head_parameters()]
    for step in range(4):
        index = list(range(step * 8, step * 8 + 8))
        rec = hooks.train_step("prune", step, enc.batch(index), one_process_part(enc, index, step))
        moved = any(float(s.detach().abs().max()) > 0 for s in masked.scores)
        assert moved == (step >= 3), step
        assert rec["remaining"] == (1.0 if step < 3 else plan.remaining(step, cfg.remaining))
        if step == 0:
            assert all(not torch.equal(a, b) for a, b in zip(head, masked.head_parameters()))


@pytest.mark.parametrize("changes, match", [
    ({"head_warmup_epochs": 2.0}, r"head_warmup_epochs must be in \[0, epochs = 2.0\), got 2.0"),
    ({"head_warmup_epochs": 1.5}, r"schedule_epochs must be in \(0, epochs - head_warmup_epochs = 0.5\], got 1.0"),
    ({"pooling": "max"}, r"pooling must be one of mean, cls, got 'max'"),
    ({"score_init": "random"}, r"score_init must be one of magnitude, zero, got 'random'"),
])
def test_bad_settings_are_refused_naming_them(changes, match):
    with pytest.raises(tr.RunError, match=match):
        sl.check_smp_config(sl.SMPConfig(**{**FAST_SMP, **changes}))


@pytest.mark.parametrize("structured", [False, True])
def test_ranking_records_measure_the_kept_set_and_the_gradient_split(runs, structured):
    """One ``ranking`` record per ``ranking_every`` steps after the warm-up and one at the end: the overlap
    of consecutive kept sets at v_f (None first), score statistics, and the gradient split whose
    regulariser part is λ·σ'(S)/(M·numel) (0 while λ is 0)."""
    log = read_log(runs[structured])
    ranking = [r for r in log if r["event"] == "ranking"]
    steps = {r["step"]: r for r in log if r["event"] == "step"}
    assert [r["step"] for r in ranking] == [4, 5, 6, 7, 8, 9, 10, 11, 12]  # ranking_every 1 (6 steps an epoch)
    assert ranking[0]["overlap_with_previous"] is None
    for r in ranking[1:]:
        assert 0.0 <= r["overlap_with_previous"] <= 1.0
        assert r["score_min"] <= r["kept_score_mean"] <= r["score_max"]
        assert r["score_std"] > 0 and r["task_gradient"] > 0
        lam = steps[r["step"]]["lambda"]  # the step record that ended there
        assert (r["regulariser_gradient"] > 0) == (lam > 0)
        share = r["regulariser_gradient"] / (r["regulariser_gradient"] + r["task_gradient"])
        assert r["regulariser_gradient_share"] == pytest.approx(share)


def test_schedules_start_and_end_where_the_formulas_say():
    assert sc.remaining_fraction(0, 0.1, 50) == 1.0
    assert sc.remaining_fraction(50, 0.1, 50) == pytest.approx(0.1)
    assert sc.remaining_fraction(80, 0.1, 50) == pytest.approx(0.1)
    assert sc.remaining_fraction(25, 0.1, 50) == pytest.approx(0.1 + 0.9 * 0.125)
    assert sc.regulariser_weight(0, 400.0, 100) == 0.0
    assert sc.regulariser_weight(100, 400.0, 100) == pytest.approx(400.0)
    assert sc.regulariser_weight(50, 400.0, 100) == pytest.approx(400.0 * (1 - 0.125))


# ---------------------------------------------------------------------- runs


def test_frozen_weights_are_bitwise_unchanged_and_scores_and_head_train(runs, base_dir):
    """The unstructured output's weights are the pre-trained ones, times its masks where masked."""
    from safetensors.torch import load_file

    base = load_file(os.path.join(base_dir, "model.safetensors"))
    saved = PrunedModel.from_pretrained(runs[False]).state_dict()
    masks = model_io.read_weight_masks(runs[False])
    assert torch.equal(saved["embeddings.word_embeddings"], base["embeddings.word_embeddings.weight"])
    compared = 0
    for i in range(4):
        pre = f"encoder.layer.{i}."
        m = {k.removeprefix(f"bert.{pre}"): v for k, v in masks.items() if k.startswith(f"bert.{pre}")}
        qkv = [base[pre + f"attention.self.{n}.weight"] * m[f"attention.self.{n}.weight"]
               for n in ("query", "key", "value")]
        pairs = [(f"layers.{i}.attention.qkv_weight", torch.cat(qkv)),
                 (f"layers.{i}.attention.out_weight",
                  base[pre + "attention.output.dense.weight"] * m["attention.output.dense.weight"]),
                 (f"layers.{i}.ffn.in_weight",
                  base[pre + "intermediate.dense.weight"] * m["intermediate.dense.weight"]),
                 (f"layers.{i}.ffn.out_weight", base[pre + "output.dense.weight"] * m["output.dense.weight"]),
                 (f"layers.{i}.attention.ln_weight", base[pre + "attention.output.LayerNorm.weight"]),
                 (f"layers.{i}.ffn.ln_bias", base[pre + "output.LayerNorm.bias"])]
        for name, want in pairs:
            assert torch.equal(saved[name], want), name
            compared += 1
    assert compared == 24
    # The head did train (dense from the pre-trained pooler, out from a seeded random init) and the masks
    # are not the all-first entries.
    assert not torch.equal(saved["head.dense_weight"], base["pooler.dense.weight"])
    m = masks["bert.encoder.layer.0.attention.self.query.weight"].reshape(-1)
    k = int(m.sum())
    assert not bool(m[:k].all())  # 0-scores would keep the first k entries (ties to the lower index)
    w = base["encoder.layer.0.attention.self.query.weight"].reshape(-1)
    assert not torch.equal(m, sc.top_count_mask(w.abs(), k))  # the scores moved from their magnitude start


def test_in_memory_training_leaves_the_models_tensors_alone(base_dir, toy):
    """The model's own parameters (not just the saved file) are bitwise the same after steps."""
    masked = _masked(base_dir, structured=False, pooling="mean")
    head = {n for n, p in masked.model.named_parameters() if p.requires_grad}
    assert head == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    before = {k: v.clone() for k, v in masked.model.state_dict().items() if k not in head}
    plan = sl.SMPPlan(sl.SMPConfig(**FAST_SMP), 48)
    enc = Encoded(toy[0], LABELS, model_io.load_tokenizer(base_dir), 16)
    hooks = sl._SMPRun(sl.SMPConfig(**FAST_SMP), plan, stub_run(), masked, None, LABELS, enc, enc,
                       torch.device("cpu"))
    for step in range(4):
        index = list(range(step * 8, step * 8 + 8))
        hooks.train_step("prune", step, enc.batch(index), one_process_part(enc, index, step))
    after = masked.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(float(s.detach().abs().max()) > 0 for s in masked.scores)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("v", [0.5, 0.1])
@pytest.mark.parametrize("pooling", sc.POOLINGS)
@pytest.mark.parametrize("structured", [True, False])
def test_the_output_model_equals_the_masked_model(tmp_path, kind, v, pooling, structured):
    """Logits of the PrunedModel built from the kept heads and units (structured), or from every head
    and unit with the masked weights zeroed (unstructured), equal the masked model's (≤ 1e-5); v = 0.1
    keeps 0 of 4 heads per layer (a sublayer of bias + LayerNorm)."""
    from tests.training_support import tiny_bert_dir

    d = tiny_bert_dir(tmp_path / "m", seed=3, kind=kind)
    masked = _masked(d, structured=structured, pooling=pooling)
    _random_scores(masked)
    with torch.no_grad():
        for p in masked.head_parameters():
            p.normal_()
    masked.remaining = v
    masked.eval()
    if structured:
        pruned = sl._compact(masked)
        heads, units = masked.kept_units()
        assert [s["heads"] for s in pruned.layer_shapes()] == heads.sum(1).tolist()
        assert [s["ffn_width"] for s in pruned.layer_shapes()] == units.sum(1).tolist()
    else:
        before = {k: t.clone() for k, t in masked.model.state_dict().items()}
        pruned = sl._zeroed(masked, {t.name: m for t, m in zip(masked.targets, masked.masks())})
        assert all(torch.equal(before[k], t) for k, t in masked.model.state_dict().items())  # a copy was zeroed
        assert pruned.sparsity == 0.0  # dense shapes
    assert pruned.config.get("pooling", "cls") == pooling
    b = _batch(masked.model.config.vocab_size)
    with torch.no_grad():
        want = masked(**b).logits
        for backend in ("reference", "auto"):
            got = pruned(b["input_ids"], b["attention_mask"], b["token_type_ids"], backend=backend)
            assert (got - want).abs().max() <= 1e-5, backend
    # And the masked model is not the dense one (the comparison is not vacuous).
    masked.remaining = 1.0
    with torch.no_grad():
        dense = masked(**b).logits
    assert (dense - want).abs().max() > 1e-3


def test_structured_output_loads_evaluates_and_predicts(runs, toy, tmp_path, capsys):
    out = runs[True]
    run = json.load(open(os.path.join(out, tr.RUN_FILE)))
    model = PrunedModel.from_pretrained(out)
    assert run["sparsity"] == pytest.approx(model.sparsity)
    assert [s["heads"] for s in model.layer_shapes()] == [sc.kept_count(0.3, 4)] * 4
    assert [s["ffn_width"] for s in model.layer_shapes()] == [sc.kept_count(0.3, 64)] * 4
    with open(os.path.join(out, "shapes.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The run's best evaluation (on toy[1]) is what `cofi eval` measures on the saved model.
    result = cli.evaluate_dir(out, toy[1], repeats=1)
    assert result["kind"] == "pruned"
    assert result["accuracy"] == pytest.approx(run["best"]["accuracy"])
    assert result["sparsity"] == pytest.approx(run["sparsity"])
    from tests.training_support import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in toy[1].texts])
    assert cli.main(["predict", "--model", out, "--data", data, "--out", str(tmp_path / "p.jsonl"), "--quiet"]) == 0
    assert len(open(tmp_path / "p.jsonl").readlines()) == len(toy[1])


def test_unstructured_output_is_evaluated_with_its_masks(runs, toy, base_dir):
    out = runs[False]
    run = json.load(open(os.path.join(out, tr.RUN_FILE)))
    masks = model_io.read_weight_masks(out)
    assert len(masks) == 6 * 4
    for name, m in masks.items():
        assert int(m.sum()) == sc.kept_count(0.3, m.numel()) == run["kept_per_matrix"][name]
    kept = sum(int(m.sum()) for m in masks.values())
    assert run["sparsity"] == pytest.approx(1 - kept / sum(m.numel() for m in masks.values()))
    result = cli.evaluate_dir(out, toy[1], repeats=1)
    assert result["kind"] == "masked"
    model = PrunedModel.from_pretrained(out)  # a full-shaped PrunedModel: no speed-up
    assert model.config["pooling"] == "mean" and model.sparsity == 0.0
    assert result["accuracy"] == pytest.approx(run["best"]["accuracy"])
    assert result["sparsity"] == pytest.approx(run["sparsity"])
    assert result["encoder_parameters"] == kept


def test_a_masked_directory_of_earlier_versions_still_loads_with_its_masks(tmp_path, toy, base_dir):
    """Before issue 25 an unstructured run wrote the dense Hugging Face classifier beside its masks; such a
    directory still loads (the masks applied) and evaluates as "masked"."""
    out = str(tmp_path / "old")
    model = model_io.load_task_model(base_dir, LABELS)
    masked = sc.MaskedClassifier(model, structured=False, score_init="magnitude")
    masks = masked.masks(0.3)
    model.save_pretrained(out)
    model_io.write_task(out, LABELS, 16, "masked")
    by_name = {t.name: m for t, m in zip(masked.targets, masks)}
    model_io.write_weight_masks(os.path.join(out, model_io.MASKS_FILE), by_name)
    model_io.load_tokenizer(base_dir).save_pretrained(out)
    loaded = model_io.load_task_model(out)
    params = dict(loaded.named_parameters())
    for t, m in zip(masked.targets, masks):
        assert torch.equal(params[t.name] != 0, m), t.name
    result = cli.evaluate_dir(out, toy[1], repeats=1)
    kept = sum(int(m.sum()) for m in masks)
    assert result["kind"] == "masked" and result["encoder_parameters"] == kept
    assert result["sparsity"] == pytest.approx(1 - kept / sum(m.numel() for m in masks))


# ---------------------------------------------------------------------- packed bits


@pytest.mark.parametrize("shape", [(1,), (8,), (9,), (7, 13), (3, 8), (2, 3, 5)])
def test_packed_bits_match_numpy_packbits_and_round_trip(shape):
    m = torch.rand(shape) > 0.5
    packed = model_io.pack_bits(m)
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), np.packbits(m.numpy().ravel()))
    assert torch.equal(model_io.unpack_bits(packed, shape), m)


def test_mask_file_round_trip_and_refusals(tmp_path):
    masks = {"a.weight": torch.rand(5, 11) > 0.3, "b.weight": torch.rand(16, 3) > 0.7}
    model_io.write_weight_masks(str(tmp_path / model_io.MASKS_FILE), masks)
    back = model_io.read_weight_masks(str(tmp_path))
    assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) for k in masks)
    assert model_io.weight_mask_counts(str(tmp_path)) == (sum(int(m.sum()) for m in masks.values()), 55 + 48)
    # A padding bit set: refused, naming the file.
    from safetensors.torch import save_file

    bad = model_io.pack_bits(torch.ones(5, 11, dtype=torch.bool))
    bad[-1] = 255
    save_file({"a.weight": bad}, str(tmp_path / model_io.MASKS_FILE),
              metadata={"format": model_io.MASKS_FORMAT, "version": "1", "shapes": json.dumps({"a.weight": [5, 11]})})
    with pytest.raises(tr.RunError, match=r"weight_masks\.safetensors: not a weight-mask file .*padding bits"):
        model_io.read_weight_masks(str(tmp_path))
    save_file({"a.weight": bad}, str(tmp_path / model_io.MASKS_FILE))
    with pytest.raises(tr.RunError, match="not a weight-mask file"):
        model_io.read_weight_masks(str(tmp_path))
    with pytest.raises(tr.RunError, match="does not fit the model"):
        model_io.apply_weight_masks(torch.nn.Linear(3, 4), {"weight": torch.ones(4, 4, dtype=torch.bool)})


# ---------------------------------------------------------------------- resume


@pytest.mark.parametrize("structured, at", [(False, 4), (True, 8)])
def test_killed_run_resumes_to_a_bitwise_identical_result(tmp_path, monkeypatch, runs, base_dir, toy, structured, at):
    out = str(tmp_path / "run")
    cfg = sl.SMPConfig(**FAST_SMP)
    with monkeypatch.context() as m:
        kill_at(m, sl._SMPRun, "train_step", at)
        with pytest.raises(Killed):
            sl.smp_prune(base_dir, *toy, out, cfg, structured=structured, progress=False)
    assert os.path.isfile(os.path.join(out, tr.CHECKPOINT_DIR, tr.CHECKPOINT_FILE))
    assert not os.path.exists(os.path.join(out, tr.RUN_FILE))
    sl.smp_prune(base_dir, *toy, out, cfg, structured=structured, resume=True, progress=False)
    ref = runs[structured]
    names = [sl.STRUCTURE_FILE, "model.safetensors"] if structured else [model_io.MASKS_FILE, "model.safetensors"]
    for name in names:
        assert files_equal_tensors(os.path.join(ref, name), os.path.join(out, name)), name
    a, b = (json.load(open(os.path.join(d, tr.RUN_FILE))) for d in (ref, out))
    assert a["best"] == b["best"] and a["sparsity"] == b["sparsity"]
    assert strip_times(read_log(ref)) == strip_times(read_log(out))


def test_resume_refuses_another_structure(tmp_path, monkeypatch, base_dir, toy):
    out = str(tmp_path / "run")
    cfg = sl.SMPConfig(**FAST_SMP)
    with monkeypatch.context() as m:
        kill_at(m, sl._SMPRun, "train_step", 5)
        with pytest.raises(Killed):
            sl.smp_prune(base_dir, *toy, out, cfg, structured=False, progress=False)
    with pytest.raises(tr.RunError, match="another run.*structured"):
        sl.smp_prune(base_dir, *toy, out, cfg, structured=True, resume=True, progress=False)


# ---------------------------------------------------------------------- teacher and command line


def test_teacher_distillation_mixes_ce_and_kl(tmp_path, base_dir, teacher_dir, toy):
    out = str(tmp_path / "kd")
    cfg = sl.SMPConfig(**{**FAST_SMP, "epochs": 0.5, "schedule_epochs": 0.5, "head_warmup_epochs": 0.0})
    sl.smp_prune(base_dir, *toy, out, cfg, structured=True, teacher_dir=teacher_dir, progress=False)
    steps = [r for r in read_log(out) if r["event"] == "step"]
    for r in steps:
        want = 0.5 * r["task"] + 0.5 * r["distill"] + r["lambda"] * r["regulariser"]
        assert r["loss"] == pytest.approx(want, rel=1e-5)
    assert any(r["distill"] > 0 for r in steps)


def test_help_lists_smps_flags_only(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prune", "--method", "smp", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--teacher", "--structured", "--unstructured", "--remaining", "--schedule-epochs",
                 "--lambda-max", "--head-lr", "--alpha-ce", "--alpha-distil"):
        assert flag in text, flag
    for flag in ("--target-sparsity", "--student", "--no-distill", "--prune-epochs", "--finetune-lr", "--reg-lr"):
        assert flag not in text, flag
