"""The per-token and pooled tasks of a PrunedModel: token classification, extractive QA, sentence embeddings.

Checked against the independent DESIGN §4 forward of ``tests/cofi_model_ref.py`` (run in float64 on
the HF model's weights) with the HF head applied to its last hidden state (token classification:
``classifier``; QA: ``qa_outputs``, start = output 0, end = output 1) or its last hidden state pooled
over the real tokens (embeddings), on fresh random weights and padded inputs; only real tokens are
compared for per-token outputs. float32 against float64: relative error (by norm) at most 1e-5
(tests/compare.py); NaN never passes (``rel_err`` of a NaN is NaN, which fails ``<=``).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import cofi_kernels
from cofi_kernels.models import arch
from cofi_kernels.models.builder import KeptLayer, build_pruned_model
from cofi_kernels.models.pruned_model import CONFIG_NAME, PrunedModel
from tests.cofi_model_ref import cofi_reference_forward, random_gates, randomized
from tests.compare import FP32_TOL, rel_err
from tests.models.test_builder import D, H, I, L, _random_structure

TOKEN_TASKS = ("token_classification", "question_answering")
NUM_LABELS = 5
needs_engine = pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def hf_model(kind: str, task: str, *, layers=L, seed=0):
    """A small random BERT/RoBERTa of the class for ``task`` (eval mode, eager attention), with
    random LayerNorms and biases (as ``tests.cofi_model_ref.small_model``)."""
    prefix = "Bert" if kind == "bert" else "Roberta"
    suffix = {"base": "Model", "embedding": "Model", "token_classification": "ForTokenClassification",
              "question_answering": "ForQuestionAnswering"}[task]
    cfg = getattr(tf, f"{prefix}Config")(
        vocab_size=97, hidden_size=D, num_hidden_layers=layers, num_attention_heads=H, intermediate_size=I,
        max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu", pad_token_id=1 if kind == "roberta" else 0,
        num_labels=2 if task == "question_answering" else NUM_LABELS, attn_implementation="eager",
    )
    return randomized(getattr(tf, prefix + suffix)(cfg), seed)


def batch(model_or_cfg, batch_size=5, seq=11, lengths=None):
    """Fresh random right-padded ``(ids, mask, types)``: lengths 1 and ``seq`` among them (unless given)."""
    cfg = model_or_cfg.config if isinstance(model_or_cfg, PrunedModel) else None
    if cfg is not None:
        pad, vocab, types_n = cfg["pad_token_id"], cfg["vocab_size"], cfg["type_vocab_size"]
    else:
        c = model_or_cfg.config
        pad, vocab, types_n = c.pad_token_id, c.vocab_size, c.type_vocab_size
    if lengths is None:
        lengths = torch.randint(1, seq + 1, (batch_size,))
        lengths[0] = seq
        if batch_size > 1:
            lengths[1] = 1
    lengths = torch.as_tensor(lengths)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = torch.randint(pad + 1, vocab, (len(lengths), seq)).masked_fill(mask == 0, pad)
    types = torch.randint(0, types_n, (len(lengths), seq)) * mask
    return ids, mask, types


def reference_output(model, task, z, ids, mask, types, pooling=None, normalize=False):
    """The gated model's task output in float64 from the HF weights (DESIGN §4 forward of cofi_model_ref)."""
    m64 = _double_copy(model)
    h = cofi_reference_forward(m64, z, ids, mask, types)  # [B, T, D], 0 on pruned dims
    if task in TOKEN_TASKS:
        head = m64.qa_outputs if task == "question_answering" else m64.classifier
        return F.linear(h, head.weight, head.bias)
    rows = []
    for b in range(h.shape[0]):  # per sequence over its real tokens: a different route than the model's
        real = h[b, mask[b].bool()]
        rows.append({"mean": real.sum(0) / real.shape[0], "cls": h[b, 0], "max": real.max(0).values}[pooling])
    out = torch.stack(rows)
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12) if normalize else out


def _double_copy(model):
    m64 = type(model)(model.config).eval()
    m64.load_state_dict(model.state_dict())
    return m64.double()


