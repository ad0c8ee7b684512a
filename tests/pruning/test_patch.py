"""apply_cofi on Hugging Face BERT / RoBERTa models: equivalence, CoFi semantics, live-only gradients, API."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cofi_kernels.pruning.cofi.patch import (
    apply_cofi,
    cofi_gates,
    is_cofi_patched,
    remove_cofi,
    set_live_only,
)
from cofi_kernels.pruning.cofi.gates import CoFiGates

from tests.cofi_model_ref import (
    cofi_reference_forward,
    cofi_reference_logits,
    encoder_of,
    minilm_model,
    padded_batch,
    random_gates,
    small_model,
)

IMPLS = ("eager", "sdpa")


def _seed() -> int:
    # Inputs and gates follow the per-test torch seed printed by conftest.
    return int(torch.randint(0, 2**31 - 1, ()))


def _small(kind, classifier, impl, **kw):
    model = small_model(kind, classifier, seed=_seed(), **kw)
    model.set_attn_implementation(impl)
    return model


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (b is the expected value)."""
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _padded_row_error(t: torch.Tensor, exact: torch.Tensor) -> float:
    """The Frobenius norm of the difference: on ill-conditioned rows the max-abs error of one fp32
    run against another scatters by 2x from seed to seed; the norm is steadier."""
    assert torch.isfinite(t).all()
    return float((t.double() - exact.double()).norm())


# Extra draws of fp32 rounding noise where one run can be lucky: few for MiniLM's hidden states (norms
# over many rows scatter little; each draw copies 22M weights), more for a single gate gradient.
MOVED_RUNS_MINILM = 4
MOVED_RUNS = 16


def _fp32_noise_of_moved_weights(model, ids, run, rows):
    """Per hidden state, the worst fp32-vs-float64 error on `rows` of MOVED_RUNS_MINILM copies of the plain
    HF `model` whose weights are moved by one ulp (up or down at random; exact zeros stay), each
    against the float64 of its own moved weights: more draws of HF's fp32 rounding noise."""
    worst, gen = None, torch.Generator().manual_seed(_seed())
    for k in range(MOVED_RUNS_MINILM):
        moved = _moved_one_ulp(model, gen)
        moved.set_attn_implementation(IMPLS[k % len(IMPLS)])
        with torch.no_grad():
            fp32 = moved(ids, **run).hidden_states
            fp64 = moved.double()(ids, **run).hidden_states
        errs = [_padded_row_error(a[rows], b[rows]) for a, b in zip(fp32, fp64)]
        worst = errs if worst is None else [max(a, b) for a, b in zip(worst, errs)]
    return worst


def _main_output(out, classifier):
    return out.logits if classifier else out.last_hidden_state


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


# ----------------------------------------------------------- all gates 1 == HF


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("how", ["fix_ones", "deterministic_large_log_alpha"])
def test_minilm_all_gates_one_matches_hf(impl, how):
    model = minilm_model()
    exact = copy.deepcopy(model).double()
    hf_paths = {}
    for path in IMPLS:
        hf_paths[path] = copy.deepcopy(model)
        hf_paths[path].set_attn_implementation(path)
    model.set_attn_implementation(impl)
    gates = apply_cofi(model)
    if how == "fix_ones":
        gates.fix(gates.ones())
    else:
        with torch.no_grad():
            for p in gates.log_alpha.values():
                p.fill_(100.0)  # soft value sigmoid(100/β·0.8) rounds to exactly 1 in fp32
    ids, mask, types = padded_batch(model, batch=4, seq=19, seed=_seed())
    run = dict(attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    with torch.no_grad():
        got = model(ids, **run)
        hf_out = {path: m(ids, **run) for path, m in hf_paths.items()}
        ref64 = exact(ids, **run)
    want = hf_out[impl]
    assert _max_rel(got.pooler_output, want.pooler_output) <= 1e-5
    assert len(got.hidden_states) == len(want.hidden_states) == model.config.num_hidden_layers + 1
    real = mask.bool()
    assert (~real).any()
    moved_noise = None
    for i, (g, w, r) in enumerate(zip(got.hidden_states, want.hidden_states, ref64.hidden_states)):
        # Real tokens: within 1e-5 of HF in fp32.
        assert _max_rel(g[real], w[real]) <= 1e-5, i
        # Padded query rows are ill-conditioned in fp32 (HF itself is off by up to ~1e-4
        # there): DESIGN §6's rule against float64 instead, with the larger error of HF's
        # eager and sdpa paths (both plain fp32 PyTorch) as PyTorch's.
        err = _padded_row_error(g[~real], r[~real])
        bar = max(_padded_row_error(out.hidden_states[i][~real], r[~real]) for out in hf_out.values())
        if err > 2 * bar:
            # Both HF runs can be lucky draws of fp32 noise (ratio 2.11 at seed 1463900764, 2.36 at
            # 289949102; ~1.2 typical): the worst of them and MOVED_RUNS_MINILM runs, weights one ulp away.
            if moved_noise is None:
                moved_noise = _fp32_noise_of_moved_weights(hf_paths["eager"], ids, run, ~real)
            bar = max(bar, moved_noise[i])
        assert err <= 2 * bar, f"hidden state {i}: padded-row error {err:.3g} > 2 x fp32 PyTorch's {bar:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("classifier", [False, True], ids=["base", "seqcls"])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_small_all_gates_one_matches_hf(kind, classifier, impl):
    model = _small(kind, classifier, impl)
    hf = copy.deepcopy(model)
    gates = apply_cofi(model)
    gates.fix(gates.ones())
    ids, mask, types = padded_batch(model, batch=3, seq=13, seed=_seed())
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types)
        got = model(ids, attention_mask=mask, token_type_ids=types)
        # no attention_mask at all (sdpa then gets no mask from HF)
        want_nomask = hf(ids, token_type_ids=types)
        got_nomask = model(ids, token_type_ids=types)
    assert _max_rel(_main_output(got, classifier), _main_output(want, classifier)) <= 1e-5
    assert _max_rel(_main_output(got_nomask, classifier), _main_output(want_nomask, classifier)) <= 1e-5


