"""Training a pruned architecture from scratch (pruning/scratch): exact shapes, the Scratch-E / Scratch-B
epoch rules, the two initialisations, resume after a kill, the CLI surface. Tiny models, seconds each."""

from __future__ import annotations

import json
import math
import os
import shutil

import matplotlib.image
import pytest
import torch
from safetensors.torch import load_file

from cofi_kernels import cli
from cofi_kernels.models.pruned_model import PrunedModel
from cofi_kernels.models.shapes import shaped_config
from cofi_kernels.models.size import dense_encoder_flops_per_token, encoder_flops_per_token
from cofi_kernels.pruning import get_method
from cofi_kernels.pruning.cofi import loop as pl
from cofi_kernels.pruning.scratch import budget as sb
from cofi_kernels.pruning.scratch import loop as sl
from cofi_kernels.training import model_io
from cofi_kernels.training import trainer as tr
from tests.training_support import (
    FAST_PRUNE,
    Killed,
    files_equal_tensors,
    kill_at,
    read_log,
    strip_times,
    tiny_bert_dir,
    toy_rows,
    tree_snapshot,
    write_jsonl,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAST_SCRATCH = dict(batch_size=8, max_length=16, checkpoint_every=4, lr=1e-3, eval_every=5)
# The architecture's pruning run, as its run.json records it: 2 epochs in total at 16 tokens.
ARCH_EPOCHS = dict(distill_epochs=0.5, prune_epochs=1.0, finetune_epochs=0.5)
PRUNING_EPOCHS = 2.0
PRUNING_LENGTH = 16
STEPS_PER_EPOCH = 6  # 48 toy examples, batch 8


def _gates(seed=0):
    """CoFi gates for the tiny teacher (4 layers, 4 heads, FFN 64, hidden 32) with every special case:
    kept sets that are not prefixes, a removed attention (layer 1), an FFN without units (layer 1),
    an attention without heads (layer 2), a removed FFN (layer 2), dropped hidden dims."""
    g = torch.Generator().manual_seed(seed)
    soft = lambda *shape: 0.3 + 0.7 * torch.rand(*shape, generator=g)  # noqa: E731
    z = {"head": soft(4, 4), "mha": soft(4), "int": soft(4, 64), "ffn": soft(4), "hidden": soft(32)}
    z["head"][0, [0, 2]] = 0.0
    z["mha"][1] = 0.0
    z["head"][2] = 0.0
    z["head"][3, 1] = 0.0
    z["int"][0, torch.randperm(64, generator=g)[:45]] = 0.0
    z["int"][1] = 0.0
    z["ffn"][2] = 0.0
    z["int"][3, torch.randperm(64, generator=g)[:20]] = 0.0
    z["hidden"][[1, 5, 31]] = 0.0
    return z


def make_architecture(directory, teacher_dir, z, run=None) -> str:
    """What `cofi prune` writes, from given gates: the folded model, tokenizer, task file, gates, run.json."""
    from safetensors.torch import save_file

    from cofi_kernels.pruning.cofi.fold import prune

    teacher = model_io.load_task_model(teacher_dir)
    pruned = prune(teacher, z=z)
    pruned.save_pretrained(directory)
    model_io.load_tokenizer(teacher_dir).save_pretrained(directory)
    task = model_io.read_task(teacher_dir)
    model_io.write_task(str(directory), task["spec"], PRUNING_LENGTH, "pruned")
    save_file({f"z.{t}": v.contiguous() for t, v in z.items()}, os.path.join(directory, pl.GATES_FILE))
    run = run or {"kind": "prune", "config": {**ARCH_EPOCHS, "max_length": PRUNING_LENGTH}}
    with open(os.path.join(directory, tr.RUN_FILE), "w") as f:
        json.dump(run, f)
    return str(directory)


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory, teacher_dir):
    return make_architecture(tmp_path_factory.mktemp("arch") / "pruned", teacher_dir, _gates())


