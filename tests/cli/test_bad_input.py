"""Every bad input of the `cofi` command: one line `cofi <command>: error: ...`, exit status 2,
no warning, and nothing written.

One table: each case builds its input (a data file, an edited model directory, a flag),
runs `cofi_kernels.cli.main` in-process and asserts the exit status, exactly one stderr
line naming the cause, no warning escaping, and `--out` (or, for `--out ""`, the working
directory) byte-identical afterwards. `item` is the number of the case in issue 11
("Every bad input gets its one-line error"); cases without one were handled before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from cofi_kernels import cli
from cofi_kernels.pruning.cofi import loop as pl
from cofi_kernels.training import trainer as tr
from tests.training_support import FAST_FINETUNE, FAST_PRUNE, toy_rows, tree_snapshot, write_csv, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_POSITIONS = 80  # max_position_embeddings of tests.training_support.tiny_bert_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return SimpleNamespace(train=write_jsonl(d / "train.jsonl", toy_rows(48, seed=1)),
                           eval=write_jsonl(d / "eval.jsonl", toy_rows(24, seed=2)))


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, teacher_dir, toy):
    out = str(tmp_path_factory.mktemp("runs") / "pruned")
    pl.cofi_prune(teacher_dir, *toy, out, pl.PruneConfig(**FAST_PRUNE), progress=False)
    return out


# ---------------------------------------------------------------------- command lines


def finetune(c, *extra, model=None, data=None, eval_data=None, out=None):
    f = FAST_FINETUNE
    return ["finetune", "--model", model or c.base, "--data", data or c.train, "--eval-data", eval_data or c.eval,
            "--out", str(c.out if out is None else out), "--epochs", str(f["epochs"]),
            "--batch-size", str(f["batch_size"]), "--max-length", str(f["max_length"]), "--quiet", *extra]


def prune(c, *extra, teacher=None, data=None, eval_data=None, out=None):
    p = FAST_PRUNE
    argv = ["prune", "--teacher", teacher or c.teacher, "--data", data or c.train, "--eval-data", eval_data or c.eval,
            "--out", str(c.out if out is None else out)]
    for key in ("target_sparsity", "distill_epochs", "prune_epochs", "sparsity_warmup_epochs", "finetune_epochs",
                "batch_size", "max_length"):
        argv += ["--" + key.replace("_", "-"), str(p[key])]
    return argv + ["--quiet", *extra]


def theseus(c, *extra, layers="2"):
    """`cofi prune --method theseus` of the 4-layer tiny teacher (no --layers when ``layers`` is None)."""
    argv = ["prune", "--method", "theseus", "--teacher", c.teacher, "--data", c.train, "--eval-data", c.eval,
            "--out", str(c.out), "--batch-size", "8", "--max-length", "16", "--replace-epochs", "1", "--quiet"]
    return argv + ([] if layers is None else ["--layers", layers]) + list(extra)


def smp(c, *extra, model=None, structure=("--structured",)):
    """`cofi prune --method smp` of the tiny pre-trained model (``structure``: its structure flags)."""
    return ["prune", "--method", "smp", "--model", model or c.base, "--data", c.train, "--eval-data", c.eval,
            "--out", str(c.out), "--remaining", "0.5", "--batch-size", "8", "--max-length", "16", "--epochs", "1",
            "--schedule-epochs", "0.5", "--quiet", *structure, *extra]


def other_vocabulary(c) -> str:
    """A copy of the teacher whose tokenizer maps one word to another id."""
    def swap(t):
        vocab = t["model"]["vocab"]
        vocab["money"], vocab["music"] = vocab["music"], vocab["money"]

    return edited(c, c.teacher, "tokenizer.json", swap)


def scratch(c, *extra, architecture=None, data=None, budget=("--budget", "E")):
    """`cofi prune --method scratch` of the pruned model's architecture (``budget``: its budget flags)."""
    return ["prune", "--method", "scratch", "--architecture", architecture or c.pruned, "--data", data or c.train,
            "--eval-data", c.eval, "--out", str(c.out), "--batch-size", "8", "--max-length", "16", "--quiet",
            *budget, *extra]


def without(c, source: str, name: str) -> str:
    """A copy of the model directory ``source`` without its file ``name``."""
    copy = c.tmp / "model_without"
    shutil.copytree(source, copy)
    os.remove(copy / name)
    return str(copy)


def evaluate(c, *extra, model=None, data=None):
    return ["eval", "--model", model or c.teacher, "--data", data or c.eval, *extra]


def predict(c, *extra, model=None, data=None, out=None):
    """`cofi predict` of the pruned model; --out is a file in the watched directory c.out."""
    return ["predict", "--model", model or c.pruned, "--data", data or c.eval,
            "--out", str(c.out / "pred.jsonl" if out is None else out), "--quiet", *extra]


# ---------------------------------------------------------------------- inputs


def write(c, name, text: str) -> str:
    path = c.tmp / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def edited(c, source: str, name: str, edit: Callable[[dict], None]) -> str:
    """A copy of the model directory ``source`` whose JSON file ``name`` went through ``edit``."""
    copy = c.tmp / "edited_model"
    shutil.copytree(source, copy)
    path = copy / name
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    return str(copy)


