"""End-to-end serving on the CPU: a pruned model's logits per batch, every way it can be served (DESIGN §7).

Models (random weights, fixed seeds):

- ``demo``: the shapes ``cofi demo`` prunes all-MiniLM-L6-v2 to (hidden 330 of 384,
  head size 32; heads [7, -, -, 2, 4, 4], FFN [-, -, -, 222, 263, 276], "-" = sublayer
  removed), 5 labels; its dense model is MiniLM-L6's shape (6 layers, 384, 12 heads, 1536).
- ``s60`` / ``s95``: the BERT-base profiles of ``benchmarks/profiles.json`` (a copy of
  ``../shared/bench/profiles.json``; 0 heads / 0 FFN units there = sublayer removed),
  2 labels; their dense model is BERT-base (12 layers, 768, 12 heads, 3072).

Workloads: ``1x128``, ``8x128``, ``32x128`` (every token real) and ``32 realistic``
(32 texts of lengths drawn log-normally between 8 and 128 from a fixed seed, the
longest 128, right-padded to 128: 47% of the positions are padding; the
exact fraction is in each benchmark's ``extra_info["padding_fraction"]``).

Rows, measured one after the other for each (model, workload), which is one
pytest-benchmark group; every row is fp32 unless it says otherwise, every call
under ``torch.inference_mode()``, torch's default thread count:

- ``dense HF``: ``transformers.BertForSequenceClassification`` of the unpruned
  shape (random init, ``attn_implementation="sdpa"``, eval);
- ``reference``: ``PrunedModel(..., backend="reference")``, the plain PyTorch forward
  over the padded batch (the baseline of the ratios);
- ``torch.compile``: ``torch.compile`` of that reference forward, default settings
  (compiled once per model; the first call of each shape, outside the timing,
  compiles: 1 x 128 static, then one graph with a dynamic batch axis, torch's
  automatic dynamic shapes);
- ``onnxruntime``: ONNX Runtime (CPU execution provider, intra-op threads = torch's)
  on ``PrunedModel.export_onnx``'s file (skipped, with the reason, without
  ``export_onnx``, ``onnx``/``onnxscript`` or ``onnxruntime``);
- ``engine fp32`` / ``engine bf16`` / ``engine int8``: ``backend="engine"`` (packed
  real tokens, one compiled call per layer) on the fp32 model, on
  ``model.to(torch.bfloat16)`` and on ``cofi_kernels.serving.quantize_int8(model)``.

Every row's logits are compared with the reference's on the same batch: fp32 rows
must agree to 1e-4 of the logit scale; the bf16 / int8 difference is recorded in
``extra_info["max_abs_diff"]``. Timing: ``benchmark.pedantic``, one call per round,
after one call that compiles / checks and one warm-up call whose time sets the
number of rounds (``TARGET_S`` of rounds, at least ``MIN_ROUNDS``, or ``MIN_ROUNDS_SLOW``
for rows of a second a call or more); medians.

Run (about 10 minutes on 2 cores; the dense BERT-base at 32 x 128 is the slowest row):

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest benchmarks/test_bench_serving.py --benchmark-group-by=group

or ``benchmarks/serving_report.py``, which runs this and writes the tables and
the issue's checks to ``benchmarks/results/serving_<cpu>.md``. Set
``OMP_WAIT_POLICY=PASSIVE`` on a shared machine: while another process keeps a
core busy, spinning OpenMP barriers slow the many small parallel ops of pruned
models several-fold (see test_bench_cofi_step.py). ``COFI_SERVING_QUICK=1``
(``serving_report.py --quick``) runs few rounds, for smoke runs. This module is
not part of the default ``pytest`` run (``testpaths = ["tests"]``) and is marked
``slow``.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from cofi_kernels.models.pruned_model import PrunedModel
from cofi_kernels.models.shapes import shaped_model

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
PROFILES = os.path.join(HERE, "profiles.json")
SEED = 20240611
SEQ = 128
VOCAB = 30522

QUICK = os.environ.get("COFI_SERVING_QUICK", "") not in ("", "0")
TARGET_S = 0.4 if QUICK else 2.0  # time per row spent in timed rounds (beyond the first two calls)
MIN_ROUNDS, MIN_ROUNDS_SLOW, MAX_ROUNDS = (2, 2, 5) if QUICK else (5, 3, 40)  # SLOW: rows of 1 s a call or more
FP32_TOL = 1e-4  # relative to the reference's largest |logit|

# ---------------------------------------------------------------------------------------- models


def _profile(name: str) -> dict:
    with open(PROFILES) as fh:
        return json.load(fh)[name]


def _bert_base_profile(name: str) -> dict:
    p = _profile(name)
    return dict(
        label=f"BERT-base {name} (sparsity {p['sparsity']:.2f}, hidden {p['hidden']})",
        heads=[h or None for h in p["heads"]], ffn=[w or None for w in p["ffn"]], hidden=p["hidden"],
        num_labels=2, head_dim=64, original=dict(hidden=768, heads=12, intermediate=3072),
    )


MODELS = {
    "demo": lambda: dict(
        label="cofi demo shapes (MiniLM-L6 pruned, hidden 330)",
        heads=[7, None, None, 2, 4, 4], ffn=[None, None, None, 222, 263, 276], hidden=330,
        num_labels=5, head_dim=32, original=dict(hidden=384, heads=12, intermediate=1536),
    ),
    "s60": lambda: _bert_base_profile("s60"),
    "s95": lambda: _bert_base_profile("s95"),
}


def _pruned(spec: dict) -> PrunedModel:
    """The pruned model of ``spec``, fp32, every weight drawn from a fixed seed (the same each call)."""
    o = spec["original"]
    return shaped_model(
        spec["heads"], spec["ffn"], spec["hidden"], num_labels=spec["num_labels"], head_dim=spec["head_dim"],
        original_hidden_size=o["hidden"], original_num_heads=o["heads"], original_intermediate_size=o["intermediate"],
        vocab_size=VOCAB, generator=torch.Generator().manual_seed(SEED),
    )


def _dense_hf(spec: dict):
    from transformers import BertConfig, BertForSequenceClassification

    o = spec["original"]
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=o["hidden"], num_hidden_layers=len(spec["heads"]),
        num_attention_heads=o["heads"], intermediate_size=o["intermediate"], num_labels=spec["num_labels"],
        attn_implementation="sdpa",
    )
    torch.manual_seed(SEED)
    return BertForSequenceClassification(config).eval()


# ---------------------------------------------------------------------------------------- workloads


def realistic_lengths(batch: int = 32, seq: int = SEQ) -> list[int]:
    """Text lengths from a fixed seed: log-normal (median 80 tokens, sigma 0.5), clipped to [8, seq], the longest = seq."""
    g = torch.Generator().manual_seed(SEED)
    lengths = torch.exp(math.log(80.0) + 0.5 * torch.randn(batch, generator=g)).round().clamp(8, seq).long()
    lengths[int(lengths.argmax())] = seq
    return lengths.tolist()


WORKLOADS = {
    "1x128": [SEQ],
    "8x128": [SEQ] * 8,
    "32x128": [SEQ] * 32,
    "32 realistic": realistic_lengths(),
}


def _inputs(workload: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, token_type_ids), int64 [B, 128], right-padded (pad id 0)."""
    lengths = torch.tensor(WORKLOADS[workload])
    g = torch.Generator().manual_seed(SEED + len(lengths))
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, VOCAB, (len(lengths), SEQ), generator=g) * mask
    return ids, mask, torch.zeros_like(ids)