@pytest.fixture(scope="module")
def scratch_e(tmp_path_factory, arch_dir, toy):
    out = str(tmp_path_factory.mktemp("runs") / "scratch_e")
    result = sl.scratch_train(arch_dir, *toy, out, sl.ScratchConfig(budget="E", **FAST_SCRATCH), progress=False)
    return out, result


def _shapes_of(directory):
    return {k: tuple(v.shape) for k, v in load_file(os.path.join(directory, "model.safetensors")).items()}


# ---------------------------------------------------------------------- shapes and output


def test_scratch_reproduces_the_architecture_exactly_and_writes_a_usable_output(arch_dir, scratch_e, toy):
    out, result = scratch_e
    arch, model = PrunedModel.from_pretrained(arch_dir), PrunedModel.from_pretrained(out)
    assert [(s["heads"], s["ffn_width"]) for s in arch.layer_shapes()] == [(2, 19), (None, 0), (0, None), (3, 44)]
    assert arch.config["hidden_size"] == 29
    assert model.layer_shapes() == arch.layer_shapes()
    assert model.config["layers"] == arch.config["layers"]
    assert _shapes_of(out) == _shapes_of(arch_dir)  # every tensor, same name and shape
    assert torch.equal(model.hidden_index, arch.hidden_index)
    assert model.sparsity == arch.sparsity and model.encoder_size == arch.encoder_size
    # Trained: the weights moved away from the architecture's and from their BERT initialisation.
    assert not torch.equal(model.layers[0].ffn.in_weight, arch.layers[0].ffn.in_weight)
    assert float(model.embeddings.ln_bias.abs().max()) > 0
    # Saved like CoFi's output: run.json, log.jsonl, the task file, shapes.png, tokenizer.
    for name in ("run.json", "log.jsonl", "cofi_task.json", "shapes.png", "tokenizer.json", "cofi_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not os.path.exists(os.path.join(out, tr.CHECKPOINT_DIR))
    with open(os.path.join(out, "shapes.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(os.path.join(out, "shapes.png")).ndim == 3
    run = json.load(open(os.path.join(out, tr.RUN_FILE)))
    assert run["method"] == "scratch" and run["init"] == "random" and run["budget"]["rule"] == "E"
    assert run["epochs"] == pytest.approx(PRUNING_EPOCHS)
    assert run["steps"] == result.steps == math.ceil(PRUNING_EPOCHS * STEPS_PER_EPOCH)
    assert run["sparsity"] == pytest.approx(arch.sparsity)
    task = model_io.read_task(out)
    assert task["labels"] == model_io.read_task(arch_dir)["labels"] and task["kind"] == "pruned"
    assert sum(r["event"] == "step" for r in read_log(out)) == run["steps"]


def test_scratch_output_works_with_cofi_eval_and_predict(scratch_e, tmp_path, capsys, toy):
    out, result = scratch_e
    data = write_jsonl(tmp_path / "eval.jsonl", toy_rows(24, seed=2))
    assert cli.main(["eval", "--model", out, "--data", data, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "pruned"
    assert report["accuracy"] == pytest.approx(result.metrics["accuracy"])  # the best state was saved
    pred = tmp_path / "pred.jsonl"
    assert cli.main(["predict", "--model", out, "--data", data, "--out", str(pred), "--quiet"]) == 0
    assert len(pred.read_text().splitlines()) == 24


# ---------------------------------------------------------------------- Scratch-E and Scratch-B


# Three layers of a model with hidden 32, 4 heads of 8, FFN 64: layer 0 keeps 2 heads and 10 units,
# layer 1 has no attention and an FFN without units, layer 2 attention without heads and no FFN.
SMALL = dict(head_dim=8, original_hidden_size=32, original_num_heads=4, original_intermediate_size=64,
             vocab_size=100, max_position_embeddings=40)


def test_flops_per_token_by_hand():
    # Pruned, T = 16: layer 0: Q,K,V,O 4·8·2·24 = 1536 weights, FFN 2·10·24 = 480 → 2·2016 multiply-adds,
    # plus attention q·kᵀ and a·v: 2·(2·16·8·2) = 1024. Layers 1 and 2 compute no product.
    assert encoder_flops_per_token([2, 0, 0], [10, 0, 0], 24, 8, 16) == 2 * 2016 + 1024 == 5056
    # Dense: per layer 4·8·4·32 + 2·64·32 = 8192 weights → 2·8192 + 4·16·8·4 = 18432; three layers 55296.
    assert dense_encoder_flops_per_token(3, 4, 8, 64, 32, 16) == 3 * 18432 == 55296
    cfg = shaped_config([2, None, 0], [10, 0, None], 24, **SMALL)
    assert sb.architecture_flops(cfg, 16) == (55296, 5056)


def test_budget_rules_e_b_and_the_cap():
    sparse = shaped_config([2, None, 0], [10, 0, None], 24, **SMALL)  # ratio 55296 / 5056 = 10.9: capped
    e = sb.scratch_budget(sparse, 7.5, 16, "E")
    assert (e.epochs, e.factor, e.capped) == (7.5, 1.0, False)
    b = sb.scratch_budget(sparse, 7.5, 16, "B")
    assert b.ratio == pytest.approx(55296 / 5056) and b.capped and b.factor == 2.0 and b.epochs == 15.0
    # Every head and unit kept, hidden 24 of 32: per layer 2·(4·8·4·24 + 2·64·24) + 4·16·8·4 = 14336,
    # ×3 = 43008 → ratio 55296 / 43008 = 9/7, under the cap.
    mild = shaped_config([4, 4, 4], [64, 64, 64], 24, **SMALL)
    b = sb.scratch_budget(mild, 7.5, 16, "B")
    assert (b.dense_flops, b.pruned_flops) == (55296, 43008)
    assert not b.capped and b.factor == pytest.approx(9 / 7) and b.epochs == pytest.approx(7.5 * 9 / 7)
    # A model without any product left: an infinite ratio, capped.
    empty = shaped_config([None] * 3, [None] * 3, 24, **SMALL)
    b = sb.scratch_budget(empty, 3.0, 16, "B")
    assert math.isinf(b.ratio) and b.epochs == 6.0 and b.to_json()["ratio"] is None
    with pytest.raises(tr.RunError, match="budget must be 'E' or 'B'"):
        sb.scratch_budget(mild, 1.0, 16, "C")


def test_pruning_run_record_reads_run_json(arch_dir, tmp_path):
    assert sb.pruning_run_record(arch_dir) == (PRUNING_EPOCHS, PRUNING_LENGTH)
    d = tmp_path / "arch"
    d.mkdir()
    with pytest.raises(tr.RunError, match=r"has no run\.json"):
        sb.pruning_run_record(str(d))
    (d / "run.json").write_text(json.dumps({"epochs": 4.0, "config": {"max_length": 32, "prune_epochs": 9.0}}))
    assert sb.pruning_run_record(str(d)) == (4.0, 32)  # a method's recorded total wins
    (d / "run.json").write_text(json.dumps({"config": {"max_length": 32, "prune_epochs": 9.0}}))
    with pytest.raises(tr.RunError, match="records no epochs"):
        sb.pruning_run_record(str(d))
    (d / "run.json").write_text(json.dumps({"epochs": 4.0, "config": {}}))
    with pytest.raises(tr.RunError, match="records no max_length"):
        sb.pruning_run_record(str(d))


def test_scratch_b_trains_the_ratio_of_the_flops(arch_dir, toy, tmp_path):
    arch = PrunedModel.from_pretrained(arch_dir)
    T, c = PRUNING_LENGTH, arch.config
    heads = [s["heads"] or 0 for s in arch.layer_shapes()]
    units = [s["ffn_width"] or 0 for s in arch.layer_shapes()]
    dh, d, D, L = c["head_dim"], c["hidden_size"], c["original_hidden_size"], c["num_layers"]
    pruned = 2 * (4 * dh * sum(heads) + 2 * sum(units)) * d + 4 * T * dh * sum(heads)
    dense = L * (2 * (4 * dh * c["original_num_heads"] + 2 * c["original_intermediate_size"]) * D
                 + 4 * T * dh * c["original_num_heads"])
    epochs = PRUNING_EPOCHS * min(dense / pruned, 2.0)
    out = str(tmp_path / "b")
    result = sl.scratch_train(arch_dir, *toy, out, sl.ScratchConfig(budget="B", **FAST_SCRATCH), progress=False)
    run = json.load(open(os.path.join(out, tr.RUN_FILE)))
    assert (run["budget"]["dense_flops"], run["budget"]["pruned_flops"]) == (dense, pruned)
    assert run["epochs"] == pytest.approx(epochs)
    assert result.steps == run["steps"] == math.ceil(epochs * STEPS_PER_EPOCH)


# ---------------------------------------------------------------------- initialisations


def test_random_init_is_berts_documented_initialisation():
    torch.manual_seed(3)
    cfg = shaped_config([4, None, 2, 0], [256, 128, None, 0], 64, head_dim=16, original_hidden_size=64,
                        original_num_heads=4, original_intermediate_size=256, vocab_size=300,
                        max_position_embeddings=64)
    model = PrunedModel(cfg)
    matrices = []
    for name, p in model.named_parameters():
        if name.endswith("ln_weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert p.dim() == 2, name
            matrices.append(p.flatten() if name != "embeddings.word_embeddings" else
                            torch.cat([p[: cfg["pad_token_id"]], p[cfg["pad_token_id"] + 1:]]).flatten())
    w = torch.cat(matrices).double()
    n = w.numel()
    # normal(0, 0.02): mean within 5 standard errors of 0, std within 2%, tails of a normal
    assert abs(float(w.mean())) < 5 * 0.02 / n ** 0.5
    assert float(w.std()) == pytest.approx(0.02, rel=0.02)
    assert float((w.abs() > 0.04).double().mean()) == pytest.approx(0.0455, abs=0.005)  # P(|z| > 2)
    assert torch.equal(model.embeddings.word_embeddings[cfg["pad_token_id"]], torch.zeros(64))
    assert torch.equal(model.hidden_index, torch.arange(64))
    # reset_parameters draws again, with the same rules.
    before = model.layers[0].attention.qkv_weight.clone()
    model.layers[0].attention.out_bias.data.fill_(3.0)
    model.reset_parameters()
    assert not torch.equal(before, model.layers[0].attention.qkv_weight)
    assert torch.equal(model.layers[0].attention.out_bias, torch.zeros(64))
    assert torch.equal(model.embeddings.word_embeddings[cfg["pad_token_id"]], torch.zeros(64))


def test_random_scratch_model_is_seeded_and_keeps_the_hidden_index(arch_dir):
    arch = PrunedModel.from_pretrained(arch_dir)
    labels = model_io.read_task(arch_dir)["spec"]
    a, b, c = (sl.scratch_model(arch, "random", s, labels) for s in (5, 5, 6))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.layers[0].ffn.in_weight, c.layers[0].ffn.in_weight)
    assert torch.equal(a.hidden_index, arch.hidden_index)
    assert a.layer_shapes() == arch.layer_shapes()


def test_pretrained_slice_copies_exactly_the_kept_pretrained_weights(arch_dir, base_dir, teacher_dir):
    import transformers as tf

    arch = PrunedModel.from_pretrained(arch_dir)
    labels = model_io.read_task(arch_dir)["spec"]
    kept = sl.kept_indices(arch_dir, arch.config, arch.hidden_index)
    model = sl.scratch_model(arch, "pretrained-slice", 0, labels, base_dir, kept)
    assert model.layer_shapes() == arch.layer_shapes() and model.embeddings.word_embeddings.dtype == torch.float32
    # The kept sets are those of the gates the CoFi run saved.
    z = load_file(os.path.join(arch_dir, pl.GATES_FILE))
    K = torch.nonzero(z["z.hidden"] != 0).flatten()
    assert torch.equal(model.hidden_index, K)
    base = tf.BertModel.from_pretrained(base_dir)
    teacher = tf.BertForSequenceClassification.from_pretrained(teacher_dir)
    emb = base.embeddings
    assert torch.equal(model.embeddings.word_embeddings, emb.word_embeddings.weight[:, K])
    assert torch.equal(model.embeddings.position_embeddings, emb.position_embeddings.weight[:, K])
    assert torch.equal(model.embeddings.ln_weight, emb.LayerNorm.weight[K])
    dh = arch.config["head_dim"]
    for i, (heads, units) in enumerate(kept):
        layer, got = base.encoder.layer[i], model.layers[i]
        if heads is not None:
            mha = z["z.mha"][i] if "z.mha" in z else torch.tensor(1.0)
            assert mha != 0
            want_heads = torch.nonzero(z["z.head"][i] != 0).flatten()
            assert torch.equal(heads, want_heads)
            rows = (heads[:, None] * dh + torch.arange(dh)).flatten()
            att = layer.attention
            if heads.numel():
                qkv = torch.cat([lin.weight[rows][:, K] for lin in (att.self.query, att.self.key, att.self.value)])
                assert torch.equal(got.attention.qkv_weight, qkv), i
                assert torch.equal(got.attention.out_weight, att.output.dense.weight[K][:, rows]), i
            assert torch.equal(got.attention.out_bias, att.output.dense.bias[K]), i
            assert torch.equal(got.attention.ln_weight, att.output.LayerNorm.weight[K]), i
        if units is not None:
            assert torch.equal(units, torch.nonzero(z["z.int"][i] != 0).flatten())
            if units.numel():
                assert torch.equal(got.ffn.in_weight, layer.intermediate.dense.weight[units][:, K]), i
                assert torch.equal(got.ffn.out_weight, layer.output.dense.weight[K][:, units]), i
            assert torch.equal(got.ffn.out_bias, layer.output.dense.bias[K]), i
    # The pooler is the pretrained one; the weights are not the fine-tuned teacher's.
    assert torch.equal(model.head.dense_weight, base.pooler.dense.weight[:, K])
    assert not torch.equal(model.layers[0].attention.out_bias, teacher.bert.encoder.layer[0].attention.output.dense.bias[K])


def test_pretrained_slice_of_a_real_cofi_run(teacher_dir, base_dir, toy, tmp_path):
    arch = str(tmp_path / "cofi")
    short = {**FAST_PRUNE, "distill_epochs": 0.0, "prune_epochs": 1.0, "sparsity_warmup_epochs": 0.5,
             "finetune_epochs": 0.5}
    pl.cofi_prune(teacher_dir, *toy, arch, pl.PruneConfig(**short), progress=False)
    out = str(tmp_path / "slice")
    cfg = sl.ScratchConfig(budget="E", init="pretrained-slice", **FAST_SCRATCH)
    result = sl.scratch_train(arch, *toy, out, cfg, pretrained_dir=base_dir, progress=False)
    run = json.load(open(os.path.join(out, tr.RUN_FILE)))
    assert run["init"] == "pretrained-slice" and run["pretrained"] == os.path.abspath(base_dir)
    assert run["epochs"] == 1.5 and result.steps == 9 and run["budget"]["max_length"] == FAST_PRUNE["max_length"]
    assert _shapes_of(out) == _shapes_of(arch)
    assert PrunedModel.from_pretrained(out).layer_shapes() == PrunedModel.from_pretrained(arch).layer_shapes()


def test_pretrained_of_other_sizes_or_fine_tuned_is_refused(arch_dir, teacher_dir, toy, tmp_path):
    other = tiny_bert_dir(tmp_path / "two_layers", layers=2)
    cfg = sl.ScratchConfig(budget="E", init="pretrained-slice", **FAST_SCRATCH)
    with pytest.raises(tr.RunError, match=r"--pretrained .* is not the model the architecture was pruned from: "
                                          r"layers 2 \(architecture's original: 4\)"):
        sl.scratch_train(arch_dir, *toy, str(tmp_path / "o1"), cfg, pretrained_dir=other, progress=False)
    with pytest.raises(tr.RunError, match=r"--pretrained .* holds a model written by `cofi finetune`"):
        sl.scratch_train(arch_dir, *toy, str(tmp_path / "o2"), cfg, pretrained_dir=teacher_dir, progress=False)
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")


def test_gates_that_disagree_with_the_shapes_are_refused(arch_dir, base_dir, toy, tmp_path):
    from safetensors.torch import save_file

    copy = tmp_path / "arch"
    shutil.copytree(arch_dir, copy)
    gates = load_file(str(copy / pl.GATES_FILE))
    gates["z.int"][0] = 0.0  # no unit of layer 0 kept, but the model keeps some
    save_file(gates, str(copy / pl.GATES_FILE))
    cfg = sl.ScratchConfig(budget="E", init="pretrained-slice", **FAST_SCRATCH)
    with pytest.raises(tr.RunError, match=r"layer 0 has 0 FFN units with non-zero gates, but the model"):
        sl.scratch_train(str(copy), *toy, str(tmp_path / "o"), cfg, pretrained_dir=base_dir, progress=False)


# ---------------------------------------------------------------------- resume


@pytest.mark.parametrize("at", [1, 6, 11])
def test_scratch_killed_and_resumed_equals_uninterrupted(arch_dir, scratch_e, toy, tmp_path, monkeypatch, at):
    out = str(tmp_path / "run")
    cfg = sl.ScratchConfig(budget="E", **FAST_SCRATCH)
    with monkeypatch.context() as m:
        kill_at(m, sl._Scratch, "train_step", at)
        with pytest.raises(Killed):
            sl.scratch_train(arch_dir, *toy, out, cfg, progress=False)
    assert os.path.isfile(os.path.join(out, tr.CHECKPOINT_DIR, tr.CHECKPOINT_FILE))
    assert not os.path.exists(os.path.join(out, tr.RUN_FILE))
    sl.scratch_train(arch_dir, *toy, out, cfg, resume=True, progress=False)
    ref, _ = scratch_e
    assert files_equal_tensors(os.path.join(ref, "model.safetensors"), os.path.join(out, "model.safetensors"))
    a, b = (json.load(open(os.path.join(d, tr.RUN_FILE))) for d in (ref, out))
    assert a["best"] == b["best"] and a["budget"] == b["budget"]
    assert strip_times(read_log(ref)) == strip_times(read_log(out))


def test_resume_with_another_budget_is_refused(arch_dir, toy, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        kill_at(m, sl._Scratch, "train_step", 3)
        with pytest.raises(Killed):
            sl.scratch_train(arch_dir, *toy, out, sl.ScratchConfig(budget="E", **FAST_SCRATCH), progress=False)
    before = tree_snapshot(out)
    with pytest.raises(tr.RunError, match=r"--resume: the checkpoint .* is from another run .*config"):
        sl.scratch_train(arch_dir, *toy, out, sl.ScratchConfig(budget="B", **FAST_SCRATCH), resume=True,
                         progress=False)
    assert tree_snapshot(out) == before


# ---------------------------------------------------------------------- the command


def test_scratch_is_registered_and_its_help_lists_its_flags_only(capsys):
    assert get_method("scratch").config is sl.ScratchConfig
    with pytest.raises(SystemExit) as e:
        cli.main(["prune", "--method", "scratch", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--architecture", "--pretrained", "--budget", "--init", "--lr", "--warmup-fraction", "--data",
                 "--out", "--resume"):
        assert flag in text, flag
    for flag in ("--teacher", "--student", "--target-sparsity", "--prune-epochs", "--no-distill", "--reg-lr"):
        assert flag not in text, flag


def test_cofi_prune_method_scratch_runs_from_the_command_line(arch_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows(48, seed=1))
    eval_data = write_jsonl(tmp_path / "eval.jsonl", toy_rows(24, seed=2))
    out = tmp_path / "out"
    argv = ["prune", "--method", "scratch", "--architecture", arch_dir, "--data", data, "--eval-data", eval_data,
            "--budget", "E", "--out", str(out), "--quiet", "--batch-size", "8", "--max-length", "16", "--lr", "1e-3"]
    assert cli.main(argv) == 0
    assert "pruned model written to" in capsys.readouterr().out
    assert PrunedModel.from_pretrained(out).layer_shapes() == PrunedModel.from_pretrained(arch_dir).layer_shapes()
