"""The GPU serving path: aligned copies through the packed engine, CUDA graphs per bucket.

On the CPU: an aligned copy (serving.aligned_copy) run through the packed,
sublayer-by-sublayer path (masked LayerNorms) equals the unpadded model; the
bucket arithmetic and the static packing of serving.cuda_graphs; the padded
forward that a graph captures equals the engine for the real rows; the errors
for CPU models. With a CUDA GPU: the engine on CUDA (Triton attention) against
the float64 reference for every sublayer kind in fp32 / bf16 / fp16, aligned or
not, and graph capture / replay.
"""

from __future__ import annotations

import pytest
import torch

import cofi_kernels
from cofi_kernels import functional
from cofi_kernels.serving import GraphedPrunedModel, aligned_copy, load_for_inference
from cofi_kernels.serving import cuda_graphs as cg
from cofi_kernels.ops.triton import support as _triton_support

from tests.compare import FP32_TOL, rel_err
from tests.conftest import requires_cuda
from tests.serving.test_engine import SHAPES, _batch, _float64_twin, _model

# float64 runs the references of varlen_attention / pruned_layer / masked_layer_norm, which say so.
pytestmark = pytest.mark.filterwarnings("ignore:.*using the slow reference:RuntimeWarning")

needs_extension = pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")
CUDA_TRITON = torch.cuda.is_available() and _triton_support.INSTALLED and not _triton_support.INTERPRET
requires_cuda_triton = pytest.mark.skipif(not CUDA_TRITON, reason="needs a CUDA GPU with compiled Triton")


def _packed_logits(model, ids, mask, types):
    """The engine's packed path called directly (the CPU engine refuses aligned copies)."""
    packed = model._pack(ids, mask, types)
    if model.head is not None:
        return model.head.classify(model._run_packed(packed, first_only=True))
    h = model._run_packed(packed, first_only=False)
    B, T = ids.shape
    out = h.new_zeros(B * T, h.shape[-1])
    out[packed.rows] = h
    return out.view(B, T, -1)


# ----------------------------------------------------------------------------- aligned copies, CPU


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_labels", [3, None])
def test_aligned_copy_through_the_packed_path_in_float64(shape, num_labels, monkeypatch):
    """float64 runs the references of every op; varlen_attention's reference takes its softmax in
    float32 (as the kernels do), so the bar of 1e-12 is against the unpadded model's packed path,
    and the reference forward (float64 softmax) is met to the fp32 bar."""
    model = _model(shape, "roberta" if num_labels is None else "bert", num_labels=num_labels).double()
    padded = aligned_copy(model, multiple=8)
    ids, mask, types = _batch(model)
    with torch.no_grad():
        reference = model(ids, mask, types, backend="reference")
        want = _packed_logits(model, ids, mask, types)
        # An aligned copy must go sublayer by sublayer: the compiled layer has no masked LayerNorm.
        monkeypatch.setattr(functional, "pruned_layer",
                            lambda *a, **k: pytest.fail("pruned_layer ran on an aligned copy"))
        got = _packed_logits(padded, ids, mask, types)
    d = model.config["hidden_size"]
    if num_labels is None:
        real = mask.bool()
        assert (got[..., d:] == 0).all() and (got[~real] == 0).all()
        got, want, reference = got[real][:, :d], want[real], reference[real]
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    assert rel_err(got, reference) <= FP32_TOL


@needs_extension
def test_aligned_copy_through_the_packed_path_in_float32():
    model = _model("demo")
    ids, mask, types = _batch(model)
    with torch.no_grad():
        exact = _float64_twin(model)(ids, mask, types, backend="reference")
        got = _packed_logits(aligned_copy(model), ids, mask, types)
    assert got.dtype == torch.float32 and rel_err(got, exact) <= FP32_TOL


def test_the_cpu_engine_still_refuses_aligned_copies():
    padded = aligned_copy(_model("every_kind"))
    ids, mask, types = _batch(padded)
    assert not padded.engine_applies(mask)
    with pytest.raises(ValueError, match="on the CPU runs unpadded models"):
        padded(ids, mask, types, backend="engine")


# ----------------------------------------------------------------------------- buckets, CPU


