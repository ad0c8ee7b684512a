"""cofi_kernels.training.distill: teacher layer choice, prediction / task losses, layerwise distillation
with dynamic layer matching (DESIGN §4, "Distillation"), checked against float64 re-implementations."""

from __future__ import annotations

import itertools

import pytest
import torch

from cofi_kernels.training.distill import LayerDistiller, default_teacher_layers, prediction_loss, task_loss

SEED = 20240607


def _gen(offset: int = 0) -> torch.Generator:
    seed = SEED + offset
    print(f"inputs from torch.Generator().manual_seed({seed})")
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- teacher layers


def test_default_teacher_layers_known_depths():
    assert default_teacher_layers(12) == [2, 5, 8, 11]
    assert default_teacher_layers(6) == [1, 2, 4, 5]
    assert default_teacher_layers(24) == [5, 11, 17, 23]
    assert default_teacher_layers(4) == [0, 1, 2, 3]


@pytest.mark.parametrize("n", range(1, 25))
def test_default_teacher_layers_valid_for_any_depth(n):
    layers = default_teacher_layers(n)
    assert layers == sorted(set(layers))
    assert all(0 <= i < n for i in layers)
    assert len(layers) == min(4, n)
    assert layers[-1] == n - 1  # the top layer is always matched


def test_default_teacher_layers_rejects_zero():
    with pytest.raises(ValueError):
        default_teacher_layers(0)


# ---------------------------------------------------------------------- prediction and task losses


def _kl_ref(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    s, t = s.double(), t.double()
    log_ps = torch.log_softmax(s / T, dim=-1)
    log_pt = torch.log_softmax(t / T, dim=-1)
    pt = log_pt.exp()
    per_example = (pt * (log_pt - log_ps)).sum(-1)
    return float(per_example.mean() * T * T)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.3])
@pytest.mark.parametrize("B, C", [(7, 3), (16, 5), (1, 2)])
def test_prediction_loss_is_kl_times_t_squared(T, B, C):
    g = _gen(B * 10 + C)
    s = torch.randn(B, C, generator=g) * 3
    t = torch.randn(B, C, generator=g) * 3
    got = prediction_loss(s, t, T)
    assert got.dim() == 0
    ref = _kl_ref(s, t, T)
    assert ref > 0
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_prediction_loss_half_precision_inputs():
    g = _gen(1)
    s = (torch.randn(6, 4, generator=g) * 2).bfloat16()
    t = (torch.randn(6, 4, generator=g) * 2).bfloat16()
    got = prediction_loss(s, t, 2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_kl_ref(s, t, 2.0), rel=1e-5)


def test_prediction_loss_zero_when_equal():
    g = _gen(2)
    s = torch.randn(9, 5, generator=g) * 4
    assert abs(prediction_loss(s, s.clone(), 2.0).item()) < 1e-6
    r = torch.randn(9, 1, generator=g)
    assert prediction_loss(r, r.clone(), 2.0).item() == 0.0


def test_prediction_loss_regression_is_mse():
    g = _gen(3)
    s = torch.randn(11, 1, generator=g)
    t = torch.randn(11, 1, generator=g)
    ref = float(((s.double() - t.double()) ** 2).mean())
    for T in (1.0, 3.0):  # temperature plays no part for one output
        assert prediction_loss(s, t, T).item() == pytest.approx(ref, rel=1e-5)


def test_prediction_loss_gradient_reaches_student():
    g = _gen(4)
    s = (torch.randn(5, 3, generator=g) * 2).requires_grad_()
    t = torch.randn(5, 3, generator=g) * 2
    prediction_loss(s, t, 2.0).backward()
    # d/ds [T²·mean_b KL(p_t‖p_s)] = T·(p_s − p_t)/B
    ref = 2.0 * (torch.softmax(s.detach().double() / 2, -1) - torch.softmax(t.double() / 2, -1)) / 5
    torch.testing.assert_close(s.grad.double(), ref, rtol=1e-4, atol=1e-7)


def test_task_loss_classification_is_cross_entropy():
    g = _gen(5)
    logits = torch.randn(8, 4, generator=g) * 2
    labels = torch.randint(0, 4, (8,), generator=g)
    ref = float(-torch.log_softmax(logits.double(), -1)[torch.arange(8), labels].mean())
    assert task_loss(logits, labels).item() == pytest.approx(ref, rel=1e-5)