def pickled_model(c) -> str:
    """The teacher with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    from safetensors.torch import load_file

    copy = c.tmp / "pickled_model"
    shutil.copytree(c.teacher, copy)
    torch.save(load_file(str(copy / "model.safetensors")), str(copy / "pytorch_model.bin"))
    os.remove(copy / "model.safetensors")
    return str(copy)


def unreadable(c, path: str) -> str:
    """``path``, with os.access saying it cannot be read (the suite runs as root, where chmod does not bite)."""
    deny(c, path, os.R_OK)
    return path


def deny(c, path: str, mode: int) -> None:
    real = os.access

    def access(p, m, *a, **kw):
        if os.path.abspath(p) == os.path.abspath(path) and m & mode:
            return False
        return real(p, m, *a, **kw)

    c.monkeypatch.setattr(os, "access", access)


def read_only_dir(c) -> str:
    parent = c.tmp / "read_only"
    parent.mkdir()
    deny(c, str(parent), os.W_OK)
    return str(parent / "out")


def a_file(c) -> str:
    return write(c, "a_file.txt", "a user's file\n")


def fifo(c) -> str:
    path = str(c.tmp / "pipe.csv")
    os.mkfifo(path)
    return path


def resumable_with(c, blob: bytes) -> None:
    """``--out`` holding a checkpoint file with ``blob`` in it."""
    (c.out / tr.CHECKPOINT_DIR).mkdir(parents=True)
    (c.out / tr.CHECKPOINT_DIR / tr.CHECKPOINT_FILE).write_bytes(blob)


def foreign_pickle() -> bytes:
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    return pickle.dumps({"format": 2, "payload": Payload()}, protocol=4)


def csv_rows(header: str, *rows: str) -> str:
    return "\n".join([header, *rows]) + "\n"


def labelled(c, name: str, label: str, at: int = 3) -> str:
    rows = toy_rows(24, seed=4)
    rows[at]["label"] = label
    return write_jsonl(c.tmp / name, rows)


def old_predictions(c) -> None:
    """--out's directory holding a predictions file from before (which an error must leave as it was)."""
    c.out.mkdir()
    (c.out / "pred.jsonl").write_text('{"label": "sport"}\n')


def data_in_out(c) -> str:
    c.out.mkdir()
    return write_jsonl(c.out / "data.jsonl", toy_rows(4, seed=6))


def cwd_with_a_log(c) -> None:
    """Run in a directory holding a user's log.jsonl (what --out "" used to truncate)."""
    c.watch = c.tmp / "cwd"
    c.watch.mkdir()
    (c.watch / tr.LOG_FILE).write_text('{"user": "log"}\n')
    c.monkeypatch.chdir(c.watch)


def export(c, *extra, model=None):
    """`cofi export` of the pruned model into the watched directory c.out (made by :func:`out_dir`)."""
    return ["export", "--model", model or c.pruned, "--out", str(c.out / "model.onnx"), *extra]


def out_dir(c) -> None:
    c.out.mkdir()


def theseus_of(c, teacher: str) -> list[str]:
    """:func:`theseus` with another --teacher."""
    argv = theseus(c)
    argv[argv.index("--teacher") + 1] = teacher
    return argv


# What can sit where a file is expected, and how the message names it.
NOT_A_FILE = {"loop": "a symbolic link loop", "fifo": r"a FIFO \(named pipe\), not a regular file",
              "directory": "a directory, not a regular file", "dangling": "a dangling symbolic link"}


