"""BERT-of-Theseus on tiny random models: the schedules, the module routing, what is frozen,
the compact output, exact resume, and the command line."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from cofi_kernels import cli
from cofi_kernels.models.pruned_model import PrunedModel
from cofi_kernels.pruning.theseus import loop as tl
from cofi_kernels.pruning.theseus.model import TheseusModel
from cofi_kernels.pruning.theseus.schedule import ReplaceSchedule
from cofi_kernels.training import model_io
from cofi_kernels.training import trainer as tr
from tests.training_support import (
    Killed,
    files_equal_tensors,
    kill_at,
    read_log,
    strip_times,
    stub_run,
    toy_rows,
    write_jsonl,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# 48 training examples, batch 8: 6 steps an epoch -> 12 replacing steps, 6 fine-tuning steps.
FAST = dict(layers=2, replace_epochs=2.0, finetune_epochs=1.0, batch_size=8, max_length=16, checkpoint_every=4,
            eval_every=3, lr=1e-3, finetune_lr=1e-3)
TEACHER_LAYERS = 4  # tests.training_support.tiny_bert_dir


def _run(teacher_dir, toy, out, monkeypatch=None, **settings):
    """Run theseus_prune; returns (result, the TheseusModel it trained)."""
    built = {}
    original = tl._build_model

    def capture(*a, **kw):
        built["model"] = original(*a, **kw)
        return built["model"]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(tl, "_build_model", capture)
        result = tl.theseus_prune(teacher_dir, *toy, str(out), tl.TheseusConfig(**{**FAST, **settings}),
                                  progress=False)
    return result, built["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, toy):
    out = tmp_path_factory.mktemp("theseus") / "ref"
    result, model = _run(teacher_dir, toy, out)
    return str(out), result, model


@pytest.fixture(scope="module")
def reference_distill(tmp_path_factory, teacher_dir, toy):
    out = tmp_path_factory.mktemp("theseus") / "ref_distill"
    result, model = _run(teacher_dir, toy, out, distill=True)
    return str(out), result, model


def _random_batch(vocab: int, batch: int = 5, seq: int = 12):
    ids = torch.randint(0, vocab, (batch, seq))
    lengths = torch.randint(2, seq + 1, (batch,))
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()  # right padding, first token real
    types = torch.zeros_like(ids)
    return ids, mask, types


def _teacher_model(teacher_dir, layers=2) -> TheseusModel:
    return TheseusModel(model_io.load_task_model(teacher_dir), layers)


def _perturb_successor(model: TheseusModel) -> None:
    """Make every successor layer differ from the predecessor layer it was copied from."""
    with torch.no_grad():
        for p in model.successor.parameters():
            p.add_(0.05 * torch.randn_like(p))


# ---------------------------------------------------------------------- schedules


def _replace_steps(out):
    return [r for r in read_log(out) if r["event"] == "step" and r["phase"] == "replace"]


@pytest.mark.parametrize("settings, formula", [
    ({}, lambda t, T: min(1.0, (1 - 0.3) / (0.6 * T) * t + 0.3)),
    ({"replace_rate": 0.1, "slope": 0.125}, lambda t, T: min(1.0, 0.125 * t + 0.1)),
    ({"schedule": "constant"}, lambda t, T: 0.3 if t < math.ceil(0.6 * T) else 1.0),
    ({"schedule": "constant", "replace_rate": 0.0, "constant_steps": 5}, lambda t, T: 0.0 if t < 5 else 1.0),
], ids=["linear-default", "linear-k", "constant-default", "constant-S"])
def test_replacing_rate_follows_its_formula_at_every_step(tmp_path, teacher_dir, toy, settings, formula):
    from cofi_kernels.training.trainer import seed_step

    out = tmp_path / "run"
    _run(teacher_dir, toy, out, finetune_epochs=0.5, **settings)
    steps = _replace_steps(out)
    T = len(steps)
    assert T == 12
    run = json.load(open(out / tr.RUN_FILE))
    for r in steps:
        t = r["step"] - 1  # the log counts steps done; the schedule counts from 0
        assert r["replace_rate"] == pytest.approx(formula(t, T), abs=1e-12), t
        # One Bernoulli(p_t) per module, drawn from the generator the trainer seeds for step t.
        seed_step(FAST.get("seed", 0), t)
        want = torch.bernoulli(torch.full((FAST["layers"],), r["replace_rate"])).long().tolist()
        assert r["successor"] == want, t
        if r["replace_rate"] == 1.0:
            assert r["successor"] == [1, 1]
        if r["replace_rate"] == 0.0:
            assert r["successor"] == [0, 0]
    assert {r["replace_rate"] for r in read_log(out) if r["event"] == "step" and r["phase"] == "finetune"} == {1.0}
    full = run["schedule"]["full_at_step"]
    assert [r["replace_rate"] == 1.0 for r in steps] == [t >= full for t in range(T)]
    if "slope" not in settings and "constant_steps" not in settings:  # the defaults: p = 1 at about 60%
        assert abs(full - 0.6 * T) <= 1


def test_default_schedules_reach_1_at_60_percent_of_a_long_phase():
    for kind in ("linear", "constant"):
        s = ReplaceSchedule.resolve(kind, 0.3, 0.0, 0, 0.6, 1000)
        assert s.full_at_step() in (600, 601), kind
        assert s.rate(0) == 0.3 and s.rate(999) == 1.0
        assert s.rate(599) < 1.0
    lin = ReplaceSchedule.resolve("linear", 0.3, 0.0, 0, 0.6, 1000)
    rates = [lin.rate(t) for t in range(1000)]
    assert all(b >= a for a, b in zip(rates, rates[1:]))
    assert rates[300] == pytest.approx(0.3 + 0.7 * 300 / 600)


# ---------------------------------------------------------------------- the model


def test_successor_starts_as_predecessor_layers_0_to_m_minus_1(teacher_dir):
    for m in (1, 2, 4):
        model = _teacher_model(teacher_dir, m)
        pred = model.predecessor_layers()
        assert len(model.successor) == m and model.ratio == TEACHER_LAYERS // m
        for j in range(m):
            a, b = model.successor[j].state_dict(), pred[j].state_dict()
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), (m, j)
            # copies, not the same tensors: training the successor leaves the predecessor alone
            assert all(a[k].data_ptr() != b[k].data_ptr() for k in a)


def _reference_logits(teacher_dir, layers, ids, mask, types):
    """A plain HF classifier whose encoder runs exactly ``layers`` (the teacher's embeddings and head)."""
    import copy

    net = model_io.load_task_model(teacher_dir).eval()
    net.bert.encoder.layer = torch.nn.ModuleList(copy.deepcopy(l) for l in layers)
    net.config.num_hidden_layers = len(layers)
    with torch.no_grad():
        return net(input_ids=ids, attention_mask=mask, token_type_ids=types).logits


@pytest.mark.parametrize("use", [[True, True], [False, False], [True, False], [False, True]])
def test_each_module_runs_its_successor_or_its_predecessor_layers(teacher_dir, use):
    model = _teacher_model(teacher_dir).eval()
    _perturb_successor(model)
    pred = model.predecessor_layers()
    want_layers = []
    for j, s in enumerate(use):
        want_layers += [model.successor[j]] if s else [pred[2 * j], pred[2 * j + 1]]
    ids, mask, types = _random_batch(model.net.config.vocab_size)
    with torch.no_grad():
        got = model(ids, mask, types, use_successor=use).logits
    want = _reference_logits(teacher_dir, want_layers, ids, mask, types)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the encoder holds its own layers again after the forward
    assert model.predecessor_layers() is pred and len(pred) == TEACHER_LAYERS


def test_at_p_1_the_training_forward_without_dropout_equals_the_eval_forward(teacher_dir):
    model = _teacher_model(teacher_dir)
    _perturb_successor(model)
    ids, mask, types = _random_batch(model.net.config.vocab_size, batch=6)
    model.train()
    torch.manual_seed(3)
    with_dropout = model(ids, mask, types, use_successor=[True, True]).logits.detach()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    train = model(ids, mask, types, use_successor=[True, True]).logits.detach()
    model.eval()
    with torch.no_grad():
        ev = model(ids, mask, types).logits  # evaluation runs the successor alone
    assert torch.equal(train, ev)
    assert not torch.allclose(with_dropout, ev)  # dropout was on: the comparison above can fail


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_successor_as_a_pruned_model_computes_the_successor(kind):
    """successor_pruned_model (the generic builder) on a 6-layer model cut to 3, both architectures."""
    import transformers as tf

    from cofi_kernels.pruning.theseus.model import successor_pruned_model

    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=40, num_labels=3)
    if kind == "roberta":
        net = tf.RobertaForSequenceClassification(tf.RobertaConfig(**common, pad_token_id=1))
    else:
        net = tf.BertForSequenceClassification(tf.BertConfig(**common))
    model = TheseusModel(net, 3).eval()
    _perturb_successor(model)
    pruned = successor_pruned_model(model)
    assert pruned.config["num_layers"] == 3 and pruned.sparsity == pytest.approx(0.5)
    ids, mask, types = _random_batch(100, batch=4, seq=10)
    ids = ids.clamp(min=2)  # no RoBERTa padding id among the real tokens
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids, mask, types), model(ids, mask, types).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- a run


