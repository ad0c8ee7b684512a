"""One CoFi training step on the CPU: live-only compute vs dense compute-then-multiply.

Model: BERT-base shapes (12 layers, 12 heads, hidden 768, FFN 3072) with random
weights, ``BertForSequenceClassification`` with 2 labels, every dropout set to
0 (so both variants run the same ops and draw no random numbers), batch
16 × 128 tokens of which the last rows are partly padding.

Gates: every log α is set to one value, found by bisection, so that
``gates.expected_sparsity()`` ≈ 0.9; one hard-concrete sample is drawn with a
fixed seed and fixed (``gates.fix``) as leaf tensors that require grad, so both
variants use the same z and still compute the gate gradients.

A step is forward + cross-entropy + backward (gradients set to None first).
The summary (medians, ratio, sparsity of the drawn sample) goes to
``benchmarks/results/cofi_step_cpu.md``; conftest.py adds its generic table
``cofi_step_cpu_<cpu>.md``.

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest benchmarks/test_bench_cofi_step.py``.
On a shared machine the passive wait policy matters: while another process
keeps a core busy, spinning OpenMP barriers made the live-only step (many
small parallel ops) up to 8x slower, the dense step about 2.5x.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from cofi_kernels.pruning.cofi.patch import apply_cofi, set_live_only

from conftest import RESULTS, device_name

BATCH, SEQ = 16, 128
TARGET_SPARSITY = 0.9
SEED = 1234
ROUNDS, WARMUP = 3, 1

_medians: dict[str, float] = {}
_paired_live: list[float] = []
_paired_dense: list[float] = []
_facts: dict[str, object] = {}


def _set_uniform_log_alpha(gates, target: float) -> float:
    """Bisect one common log α value so that the expected sparsity is ``target``."""
    lo, hi = -10.0, 10.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        with torch.no_grad():
            for p in gates.log_alpha.values():
                p.fill_(mid)
        # Sparsity falls as log α rises.
        with torch.no_grad():
            sparsity = float(gates.expected_sparsity())
        if sparsity > target:
            lo = mid
        else:
            hi = mid
    return mid


@pytest.fixture(scope="module")
def setup():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED)
    cfg = BertConfig(
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    model = BertForSequenceClassification(cfg).train()
    gates = apply_cofi(model)
    log_alpha = _set_uniform_log_alpha(gates, TARGET_SPARSITY)
    torch.manual_seed(SEED)
    z = {t: (None if v is None else v.detach().requires_grad_()) for t, v in gates.sample().items()}
    gates.fix(z)

    ids = torch.randint(1000, cfg.vocab_size, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    for b in range(BATCH // 2, BATCH):  # half the rows padded to random lengths
        mask[b, int(torch.randint(SEQ // 4, SEQ, ())):] = 0
    labels = torch.randint(0, 2, (BATCH,))

    live_heads = int(((z["head"] > 0) & (z["mha"] > 0)[:, None]).sum())
    live_units = int(((z["int"] > 0) & (z["ffn"] > 0)[:, None]).sum())
    _facts.update(
        log_alpha=log_alpha,
        expected=float(gates.expected_sparsity().detach()),
        realised=gates.realised_sparsity(z),
        mha=int((z["mha"] > 0).sum()),
        ffn=int((z["ffn"] > 0).sum()),
        heads=live_heads,
        units=live_units,
        hidden=int((z["hidden"] > 0).sum()),
        cfg=cfg,
    )
    yield model, gates, (ids, mask, labels)
    _write_summary()


def _step(model, gates, batch):
    ids, mask, labels = batch
    model.zero_grad(set_to_none=True)
    for v in gates.fixed.values():
        if v is not None:
            v.grad = None
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("variant", ["dense", "live_only"])
def test_cofi_train_step(benchmark, setup, variant):
    model, gates, batch = setup
    set_live_only(model, variant == "live_only")
    benchmark.group = "cofi_step_bert_base_16x128"
    # conftest.py also writes its generic table (suite cofi_step); the detailed
    # summary with the gate sample is ours.
    benchmark.extra_info.update(variant=variant, device="cpu", suite="cofi_step", baseline=variant == "dense")
    setup_fn = None
    if variant == "dense":
        # The machine is shared and its load drifts over minutes: before every
        # dense round, time one live-only step too (untimed by pytest-benchmark),
        # so the summary also has a ratio of interleaved, equally loaded pairs.
        def setup_fn():
            set_live_only(model, True)
            t0 = time.perf_counter()
            _step(model, gates, batch)
            _paired_live.append(time.perf_counter() - t0)
            set_live_only(model, False)

    loss = benchmark.pedantic(
        _step, args=(model, gates, batch), setup=setup_fn, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP
    )
    assert torch.isfinite(loss)
    _medians[variant] = benchmark.stats.stats.median
    if variant == "dense":
        _paired_dense.extend(benchmark.stats.stats.data)


def _env_prefix() -> str:
    policy = os.environ.get("OMP_WAIT_POLICY")
    return f"OMP_WAIT_POLICY={policy} " if policy else ""


def _write_summary() -> None:
    if set(_medians) != {"dense", "live_only"}:
        return
    f, cfg = _facts, _facts["cfg"]
    L, H, I, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_size
    dense, live = _medians["dense"], _medians["live_only"]
    lines = [
        f"# CoFi training step on {device_name('cpu')}",
        "",
        f"BertForSequenceClassification, BERT-base shapes, random weights, 2 labels, dropout 0; "
        f"batch {BATCH} x {SEQ} tokens (half the rows padded); one step = forward + cross-entropy + backward.",
        f"Gates: every log alpha = {f['log_alpha']:.4f} (expected sparsity {f['expected']:.4f}); one sample "
        f"drawn with seed {SEED} and fixed for both variants.",
        f"Drawn sample: realised sparsity {f['realised']:.4f}; live attention sublayers {f['mha']}/{L}, "
        f"live heads {f['heads']}/{L * H}, live FFN sublayers {f['ffn']}/{L}, live FFN units {f['units']}/{L * I}, "
        f"kept hidden dims {f['hidden']}/{D}. Live-only computes only these (heads, units, sublayers and hidden dims); "
        f"dense computes everything, multiplies by the gates and selects the residual for a dead sublayer.",
        f"Medians of {ROUNDS} rounds after {WARMUP} warm-up round(s), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; the machine is shared (1-min load average {os.getloadavg()[0]:.1f} "
        f"at the end), so times vary from run to run; the interleaved pairs below saw the same load.",
        "",
        "| variant | median (s) | speed-up vs dense |",
        "|---|---|---|",
        f"| dense compute-then-multiply | {dense:.3f} | 1.00x |",
        f"| live-only | {live:.3f} | {dense / live:.2f}x |",
        "",
    ]
    if _paired_dense and _paired_live:
        # The warm-up round's live step is in _paired_live too; pair the timed rounds only.
        pl, pd = _paired_live[-len(_paired_dense):], _paired_dense
        ratios = [d / l for d, l in zip(pd, pl)]
        lines += [
            f"Interleaved pairs (a live-only step timed just before each dense round, same load): "
            f"medians dense {statistics.median(pd):.3f} s, live-only {statistics.median(pl):.3f} s, "
            f"per-pair speed-ups {', '.join(f'{r:.2f}x' for r in ratios)} (median {statistics.median(ratios):.2f}x).",
            "",
        ]
    lines += [
        f"Command: `{_env_prefix()}.venv/bin/python -m pytest benchmarks/test_bench_cofi_step.py`",
    ]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "cofi_step_cpu.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