def not_a_file(path, kind: str) -> str:
    """``path`` made a ``kind`` of :data:`NOT_A_FILE`: a link to itself, a FIFO, a directory, a link to nothing."""
    path = str(path)
    if kind == "loop":
        os.symlink(os.path.basename(path), path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        os.mkdir(path)
    else:
        os.symlink(path + ".missing", path)
    return path


def with_not_a_file(c, source: str, name: str, kind: str) -> str:
    """A copy of the model directory ``source`` whose file ``name`` is a ``kind`` of :data:`NOT_A_FILE`."""
    copy = c.tmp / "model_with_not_a_file"
    shutil.copytree(source, copy)
    os.remove(copy / name)
    not_a_file(copy / name, kind)
    return str(copy)


def in_use(c) -> None:
    """--out held by a run still going: its log, its checkpoint and its lock (taken here: a lock belongs
    to an open descriptor, so this process's own run counts as another one)."""
    c.holder = tr.RunDirectory(str(c.out), {}, False, "toy")
    c.holder.start()
    c.holder.save_checkpoint({})


def locked(c) -> None:
    """--out, empty, locked as a running `cofi demo` holds it."""
    c.out.mkdir()
    c.holder = tr.OutputLock(str(c.out))


IN_USE = r"output directory '.*out' is in use by another cofi run( \(process \d+\))?; wait for it to end"


def without_vocabulary(c, source: str) -> str:
    """A copy of the model directory ``source`` whose tokenizer keeps only tokenizer_config.json
    (and special_tokens_map.json): its vocabulary files removed."""
    copy = c.tmp / "model_without_vocabulary"
    shutil.copytree(source, copy)
    for name in ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt"):
        if (copy / name).exists():
            os.remove(copy / name)
    return str(copy)


def with_weights_edited(c, source: str, edit: Callable[[dict], None]) -> str:
    """A copy of the model directory ``source`` whose model.safetensors went through ``edit``."""
    from safetensors.torch import load_file, save_file

    copy = c.tmp / "model_with_weights_edited"
    shutil.copytree(source, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return str(copy)


def _one_weight(tensors: dict) -> str:
    """The name of an encoder weight matrix (one that every forward reads)."""
    return next(k for k, v in sorted(tensors.items()) if v.dim() == 2 and "layer" in k and "embeddings" not in k)


def with_nan_weight(c, source: str) -> str:
    def poison(tensors):
        tensors[_one_weight(tensors)].view(-1)[3] = float("nan")

    return with_weights_edited(c, source, poison)


def with_weight_dtype(c, source: str, dtype: torch.dtype) -> str:
    def cast(tensors):
        name = _one_weight(tensors)
        tensors[name] = tensors[name].to(dtype)

    return with_weights_edited(c, source, cast)


def nonfinite_command(c, command: str, kind: str) -> list[str]:
    """``command`` (predict, predict-int8, eval, export) of the pruned or dense model with one NaN weight."""
    model = with_nan_weight(c, c.pruned if kind == "pruned" else c.teacher)
    if command == "predict-int8":
        return predict(c, "--precision", "int8", model=model)
    return {"predict": predict, "eval": evaluate, "export": export}[command](c, model=model)


def with_masks_as(c, kind: str) -> str:
    """A copy of the teacher whose weight_masks.safetensors is a ``kind`` of :data:`NOT_A_FILE`."""
    copy = c.tmp / "masked_model"
    shutil.copytree(c.teacher, copy)
    not_a_file(copy / "weight_masks.safetensors", kind)
    return str(copy)


# ---------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable
    pattern: str
    item: int | None = None
    setup: Callable | None = None  # runs before argv (e.g. to change directory)


TEN_9 = 10**9
# The quote opened on line 3 closes on line 4: four rows used to read as three examples.
BAD_QUOTE = csv_rows("text,label", "goal match team,sport", '"bank market price,money', 'song album band",music',
                     "piano tour record,music")

CASES = [
    # 1. --out "" wrote into the working directory.
    Case("out-empty-finetune", lambda c: finetune(c, out=""), r"--out path is empty", 1, cwd_with_a_log),
    Case("out-empty-prune", lambda c: prune(c, out=""), r"--out path is empty", 1, cwd_with_a_log),
    Case("demo-out-empty", lambda c: ["demo", "--out", "", "--quiet"], r"--out path is empty", 1, cwd_with_a_log),
    # 2. max_length beyond the position embeddings.
    Case("max-length-finetune", lambda c: finetune(c, "--max-length", "100"),
         rf"finetune: max_length must be in \[8, {TINY_POSITIONS}\].*got 100", 2),
    Case("max-length-prune", lambda c: prune(c, "--max-length", "100"),
         rf"prune: max_length must be in \[8, {TINY_POSITIONS}\].*got 100", 2),
    Case("demo-max-length", lambda c: ["demo", "--out", str(c.out), "--max-length", "1024", "--quiet"],
         r"max_length must be in \[8, 512\].*got 1024", 2),
    Case("task-max-length-huge",
         lambda c: evaluate(c, model=edited(c, c.teacher, "cofi_task.json", lambda t: t.update(max_length=100000))),
         rf"cofi_task.json: max_length must be in \[8, {TINY_POSITIONS}\]", 2),
    Case("pruned-task-max-length-huge",
         lambda c: evaluate(c, model=edited(c, c.pruned, "cofi_task.json", lambda t: t.update(max_length=4096))),
         rf"cofi_task.json: max_length must be in \[8, {TINY_POSITIONS}\]", 2),
    # 3. eval --batch-size below 1.
    Case("eval-batch-size-0", lambda c: evaluate(c, "--batch-size", "0"), r"--batch-size: must be >= 1", 3),
    Case("eval-batch-size-negative", lambda c: evaluate(c, "--batch-size", "-1"), r"--batch-size: must be >= 1", 3),
    # 4. devices that do not exist.
    Case("eval-device-bogus", lambda c: evaluate(c, "--device", "bogus"), r"device 'bogus' is not a device name", 4),
    Case("finetune-device-bogus", lambda c: finetune(c, "--device", "bogus"), r"device 'bogus' is not a device", 4),
    Case("prune-device-bogus", lambda c: prune(c, "--device", "mps"), r"device must be cpu, cuda or cuda:N", 4),
    Case("eval-device-absent-gpu", lambda c: evaluate(c, "--device", "cuda:99"),
         r"device 'cuda:99' was asked for, but (no CUDA GPU is available|this machine has \d+ GPU)", 4),
    Case("eval-device-cuda-without-gpu", lambda c: evaluate(c, "--device", "cuda"),
         r"device 'cuda' was asked for, but no CUDA GPU is available", 4),
    # 6. data files that cannot be read.
    Case("data-unreadable", lambda c: finetune(c, data=unreadable(c, c.train)),
         r"--data '.*train\.jsonl' is not readable \(permission denied\)", 6),
    Case("data-unreadable-eval", lambda c: evaluate(c, data=unreadable(c, c.eval)),
         r"--data '.*eval\.jsonl' is not readable", 6),
    Case("eval-data-unreadable", lambda c: prune(c, eval_data=unreadable(c, c.eval)),
         r"--eval-data '.*eval\.jsonl' is not readable", 6),
    # 7. --out that cannot be created.
    Case("out-under-a-file", lambda c: finetune(c, out=os.path.join(a_file(c), "run")),
         r"--out '.*a_file.txt/run' cannot be created: '.*a_file.txt' is a file, not a directory", 7),
    Case("out-read-only-parent", lambda c: prune(c, out=read_only_dir(c)),
         r"--out '.*read_only/out' cannot be created: '.*read_only' is not writable", 7),
    # 8. numbers that are not finite, and seeds torch cannot take.
    Case("epochs-inf", lambda c: finetune(c, "--epochs", "inf"), r"epochs must be a finite number, got inf", 8),
    Case("prune-epochs-inf", lambda c: prune(c, "--prune-epochs", "inf"),
         r"prune_epochs must be a finite number, got inf", 8),
    Case("lr-nan", lambda c: prune(c, "--lr", "nan"), r"prune: lr must be a finite number, got nan", 8),
    Case("finetune-lr-inf", lambda c: finetune(c, "--lr", "inf"), r"lr must be a finite number, got inf", 8),
    Case("epsilon-nan", lambda c: prune(c, "--epsilon", "nan"), r"epsilon must be a finite number", 8),
    Case("seed-huge", lambda c: finetune(c, "--seed", str(2**70)), r"seed must be < 2\*\*32", 8),
    Case("seed-negative", lambda c: prune(c, "--seed", "-3"), r"seed must be >= 0, got -3", 8),
    # 9. hand-edited model directories.
    Case("task-max-length-word",
         lambda c: evaluate(c, model=edited(c, c.teacher, "cofi_task.json", lambda t: t.update(max_length="big"))),
         r"cofi_task.json: max_length must be an integer, got 'big'", 9),
    Case("task-too-many-labels",
         lambda c: evaluate(c, model=edited(c, c.teacher, "cofi_task.json",
                                            lambda t: t.update(labels=["a", "b", "c", "d", "e"]))),
         r"cofi_task.json: lists 5 class\(es\) for a classification task, but the model has 3 output", 9),
    Case("task-duplicate-labels",
         lambda c: evaluate(c, model=edited(c, c.teacher, "cofi_task.json",
                                            lambda t: t.update(labels=["money", "money", "sport"]))),
         r"cofi_task.json: 'labels' lists a class twice", 9),
    Case("task-labels-not-strings",
         lambda c: evaluate(c, model=edited(c, c.teacher, "cofi_task.json", lambda t: t.update(labels=[1, 2, 3]))),
         r"'labels' must be a list of class names \(strings\)", 9),
    Case("teacher-task-too-many-labels",
         lambda c: prune(c, teacher=edited(c, c.teacher, "cofi_task.json",
                                           lambda t: t.update(labels=["a", "b", "c", "d", "e"]))),
         r"cofi_task.json: lists 5 class\(es\).*3 output", 9),
    Case("config-heads-huge",
         lambda c: evaluate(c, model=edited(c, c.pruned, "cofi_config.json",
                                            lambda t: t["layers"][0].update(heads=TEN_9))),
         r"layers\[0\]\.heads is 1000000000, more than the original model's original_num_heads 4", 9),
    Case("config-ffn-huge",
         lambda c: evaluate(c, model=edited(c, c.pruned, "cofi_config.json",
                                            lambda t: t["layers"][1].update(ffn_width=TEN_9))),
         r"layers\[1\]\.ffn_width is 1000000000, more than", 9),
    Case("config-vocab-huge",
         lambda c: evaluate(c, model=edited(c, c.pruned, "cofi_config.json", lambda t: t.update(vocab_size=TEN_9))),
         r"model.safetensors: tensor 'embeddings\.word_embeddings' has the wrong shape", 9),
    Case("dense-config-huge",
         lambda c: evaluate(c, model=edited(c, c.teacher, "config.json", lambda t: t.update(intermediate_size=TEN_9))),
         r"config.json describes at least [\d,]+ weights but its safetensors files hold [\d,]+", 9),
    Case("base-config-heads-huge",
         lambda c: finetune(c, model=edited(c, c.base, "config.json",
                                            lambda t: t.update(num_attention_heads=TEN_9, hidden_size=TEN_9))),
         r"config.json describes at least", 9),
    # 10. CSVs that used to be misread silently.
    Case("csv-unbalanced-quote", lambda c: finetune(c, data=write(c, "quote.csv", BAD_QUOTE)),
         r"quote\.csv:3: .*quote", 10),
    Case("csv-duplicate-header",
         lambda c: finetune(c, data=write(c, "dup.csv", csv_rows("text,label,text", "a b,sport,c d", "e f,money,g h"))),
         r"dup\.csv:1: .*'text'", 10),
    Case("csv-case-variant-header",
         lambda c: finetune(c, data=write(c, "case.csv", csv_rows("Text,label,text", "a b,sport,c", "e f,money,g"))),
         r"case\.csv:1: .*'Text'.*'text'|case\.csv:1: .*'text'.*'Text'", 10),
    # 11. misleading messages.
    Case("data-is-a-directory", lambda c: finetune(c, data=str(c.tmp)), r"--data '.*' is a directory, not a regular file",
         11),
    Case("data-is-a-fifo", lambda c: finetune(c, data=fifo(c)), r"--data '.*pipe\.csv' is a FIFO", 11),
    Case("model-is-a-file", lambda c: finetune(c, model=a_file(c)), r"--model '.*a_file\.txt' is a file, not a directory",
         11),
    Case("model-missing", lambda c: finetune(c, model=str(c.tmp / "nope")), r"--model '.*nope' does not exist", 11),
    Case("eval-model-is-a-file", lambda c: evaluate(c, model=a_file(c)), r"--model '.*a_file\.txt' is a file", 11),
    Case("eval-model-missing", lambda c: evaluate(c, model=str(c.tmp / "nope")), r"--model '.*nope' does not exist",
         11),
    Case("teacher-is-a-file", lambda c: prune(c, teacher=a_file(c)), r"--teacher '.*a_file\.txt' is a file", 11),
    Case("teacher-missing", lambda c: prune(c, teacher=str(c.tmp / "nope")), r"--teacher '.*nope' does not exist", 11),
    Case("student-missing", lambda c: prune(c, "--student", str(c.tmp / "nope")), r"--student '.*nope' does not exist",
         11),
    Case("out-is-a-file", lambda c: finetune(c, out=a_file(c)), r"--out '.*a_file\.txt' is a file, not a directory",
         11),
    Case("prune-unknown-training-label", lambda c: prune(c, data=labelled(c, "odd.jsonl", "weather")),
         r"label 'weather' \(example 4\) is not one of the classes .*from the classes in .*cofi_task\.json", 11),
    Case("pickled-weights", lambda c: evaluate(c, model=pickled_model(c)),
         r"holds its weights only as pytorch_model\.bin, a pickle, which cofi_kernels never loads", 11),
    Case("pickled-base-weights", lambda c: finetune(c, model=pickled_model(c)), r"pytorch_model\.bin, a pickle", 11),
    Case("pickled-checkpoint", lambda c: finetune(c, "--resume"),
         r"--resume: '.*state\.pt' is not a checkpoint written by cofi_kernels", 11,
         lambda c: resumable_with(c, foreign_pickle())),
    # Issue 23, item 8: messages that named the wrong cause.
    Case("export-opset-low", lambda c: export(c, "--opset", "5"),
         r"--opset must be an integer in \[18, \d+\] or None, got 5$", setup=out_dir),
    Case("export-opset-high", lambda c: export(c, "--opset", "999"),
         r"--opset must be an integer in \[18, \d+\] or None, got 999$", setup=out_dir),
    *[Case(f"model-config-json-{kind}",
           lambda c, kind=kind: evaluate(c, model=with_not_a_file(c, c.teacher, "config.json", kind)),
           rf"--model '.*model_with_not_a_file': config\.json is {text}") for kind, text in NOT_A_FILE.items()],
    Case("export-cofi-config-fifo", lambda c: export(c, model=with_not_a_file(c, c.pruned, "cofi_config.json", "fifo")),
         r"--model '.*': cofi_config\.json is a FIFO", setup=out_dir),
    Case("predict-tokenizer-directory",
         lambda c: predict(c, model=with_not_a_file(c, c.pruned, "tokenizer.json", "directory")),
         r"--model '.*': tokenizer\.json is a directory, not a regular file", setup=old_predictions),
    Case("model-is-a-symlink-loop", lambda c: evaluate(c, model=not_a_file(c.tmp / "loop", "loop")),
         r"--model '.*loop' is a symbolic link loop, not a directory"),
    Case("teacher-is-a-symlink-loop", lambda c: prune(c, teacher=not_a_file(c.tmp / "loop", "loop")),
         r"--teacher '.*loop' is a symbolic link loop, not a directory"),
    Case("data-is-a-symlink-loop", lambda c: finetune(c, data=not_a_file(c.tmp / "loop.csv", "loop")),
         r"--data '.*loop\.csv' is a symbolic link loop, not a regular file"),
    Case("data-is-a-dangling-symlink", lambda c: finetune(c, data=not_a_file(c.tmp / "gone.csv", "dangling")),
         r"--data '.*gone\.csv' is a dangling symbolic link \(to '.*gone\.csv\.missing'\)"),
    Case("theseus-pruned-teacher", lambda c: theseus_of(c, c.pruned),
         r"theseus: --teacher '.*' is a pruned model \(written by `cofi prune`\); Theseus needs a fine-tuned dense "
         r"teacher: give a directory written by `cofi finetune`"),
    Case("flag-of-cofi-with-theseus", lambda c: theseus(c, "--target-sparsity", "0.5"),
         r"^cofi prune: error: --target-sparsity is a flag of --method cofi, not of --method theseus; "
         r"see 'cofi prune --method theseus --help'$"),
    Case("flag-of-theseus-with-cofi", lambda c: ["prune", "--layers", "2"],
         r"^cofi prune: error: --layers is a flag of --method theseus, not of --method cofi; "
         r"see 'cofi prune --method cofi --help'$"),
    Case("flag-of-several-methods", lambda c: scratch(c, "--teacher", c.teacher),
         r"--teacher is a flag of --method cofi, smp and theseus, not of --method scratch"),
    # Handled before issue 11; kept in the table.
    Case("csv-missing-label-column", lambda c: finetune(c, data=write_csv(c.tmp / "d.csv", toy_rows(8, 3), ("text",))),
         r"missing column.*'label'"),
    Case("jsonl-missing-text-key",
         lambda c: finetune(c, data=write_jsonl(c.tmp / "d.jsonl", [{"sentence": "a b", "label": "x"}])),
         r"missing column.*'text'"),
    Case("empty-file", lambda c: finetune(c, data=write(c, "e.jsonl", "")), r"no examples"),
    Case("blank-lines-file", lambda c: finetune(c, data=write(c, "e.jsonl", "\n\n")), r"no examples"),
    Case("header-only-csv", lambda c: finetune(c, data=write(c, "e.csv", "text,label\n")), r"no examples"),
    Case("finetune-unknown-eval-label", lambda c: finetune(c, eval_data=labelled(c, "odd.jsonl", "weather")),
         r"'weather' \(example 4\) is not one of the classes"),
    Case("prune-unknown-eval-label", lambda c: prune(c, eval_data=labelled(c, "odd.jsonl", "weather")),
         r"'weather' \(example 4\) is not one of the classes"),
    Case("eval-unknown-label", lambda c: evaluate(c, data=labelled(c, "odd.jsonl", "weather")),
         r"label 'weather' \(example 4\)"),
    Case("model-dir-empty", lambda c: finetune(c, model=str(c.empty_dir)), r"has no config\.json"),
    Case("model-config-broken", lambda c: finetune(c, model=write_broken_config(c)), r"cannot read config\.json"),
    Case("teacher-without-task-file", lambda c: prune(c, teacher=str(c.empty_dir)), r"has no cofi_task\.json"),
    Case("eval-without-task-file", lambda c: evaluate(c, model=str(c.empty_dir)), r"has no cofi_task\.json"),
    *[Case(f"target-sparsity-{t}", lambda c, t=t: prune(c, "--target-sparsity", t),
           r"--target-sparsity.*(\(0, 1\)|number)") for t in ("0", "1", "1.5", "-0.1", "nan", "ninety")],
    Case("out-not-empty", lambda c: prune(c), r"output directory .* exists and is not empty",
         setup=lambda c: (c.out.mkdir(), (c.out / "keep.txt").write_text("user file"))),
    # Issue 23, item 2: an output directory in use by another run.
    Case("out-in-use-finetune", lambda c: finetune(c), IN_USE, setup=in_use),
    Case("out-in-use-resume", lambda c: finetune(c, "--resume"), IN_USE, setup=in_use),
    Case("out-in-use-prune", lambda c: prune(c), IN_USE, setup=in_use),
    Case("out-in-use-smp", lambda c: smp(c), IN_USE, setup=in_use),
    Case("demo-out-in-use", lambda c: ["demo", "--out", str(c.out), "--quiet"], IN_USE, setup=locked),
    Case("resume-without-checkpoint", lambda c: prune(c, "--resume"), r"no checkpoint",
         setup=lambda c: c.out.mkdir()),
    Case("empty-out-stays-empty", lambda c: prune(c, eval_data=labelled(c, "odd.jsonl", "weather", at=0)),
         r"not one of", setup=lambda c: c.out.mkdir()),
    Case("usage-missing-required", lambda c: ["prune", "--teacher", "x"], r"required"),
    Case("usage-not-an-int", lambda c: ["eval", "--model", "x", "--batch-size", "many"], r"expected an integer"),
    # `cofi predict` and `cofi eval --precision` (issue item 6).
    Case("predict-data-flag-missing", lambda c: ["predict", "--model", c.pruned, "--out", str(c.out / "p.jsonl")],
         r"required: --data"),
    Case("predict-data-missing", lambda c: predict(c, data=str(c.tmp / "nope.jsonl")),
         r"--data '.*nope\.jsonl' does not exist", setup=old_predictions),
    Case("predict-data-unreadable", lambda c: predict(c, data=unreadable(c, c.eval)),
         r"--data '.*eval\.jsonl' is not readable", setup=old_predictions),
    Case("predict-data-without-text", lambda c: predict(c, data=write_jsonl(c.tmp / "d.jsonl", [{"sentence": "a"}])),
         r"missing column\(s\) \['text'\]", setup=old_predictions),
    Case("predict-out-is-a-directory", lambda c: predict(c, out=c.out), r"--out '.*out' is a directory, not a regular file",
         setup=lambda c: c.out.mkdir()),
    Case("predict-out-in-a-missing-directory", lambda c: predict(c),
         r"--out '.*pred\.jsonl' cannot be written: its directory '.*out' does not exist"),
    Case("predict-out-under-a-file", lambda c: predict(c, out=os.path.join(a_file(c), "p.jsonl")),
         r"--out '.*p\.jsonl' cannot be written: '.*a_file\.txt' is a file, not a directory"),
    Case("predict-out-empty", lambda c: predict(c, out=""), r"--out path is empty", setup=cwd_with_a_log),
    Case("predict-out-is-the-data", lambda c: predict(c, data=str(c.out / "data.jsonl"), out=data_in_out(c)),
         r"--out '.*data\.jsonl' is the --data file"),
    Case("predict-int8-dense", lambda c: predict(c, "--precision", "int8", model=c.teacher),
         r"precision 'int8' needs a pruned model directory .* holds a dense model, which runs in fp32 only",
         setup=old_predictions),
    Case("predict-bf16-dense", lambda c: predict(c, "--precision", "bf16", model=c.teacher),
         r"precision 'bf16' needs a pruned model", setup=old_predictions),
    Case("predict-fp16-on-cpu", lambda c: predict(c, "--precision", "fp16"), r"'fp16' runs on a CUDA GPU only",
         setup=old_predictions),
    Case("predict-precision-unknown", lambda c: predict(c, "--precision", "fp8"), r"invalid choice: 'fp8'",
         setup=old_predictions),
    Case("predict-batch-size-0", lambda c: predict(c, "--batch-size", "0"), r"--batch-size: must be >= 1",
         setup=old_predictions),
    Case("predict-device-bogus", lambda c: predict(c, "--device", "bogus"), r"device 'bogus' is not a device name",
         setup=old_predictions),
    Case("predict-without-task-file", lambda c: predict(c, model=str(c.empty_dir)), r"has no cofi_task\.json",
         setup=old_predictions),
    Case("eval-int8-dense", lambda c: evaluate(c, "--precision", "int8"), r"precision 'int8' needs a pruned model"),
    Case("eval-fp16-on-cpu", lambda c: evaluate(c, "--precision", "fp16", model=c.pruned),
         r"'fp16' runs on a CUDA GPU only"),
    # `cofi prune --method theseus` (issue 13): the successor's depth and the replacing schedule.
    Case("theseus-layers-not-a-divisor", lambda c: theseus(c, layers="3"),
         r"theseus: --layers 3 does not divide the 4 layers of the teacher .*divisor of 4 \(1, 2, 4\)"),
    Case("theseus-layers-0", lambda c: theseus(c, layers="0"), r"theseus: layers \(--layers\) must be >= 1"),
    Case("theseus-layers-negative", lambda c: theseus(c, layers="-2"), r"layers \(--layers\) must be >= 1"),
    Case("theseus-layers-deeper-than-teacher", lambda c: theseus(c, layers="8"),
         r"theseus: --layers 8 is more than the 4 layers of the teacher"),
    Case("theseus-layers-missing", lambda c: theseus(c, layers=None), r"required: --layers"),
    Case("theseus-schedule-unknown", lambda c: theseus(c, "--schedule", "cosine"),
         r"schedule \(--schedule\) must be one of linear, constant, got 'cosine'"),
    Case("theseus-replace-rate-above-1", lambda c: theseus(c, "--replace-rate", "1.5"),
         r"replace_rate \(--replace-rate\) must be in \[0, 1\], got 1.5"),
    Case("theseus-slope-negative", lambda c: theseus(c, "--slope", "-0.01"), r"slope \(--slope\) must be >= 0"),
    Case("theseus-constant-steps-negative", lambda c: theseus(c, "--schedule", "constant", "--constant-steps", "-3"),
         r"constant_steps \(--constant-steps\) must be >= 0"),
    Case("theseus-slope-with-constant-schedule", lambda c: theseus(c, "--schedule", "constant", "--slope", "0.1"),
         r"slope \(--slope\) belongs to the linear schedule"),
    Case("theseus-rate-full-at-0", lambda c: theseus(c, "--rate-full-at", "0"),
         r"rate_full_at \(--rate-full-at\) must be in \(0, 1\]"),
    # `cofi prune --method smp` (issue 13).
    Case("smp-no-structure", lambda c: smp(c, structure=()),
         r"--method smp needs exactly one of --structured .* or --unstructured"),
    Case("smp-both-structures", lambda c: smp(c, structure=("--structured", "--unstructured")),
         r"--method smp needs exactly one of --structured"),
    Case("smp-model-flag-missing", lambda c: ["prune", "--method", "smp", "--out", str(c.out), "--remaining", "0.5",
                                              "--structured"], r"required: --model"),
    Case("smp-model-missing", lambda c: smp(c, model=str(c.tmp / "nope")), r"--model '.*nope' does not exist"),
    Case("smp-model-without-config", lambda c: smp(c, model=str(c.empty_dir)), r"has no config\.json"),
    *[Case(f"smp-remaining-{v}", lambda c, v=v: smp(c, "--remaining", v), r"--remaining.*(\(0, 1\)|number)")
      for v in ("0", "1", "1.5", "nan")],
    Case("smp-schedule-longer-than-run", lambda c: smp(c, "--schedule-epochs", "2"),
         r"prune: schedule_epochs must be in \(0, epochs - head_warmup_epochs = 0.5\], got 2.0"),
    Case("smp-warmup-as-long-as-run", lambda c: smp(c, "--head-warmup-epochs", "1"),
         r"prune: head_warmup_epochs must be in \[0, epochs = 1.0\), got 1.0"),
    Case("smp-pooling", lambda c: smp(c, "--pooling", "max"), r"prune: pooling must be one of mean, cls, got 'max'"),
    Case("smp-score-init", lambda c: smp(c, "--score-init", "ones"),
         r"prune: score_init must be one of magnitude, zero, got 'ones'"),
    Case("smp-lr-0", lambda c: smp(c, "--lr", "0"), r"prune: lr must be > 0, got 0.0"),
    Case("smp-lambda-negative", lambda c: smp(c, "--lambda-max", "-1"), r"prune: lambda_max must be >= 0"),
    Case("smp-max-length", lambda c: smp(c, "--max-length", "100"),
         rf"prune: max_length must be in \[8, {TINY_POSITIONS}\].*got 100"),
    Case("smp-teacher-other-vocabulary", lambda c: smp(c, "--teacher", other_vocabulary(c)),
         r"--teacher .* has another vocabulary than --model"),
    Case("smp-teacher-without-task-file", lambda c: smp(c, "--teacher", c.base), r"has no cofi_task\.json"),
    # `cofi prune --method scratch` (issue 13): the architecture's files, the budget, the two starts.
    Case("scratch-architecture-missing", lambda c: scratch(c, architecture=str(c.tmp / "nope")),
         r"--architecture '.*nope' does not exist"),
    Case("scratch-architecture-flag-missing", lambda c: ["prune", "--method", "scratch", "--out", str(c.out),
                                                         "--budget", "E"], r"required: --architecture"),
    Case("scratch-architecture-dense", lambda c: scratch(c, architecture=c.teacher),
         r"--architecture .* has no cofi_config\.json, so it is not a pruned model"),
    Case("scratch-architecture-without-run-json", lambda c: scratch(c, architecture=without(c, c.pruned, "run.json")),
         r"--architecture .* has no run\.json; the scratch budget is the pruning run's epochs"),
    Case("scratch-run-json-without-epochs",
         lambda c: scratch(c, architecture=edited(c, c.pruned, "run.json", lambda r: r.update(config={"max_length": 16}))),
         r"run\.json: records no epochs of the pruning run"),
    Case("scratch-budget-missing", lambda c: scratch(c, budget=()), r"required: --budget"),
    Case("scratch-budget-unknown", lambda c: scratch(c, budget=("--budget", "C")),
         r"--budget: must be one of E, B, got 'C'"),
    Case("scratch-init-unknown", lambda c: scratch(c, "--init", "zeros"),
         r"--init: must be one of random, pretrained-slice, got 'zeros'"),
    Case("scratch-slice-without-pretrained", lambda c: scratch(c, "--init", "pretrained-slice"),
         r"prune: --init pretrained-slice needs --pretrained DIR"),
    Case("scratch-pretrained-with-random-init", lambda c: scratch(c, "--pretrained", c.base),
         r"prune: --pretrained is used with --init pretrained-slice only"),
    Case("scratch-pretrained-fine-tuned", lambda c: scratch(c, "--init", "pretrained-slice", "--pretrained", c.teacher),
         r"--pretrained .* holds a model written by `cofi finetune` or `cofi prune`"),
    Case("scratch-slice-without-gates",
         lambda c: scratch(c, "--init", "pretrained-slice", "--pretrained", c.base,
                           architecture=without(c, c.pruned, "gates.safetensors")),
         r"--architecture .* has no gates\.safetensors, which names the kept heads"),
    Case("scratch-max-length", lambda c: scratch(c, "--max-length", "100"),
         rf"prune: max_length must be in \[8, {TINY_POSITIONS}\].*got 100"),
    Case("scratch-unknown-training-label", lambda c: scratch(c, data=labelled(c, "odd.jsonl", "weather")),
         r"label 'weather' \(example 4\) is not one of the classes"),
    Case("scratch-lr-0", lambda c: scratch(c, "--lr", "0"), r"prune: lr must be > 0"),
    # Issue 23, item 1: a tokenizer that is not the model's (transformers built a 5-token one from
    # tokenizer_config.json alone, and every word became [UNK]).
    Case("eval-without-vocabulary", lambda c: evaluate(c, model=without_vocabulary(c, c.teacher)),
         r"its tokenizer knows only 5 tokens for the model's [\d,]+ embeddings; its vocabulary is missing"),
    Case("predict-without-vocabulary", lambda c: predict(c, model=without_vocabulary(c, c.pruned)),
         r"its tokenizer knows only 5 tokens", setup=old_predictions),
    Case("prune-teacher-without-vocabulary", lambda c: prune(c, teacher=without_vocabulary(c, c.teacher)),
         r"its tokenizer knows only 5 tokens"),
    Case("finetune-tokenizer-larger-than-model",
         lambda c: finetune(c, model=edited(c, c.base, "config.json", lambda t: t.update(vocab_size=1000))),
         r"its tokenizer knows [\d,]+ tokens but the model embeds only 1,000"),
    Case("eval-tokenizer-other-padding",
         lambda c: evaluate(c, model=edited(c, c.pruned, "cofi_config.json", lambda t: t.update(pad_token_id=7))),
         r"its tokenizer pads with id 0 but the model's config says pad_token_id 7"),
    # Issue 23, item 3: weights that are not finite (NaN predictions, an ONNX file computing NaN).
    *[Case(f"{cmd}-nan-weight-{kind}", lambda c, cmd=cmd, kind=kind: nonfinite_command(c, cmd, kind),
           r"tensor '.*' holds 1 non-finite value\(s\) \(NaN or infinity\)", setup=old_predictions)
      for cmd, kind in (("predict", "pruned"), ("predict-int8", "pruned"), ("eval", "pruned"), ("eval", "dense"),
                        ("export", "pruned"), ("predict", "dense"))],
    # Issue 23, item 6: hand-edited model directories (sizes that overflow, weights of another dtype).
    *[Case(f"config-{key}-2-62", lambda c, key=key: evaluate(c, model=edited(c, c.pruned, "cofi_config.json",
                                                                           lambda t: t.update({key: 2**62}))),
           rf"'{key}' must be a positive integer up to 2,147,483,647, got {2**62}")
      for key in ("vocab_size", "max_position_embeddings", "num_labels")],
    *[Case(f"dense-config-{key}-2-62", lambda c, key=key: evaluate(c, model=edited(c, c.teacher, "config.json",
                                                                                 lambda t: t.update({key: 2**62}))),
           r"config.json describes at least [\d,]+ weights but its safetensors files hold")
      for key in ("vocab_size", "max_position_embeddings", "type_vocab_size")],
    Case("predict-int32-weight", lambda c: predict(c, model=with_weight_dtype(c, c.pruned, torch.int32)),
         r"model.safetensors: tensor '.*' must be floating point \(F16, BF16, F32, F64\), got I32",
         setup=old_predictions),
    Case("export-int32-weight", lambda c: export(c, model=with_weight_dtype(c, c.pruned, torch.int32)),
         r"must be floating point \(F16, BF16, F32, F64\), got I32", setup=old_predictions),
    # Issue 23, item 7: a weight-mask file that cannot be read was skipped: the model served unmasked.
    *[Case(f"eval-masks-{kind}", lambda c, kind=kind: evaluate(c, model=with_masks_as(c, kind)),
           rf"weight_masks\.safetensors is {NOT_A_FILE[kind]}") for kind in NOT_A_FILE],
]


def write_broken_config(c) -> str:
    d = c.tmp / "broken_model"
    d.mkdir()
    (d / "config.json").write_text("{ not json")
    return str(d)


def run_cli_full(argv, capsys):
    """``(status, stdout lines, stderr lines, warnings that escaped)`` of ``cofi argv`` run in-process."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            status = cli.main(argv)
        except SystemExit as e:  # argparse
            status = e.code
    out = capsys.readouterr()
    return status, out.out.strip().splitlines(), out.err.strip().splitlines(), [str(w.message) for w in caught]


def run_cli(argv, capsys):
    """``(status, stderr lines, warnings that escaped)`` of ``cofi argv`` run in-process."""
    status, _, err, caught = run_cli_full(argv, capsys)
    return status, err, caught


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys, monkeypatch, base_dir, teacher_dir,
                                                      pruned_dir, files):
    if case.id == "eval-device-cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    c = SimpleNamespace(tmp=tmp_path, out=tmp_path / "out", base=base_dir, teacher=teacher_dir, pruned=pruned_dir,
                        train=files.train, eval=files.eval, monkeypatch=monkeypatch, watch=None,
                        empty_dir=tmp_path / "empty_model")
    c.empty_dir.mkdir()
    if case.setup is not None:
        case.setup(c)
    argv = case.argv(c)
    watched = c.watch or c.out
    before = tree_snapshot(watched)
    status, err, caught = run_cli(argv, capsys)
    assert status == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"cofi {argv[0]}: error: "), err
    assert re.search(case.pattern, err[0]), err[0]
    assert caught == [], caught
    assert tree_snapshot(watched) == before, f"{watched} changed"


def test_every_item_of_issue_11_has_a_case():
    assert {c.item for c in CASES} - {None} == set(range(1, 12)) - {5}  # 5 is not an error: below


def test_a_csv_field_over_the_csv_module_limit_reads_like_jsonl(tmp_path, capsys, teacher_dir):
    """Item 5: a text of 200,000 characters in a CSV evaluates as the same text in JSONL."""
    import csv

    rows = toy_rows(6, seed=5)
    rows[2]["text"] = "goal " * 40_000 + "match"
    jsonl = write_jsonl(tmp_path / "long.jsonl", rows)
    csv_path = write_csv(tmp_path / "long.csv", rows)
    assert len(rows[2]["text"]) > csv.field_size_limit()
    results = []
    for path in (jsonl, csv_path):
        assert cli.main(["eval", "--model", teacher_dir, "--data", path, "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["examples"] == results[1]["examples"] == 6
    assert results[0]["accuracy"] == results[1]["accuracy"]
    assert results[0]["loss"] == results[1]["loss"]


def test_library_warnings_before_an_error_are_dropped_and_shown_after_success(monkeypatch, capsys, teacher_dir,
                                                                               files):
    from cofi_kernels.tasks import classification as data  # where the classification task reads its files

    def library_warns():
        warnings.warn_explicit("a library's remark", UserWarning, "/some/library/module.py", 7)

    real_read = data.read_examples

    def warn_then_fail(path, **kw):
        library_warns()
        raise data.DataError(f"{path}: bad")

    monkeypatch.setattr(data, "read_examples", warn_then_fail)
    status, err, caught = run_cli(evaluate(SimpleNamespace(teacher=teacher_dir, eval=files.eval)), capsys)
    assert status == 2 and len(err) == 1 and caught == [], (err, caught)

    def warn_then_read(path, **kw):
        library_warns()
        return real_read(path, **kw)

    monkeypatch.setattr(data, "read_examples", warn_then_read)
    status, err, caught = run_cli(evaluate(SimpleNamespace(teacher=teacher_dir, eval=files.eval)), capsys)
    assert status == 0 and caught == ["a library's remark"], (err, caught)
