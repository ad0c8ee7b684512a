"""End-to-end serving on a CUDA GPU: the issue's GPU targets and the varlen attention choice. GPU only.

Groups (one pytest-benchmark group each; speed-up = the baseline's median / the row's):

- ``s95 · 128x128 bf16``: the BERT-base s95 profile (benchmarks/profiles.json) with
  random weights at batch 128 x 128 tokens, every token real, bf16. Rows: ``dense HF``
  (``BertForSequenceClassification`` of the unpruned BERT-base shape, sdpa, bf16;
  the baseline: the issue aims at >= 15x), ``reference`` (``PrunedModel`` plain
  forward, bf16), ``engine`` (``load_for_inference``'s form on CUDA: the aligned copy,
  packed tokens, Triton varlen attention), ``engine unaligned`` and ``engine + CUDA
  graphs`` (serving.GraphedPrunedModel with batch buckets up to 128).
- ``s95 · 1x128 <dtype>`` for fp32 and bf16: latency of one 128-token request.
  Rows: ``reference`` (the baseline: the issue aims at >= 3x), ``engine``, ``engine +
  CUDA graphs`` (serving.GraphedPrunedModel over the aligned copy), ``dense HF``.
- ``varlen attention · <workload>``: the op alone, 4 heads of 64, bf16, on 128 x 128
  tokens and on 128 texts of realistic lengths (log-normal, median 80, up to 128;
  about 40% padding), every query and first query only. Rows: ``triton`` (what
  ``auto`` picks on CUDA, unmeasured until this runs), ``sdpa padded`` (scatter the
  packed rows to ``[B, H, T, D]``, ``F.scaled_dot_product_attention`` with a key
  padding mask, gather back: what a padded SDPA path costs; the baseline) and
  ``reference`` (the per-sequence loop of ops.reference).

Every call is timed with its ``torch.cuda.synchronize()`` (wall time of a request),
after warm-up calls outside the timing (Triton compiles, graphs capture). Every
row's output is compared with the reference's: fp32 rows within 1e-4 of the logit
scale (asserted); bf16 rows record ``max_abs_diff`` / ``rel_err`` in extra_info.

    python -m pytest benchmarks/test_bench_serving_gpu.py --benchmark-group-by=group

Run by ``benchmarks/gpu_check.py`` (its summary table: ``serving_gpu_gpu_check_<device>.md``).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark")]

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20240611
VOCAB = 30522
SEQ = 128
FP32_TOL = 1e-4
ROUNDS = {"fast": 30, "slow": 10}


def _profile(name: str) -> dict:
    with open(os.path.join(HERE, "profiles.json")) as fh:
        return json.load(fh)[name]


def _s95():
    from cofi_kernels.models.shapes import shaped_model

    p = _profile("s95")
    return shaped_model([h or None for h in p["heads"]], [w or None for w in p["ffn"]], p["hidden"], num_labels=2,
                        head_dim=64, original_hidden_size=768, original_num_heads=12,
                        original_intermediate_size=3072, vocab_size=VOCAB,
                        generator=torch.Generator().manual_seed(SEED))


def _dense_hf(dtype):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, num_labels=2, attn_implementation="sdpa")
    torch.manual_seed(SEED)
    return BertForSequenceClassification(config).eval().to("cuda", dtype)


def _inputs(batch: int, lengths: list[int] | None = None):
    g = torch.Generator().manual_seed(SEED + batch)
    lengths = torch.tensor(lengths or [SEQ] * batch)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, VOCAB, (batch, SEQ), generator=g) * mask
    return [t.cuda() for t in (ids, mask, torch.zeros_like(ids))]


def realistic_lengths(batch: int) -> list[int]:
    g = torch.Generator().manual_seed(SEED)
    lengths = torch.exp(math.log(80.0) + 0.5 * torch.randn(batch, generator=g)).round().clamp(8, SEQ).long()
    lengths[int(lengths.argmax())] = SEQ
    return lengths.tolist()


def _synced(fn):
    def call(*args):
        with torch.inference_mode():
            out = fn(*args)
        torch.cuda.synchronize()
        return out

    return call


class _Models:
    """The served forms, built once per module and dtype."""

    def __init__(self):
        self._cache = {}

    def get(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def pruned(self, dtype):
        return self.get(("pruned", dtype), lambda: _s95().to("cuda", dtype))

    def aligned(self, dtype):
        from cofi_kernels.serving import aligned_copy

        return self.get(("aligned", dtype), lambda: aligned_copy(_s95(), 8).to("cuda", dtype))

    def graphed(self, dtype):
        from cofi_kernels.serving import GraphedPrunedModel

        # Batch buckets up to 128 (the library's default stops at 32) so that 128 x 128 replays a graph too.
        return self.get(("graphed", dtype), lambda: GraphedPrunedModel(self.aligned(dtype),
                                                                       batch_buckets=(1, 2, 4, 8, 16, 32, 64, 128)))

    def dense(self, dtype):
        return self.get(("dense", dtype), lambda: _dense_hf(dtype))


@pytest.fixture(scope="module")
def models():
    return _Models()


def _row(models: _Models, row: str, dtype):
    if row == "dense HF":
        dense = models.dense(dtype)
        return lambda i, m, t: dense(input_ids=i, attention_mask=m, token_type_ids=t).logits
    if row == "reference":
        return lambda i, m, t: models.pruned(dtype)(i, m, t, backend="reference")
    if row == "engine":
        return lambda i, m, t: models.aligned(dtype)(i, m, t, backend="engine")
    if row == "engine unaligned":
        return lambda i, m, t: models.pruned(dtype)(i, m, t, backend="engine")
    if row == "engine + CUDA graphs":
        graphed = models.graphed(dtype)
        return lambda i, m, t: graphed(i, m, t)
    raise ValueError(row)


def _run(benchmark, models, group, row, dtype, inputs, baseline, **info):
    call = _synced(_row(models, row, dtype))
    logits = call(*inputs)  # builds, compiles, captures
    for _ in range(3):
        call(*inputs)
    extra = benchmark.extra_info
    if row != "dense HF":
        ref = _synced(_row(models, "reference", dtype))(*inputs).float()
        diff = float((logits.float() - ref).abs().max())
        extra.update(max_abs_diff=diff, rel_err=float((logits.float() - ref).norm() / ref.norm()))
        if dtype == torch.float32:
            assert diff <= FP32_TOL * float(ref.abs().max()), f"{row}: logits differ by {diff:.3g}"
    benchmark.group = group
    extra.update(suite="serving_gpu", device="cuda", variant=row, baseline=row == baseline,
                 dtype=str(dtype).removeprefix("torch."), **info)
    rounds = ROUNDS["slow"] if row in ("dense HF", "reference") and inputs[0].shape[0] > 1 else ROUNDS["fast"]
    benchmark.pedantic(call, args=tuple(inputs), warmup_rounds=0, rounds=rounds, iterations=1)


@pytest.mark.parametrize("row", ["dense HF", "reference", "engine", "engine unaligned", "engine + CUDA graphs"])
def test_s95_128x128_bf16(benchmark, models, row):
    _run(benchmark, models, "s95 · 128x128 bf16", row, torch.bfloat16, _inputs(128), "dense HF",
         batch=128, seq=SEQ, aim="engine >= 15x over dense HF")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("row", ["reference", "engine", "engine + CUDA graphs", "dense HF"])
def test_s95_1x128_latency(benchmark, models, row, dtype):
    name = str(dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")
    _run(benchmark, models, f"s95 · 1x128 {name}", row, dtype, _inputs(1), "reference",
         batch=1, seq=SEQ, aim="engine + CUDA graphs >= 3x over the reference")


# --------------------------------------------------------------------------------- the op alone

HEADS, HEAD_DIM = 4, 64


def _sdpa_padded(qkv, cu, heads, head_dim, first_only, batch, seq, rows, positions):
    """Packed rows → padded [B, H, T, D] → SDPA with a key padding mask → packed rows again."""
    padded = qkv.new_zeros(batch * seq, qkv.shape[1])
    padded[rows] = qkv
    q, k, v = padded.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    keep = positions[None, :] < (cu[1:] - cu[:-1])[:, None]
    if first_only:
        q = q[:, :, :1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
    return out[:, 0] if first_only else out.reshape(batch * seq, -1)[rows]


@pytest.mark.parametrize("first_only", [False, True], ids=["every query", "first query"])
@pytest.mark.parametrize("workload", ["128x128", "128 realistic"])
@pytest.mark.parametrize("row", ["triton", "sdpa padded", "reference"])
def test_varlen_attention(benchmark, row, workload, first_only):
    from cofi_kernels import functional
    from cofi_kernels.ops import reference

    lengths = [SEQ] * 128 if workload == "128x128" else realistic_lengths(128)
    batch = len(lengths)
    lens = torch.tensor(lengths, device="cuda")
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
    positions = torch.arange(SEQ, device="cuda")
    rows = ((torch.arange(batch, device="cuda")[:, None] * SEQ + positions[None, :])
            [positions[None, :] < lens[:, None]])
    torch.manual_seed(SEED)
    qkv = torch.randn(int(cu[-1]), 3 * HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    scale = HEAD_DIM**-0.5
    fns = {
        "triton": lambda: functional.varlen_attention(qkv, cu, HEADS, HEAD_DIM, first_only=first_only,
                                                      backend="triton"),
        "sdpa padded": lambda: _sdpa_padded(qkv, cu, HEADS, HEAD_DIM, first_only, batch, SEQ, rows, positions),
        "reference": lambda: reference.varlen_attention(qkv, cu, HEADS, HEAD_DIM, scale, first_only),
    }
    call = _synced(fns[row])
    out = call()
    for _ in range(3):
        call()
    exact = reference.varlen_attention(qkv.double(), cu, HEADS, HEAD_DIM, scale, first_only)
    err = float((out.double() - exact).norm() / exact.norm())
    assert err < 2e-2, f"{row}: relative error {err:.3g}"
    real = sum(lengths)
    benchmark.group = f"varlen attention · {workload} · {'first query' if first_only else 'every query'}"
    benchmark.extra_info.update(suite="serving_gpu", device="cuda", variant=row, baseline=row == "sdpa padded",
                                rel_err=err, real_tokens=real, padding_fraction=round(1 - real / (batch * SEQ), 4),
                                heads=HEADS, head_dim=HEAD_DIM, dtype="bfloat16")
    benchmark.pedantic(call, warmup_rounds=0, rounds=ROUNDS["fast"] if row != "reference" else ROUNDS["slow"],
                       iterations=1)