def test_frozen_tensors_are_bitwise_unchanged_and_only_the_successor_trains(reference, teacher_dir):
    _, _, model = reference
    teacher = model_io.load_task_model(teacher_dir)
    net = dict(model.net.named_parameters())
    ref = dict(teacher.named_parameters())
    assert net.keys() == ref.keys()
    for k in ref:  # embeddings, the predecessor's 4 layers, pooler, classifier
        assert torch.equal(net[k], ref[k]), k
        assert not net[k].requires_grad, k
    assert all(p.requires_grad for p in model.successor.parameters())
    layers = teacher.bert.encoder.layer
    changed = sum(not torch.equal(v, layers[j].state_dict()[k])
                  for j, s in enumerate(model.successor) for k, v in s.state_dict().items())
    assert changed > 10, "the successor did not train"


def test_output_is_a_pruned_model_whose_logits_equal_the_trained_successor(reference, teacher_dir, toy):
    out, result, model = reference
    pruned = PrunedModel.from_pretrained(out)
    teacher = model_io.load_task_model(teacher_dir)
    cfg = teacher.config
    assert pruned.layer_shapes() == [{"heads": cfg.num_attention_heads, "ffn_width": cfg.intermediate_size,
                                      "hidden": cfg.hidden_size}] * FAST["layers"]
    assert pruned.sparsity == pytest.approx(1 - FAST["layers"] / TEACHER_LAYERS)
    run = json.load(open(os.path.join(out, tr.RUN_FILE)))
    assert run["sparsity"] == pytest.approx(pruned.sparsity) == pytest.approx(result.extra["sparsity"])
    assert run["method"] == "theseus" and run["modules"] == [[0, 1], [2, 3]]
    with open(os.path.join(out, "shapes.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    model.eval()
    for _ in range(3):
        ids, mask, types = _random_batch(cfg.vocab_size)
        with torch.no_grad():
            want = model(ids, mask, types).logits
            got = pruned(ids, mask, types)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The best fine-tuning evaluation is the kept state and the reported metric.
    evals = [r for r in read_log(out) if r["event"] == "eval" and r["phase"] == "finetune"]
    assert result.metrics["accuracy"] == max(r["accuracy"] for r in evals)
    from cofi_kernels.tasks.classification import Encoded
    from cofi_kernels.training.evaluation import evaluate

    task = model_io.read_task(out)
    enc = Encoded(toy[1], task["spec"], model_io.load_tokenizer(out), FAST["max_length"])
    assert evaluate(pruned, enc, task["spec"])["accuracy"] == pytest.approx(result.metrics["accuracy"])


def test_distill_adds_prediction_distillation_from_the_predecessor(reference_distill, teacher_dir, toy):
    out, _, model = reference_distill
    steps = [r for r in read_log(out) if r["event"] == "step"]
    assert all(r["loss"] == pytest.approx(r["task"] + r["distill_pred"], rel=1e-6) for r in steps)
    assert all(r["distill_pred"] >= 0 for r in steps)
    # The cached targets are the predecessor's eval-mode logits.
    from cofi_kernels.tasks.classification import Encoded

    task = model_io.read_task(teacher_dir)
    enc = Encoded(toy[0], task["spec"], model_io.load_tokenizer(teacher_dir), FAST["max_length"])
    teacher = model_io.load_task_model(teacher_dir).eval()
    b = enc.batch([3, 17, 40])
    with torch.no_grad():
        want = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       token_type_ids=b["token_type_ids"]).logits
    hooks = tl._TheseusRun(tl.TheseusConfig(**{**FAST, "distill": True}), tl._Plan(tl.TheseusConfig(**FAST), 48),
                           stub_run(), model, task["spec"], enc, enc, torch.device("cpu"))
    hooks.on_start(0, [3, 17, 40])
    torch.testing.assert_close(hooks.teacher.batch_logits([3, 17, 40], "cpu"), want, rtol=1e-5, atol=1e-5)
    assert sorted(hooks.teacher.logits) == [3, 17, 40]  # only this process's examples are kept


@pytest.mark.parametrize("distill, at", [(False, 5), (False, 12), (False, 16), (True, 7)],
                         ids=["replace", "phase-boundary", "finetune", "distill-replace"])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, reference, reference_distill, teacher_dir,
                                                 toy, distill, at):
    ref = (reference_distill if distill else reference)[0]
    out = str(tmp_path / "run")
    cfg = tl.TheseusConfig(**{**FAST, "distill": distill})
    with monkeypatch.context() as m:
        kill_at(m, tl._TheseusRun, "train_step", at)
        with pytest.raises(Killed):
            tl.theseus_prune(teacher_dir, *toy, out, cfg, progress=False)
    assert os.path.isfile(os.path.join(out, tr.CHECKPOINT_DIR, tr.CHECKPOINT_FILE))
    assert not os.path.exists(os.path.join(out, tr.RUN_FILE))
    tl.theseus_prune(teacher_dir, *toy, out, cfg, resume=True, progress=False)
    assert files_equal_tensors(os.path.join(ref, "model.safetensors"), os.path.join(out, "model.safetensors"))
    assert strip_times(read_log(ref)) == strip_times(read_log(out))
    a, b = (json.load(open(os.path.join(d, tr.RUN_FILE))) for d in (ref, out))
    assert a["best"] == b["best"] and a["schedule"] == b["schedule"]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, monkeypatch, teacher_dir, toy):
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        kill_at(m, tl._TheseusRun, "train_step", 3)
        with pytest.raises(Killed):
            tl.theseus_prune(teacher_dir, *toy, out, tl.TheseusConfig(**FAST), progress=False)
    other = tl.TheseusConfig(**{**FAST, "schedule": "constant"})
    with pytest.raises(tr.RunError, match="another run.*config"):
        tl.theseus_prune(teacher_dir, *toy, out, other, resume=True, progress=False)


