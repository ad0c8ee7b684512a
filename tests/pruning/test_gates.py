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


def _random_log_alpha(g: CoFiGates, pattern: str, gen: torch.Generator) -> None:
    """Fill every log α: ``spread`` (normal, wide), ``ties`` (only the clamp limits and 0, many
    equal keep scores) or ``undecided`` (all near P(z>0) = 0.5, where each group's own rounding
    is furthest from the whole count; some rows round to 0 zeros)."""
    with torch.no_grad():
        for p in g.log_alpha.values():
            if pattern == "spread":
                p.copy_(torch.randn(p.shape, generator=gen) * 3)
            elif pattern == "ties":
                p.copy_((torch.randint(0, 3, p.shape, generator=gen).float() - 1) * math.log(100))
            else:
                p.copy_(SHIFT + 0.3 * torch.randn(p.shape, generator=gen))


def _cofi_rule_holds_within_groups(g: CoFiGates, z: dict) -> None:
    """Every head / unit row and the hidden vector have their zeros at their lowest keep scores
    (ties: lower index zeroed first), and the kept gates carry their score."""
    for t in ("head", "int", "hidden"):
        score = torch.sigmoid(g.log_alpha[t].detach() / BETA * 0.8)
        for row_z, row_s in zip(z[t].reshape(-1, z[t].shape[-1]), score.reshape(-1, score.shape[-1])):
            order = torch.sort(row_s, stable=True).indices
            zeros = int((row_z == 0).sum())
            assert (row_z[order[:zeros]] == 0).all() and (row_z[order[zeros:]] > 0).all(), t
            assert torch.equal(row_z[order[zeros:]], row_s[order[zeros:]])


@pytest.mark.parametrize("pattern", ["spread", "ties", "undecided"])
def test_exact_selection_hits_the_target_on_random_gates(pattern):
    """Realised sparsity (DESIGN §4 count) within 0.005 of the target for MiniLM-L6 shapes, every
    gate type learned, targets from 0.05 to 0.99; CoFi's per-group rule alone misses them."""
    gen = torch.Generator().manual_seed(sum(map(ord, pattern)))
    misses = 0
    for trial in range(2):
        g = CoFiGates(6, 12, 32, 1536, 384)
        _random_log_alpha(g, pattern, gen)
        plain = g.deterministic()
        for target in (0.05, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99):
            z = g.deterministic(target)
            assert abs(g.realised_sparsity(z) - target) <= 0.005, (pattern, trial, target)
            _cofi_rule_holds_within_groups(g, z)
            misses += abs(g.realised_sparsity(plain) - target) > 0.005
    assert misses > 10  # the targets are not met by the per-group rounding by chance


def test_exact_selection_prunes_groups_whose_own_rounding_gives_no_zero():
    """Every head row has Σ(1 − P(z>0)) ≈ 0.3, so CoFi's rule zeros no head at all; the exact
    selection takes heads anyway, lowest keep score first across layers (here below every unit's)."""
    g = CoFiGates(6, 12, 32, 1536, 384)
    with torch.no_grad():
        for p in g.log_alpha.values():
            p.fill_(math.log(100))
        g.log_alpha["head"].copy_(2.0 + 0.01 * torch.arange(72.0).reshape(6, 12))  # distinct scores, P ≈ 0.97
    plain = g.deterministic()
    assert not (plain["head"] == 0).any()
    for target in (0.8, 0.9, 0.95):
        z = g.deterministic(target)
        assert abs(g.realised_sparsity(z) - target) <= 0.005, target
        gone = z["head"] == 0
        assert gone.any()
        # the heads that went are the lowest scores over all layers (below every unit's, so they go first)
        la = g.log_alpha["head"].detach()
        if not gone.all():
            assert la[gone].max() < la[~gone].min()