def float64_twin(pruned: PrunedModel) -> PrunedModel:
    twin = PrunedModel(pruned.config)
    twin.load_state_dict(pruned.state_dict())
    return twin.double().eval()


def pruned_for(kind, task, *, scaled=True, pooling="mean", normalize=True, seed=None):
    """(HF model, its pruned model, gate dict) with a random kept structure (every sublayer kind)."""
    model = hf_model(kind, task, seed=_seed() if seed is None else seed)
    layers, hidden, hidden_scale, z = _random_structure(torch.Generator().manual_seed(_seed()), scaled)
    kw = {"embedding": {"pooling": pooling, "normalize": normalize}} if task == "embedding" else {}
    return model, build_pruned_model(model, layers, hidden=hidden, hidden_scale=hidden_scale, **kw), z


def assert_close_on_real(got, want, mask, tol=FP32_TOL):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all()
    real = mask.bool()
    err = rel_err(got[real], want[real])
    assert err <= tol, err


# ----------------------------------------------------------------------------- adapter


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("task", TOKEN_TASKS)
def test_adapter_supports_token_and_qa_models(kind, task):
    model = hf_model(kind, task)
    adapter, got_task, encoder = arch.supported_model(model)
    assert adapter.model_type == kind and got_task == task and encoder is model.base_model
    head = adapter.token_head(model)
    assert head is (model.qa_outputs if task == "question_answering" else model.classifier)
    assert encoder.pooler is None  # the HF token / QA models have no pooler
    assert type(model).__name__ in arch.SUPPORTED_MODELS


# ----------------------------------------------------------------------------- builder exactness


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("task", TOKEN_TASKS)
@pytest.mark.parametrize("scaled", [False, True])
def test_builder_token_heads_compute_the_gated_model(kind, task, scaled):
    model, pruned, z = pruned_for(kind, task, scaled=scaled)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    C = 2 if task == "question_answering" else NUM_LABELS
    assert pruned.config["task"] == task and pruned.config["num_labels"] == C
    assert pruned.config["id2label"] == {str(k): v for k, v in model.config.id2label.items()}
    assert tuple(pruned.head.out_weight.shape) == (C, 25) and "head.dense_weight" not in pruned.state_dict()
    ids, mask, types = batch(model)
    with torch.no_grad():
        got = pruned(ids, mask, types, backend="reference")
    want = reference_output(model, task, z, ids, mask, types)
    assert got.shape == (*ids.shape, C)
    assert_close_on_real(got, want, mask)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not modified