def test_bucket_arithmetic():
    buckets = (1, 2, 4, 8)
    assert [cg.bucket(n, buckets) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, None]
    assert cg.bucket(3, (8, 2, 4)) == 4  # any order
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        cg.bucket(0, buckets)
    model = _model("every_kind")  # bert, 80 positions
    assert cg.length_buckets_for(model) == (16, 32, 64, 80)
    assert cg.length_buckets_for(model, (8, 24)) == (8, 24)
    roberta = _model("every_kind", "roberta")  # positions from pad_token_id + 1: 80 - 1 - 1 = 78 tokens
    assert cg.length_buckets_for(roberta)[-1] == 78
    with pytest.raises(ValueError, match="length_buckets must be a non-empty sequence of integers >= 1"):
        cg.length_buckets_for(model, (0, 16))


def test_pad_to_bucket_and_unpad():
    ids = torch.randint(3, 100, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    types = torch.randint(0, 2, (3, 5))
    p_ids, p_mask, p_types = cg.pad_to_bucket(ids, mask, types, 4, 8, pad_token_id=1)
    assert p_ids.shape == p_mask.shape == p_types.shape == (4, 8)
    assert torch.equal(p_ids[:3, :5], ids) and (p_ids[3] == 1).all() and (p_ids[:, 5:] == 1).all()
    assert torch.equal(p_mask[:3, :5], mask) and p_mask[3].sum() == 0 and p_mask[:, 5:].sum() == 0
    assert torch.equal(p_types[:3, :5], types) and p_types[3:].sum() == 0 and p_types[:, 5:].sum() == 0
    _, ones, zeros = cg.pad_to_bucket(ids, None, None, 3, 6, pad_token_id=0)
    assert ones[:, :5].all() and ones[:, 5].sum() == 0 and zeros.sum() == 0
    with pytest.raises(ValueError, match="smaller than the batch"):
        cg.pad_to_bucket(ids, mask, types, 2, 8, pad_token_id=0)
    assert cg.unpad(torch.randn(4, 7), 3, 5).shape == (3, 7)
    assert cg.unpad(torch.randn(4, 8, 6), 3, 5).shape == (3, 5, 6)


def test_static_packing_puts_the_real_tokens_first_in_engine_order():
    lengths = torch.tensor([3, 1, 6, 5, 1])
    Bb, Tb = 5, 6
    mask = (torch.arange(Tb)[None] < lengths[:, None]).long()
    src, dest, cu = cg.static_packing(mask)
    m = Bb * Tb
    assert src.shape == (m + 1,) and dest.shape == (m,) and cu.shape == (Bb + 2,)
    assert torch.equal(src[dest], torch.arange(m)) and src[m] == m  # inverse permutations, extra row last
    n = int(lengths.sum())
    assert torch.equal(src[:n], mask.reshape(-1).nonzero().squeeze(1))  # PrunedModel._pack's order
    assert cu.tolist() == [0, 3, 4, 10, 15, 16, m + 1]
    assert (cu[1:] > cu[:-1]).all()  # every sequence non-empty, the padding one included


@needs_extension
@pytest.mark.parametrize("shape", ["every_kind", "demo", "no_attention", "ffn_only_tail"])
@pytest.mark.parametrize("num_labels", [3, None])
def test_padded_forward_equals_the_engine(shape, num_labels):
    model = _model(shape, "bert" if num_labels else "roberta", num_labels=num_labels)
    ids, mask, types = _batch(model, batch=6, seq=21)
    Bb, Tb = 8, 32
    with torch.inference_mode():
        want = model(ids, mask, types, backend="engine")
        out = cg.padded_forward(model, *cg.pad_to_bucket(ids, mask, types, Bb, Tb, model.config["pad_token_id"]))
        got = cg.unpad(out, *ids.shape)
        twin = _float64_twin(model)
        exact = cg.unpad(cg.padded_forward(twin, *cg.pad_to_bucket(ids, mask, types, Bb, Tb,
                                                                    model.config["pad_token_id"])), *ids.shape)
        exact_engine = twin(ids, mask, types, backend="engine")
    assert out.shape[0] == Bb and got.shape == want.shape
    assert rel_err(got, want) <= FP32_TOL
    if num_labels is None:
        assert (out[:, 21:] == 0).all() and (got[~mask.bool()] == 0).all()
    # float64: the padding changes nothing but the rounding of GEMMs with more rows.
    assert (exact - exact_engine).abs().max() <= 1e-12 * exact_engine.abs().max()


def test_graphs_and_gpu_options_refuse_cpu_models(tmp_path):
    model = _model("one_layer")
    with pytest.raises(ValueError, match="model must be on a CUDA device"):
        GraphedPrunedModel(model)
    with pytest.raises(TypeError, match="model must be a PrunedModel"):
        GraphedPrunedModel(torch.nn.Linear(2, 2))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cuda_graphs=True needs device='cuda'"):
        load_for_inference(tmp_path, cuda_graphs=True)
    with pytest.raises(ValueError, match="align=True pads the model for GPU GEMMs"):
        load_for_inference(tmp_path, align=True)
    assert getattr(load_for_inference(tmp_path), "aligned_from", None) is None  # the CPU default: unpadded


# ----------------------------------------------------------------------------- CUDA


def _cuda_cases():
    return [(s, dt, al) for s in SHAPES for dt in (torch.float32, torch.bfloat16, torch.float16)
            for al in (False, True)]


@requires_cuda
@requires_cuda_triton
@pytest.mark.parametrize("shape,dtype,aligned", _cuda_cases())
def test_cuda_engine_matches_the_reference(shape, dtype, aligned):
    model = _model(shape)
    ids, mask, types = _batch(model, batch=9, seq=40 if shape != "demo" else 70)
    exact = _float64_twin(model)(ids, mask, types, backend="reference")
    served = (aligned_copy(model) if aligned else model).to("cuda", dtype)
    cuda = [t.cuda() for t in (ids, mask, types)]
    calls = []
    real_layer = functional.pruned_layer
    try:
        functional.pruned_layer = lambda *a, **k: calls.append(1) or real_layer(*a, **k)
        with torch.inference_mode():
            assert served.engine_applies(cuda[1])
            got = served(*cuda)  # auto: the engine
            plain = served(*cuda, backend="reference")
    finally:
        functional.pruned_layer = real_layer
    assert not calls, "the CPU-only pruned_layer op ran on CUDA"
    assert got.dtype == dtype and torch.isfinite(got).all()
    if dtype == torch.float32:
        assert rel_err(got, exact) <= FP32_TOL
    else:
        assert rel_err(got, exact) <= 2 * rel_err(plain, exact) + 1e-3


@requires_cuda
@requires_cuda_triton
@pytest.mark.parametrize("num_labels", [3, None])
def test_cuda_graphs_replay_the_padded_forward(num_labels):
    model = _model("demo", "bert" if num_labels else "roberta", num_labels=num_labels).cuda()
    graphed = GraphedPrunedModel(model, batch_buckets=(1, 4, 8), length_buckets=(16, 32, 64))
    pad = model.config["pad_token_id"]
    for batch, seq in ((3, 23), (4, 30), (1, 16), (2, 9), (3, 23)):
        ids, mask, types = (t.cuda() for t in _batch(model, batch=max(batch, 4), seq=seq))
        ids, mask, types = ids[:batch], mask[:batch], types[:batch]
        mask[:, 0] = 1
        with torch.inference_mode():
            got = graphed(ids, mask, types)
            buckets = graphed.buckets_for(batch, seq)
            eager = cg.unpad(cg.padded_forward(model, *cg.pad_to_bucket(ids, mask, types, *buckets, pad)), batch, seq)
            engine = model(ids, mask, types, backend="engine")
        assert torch.equal(got, eager)  # the replay is the captured forward, bit for bit
        assert rel_err(got, engine) <= FP32_TOL
    assert graphed.captured == ((1, 16), (4, 16), (4, 32))
    big = [t.cuda() for t in _batch(model, batch=9, seq=20)]  # beyond the batch buckets: un-graphed engine
    with torch.inference_mode():
        assert rel_err(graphed(*big), model(*big, backend="engine")) <= FP32_TOL
    with pytest.raises(ValueError, match="first token must be real"):
        graphed(big[0], big[1].flip(1).contiguous(), big[2])


@requires_cuda
@requires_cuda_triton
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_load_for_inference_aligns_and_graphs(tmp_path, precision):
    model = _model("demo")
    model.save_pretrained(tmp_path)
    ids, mask, types = _batch(model, batch=5)
    exact = _float64_twin(model)(ids, mask, types, backend="reference")
    served = load_for_inference(tmp_path, precision=precision, device="cuda")
    assert served.aligned_from == 330 and served.config["hidden_size"] == 336
    graphed = load_for_inference(tmp_path, precision=precision, device="cuda", cuda_graphs=True)
    assert isinstance(graphed, GraphedPrunedModel) and graphed.model.aligned_from == 330
    cuda = [t.cuda() for t in (ids, mask, types)]
    with torch.inference_mode():
        got, replayed = served(*cuda), graphed(*cuda)
    tol = FP32_TOL if precision == "fp32" else 0.05
    assert rel_err(got, exact) <= tol and rel_err(replayed, exact) <= tol