# ------------------------------------------------- random gates == independent reference


def _hard_gates(cfg, seed):
    """Random soft gates with exact zeros, plus every special case of DESIGN §4 in 4 layers."""
    z = random_gates(cfg, seed=seed, p_zero=0.3, soft=True)
    z["mha"] = torch.tensor([0.7, 0.9, 0.0, 1.0])  # layer 2: dead attention sublayer
    z["ffn"] = torch.tensor([0.0, 0.6, 1.0, 0.8])  # layer 0: dead FFN sublayer
    z["head"][1] = 0.0  # layer 1: live attention gate, no live head (bias + LayerNorm only)
    z["int"][3] = 0.0  # layer 3: live FFN gate, no live unit
    z["head"][3] = torch.linspace(0.3, 1.0, cfg.num_attention_heads)  # soft, all live
    z["hidden"][:2] = 0.0  # pruned hidden dims (at least two)
    z["hidden"][2] = 0.5
    return z


@pytest.mark.parametrize("live_only", [True, False], ids=["live", "dense"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("classifier", [False, True], ids=["base", "seqcls"])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_random_gates_match_reference(kind, classifier, impl, live_only):
    model = _small(kind, classifier, impl, layers=4)
    plain = copy.deepcopy(model)
    gates = apply_cofi(model, live_only=live_only)
    z = _hard_gates(encoder_of(model).config, _seed())
    gates.fix(z)
    ids, mask, types = padded_batch(model, batch=3, seq=13, seed=_seed())
    with torch.no_grad():
        out = model(ids, attention_mask=mask, token_type_ids=types)
    if classifier:
        want = cofi_reference_logits(plain, z, ids, mask, types)
        assert _max_rel(out.logits, want) <= 1e-5
        hidden = model.base_model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    else:
        hidden = out.last_hidden_state
    want_h = cofi_reference_forward(plain, z, ids, mask, types)
    assert _max_rel(hidden, want_h) <= 1e-5
    assert (hidden[..., :2] == 0).all()  # pruned hidden dims come out exactly 0


def test_minilm_random_gates_match_reference():
    model = minilm_model()
    plain = copy.deepcopy(model)
    gates = apply_cofi(model)
    cfg = model.config
    z = random_gates(cfg, seed=_seed(), p_zero=0.4)
    z["mha"][1] = 0.0
    z["ffn"][4] = 0.0
    z["head"][2] = 0.0
    z["int"][5] = 0.0
    gates.fix(z)
    ids, mask, types = padded_batch(model, batch=3, seq=17, seed=_seed())
    with torch.no_grad():
        got = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert _max_rel(got, cofi_reference_forward(plain, z, ids, mask, types)) <= 1e-5


# ----------------------------------------------------- live-only == dense, with gradients


def _sparse_log_alpha(gates, gen):
    """log α spread so samples have many exact zeros, with sure-dead sublayers, heads and units."""
    with torch.no_grad():
        for t, p in gates.log_alpha.items():
            p.copy_(torch.empty(p.shape).uniform_(-2.0, 3.0, generator=gen))
        la = gates.log_alpha
        la["mha"][1] = -30.0  # P(z > 0) ~ 1e-13: dead attention sublayer
        la["ffn"][2] = -30.0  # dead FFN sublayer
        la["mha"][0] = la["ffn"][3] = la["ffn"][0] = la["mha"][3] = 30.0
        la["head"][0] = -30.0  # layer 0: attention gate live, no head
        la["head"][3, 0] = 30.0
        la["int"][3] = -30.0  # layer 3: FFN gate live, no unit
        la["int"][0, 0] = 30.0
        la["hidden"][0] = -30.0  # a dead hidden dim in every sample


def _train_step_grads(model, gates, batch, seed, classifier):
    ids, mask, types = batch
    model.zero_grad(set_to_none=True)
    gates.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    proj = torch.linspace(-1, 1, out.hidden_states[-1].shape[-1])
    loss = (out.hidden_states[-1] * proj).square().mean()
    if classifier:
        loss = loss + out.logits.square().sum()
    loss.backward()
    grads = {f"model.{n}": p.grad for n, p in model.named_parameters()}
    grads.update({f"log_alpha.{t}": p.grad for t, p in gates.log_alpha.items()})
    return _main_output(out, classifier).detach(), grads


def _replayed_sample(gates, seed, log_alpha):
    """gates.sample() after torch.manual_seed(seed), as a function of `log_alpha` (its documented
    formula, u drawn as sample() draws it): the same gates in float64, with their graph to log α."""
    torch.manual_seed(seed)
    z = dict.fromkeys(gates.shapes)
    for t in gates.learn:
        u = torch.empty_like(gates.log_alpha[t]).uniform_(gates.eps, 1.0 - gates.eps).to(log_alpha[t].dtype)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha[t]) / gates.temperature)
        z[t] = (s * (gates.limit_r - gates.limit_l) + gates.limit_l).clamp(0.0, 1.0)
    return z