def test_task_loss_regression_is_mse_without_broadcasting():
    g = _gen(6)
    logits = torch.randn(8, 1, generator=g)
    labels = torch.randn(8, generator=g)
    ref = float(((logits[:, 0].double() - labels.double()) ** 2).mean())
    assert task_loss(logits, labels).item() == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------------- layer distillation: reference


def _masked_mse(teacher: torch.Tensor, student_mapped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of squared differences over real tokens and all D output dims (float64)."""
    real = mask.bool()
    d = teacher.double()[real] - student_mapped.double()[real]  # [n_real, D]
    return (d ** 2).mean()


def _reference_mse(student_hidden, teacher_hidden, mask, teacher_layers, W, b, hidden_index=None):
    """``mse[t][s]``: masked MSE between teacher layer t and W·(student layer s) + b, in float64."""
    W = W.double()
    if hidden_index is not None:
        W = W[:, hidden_index]
    mapped = [h.double() @ W.T + b.double() for h in student_hidden]
    return {t: [_masked_mse(teacher_hidden[t], m, mask) for m in mapped] for t in teacher_layers}


def _reference_match(mse, alive, teacher_layers):
    """Brute-force DESIGN §4 rule: teacher layers from the top down, each matched to the alive
    student layer strictly below the previous match with the smallest MSE; no candidate → None.
    Returns the sum of the matched MSEs and the match per teacher layer (ascending)."""
    match = {}
    upper = len(alive)
    for t in sorted(teacher_layers, reverse=True):
        errs = {s: float(mse[t][s].detach()) for s in range(upper) if alive[s]}
        if not errs:
            match[t] = None
            continue
        best = min(errs, key=errs.get)
        # keep the reference meaningful: the winner is clear of float32 rounding
        others = sorted(errs.values())
        if len(others) > 1:
            assert others[1] - others[0] > 1e-4 * others[0], "near tie in the test inputs; change SEED"
        match[t] = best
        upper = best
    loss = sum((mse[t][s] for t, s in match.items() if s is not None), torch.zeros((), dtype=torch.float64))
    return loss, [match[t] for t in sorted(teacher_layers)]


def _reference(student_hidden, teacher_hidden, mask, alive, teacher_layers, W, b, hidden_index=None):
    mse = _reference_mse(student_hidden, teacher_hidden, mask, teacher_layers, W, b, hidden_index)
    return _reference_match(mse, alive, teacher_layers)


def _hidden_states(g, B, T, D, n_student, n_teacher):
    """Teacher states plus student states that each resemble a random teacher layer (so that the
    matching has real choices to make), with different noise levels."""
    teacher = [torch.randn(B, T, D, generator=g) * (1 + 0.2 * i) for i in range(n_teacher)]
    student = []
    for _ in range(n_student):
        src = int(torch.randint(0, n_teacher, (1,), generator=g))
        noise = 0.3 + 1.5 * float(torch.rand(1, generator=g))
        student.append(teacher[src] + noise * torch.randn(B, T, D, generator=g))
    return student, teacher


def _mask(g, B, T):
    lengths = torch.randint(2, T, (B,), generator=g)  # every row but the first has padding
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    assert (mask == 0).any()
    return mask


def _randomize_transform(dist: LayerDistiller, g: torch.Generator, scale: float = 0.2):
    D = dist.transform.weight.shape[0]
    with torch.no_grad():
        dist.transform.weight.copy_(torch.eye(D) + scale * torch.randn(D, D, generator=g))
        dist.transform.bias.copy_(0.1 * torch.randn(D, generator=g))


# ---------------------------------------------------------------------- layer distillation


def test_transform_starts_as_identity():
    d = LayerDistiller(24, 12)
    assert d.teacher_layers == [2, 5, 8, 11]
    assert torch.equal(d.transform.weight, torch.eye(24))
    assert torch.equal(d.transform.bias, torch.zeros(24))
    x = torch.randn(3, 24, generator=_gen(7))
    torch.testing.assert_close(d.transform(x), x, rtol=0, atol=0)
    assert {n for n, _ in d.named_parameters()} == {"transform.weight", "transform.bias"}


def test_explicit_teacher_layers_are_sorted_and_deduplicated():
    d = LayerDistiller(8, 6, teacher_layers=[5, 1, 3, 1])
    assert d.teacher_layers == [1, 3, 5]


def _alive_patterns(g, n_student):
    pats = [
        [True] * n_student,
        [False] * n_student,
        [i == n_student - 1 for i in range(n_student)],  # only the top layer: one match, the rest None
        [i == 0 for i in range(n_student)],
    ]
    for _ in range(6):
        pats.append([bool(v) for v in (torch.rand(n_student, generator=g) < 0.6).tolist()])
    return pats


@pytest.mark.parametrize("n_student, n_teacher, teacher_layers, random_w", [
    (6, 12, None, False),
    (6, 12, None, True),
    (12, 12, None, True),
    (4, 6, [0, 2, 3, 5], True),
    (3, 12, [2, 5, 8, 11], False),  # more teacher layers than student layers
])
def test_matching_and_loss_equal_brute_force(n_student, n_teacher, teacher_layers, random_w):
    g = _gen(100 + n_student * 13 + n_teacher + int(random_w))
    B, T, D = 3, 7, 16
    student, teacher = _hidden_states(g, B, T, D, n_student, n_teacher)
    mask = _mask(g, B, T)
    dist = LayerDistiller(D, n_teacher, teacher_layers)
    if random_w:
        _randomize_transform(dist, g)
    mse = _reference_mse(student, teacher, mask, dist.teacher_layers,
                         dist.transform.weight.detach(), dist.transform.bias.detach())
    saw_none = saw_reorder = False
    for alive in _alive_patterns(g, n_student):
        loss, match = dist(student, teacher, mask, alive)
        ref_loss, ref_match = _reference_match(mse, alive, dist.teacher_layers)
        assert match == ref_match, (alive, match, ref_match)
        assert loss.dim() == 0
        assert loss.item() == pytest.approx(float(ref_loss), rel=1e-5, abs=1e-7), alive
        if not any(alive):
            assert match == [None] * len(dist.teacher_layers) and loss.item() == 0.0
        saw_none |= None in match and any(alive)
        matched = [s for s in match if s is not None]
        assert matched == sorted(set(matched))  # strictly increasing with the teacher layer
        assert all(alive[s] for s in matched)
        saw_reorder |= len(matched) > 1
    assert saw_none and saw_reorder


def test_matching_constraint_overrides_the_closest_layer():
    # Every teacher layer is closest to student layer 3; the top teacher layer takes it and the
    # lower ones must take layers strictly below it, each the closest of what is left.
    g = _gen(8)
    B, T, D = 2, 5, 8
    base = torch.randn(B, T, D, generator=g)
    teacher = [base + 0.01 * k * torch.randn(B, T, D, generator=g) for k in range(6)]
    noise = {0: 3.0, 1: 1.0, 2: 2.0, 3: 0.1, 4: 5.0}
    student = [base + noise[s] * torch.randn(B, T, D, generator=g) for s in range(5)]
    mask = torch.ones(B, T, dtype=torch.long)
    dist = LayerDistiller(D, 6, teacher_layers=[1, 3, 4, 5])
    loss, match = dist(student, teacher, mask)
    # 5 -> 3 (closest overall), 4 -> 1 (closest below 3), 3 -> 0 (only one below 1), 1 -> None
    assert match == [None, 0, 1, 3]
    ref_loss, ref_match = _reference(student, teacher, mask, [True] * 5, [1, 3, 4, 5], torch.eye(D), torch.zeros(D))
    assert ref_match == match
    assert loss.item() == pytest.approx(float(ref_loss), rel=1e-5)
    # a dead layer 1 changes the second match to the next closest below 3
    loss2, match2 = dist(student, teacher, mask, alive=[True, False, True, True, True])
    assert match2 == [None, 0, 2, 3]


def test_padding_positions_do_not_change_the_loss():
    g = _gen(9)
    B, T, D = 4, 9, 12
    student, teacher = _hidden_states(g, B, T, D, 6, 12)
    mask = _mask(g, B, T)
    dist = LayerDistiller(D, 12)
    _randomize_transform(dist, g)
    loss, match = dist(student, teacher, mask)
    pad = (mask == 0)[..., None]
    student2 = [torch.where(pad, 50 * torch.randn(B, T, D, generator=g), h) for h in student]
    teacher2 = [torch.where(pad, -40 * torch.randn(B, T, D, generator=g), h) for h in teacher]
    loss2, match2 = dist(student2, teacher2, mask)
    assert match2 == match
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    # the same change on a real token does change it
    student3 = [h.clone() for h in student]
    for h in student3:
        h[0, 0] += 5.0
    assert dist(student3, teacher, mask)[0].item() != pytest.approx(loss.item(), rel=1e-3)
    # a bool or float mask means the same
    for m in (mask.bool(), mask.float()):
        assert dist(student, teacher, m)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_hidden_index_equals_full_width_student_with_zeros():
    g = _gen(10)
    B, T, D = 3, 6, 16
    student_full, teacher = _hidden_states(g, B, T, D, 6, 12)
    mask = _mask(g, B, T)
    keep = torch.sort(torch.randperm(D, generator=g)[:10]).values
    dist = LayerDistiller(D, 12)
    _randomize_transform(dist, g)
    student_small = [h[..., keep].contiguous() for h in student_full]
    student_zeroed = []
    for h in student_small:
        z = torch.zeros(B, T, D)
        z[..., keep] = h
        student_zeroed.append(z)
    for alive in ([True] * 6, [True, False, True, True, False, True]):
        loss_small, match_small = dist(student_small, teacher, mask, alive, hidden_index=keep)
        loss_full, match_full = dist(student_zeroed, teacher, mask, alive)
        assert match_small == match_full
        assert loss_small.item() == pytest.approx(loss_full.item(), rel=1e-5)
        ref_loss, ref_match = _reference(student_small, teacher, mask, alive, dist.teacher_layers,
                                         dist.transform.weight.detach(), dist.transform.bias.detach(),
                                         hidden_index=keep)
        assert match_small == ref_match
        assert loss_small.item() == pytest.approx(float(ref_loss), rel=1e-5)


def test_gradients_reach_student_states_and_transform():
    g = _gen(11)
    B, T, D = 2, 6, 8
    student, teacher = _hidden_states(g, B, T, D, 5, 12)
    student = [h.clone().requires_grad_() for h in student]
    mask = _mask(g, B, T)
    dist = LayerDistiller(D, 12)
    _randomize_transform(dist, g)
    alive = [True, True, False, True, True]
    loss, match = dist(student, teacher, mask, alive)
    loss.backward()
    matched = {s for s in match if s is not None}
    assert matched
    for s, h in enumerate(student):
        if s in matched:
            assert h.grad is not None and h.grad.abs().sum() > 0
            # padding positions get no gradient
            assert (h.grad[mask == 0] == 0).all()
        else:
            assert h.grad is None or (h.grad == 0).all()
    # compare with float64 autograd of the reference loss under the same matching
    W = dist.transform.weight.detach().double().requires_grad_()
    b = dist.transform.bias.detach().double().requires_grad_()
    sd = [h.detach().double().requires_grad_() for h in student]
    ref_loss, ref_match = _reference(sd, teacher, mask, alive, dist.teacher_layers, W, b)
    assert ref_match == match
    ref_loss.backward()
    torch.testing.assert_close(dist.transform.weight.grad.double(), W.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dist.transform.bias.grad.double(), b.grad, rtol=1e-4, atol=1e-6)
    for h, r in zip(student, sd):
        got = torch.zeros_like(r) if h.grad is None else h.grad.double()
        want = torch.zeros_like(r) if r.grad is None else r.grad
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_no_alive_layer_gives_zero_loss_that_backpropagates():
    g = _gen(12)
    student, teacher = _hidden_states(g, 2, 4, 8, 3, 6)
    student = [h.requires_grad_() for h in student]
    dist = LayerDistiller(8, 6)
    loss, match = dist(student, teacher, torch.ones(2, 4), alive=[False] * 3)
    assert match == [None] * len(dist.teacher_layers)
    assert loss.item() == 0.0
    loss.backward()  # must not raise
    assert dist.transform.weight.grad is not None and (dist.transform.weight.grad == 0).all()


@pytest.mark.parametrize("layers", [[], [12], [-1], [2, 5, 12], [0, -3]])
def test_bad_teacher_layers(layers):
    with pytest.raises(ValueError, match="teacher_layers"):
        LayerDistiller(8, 12, teacher_layers=layers)


def test_zero_teacher_layers_count():
    with pytest.raises(ValueError):
        LayerDistiller(8, 0)


def test_default_matches_default_teacher_layers():
    for n in (1, 2, 3, 6, 12, 24):
        assert LayerDistiller(4, n).teacher_layers == default_teacher_layers(n)
    # any valid subset is accepted as given
    for pair in itertools.combinations(range(4), 2):
        assert LayerDistiller(4, 4, teacher_layers=pair).teacher_layers == list(pair)