@pytest.mark.parametrize("task", TOKEN_TASKS)
def test_every_weight_kept_is_the_hf_model(task):
    model = hf_model("roberta", task, seed=_seed())
    pruned = build_pruned_model(model, [KeptLayer(heads=range(H), units=range(I)) for _ in range(L)])
    ids, mask, types = batch(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        got = pruned(ids, mask, types, backend="reference")
    if task == "question_answering":
        want = torch.stack([out.start_logits, out.end_logits], -1)
    else:
        want = out.logits
    assert_close_on_real(got, want, mask)


@pytest.mark.parametrize("task", TOKEN_TASKS)
def test_apply_cofi_and_prune_accept_token_models(task):
    """The gated HF token / QA model (apply_cofi, gates fixed) gives what its pruned model gives."""
    model = hf_model("bert", task, seed=_seed())
    z = random_gates(model.config, seed=_seed())
    pruned = cofi_kernels.prune(model, z=z)
    assert pruned.config["task"] == task
    patched = _double_copy(model).float()
    gates = cofi_kernels.apply_cofi(patched)
    gates.fix(z)
    ids, mask, types = batch(model)
    with torch.no_grad():
        out = patched(input_ids=ids, attention_mask=mask, token_type_ids=types)
        got = pruned(ids, mask, types, backend="reference")
    hf = torch.stack([out.start_logits, out.end_logits], -1) if task == "question_answering" else out.logits
    want = reference_output(model, task, z, ids, mask, types)
    assert_close_on_real(hf, want, mask)
    assert_close_on_real(got, want, mask)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
@pytest.mark.parametrize("normalize", [True, False])
def test_embedding_pools_the_gated_last_hidden_state(kind, pooling, normalize):
    model, pruned, z = pruned_for(kind, "embedding", pooling=pooling, normalize=normalize)
    c = pruned.config
    assert (c["task"], c["pooling"], c["normalize"]) == ("embedding", pooling, normalize)
    assert pruned.head is None and not any(k.startswith("head.") for k in pruned.state_dict())
    ids, mask, types = batch(model)
    with torch.no_grad():
        got = pruned(ids, mask, types, backend="reference")
    want = reference_output(model, "embedding", z, ids, mask, types, pooling, normalize)
    assert got.shape == (ids.shape[0], D) and got.dtype == torch.float32 and torch.isfinite(got).all()
    assert rel_err(got, want) <= FP32_TOL
    pruned_dims = torch.ones(D, dtype=torch.bool)
    pruned_dims[pruned.hidden_index] = False
    assert (got[:, pruned_dims] == 0).all()
    if normalize:
        assert torch.allclose(got.norm(dim=-1), torch.ones(ids.shape[0]), atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_embedding_of_the_unpruned_encoder_is_sentence_transformers_pooling(pooling):
    """Every weight kept: the embedding is sentence-transformers' Pooling (+ Normalize) of the HF output."""
    import sentence_transformers  # noqa: F401  (a test requirement)
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Pooling
    model = hf_model("bert", "embedding", seed=_seed())
    pruned = build_pruned_model(model, [KeptLayer(heads=range(H), units=range(I)) for _ in range(L)],
                                embedding={"pooling": pooling, "normalize": True})
    ids, mask, types = batch(model)
    pool = Pooling(D, pooling_mode=pooling)
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        want = F.normalize(pool({"token_embeddings": h, "attention_mask": mask})["sentence_embedding"], dim=-1)
        got = pruned(ids, mask, types, backend="reference")
    assert rel_err(got, want) <= FP32_TOL


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"pooling": "sum", "normalize": True}, r"embedding\['pooling'\] must be one of 'mean', 'cls', 'max'"),
        ({"pooling": "mean", "normalize": 1}, r"embedding\['normalize'\] must be True or False"),
        ({"pooling": "mean"}, r"embedding must be a dict with exactly the keys"),
    ],
)
def test_builder_refuses_a_bad_embedding(kw, match):
    model = hf_model("bert", "embedding")
    with pytest.raises(ValueError, match=match):
        build_pruned_model(model, [KeptLayer(None, None)] * L, embedding=kw)


def test_builder_refuses_an_embedding_for_a_model_with_a_head():
    model = hf_model("bert", "token_classification")
    with pytest.raises(ValueError, match="embedding= is for a bare encoder"):
        build_pruned_model(model, [KeptLayer(None, None)] * L, embedding={"pooling": "mean", "normalize": True})


# ----------------------------------------------------------------------------- engine


ENGINE_CASES = [("token_classification", None), ("question_answering", None), ("embedding", "mean"),
                ("embedding", "cls"), ("embedding", "max")]


def _engine_vs_reference(pruned, ids, mask, types):
    with torch.inference_mode():
        got = pruned(ids, mask, types, backend="engine")
        auto = pruned(ids, mask, types)
        want = float64_twin(pruned)(ids, mask, types, backend="reference")
    assert torch.equal(got, auto)  # "auto" runs the engine here
    if pruned.config["task"] == "embedding":
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert rel_err(got, want) <= FP32_TOL
    else:
        assert_close_on_real(got, want, mask if mask is not None else torch.ones_like(ids))
        if mask is not None:
            assert (got[~mask.bool()] == 0).all()  # padded positions are not computed