# ---------------------------------------------------------------------- bad settings (API)


@pytest.mark.parametrize("settings, pattern", [
    ({"layers": 3}, r"--layers 3 does not divide the 4 layers .*divisor of 4 \(1, 2, 4\)"),
    ({"layers": 0}, r"layers \(--layers\) must be >= 1"),
    ({"layers": -2}, r"layers \(--layers\) must be >= 1"),
    ({"layers": 8}, r"--layers 8 is more than the 4 layers"),
    ({"schedule": "cosine"}, r"schedule \(--schedule\) must be one of linear, constant"),
    ({"replace_rate": 1.5}, r"replace_rate \(--replace-rate\) must be in \[0, 1\]"),
    ({"replace_rate": -0.1}, r"replace_rate \(--replace-rate\) must be in \[0, 1\]"),
    ({"slope": -0.01}, r"slope \(--slope\) must be >= 0"),
    ({"constant_steps": -1, "schedule": "constant"}, r"constant_steps \(--constant-steps\) must be >= 0"),
    ({"slope": 0.1, "schedule": "constant"}, r"slope \(--slope\) belongs to the linear schedule"),
    ({"constant_steps": 4}, r"constant_steps \(--constant-steps\) belongs to the constant schedule"),
    ({"rate_full_at": 0.0}, r"rate_full_at \(--rate-full-at\) must be in \(0, 1\]"),
    ({"rate_full_at": 1.5}, r"rate_full_at \(--rate-full-at\) must be in \(0, 1\]"),
    ({"replace_epochs": 0.0}, r"replace_epochs must be > 0"),
    ({"finetune_epochs": -1.0}, r"finetune_epochs must be >= 0"),
    ({"replace_rate": float("nan")}, r"replace_rate must be a finite number"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, teacher_dir, toy, settings, pattern):
    out = tmp_path / "out"
    with pytest.raises(tr.RunError, match=pattern):
        tl.theseus_prune(teacher_dir, *toy, str(out), tl.TheseusConfig(**{**FAST, **settings}), progress=False)
    assert not out.exists()


# ---------------------------------------------------------------------- the command line


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


THESEUS_FLAGS = ("--layers", "--replace-epochs", "--schedule", "--replace-rate", "--slope", "--constant-steps",
                 "--rate-full-at", "--distill", "--finetune-lr")
COFI_ONLY = ("--target-sparsity", "--student", "--no-distill", "--prune-epochs", "--sparsity-warmup-epochs",
             "--reg-lr", "--lambda-lr", "--alpha-layer", "--epsilon", "--learn", "--teacher-cache-mb")


def _flags_in(text: str) -> set[str]:
    import re

    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def test_help_of_theseus_lists_the_theseus_flags_only(capsys):
    text = _flags_in(_help(capsys, ["prune", "--method", "theseus", "--help"]))
    assert set(THESEUS_FLAGS) | {"--teacher"} <= text, text
    assert not text & set(COFI_ONLY), text
    cofi = _flags_in(_help(capsys, ["prune", "--help"]))  # the default method stays cofi
    assert set(COFI_ONLY) <= cofi
    assert not cofi & {"--layers", "--replace-rate", "--schedule", "--rate-full-at", "--slope", "--distill"}, cofi


def test_cli_prune_eval_predict(tmp_path, capsys, teacher_dir):
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(48, seed=1))
    ev = write_jsonl(tmp_path / "eval.jsonl", toy_rows(24, seed=2))
    out = str(tmp_path / "theseus")
    argv = ["prune", "--method", "theseus", "--teacher", teacher_dir, "--data", train, "--eval-data", ev,
            "--layers", "1", "--out", out, "--quiet", "--schedule", "constant", "--distill"]
    for k in ("replace_epochs", "finetune_epochs", "batch_size", "max_length", "eval_every"):
        argv += ["--" + k.replace("_", "-"), str(FAST[k])]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "realised sparsity 0.7500" in printed, printed
    run = json.load(open(os.path.join(out, tr.RUN_FILE)))
    assert run["config"]["layers"] == 1 and run["config"]["distill"] and run["modules"] == [[0, 1, 2, 3]]
    assert cli.main(["eval", "--model", out, "--data", ev, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kind"] == "pruned" and res["examples"] == 24
    assert res["accuracy"] == pytest.approx(run["metrics"]["accuracy"])
    assert res["sparsity"] == pytest.approx(0.75)
    pred = str(tmp_path / "pred.jsonl")
    assert cli.main(["predict", "--model", out, "--data", ev, "--out", pred, "--quiet"]) == 0
    lines = [json.loads(line) for line in open(pred)]
    assert len(lines) == 24 and all(set(line["probabilities"]) == {"sport", "money", "music"} for line in lines)