def padding_fraction(workload: str) -> float:
    lengths = WORKLOADS[workload]
    return 1.0 - sum(lengths) / (len(lengths) * SEQ)


# ---------------------------------------------------------------------------------------- the served forms


class Served:
    """One model's served forms, each built on first use and kept for the module's tests of that model."""

    def __init__(self, key: str, tmp_dir):
        self.key, self.spec, self.tmp_dir = key, MODELS[key](), tmp_dir
        self.fp32 = _pruned(self.spec)
        self._cache: dict[str, object] = {}
        self._reference_logits: dict[str, torch.Tensor] = {}

    def _get(self, name, build):
        if name not in self._cache:
            try:
                self._cache[name] = build()
            except _Skip as exc:  # remembered, so that every workload skips at once with the same reason
                self._cache[name] = exc
        value = self._cache[name]
        if isinstance(value, _Skip):
            pytest.skip(str(value))
        return value

    def reference_logits(self, workload: str) -> torch.Tensor:
        if workload not in self._reference_logits:
            with torch.inference_mode():
                self._reference_logits[workload] = self.fp32(*_inputs(workload), backend="reference").float()
        return self._reference_logits[workload]

    def dense(self):
        return self._get("dense", lambda: _dense_hf(self.spec))

    def compiled(self):
        def build():
            model = self.fp32

            def reference_forward(input_ids, attention_mask, token_type_ids):
                return model(input_ids, attention_mask, token_type_ids, backend="reference")

            return torch.compile(reference_forward)

        return self._get("compiled", build)

    def onnx_session(self):
        return self._get("onnx", self._build_onnx)

    def _build_onnx(self):
        if not hasattr(PrunedModel, "export_onnx"):
            raise _Skip("PrunedModel.export_onnx is not available in this checkout")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise _Skip(f"onnxruntime is not installed ({exc}); pip install cofi-kernels[onnx]") from None
        path = os.path.join(str(self.tmp_dir), f"{self.key}.onnx")
        try:
            self.fp32.export_onnx(path)
        except ImportError as exc:
            raise _Skip(f"ONNX export unavailable: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a benchmark row, not the export's test: say why and skip
            raise _Skip(f"PrunedModel.export_onnx failed: {type(exc).__name__}: {exc}") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # ORT's threads spin after each run by default and would starve the torch rows measured next.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.inter_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def bf16(self):
        return self._get("bf16", lambda: _pruned(self.spec).to(torch.bfloat16))

    def int8(self):
        from cofi_kernels.serving import quantize_int8

        return self._get("int8", lambda: quantize_int8(_pruned(self.spec)))


class _Skip(Exception):
    pass


@pytest.fixture(scope="module", params=list(MODELS))
def served(request, tmp_path_factory):
    return Served(request.param, tmp_path_factory.mktemp(f"serving_{request.param}"))


# ---------------------------------------------------------------------------------------- rows


def _torch_call(fn):
    def call(inputs):
        with torch.inference_mode():
            return fn(*inputs)

    return call


def _row_callable(served: Served, row: str):
    """A function of the workload's (input_ids, attention_mask, token_type_ids) returning fp32 logits."""
    if row == "dense HF":
        dense = served.dense()
        return _torch_call(lambda i, m, t: dense(input_ids=i, attention_mask=m, token_type_ids=t).logits)
    if row == "reference":
        return _torch_call(lambda i, m, t: served.fp32(i, m, t, backend="reference"))
    if row == "torch.compile":
        return _torch_call(served.compiled())
    if row == "onnxruntime":
        session = served.onnx_session()

        def run_onnx(inputs):
            feeds = dict(zip(("input_ids", "attention_mask", "token_type_ids"), (x.numpy() for x in inputs)))
            return torch.from_numpy(session.run(["logits"], feeds)[0])

        return run_onnx
    model = {"engine fp32": lambda: served.fp32, "engine bf16": served.bf16, "engine int8": served.int8}[row]()
    return _torch_call(lambda i, m, t: model(i, m, t, backend="engine"))


ROWS = ["dense HF", "reference", "torch.compile", "onnxruntime", "engine fp32", "engine bf16", "engine int8"]
FP32_ROWS = {"reference", "torch.compile", "onnxruntime", "engine fp32"}


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_serving(benchmark, served, workload, row):
    inputs = _inputs(workload)
    call = _row_callable(served, row)
    start = time.perf_counter()
    try:
        logits = call(inputs)  # compiles (torch.compile, the engine's per-layer calls) and checks
    except Exception as exc:  # noqa: BLE001
        if row == "torch.compile":
            served._cache["compiled"] = _Skip(f"torch.compile of the reference forward failed: "
                                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            pytest.skip(str(served._cache["compiled"]))
        raise
    first_s = time.perf_counter() - start

    extra = benchmark.extra_info
    if row != "dense HF":
        ref = served.reference_logits(workload)
        diff = float((logits.float() - ref).abs().max())
        extra["max_abs_diff"] = diff
        if row in FP32_ROWS:
            scale = float(ref.abs().max())
            assert diff <= FP32_TOL * scale, f"{row}: logits differ from the reference by {diff:.3g} (scale {scale:.3g})"

    start = time.perf_counter()
    call(inputs)  # warm-up; its time sets the number of rounds
    warm_s = time.perf_counter() - start
    rounds = max(MIN_ROUNDS if warm_s < 1.0 else MIN_ROUNDS_SLOW, min(MAX_ROUNDS, math.ceil(TARGET_S / max(warm_s, 1e-6))))

    spec = served.spec
    benchmark.group = f"{served.key} · {workload}"
    extra.update(
        suite="serving", device="cpu", variant=row, baseline=row == "reference",
        model=served.key, model_label=spec["label"], workload=workload,
        batch=len(WORKLOADS[workload]), seq=SEQ, real_tokens=sum(WORKLOADS[workload]),
        padding_fraction=round(padding_fraction(workload), 4),
        sparsity=round(float(served.fp32.sparsity), 4), torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        first_call_s=round(first_s, 3), quick=QUICK,
    )
    benchmark.pedantic(call, args=(inputs,), warmup_rounds=0, rounds=rounds, iterations=1)


def test_realistic_padding():
    """The "32 realistic" batch is padded to its longest (128) with 40-50% of the positions padding."""
    lengths = WORKLOADS["32 realistic"]
    assert max(lengths) == SEQ and min(lengths) >= 8
    assert 0.40 <= padding_fraction("32 realistic") <= 0.50, padding_fraction("32 realistic")