@needs_engine
@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("task, pooling", ENGINE_CASES)
def test_engine_equals_the_reference_on_ragged_batches(kind, task, pooling):
    _, pruned, _ = pruned_for(kind, task, pooling=pooling)
    _engine_vs_reference(pruned, *batch(pruned, batch_size=7, seq=13))
    ids, mask, types = batch(pruned, seq=9, lengths=[9, 9, 9])  # no padding
    _engine_vs_reference(pruned, ids, mask, types)
    _engine_vs_reference(pruned, ids, None, types)


@needs_engine
@pytest.mark.parametrize("task, pooling", ENGINE_CASES)
@pytest.mark.parametrize("lengths, seq", [([1, 1, 1], 1), ([6], 6), ([1], 1), ([4], 7)],
                         ids=["T1", "B1", "B1T1", "B1pad"])
def test_engine_single_token_and_single_sequence(task, pooling, lengths, seq):
    _, pruned, _ = pruned_for("bert", task, pooling=pooling)
    _engine_vs_reference(pruned, *batch(pruned, seq=seq, lengths=lengths))


@needs_engine
@pytest.mark.parametrize("task, pooling", ENGINE_CASES)
def test_output_hidden_states_returns_the_task_output_and_every_layer(task, pooling):
    _, pruned, _ = pruned_for("roberta", task, pooling=pooling)
    ids, mask, types = batch(pruned)
    with torch.no_grad():
        out, per_layer = pruned(ids, mask, types, output_hidden_states=True)
        plain = pruned(ids, mask, types, backend="reference")
    assert torch.equal(out, plain) and len(per_layer) == L and per_layer[-1].shape == (*ids.shape, 25)
    with pytest.raises(ValueError, match="does not return per-layer hidden states"):
        pruned(ids, mask, types, output_hidden_states=True, backend="engine")


@pytest.mark.parametrize("task, pooling", ENGINE_CASES)
def test_an_aligned_copy_gives_the_same_output(task, pooling):
    """Padded hidden dims (hidden_index -1) stay out of the expanded embedding; token heads see zeros there."""
    from cofi_kernels.serving import aligned_copy

    _, pruned, _ = pruned_for("bert", task, pooling=pooling)
    padded = aligned_copy(pruned.double(), 8)
    assert padded.config["hidden_size"] == 32 and pruned.config["hidden_size"] == 25
    ids, mask, types = batch(pruned)
    with torch.no_grad():
        got, want = padded(ids, mask, types), pruned(ids, mask, types, backend="reference")
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert rel_err(got, want) <= 1e-12


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("task, pooling", ENGINE_CASES)
def test_save_and_load_round_trip_is_bit_identical(tmp_path, task, pooling):
    _, pruned, _ = pruned_for("bert", task, pooling=pooling)
    pruned.save_pretrained(tmp_path)
    loaded = PrunedModel.from_pretrained(tmp_path)
    assert {k: v for k, v in loaded.config.items() if k not in ("encoder_size", "dtype")} == pruned.config
    assert loaded.state_dict().keys() == pruned.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in pruned.state_dict().items())
    ids, mask, types = batch(pruned)
    with torch.no_grad():
        for backend in ("reference", "auto"):
            assert torch.equal(loaded(ids, mask, types, backend=backend), pruned(ids, mask, types, backend=backend))
    assert task.replace("_", " ").split()[0] in loaded.summary().splitlines()[0]


_DROP = object()


def _edit_config(directory, **changes):
    path = os.path.join(directory, CONFIG_NAME)
    with open(path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k)
        else:
            cfg[k] = v
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


@pytest.mark.parametrize(
    "task, changes, match",
    [
        ("token_classification", {"task": "summarization"}, r"task 'summarization' is not one of 'base'"),
        ("question_answering", {"num_labels": 3}, r"'num_labels' of a question-answering model must be 2"),
        ("token_classification", {"num_labels": None}, r"'num_labels' must be a positive integer"),
        ("embedding", {"pooling": "sum"}, r"'pooling' of an embedding model must be one of 'mean', 'cls', 'max'"),
        ("embedding", {"pooling": _DROP}, r"'pooling' of an embedding model must be one of"),
        ("embedding", {"normalize": "yes"}, r"'normalize' of an embedding model must be true or false"),
    ],
)
def test_a_bad_task_config_is_refused_naming_the_file(tmp_path, task, changes, match):
    _, pruned, _ = pruned_for("bert", task)
    pruned.save_pretrained(tmp_path)
    path = _edit_config(tmp_path, **changes)
    for load in (PrunedModel.from_pretrained, PrunedModel.read_config):
        with pytest.raises(ValueError, match=match) as info:
            load(tmp_path)
        assert str(info.value).startswith(path)


