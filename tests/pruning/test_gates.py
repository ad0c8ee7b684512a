"""CoFiGates: hard-concrete sampling, deterministic gates, size model, Lagrangian, fix/unfix."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cofi_kernels.pruning.cofi.gates import TYPES, CoFiGates

BETA = 2.0 / 3.0
SHIFT = BETA * math.log(0.1 / 1.1)  # β·log(−l/r)


def _small(**kw):
    return CoFiGates(3, 4, 8, 10, 16, **kw)


def _set_log_alpha(gates, **values):
    with torch.no_grad():
        for t, v in values.items():
            gates.log_alpha[t].copy_(torch.as_tensor(v, dtype=torch.float32).expand_as(gates.log_alpha[t]))


def test_shapes_init_and_from_config():
    g = _small()
    assert set(g.log_alpha.keys()) == set(TYPES)
    assert {t: tuple(g.log_alpha[t].shape) for t in TYPES} == {
        "head": (3, 4), "mha": (3,), "int": (3, 10), "ffn": (3,), "hidden": (16,)
    }
    for t in ("head", "mha", "ffn", "hidden"):
        assert (g.log_alpha[t] - 10).abs().max() < 0.1
    assert g.log_alpha["int"].abs().max() < 0.1  # log((1-0.5)/0.5) = 0
    g2 = _small(droprate_init=0.2)
    assert (g2.log_alpha["int"] - math.log(4)).abs().max() < 0.1
    assert g.lambda_1.item() == 0 and g.lambda_2.item() == 0
    cfg = SimpleNamespace(num_hidden_layers=12, num_attention_heads=12, hidden_size=768, intermediate_size=3072)
    big = CoFiGates.from_config(cfg, learn=("head",))
    assert (big.num_layers, big.num_heads, big.head_dim, big.intermediate_size, big.hidden_size) == (12, 12, 64, 3072, 768)
    assert big.full_size() == 84_934_656


def test_sampling_statistics_match_keep_prob():
    g = _small()
    _set_log_alpha(g, int=torch.linspace(-3, 3, 10).expand(3, 10), head=0.3, mha=-1.0, ffn=2.0, hidden=0.0)
    n = 4000
    counts = {t: torch.zeros_like(g.log_alpha[t]) for t in TYPES}
    saw_zero = saw_one = False
    with torch.no_grad():
        for _ in range(n):
            z = g.sample()
            for t in TYPES:
                v = z[t]
                assert v.shape == g.log_alpha[t].shape
                assert v.min() >= 0 and v.max() <= 1
                counts[t] += v > 0
                saw_zero |= bool((v == 0).any())
                saw_one |= bool((v == 1).any())
    assert saw_zero and saw_one
    keep = g.keep_prob()
    for t in TYPES:
        emp = counts[t] / n
        # binomial std ≤ 0.5/sqrt(4000) ≈ 0.008; 5 sigma
        assert (emp - keep[t]).abs().max() < 0.04, t
        assert torch.allclose(keep[t], torch.sigmoid(g.log_alpha[t] - SHIFT))


def test_sample_is_differentiable():
    g = _small()
    _set_log_alpha(g, int=0.0)
    z = g.sample()
    z["int"].sum().backward()
    assert g.log_alpha["int"].grad is not None
    assert g.log_alpha["int"].grad.abs().sum() > 0


def test_expected_sparsity_zero_at_full_keep_and_bert_base_m():
    g = CoFiGates(12, 12, 64, 3072, 768)
    assert g.full_size() == 84_934_656
    _set_log_alpha(g, head=50.0, mha=50.0, int=50.0, ffn=50.0, hidden=50.0)
    assert abs(g.expected_sparsity().item()) < 1e-6
    assert abs(g.expected_size().item() - 84_934_656) / 84_934_656 < 1e-6


def test_expected_size_formula_by_hand():
    g = _small()
    _set_log_alpha(g, head=torch.randn(3, 4), mha=torch.randn(3), int=torch.randn(3, 10), ffn=torch.randn(3), hidden=torch.randn(16))
    p = {t: v.detach().double() for t, v in g.keep_prob().items()}
    want = 0.0
    for i in range(3):
        want += 4 * 8 * sum(p["mha"][i] * p["head"][i, h] for h in range(4)) * p["hidden"].sum()
        want += 2 * sum(p["ffn"][i] * p["int"][i, j] for j in range(10)) * p["hidden"].sum()
    assert abs(g.expected_size().detach().item() - float(want)) < 1e-3
    assert g.full_size() == (4 * 8 * 3 * 4 + 2 * 3 * 10) * 16
    s = g.expected_sparsity()
    s.backward()
    assert all(g.log_alpha[t].grad is not None for t in TYPES)


def test_deterministic_rule_hand_made():
    g = _small()
    # Row 0 of int: keep probs sum so that round(10 - Σp) = 3 zeros, chosen by smallest soft value.
    la_int = torch.full((3, 10), 20.0)
    la_int[0, [2, 5, 7]] = -20.0  # p ≈ 0 → 3 expected zeros
    la_int[1] = torch.tensor([5.0, 4, 3, 2, 1, 0, -1, -2, -3, -4])
    la_int[2] = 20.0
    la_head = torch.tensor([[20.0, -20, 20, 20], [-20.0, -20, -20, -20], [20.0, 20, 20, 20]])
    with torch.no_grad():
        g.log_alpha["int"].copy_(la_int)
        g.log_alpha["head"].copy_(la_head)
        g.log_alpha["mha"].copy_(torch.tensor([SHIFT - 0.01, SHIFT + 0.01, 3.0]))  # p just below / above 0.5
        g.log_alpha["ffn"].copy_(torch.tensor([-5.0, 0.0, 5.0]))
        g.log_alpha["hidden"].copy_(torch.linspace(-6, 6, 16))
    z = g.deterministic()
    soft = {t: torch.sigmoid(g.log_alpha[t].detach() / BETA * 0.8) for t in TYPES}
    keep = {t: v.detach().double() for t, v in g.keep_prob().items()}

    assert torch.equal(z["int"][0] == 0, torch.isin(torch.arange(10), torch.tensor([2, 5, 7])))
    n1 = round(10 - keep["int"][1].sum().item())
    assert int((z["int"][1] == 0).sum()) == n1
    assert n1 > 0
    # The zeros of row 1 are the n1 smallest log α (the last n1 entries).
    assert (z["int"][1, 10 - n1:] == 0).all() and (z["int"][1, : 10 - n1] > 0).all()
    assert torch.allclose(z["int"][1, : 10 - n1], soft["int"][1, : 10 - n1])
    assert (z["int"][2] > 0).all()
    assert torch.equal(z["head"] == 0, la_head < 0)
    assert z["mha"][0] == 0 and z["mha"][1] > 0 and torch.allclose(z["mha"][1:], soft["mha"][1:])
    assert z["ffn"][0] == 0 and z["ffn"][1] > 0
    nh = round(16 - keep["hidden"].sum().item())
    assert int((z["hidden"] == 0).sum()) == nh and (z["hidden"][:nh] == 0).all()
    for t in TYPES:
        assert not z[t].requires_grad


def test_clamp():
    g = _small()
    _set_log_alpha(g, int=torch.linspace(-10, 10, 10).expand(3, 10))
    g.clamp_()
    assert abs(g.log_alpha["int"].min().item() - math.log(0.01)) < 1e-6
    assert abs(g.log_alpha["int"].max().item() - math.log(100)) < 1e-6
    assert abs(g.log_alpha["head"].max().item() - math.log(100)) < 1e-6  # init 10 > log 100
    mid = g.log_alpha["int"][0, 4:6]
    assert torch.allclose(mid, torch.linspace(-10, 10, 10)[4:6])


def test_lagrangian_value_and_gradient_signs():
    g = _small()
    _set_log_alpha(g, int=0.0)
    with torch.no_grad():
        g.lambda_1.fill_(0.7)
        g.lambda_2.fill_(1.3)
    t = 0.5
    s = g.expected_sparsity().item()
    lc = g.lagrangian(t)
    assert abs(lc.item() - (0.7 * (s - t) + 1.3 * (s - t) ** 2)) < 1e-6
    lc.backward()
    assert abs(g.lambda_1.grad.item() - (s - t)) < 1e-6
    assert abs(g.lambda_2.grad.item() - (s - t) ** 2) < 1e-6
    # s < t: raising sparsity (lowering log α) lowers L_c, so dL/dlogα > 0 for λ1 > 0 ... here
    # dL/ds = λ1 + 2λ2(s−t) ; d s / d logα < 0.
    dlds = 0.7 + 2 * 1.3 * (s - t)
    assert s < t
    sign = -1 if dlds > 0 else 1
    assert (torch.sign(g.log_alpha["int"].grad) == sign).all()
    # Gradient ascent on λ: after negation and one SGD step λ1 moves towards the violated side.
    g.lambda_1.grad.neg_()
    opt = torch.optim.SGD([g.lambda_1], lr=0.1)
    opt.step()
    assert g.lambda_1.item() < 0.7  # s − t < 0 → λ1 decreases, making the penalty λ1(s−t) grow


def test_fix_unfix_and_current():
    g = _small()
    assert g.fixed is None
    z = {"head": torch.rand(3, 4, requires_grad=True), "hidden": torch.rand(16)}
    g.fix(z)
    f = g.fixed
    assert set(f) == set(TYPES) and f["mha"] is None and f["int"] is None
    assert f["head"] is z["head"]  # stored as given, graph kept
    assert g.current(True)["head"] is z["head"] and g.current(False)["hidden"] is z["hidden"]
    g.unfix()
    assert g.fixed is None
    d = g.current(False)
    assert torch.equal(d["int"], g.deterministic()["int"])
    s = g.current(True)
    assert s["int"].requires_grad


@pytest.mark.parametrize(
    "z, words",
    [
        ({"head": torch.ones(3, 5)}, ["'head'", "[3, 4]", "[3, 5]"]),
        ({"hidden": torch.ones(15)}, ["'hidden'", "[16]", "[15]"]),
        ({"mha": torch.ones(3, 1)}, ["'mha'", "[3]", "[3, 1]"]),
        ({"int": torch.ones(10)}, ["'int'", "[3, 10]", "[10]"]),
        ({"bogus": torch.ones(3)}, ["bogus"]),
        ({"ffn": [1.0, 1.0, 1.0]}, ["'ffn'", "Tensor"]),
    ],
)
def test_fix_validation_errors(z, words):
    g = _small()
    with pytest.raises(ValueError) as e:
        g.fix(z)
    for w in words:
        assert w in str(e.value)
    assert g.fixed is None


def test_learn_subsets():
    g = _small(learn=("int", "hidden"))
    assert set(g.log_alpha.keys()) == {"int", "hidden"}
    for d in (g.sample(), g.deterministic(), g.keep_prob()):
        assert d["head"] is None and d["mha"] is None and d["ffn"] is None
        assert d["int"] is not None and d["hidden"] is not None
    _set_log_alpha(g, int=50.0, hidden=50.0)
    assert abs(g.expected_sparsity().item()) < 1e-6
    # Not learning int: the FFN term counts every unit as kept.
    g2 = _small(learn=("head",))
    _set_log_alpha(g2, head=-50.0)
    want = 1 - (2 * 3 * 10 * 16) / g2.full_size()
    assert abs(g2.expected_sparsity().item() - want) < 1e-6
    with pytest.raises(ValueError, match="unknown gate type"):
        _small(learn=("heads",))
    g3 = _small(learn=())
    assert len(list(g3.log_alpha.keys())) == 0
    assert g3.expected_sparsity().item() == 0.0


def test_realised_size_and_sparsity():
    g = _small()
    z = {
        "head": torch.tensor([[1.0, 0, 0.3, 0], [0.0, 0, 0, 0], [1.0, 1, 1, 1]]),
        "mha": torch.tensor([1.0, 1.0, 0.0]),
        "int": torch.tensor([[0.5] * 10, [0.0] * 5 + [1.0] * 5, [1.0] * 10]),
        "ffn": torch.tensor([0.0, 0.9, 1.0]),
        "hidden": torch.tensor([1.0] * 12 + [0.0] * 4),
    }
    heads = 2 + 0 + 0
    units = 0 + 5 + 10
    want = (4 * 8 * heads + 2 * units) * 12
    assert g.realised_size(z) == want
    assert abs(g.realised_sparsity(z) - (1 - want / g.full_size())) < 1e-12
    assert g.realised_size({}) == g.full_size()


def test_keep_prob_gradient_is_accurate_in_float32_near_one():
    # At initialisation log α ≈ 10, P(z > 0) ≈ 1 − 3e-5: σ's backward (σ·(1 − σ) from a rounded σ)
    # lost ~1e-3 of the gradient there; the log-sigmoid form keeps float32 accuracy.
    g = _small()
    g64 = _small().double()
    with torch.no_grad():
        for t in TYPES:
            values = torch.linspace(8.0, 11.0, g.log_alpha[t].numel()).reshape(g.log_alpha[t].shape)
            g.log_alpha[t].copy_(values)
            g64.log_alpha[t].copy_(values.double())
    g.expected_sparsity().backward()
    g64.expected_sparsity().backward()
    for t in TYPES:
        got, want = g.log_alpha[t].grad.double(), g64.log_alpha[t].grad
        assert torch.isfinite(got).all() and want.abs().min() > 0
        assert ((got - want).abs() / want.abs()).max() <= 2e-6, t