def _moved_one_ulp(model, gen):
    """A copy of `model` with every nonzero weight moved one ulp, up or down at random (`gen`)."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            inf = torch.full_like(p, float("inf"))
            up = torch.rand(p.shape, generator=gen) < 0.5
            p.copy_(torch.where(p == 0, p, torch.where(up, torch.nextafter(p, inf), torch.nextafter(p, -inf))))
    return moved


def _dense_fp32_noise(pristine, batch, seed, classifier):
    """DESIGN §6's bar for the log α gradients: the dense (gate-multiplying) fp32 path's error against
    float64 (the same model and samples in float64), the worst of the model as given and MOVED_RUNS
    copies with weights moved one ulp, each against its own float64; and the float64 gradients of
    the model as given. `pristine` is a copy of the patched model from before any forward."""
    worst, exact = {}, None
    gen = torch.Generator().manual_seed(_seed())  # the runs below reseed the global generator
    for k in range(1 + MOVED_RUNS):
        model = copy.deepcopy(pristine) if k == 0 else _moved_one_ulp(pristine, gen)
        gates = cofi_gates(model)
        m64 = copy.deepcopy(model).double()
        g64 = cofi_gates(m64).double()
        set_live_only(model, False)
        set_live_only(m64, False)
        _, g32 = _train_step_grads(model, gates, batch, seed, classifier)
        g64.fix(_replayed_sample(gates, seed, g64.log_alpha))
        _, g_exact = _train_step_grads(m64, g64, batch, seed, classifier)
        for n in g_exact:
            if n.startswith("log_alpha"):
                worst[n] = max(worst.get(n, 0.0), _max_rel(g32[n], g_exact[n]))
        exact = g_exact if k == 0 else exact
    return worst, exact


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,classifier", [("bert", True), ("roberta", False), ("roberta", True)])
def test_live_only_equals_dense_with_gradients(kind, classifier, impl):
    model = _no_dropout(_small(kind, classifier, impl, layers=4)).train()
    gates = apply_cofi(model)
    gen = torch.Generator().manual_seed(_seed())
    _sparse_log_alpha(gates, gen)
    pristine = copy.deepcopy(model)  # before any forward: a run leaves its gates' graph in the model
    batch = padded_batch(model, batch=3, seq=13, seed=_seed())
    seed = _seed()

    torch.manual_seed(seed)
    z = gates.sample()
    assert z["mha"][1] == 0 and z["ffn"][2] == 0 and (z["head"][0] == 0).all() and (z["int"][3] == 0).all()
    assert (z["int"] == 0).float().mean() > 0.1 and (z["hidden"] == 0).any()
    assert ((z["int"] > 0) & (z["int"] < 1)).any()  # soft values too

    set_live_only(model, True)
    out_live, g_live = _train_step_grads(model, gates, batch, seed, classifier)
    set_live_only(model, False)
    out_dense, g_dense = _train_step_grads(model, gates, batch, seed, classifier)

    assert _max_rel(out_live, out_dense) <= 1e-5
    assert g_live.keys() == g_dense.keys()
    noise = None  # (bar, float64 gradients) by name, computed when a gate gradient needs it
    for name in g_dense:
        a, b = g_live[name], g_dense[name]
        if b is None or not b.any():
            # Dead sublayers: dense gets exact zero gradients, live-only none or zeros.
            assert a is None or not a.any(), name
            continue
        assert a is not None, name
        if name.endswith("key.bias"):
            # 0 analytically (softmax ignores a per-row shift): only fp32 noise, so
            # it is held to the scale of the key weights' gradient instead.
            scale = float(g_dense[name[: -len("bias")] + "weight"].abs().max())
            assert float((a - b).abs().max()) <= 1e-5 * scale, name
            continue
        # A gate gradient is one sum over B·T·D products with cancellation: a long
        # reduction, held to DESIGN §6's 1e-4; every model parameter to 1e-5.
        if not name.startswith("log_alpha"):
            assert _max_rel(a, b) <= 1e-5, name
        elif _max_rel(a, b) > 1e-4:
            # A sum that cancels badly (seed 121: dense fp32 1e-6 off float64, up to 2.8e-4 with weights one
            # ulp away; live 1.7e-4): DESIGN §6's 2x the dense fp32 error, worst of 1 + MOVED_RUNS draws.
            if noise is None:
                replayed = _replayed_sample(gates, seed, gates.log_alpha)
                assert all(torch.equal(replayed[t], z[t]) for t in z if z[t] is not None), "replay of sample()"
                noise = _dense_fp32_noise(pristine, batch, seed, classifier)
            bar, exact = noise[0][name], noise[1][name]
            err = _max_rel(a, exact)
            assert err <= max(1e-4, 2 * bar), f"{name}: live-only error {err:.3g} > 2 x dense fp32's {bar:.3g}"
    # the sure-dead gates got no gradient, soft live ones did
    assert g_dense["log_alpha.mha"][1] == 0 and g_live["log_alpha.mha"][1] == 0
    assert not g_dense["log_alpha.int"][3].any() and not g_dense["log_alpha.head"][0].any()
    assert g_dense["log_alpha.int"].any() and g_dense["log_alpha.hidden"].any()
    soft_heads = (z["head"] > 0) & (z["head"] < 1)
    soft_heads &= (z["mha"] > 0)[:, None]
    assert bool(g_dense["log_alpha.head"].any()) == bool(soft_heads.any())


# ------------------------------------------------------------------------- API behaviour


def test_fix_unfix_and_train_vs_eval():
    model = small_model("bert", False, seed=_seed())
    gates = apply_cofi(model)
    with torch.no_grad():
        gates.log_alpha["int"].normal_(0.0, 2.0)
        gates.log_alpha["head"].normal_(1.0, 2.0)
    ids, mask, types = padded_batch(model, seed=_seed())

    def run():
        with torch.no_grad():
            return model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state

    model.eval()
    e1, e2 = run(), run()
    assert torch.equal(e1, e2)  # eval: deterministic gates
    gates.fix(gates.deterministic())
    assert gates.fixed is not None
    assert torch.equal(run(), e1)
    gates.fix(gates.ones())
    ones = run()
    assert not torch.allclose(ones, e1)
    gates.unfix()
    assert gates.fixed is None and torch.equal(run(), e1)

    model.train()  # dropout on: compare gates only, via the samples drawn
    seen = []
    real_current = gates.current
    gates.current = lambda training: seen.append(training) or real_current(training)
    try:
        _no_dropout(model)
        t1, t2 = run(), run()
    finally:
        del gates.current
    assert seen == [True, True]  # exactly one gate draw per forward, with the model's mode
    assert not torch.equal(t1, t2)  # a fresh sample each training step
    gates.fix(gates.ones())
    assert torch.equal(run(), ones)  # fixed gates win in training mode too


def test_current_called_once_per_forward_of_wrapper():
    model = small_model("roberta", True, seed=_seed())
    gates = apply_cofi(model)
    calls = []
    real_current = gates.current
    gates.current = lambda training: calls.append(training) or real_current(training)
    ids, mask, types = padded_batch(model, seed=_seed())
    with torch.no_grad():
        model(ids, attention_mask=mask, output_hidden_states=True)
    assert calls == [False]


def test_outputs_and_structure_preserved():
    from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

    model = small_model("bert", True, seed=_seed())
    keys = list(model.state_dict())
    n_params = len(list(model.parameters()))
    gates = apply_cofi(model)
    assert list(model.state_dict()) == keys
    assert len(list(model.parameters())) == n_params  # the gates are not a submodule
    assert all(p is not q for p in model.parameters() for q in gates.parameters())
    assert is_cofi_patched(model) and cofi_gates(model) is gates
    assert isinstance(model.bert.embeddings, BertEmbeddings)
    assert all(isinstance(layer, BertLayer) for layer in model.bert.encoder.layer)
    assert all(layer.attention.self.is_causal is False for layer in model.bert.encoder.layer)
    gates.fix(random_gates(model.config, seed=_seed()))
    ids, mask, types = padded_batch(model, seed=_seed())
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        tup = model(ids, attention_mask=mask, return_dict=False)
        base = model.bert(ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(base.hidden_states[-1], base.last_hidden_state)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.logits)


def test_remove_and_deepcopy():
    model = small_model("bert", False, seed=_seed())
    hf = copy.deepcopy(model)
    gates = apply_cofi(model)
    gates.fix(random_gates(model.config, seed=_seed()))
    ids, mask, types = padded_batch(model, seed=_seed())
    twin = copy.deepcopy(model)
    twin_gates = cofi_gates(twin)
    assert twin_gates is not gates
    twin_gates.fix(twin_gates.ones())
    with torch.no_grad():
        gated = model(ids, attention_mask=mask).last_hidden_state
        twin_out = twin(ids, attention_mask=mask).last_hidden_state
        plain = hf(ids, attention_mask=mask).last_hidden_state
        assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, gated)  # twin did not touch it
    assert _max_rel(twin_out, plain) <= 1e-5 and not torch.allclose(gated, plain)
    assert remove_cofi(model) is gates and not is_cofi_patched(model)
    assert type(model.encoder.layer[0]).__name__ == "BertLayer"
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, plain)
    apply_cofi(model, gates=gates)  # patch again after removal, with the same gates
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, gated)


def test_gradient_checkpointing_same_gradients():
    model = _no_dropout(small_model("bert", True, seed=_seed(), layers=4)).train()
    gates = apply_cofi(model)
    _sparse_log_alpha(gates, torch.Generator().manual_seed(_seed()))
    batch = padded_batch(model, seed=_seed())
    seed = _seed()
    _, plain = _train_step_grads(model, gates, batch, seed, True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, ckpt = _train_step_grads(model, gates, batch, seed, True)
    for name, g in plain.items():
        if g is None:
            assert ckpt[name] is None or not ckpt[name].any(), name
        else:
            assert torch.allclose(ckpt[name], g, rtol=1e-5, atol=1e-7), name


def test_errors():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
    with pytest.raises(TypeError, match=r"BertForMaskedLM.*BertModel.*RobertaForSequenceClassification"):
        apply_cofi(BertForMaskedLM(cfg))
    with pytest.raises(TypeError, match="Linear"):
        apply_cofi(nn.Linear(2, 2))

    model = small_model("bert", False, seed=_seed())
    wrong = CoFiGates(model.config.num_hidden_layers + 1, 4, 8, 48, 32)
    with pytest.raises(ValueError, match="do not match the model config"):
        apply_cofi(model, gates=wrong)
    assert not is_cofi_patched(model)
    with pytest.raises(ValueError, match="not both"):
        apply_cofi(model, gates=CoFiGates.from_config(model.config), droprate_init=0.3)
    with pytest.raises(ValueError, match="not patched"):
        cofi_gates(model)

    gates = apply_cofi(model, learn=("head", "int"))
    assert gates.learn == ("head", "int")
    with pytest.raises(ValueError, match="already patched"):
        apply_cofi(model)
    with pytest.raises(ValueError, match="wrong shape"):
        gates.fix({"head": torch.ones(2, 2)})
    ids, mask, _ = padded_batch(model, seed=_seed())
    gates.fix({"hidden": torch.full((32,), float("nan"))})
    with pytest.raises(ValueError, match="NaN"):
        model(ids, attention_mask=mask)
    gates.unfix()
    fresh = small_model("bert", False, seed=_seed())
    apply_cofi(fresh)
    with pytest.raises(RuntimeError, match="call the patched model"):
        fresh.encoder.layer[0](torch.zeros(1, 3, 32))

    decoder_cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=24, is_decoder=True)
    from transformers import BertModel

    with pytest.raises(ValueError, match="decoder"):
        apply_cofi(BertModel(decoder_cfg))