# ----------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize(
    "kind, task, pooling",
    [("bert", "token_classification", None), ("roberta", "question_answering", None), ("bert", "embedding", "mean"),
     ("roberta", "embedding", "max"), ("roberta", "embedding", "cls")],
)
def test_onnx_export_per_task(tmp_path, kind, task, pooling):
    import onnx
    import onnxruntime as ort
    import onnxscript  # noqa: F401  (a test requirement)
    _, pruned, _ = pruned_for(kind, task, pooling=pooling)
    path = str(tmp_path / "model.onnx")
    result = pruned.export_onnx(path)
    proto = onnx.load(path)
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    expected = {
        "token_classification": {"logits": ["batch", "sequence", NUM_LABELS]},
        "question_answering": {"start_logits": ["batch", "sequence"], "end_logits": ["batch", "sequence"]},
        "embedding": {"embedding": ["batch", D]},
    }[task]
    assert outs == expected and list(result.outputs) == list(expected) and result.output == list(expected)[0]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for b, t in ((2, 7), (5, 19)):
        ids, mask, types = batch(pruned, batch_size=b, seq=t)
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                 "token_type_ids": types.numpy()})
        got = [torch.from_numpy(g) for g in got]
        with torch.no_grad():
            want = float64_twin(pruned)(ids, mask, types, backend="reference")
        if task == "embedding":
            [g] = got
            assert g.dtype == torch.float32 and torch.isfinite(g).all() and rel_err(g, want) <= FP32_TOL
        elif task == "question_answering":
            assert_close_on_real(got[0], want[..., 0], mask)
            assert_close_on_real(got[1], want[..., 1], mask)
        else:
            assert_close_on_real(got[0], want, mask)


# ----------------------------------------------------------------------------- precision


def assert_served_close_to_fp32(directory, pruned, *, token_rows: bool):
    """Save ``pruned`` to ``directory``, serve it in int8 and bf16 (:func:`load_for_inference`) and check
    both backends' outputs against the fp32 model's on fresh inputs: finite, same shape, relative error
    at most 0.15 (int8) / 0.05 (bf16), over the real tokens' rows when ``token_rows``. Returns
    ``(precision, served model)`` per precision for further checks."""
    from cofi_kernels.serving import load_for_inference

    pruned.save_pretrained(directory)
    ids, mask, types = batch(pruned, batch_size=6, seq=15)
    real = mask.bool() if token_rows else slice(None)
    served_models = []
    with torch.inference_mode():
        fp32 = pruned(ids, mask, types)
        for precision, tol in (("int8", 0.15), ("bf16", 0.05)):
            served = load_for_inference(directory, precision=precision)
            for backend in ("auto", "reference"):
                got = served(ids, mask, types, backend=backend)
                assert got.shape == fp32.shape and torch.isfinite(got).all()
                assert rel_err(got.float()[real], fp32[real]) <= tol, (precision, backend)
            served_models.append((precision, served))
    return served_models


@needs_engine
@pytest.mark.parametrize("task", TOKEN_TASKS)
def test_int8_and_bf16_serve_a_token_model_close_to_fp32(tmp_path, task):
    from cofi_kernels.serving import quantize_int8

    _, pruned, _ = pruned_for("bert", task)
    for precision, served in assert_served_close_to_fp32(tmp_path, pruned, token_rows=True):
        if precision == "int8":
            assert "out" in served.head.linear_overrides  # the head's linear is quantized too
    with torch.inference_mode():
        q = quantize_int8(PrunedModel.from_pretrained(tmp_path))
        assert q.head in q.linear_sublayers()