def test_exact_selection_moves_only_heads_and_units_when_they_suffice():
    gen = torch.Generator().manual_seed(1)
    g = CoFiGates(6, 12, 32, 1536, 384)
    _random_log_alpha(g, "spread", gen)
    with torch.no_grad():  # every sublayer and most hidden dims alive, so heads and units can reach t
        g.log_alpha["mha"].fill_(4.0)
        g.log_alpha["ffn"].fill_(4.0)
        g.log_alpha["hidden"].copy_(torch.linspace(-6.0, 6.0, 384).clamp(min=2.0))
    plain = g.deterministic()
    for target in (0.6, 0.8, 0.9, 0.95):
        z = g.deterministic(target)
        for t in ("mha", "ffn", "hidden"):
            assert torch.equal(z[t], plain[t]), (t, target)
        assert abs(g.realised_sparsity(z) - target) <= 0.005


def test_exact_selection_restores_hidden_dims_only_when_needed():
    g = CoFiGates(6, 12, 32, 1536, 384)
    with torch.no_grad():
        for p in g.log_alpha.values():
            p.fill_(4.0)
        g.log_alpha["hidden"][:300] = torch.linspace(-4.6, -2.0, 300)  # CoFi drops most of these
        g.log_alpha["mha"][0] = -4.0
    plain = g.deterministic()
    ones = g.ones()
    # With CoFi's hidden dims, even every head and unit leaves the model sparser than 0.5.
    assert g.realised_sparsity({**plain, "head": ones["head"], "int": ones["int"]}) > 0.5
    z = g.deterministic(0.5)
    assert abs(g.realised_sparsity(z) - 0.5) <= 0.005
    score = torch.sigmoid(g.log_alpha["hidden"].detach() / BETA * 0.8)
    back = (plain["hidden"] == 0) & (z["hidden"] > 0)
    still = (plain["hidden"] == 0) & (z["hidden"] == 0)
    assert back.any() and still.any()
    assert score[back].min() >= score[still].max()  # highest keep scores come back first
    z9 = g.deterministic(0.9)  # reachable by heads and units at CoFi's hidden count
    assert torch.equal(z9["hidden"], plain["hidden"]) and torch.equal(z9["mha"], plain["mha"])


def test_exact_selection_with_some_types_not_learned_and_bad_targets():
    g = CoFiGates(6, 12, 32, 1536, 384, learn=("int",))
    _random_log_alpha(g, "spread", torch.Generator().manual_seed(2))
    z = g.deterministic(0.5)  # heads stay: units alone cover 2/3 of M
    assert z["head"] is None and abs(g.realised_sparsity(z) - 0.5) <= 0.005
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="target_sparsity"):
            g.deterministic(bad)


def test_hold_expected_sparsity_shifts_every_log_alpha_by_one_amount():
    g = CoFiGates(6, 12, 32, 1536, 384)
    _random_log_alpha(g, "spread", torch.Generator().manual_seed(3))
    g.clamp_()
    before = {t: p.detach().clone() for t, p in g.log_alpha.items()}
    s0 = float(g.expected_sparsity().detach())
    assert g.hold_expected_sparsity_(s0 - 0.01, s0 + 0.01) == 0.0  # inside: nothing moves
    assert all(torch.equal(before[t], g.log_alpha[t]) for t in TYPES)
    for low, high in ((0.88, 0.92), (0.05, 0.1)):
        shift = g.hold_expected_sparsity_(low, high)
        s = float(g.expected_sparsity().detach())
        assert low <= s <= high and min(abs(s - low), abs(s - high)) < 1e-4  # on the nearer edge
        assert shift != 0.0
        for t in TYPES:  # one common shift, clamped to log α's range: every order is kept
            want = (before[t] + shift).clamp(math.log(1e-2), math.log(1e2))
            assert torch.allclose(g.log_alpha[t], want, atol=1e-5)
        before = {t: p.detach().clone() for t, p in g.log_alpha.items()}
    with pytest.raises(ValueError, match="low <= high"):
        g.hold_expected_sparsity_(0.5, 0.4)


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
