"""The checks a run makes before it reads, loads or writes anything, called from Python:
settings of any method, devices, paths, model directories and their task files, checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

from cofi_kernels.pruning import get_method, method_names
from cofi_kernels.training import config as rc
from cofi_kernels.training import model_io
from cofi_kernels.training import trainer as tr
from cofi_kernels.data.text import DataError
from cofi_kernels.training.finetune import FinetuneConfig
from cofi_kernels.data.paths import check_input_file, check_model_dir, check_output_dir


def _configs():
    yield FinetuneConfig
    for name in method_names():
        yield get_method(name).config


@pytest.mark.parametrize("config", list(_configs()), ids=lambda c: c.__name__)
def test_every_number_of_every_method_must_be_finite_and_typed(config):
    for f in rc.settings_of(config):
        kind = str(f.type).replace(" ", "")
        bad = {"float": [float("inf"), float("nan"), "1", True], "int": [1.5, True, "3"]}.get(kind, [])
        for value in bad:
            cfg = config(**{f.name: value})
            with pytest.raises(tr.RunError, match=rf"^x: {f.name}( \(--[\w-]+\))? must be"):
                rc.check_run_settings(cfg, "x")


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, r"batch_size must be >= 1, got 0"),
    ("max_length", 4, r"max_length must be >= 8"),
    ("checkpoint_every", -1, r"checkpoint_every must be >= 1"),
    ("seed", -1, r"seed must be >= 0"),
    ("seed", 2**32, r"seed must be < 2\*\*32"),
    ("eval_every", -2, r"eval_every must be >= 0"),
    ("freeze_embeddings", 1, r"freeze_embeddings must be True or False"),
    ("device", 0, r"device must be a string, got 0"),
])
def test_shared_ranges(field, value, message):
    with pytest.raises(tr.RunError, match=message):
        rc.check_run_settings(FinetuneConfig(**{field: value}), "finetune")


def test_learn_must_name_gate_types():
    cfg = get_method("cofi").config(learn=("head", "heads"))
    with pytest.raises(tr.RunError, match=r"learn holds \['heads'\], not among"):
        rc.check_run_settings(cfg, "prune")


@pytest.mark.parametrize("device, message", [
    ("bogus", r"'bogus' is not a device name"),
    ("mps", r"device must be cpu, cuda or cuda:N, got 'mps'"),
    ("cuda:99", r"'cuda:99' was asked for, but"),
])
def test_check_device(device, message):
    with pytest.raises(tr.RunError, match=message):
        rc.check_device(device, "eval")
    assert rc.check_device("cpu", "eval") == torch.device("cpu")


# ---------------------------------------------------------------------- paths


def test_path_checks_name_what_the_path_is(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for check in (check_input_file, check_model_dir, check_output_dir):
        with pytest.raises(DataError, match=r"^the --x path is empty"):
            check(None, "--x", DataError)
        with pytest.raises(DataError, match=r"^the --x path is empty"):
            check("", "--x", DataError)
    assert check_input_file(f, "--data", DataError) == str(f)
    with pytest.raises(DataError, match=r"is a directory, not a regular file"):
        check_input_file(tmp_path, "--data", DataError)
    with pytest.raises(DataError, match=r"is a FIFO \(named pipe\), not a regular file"):
        check_input_file(pipe, "--data", DataError)
    with pytest.raises(tr.RunError, match=r"is a file, not a directory"):
        check_model_dir(f, "--model", tr.RunError)
    with pytest.raises(tr.RunError, match=r"'.*nope' does not exist"):
        check_model_dir(tmp_path / "nope", "--model", tr.RunError)
    assert check_output_dir(tmp_path / "a" / "b", "--out", tr.RunError) == str(tmp_path / "a" / "b")
    with pytest.raises(tr.RunError, match=r"cannot be created: '.*f\.txt' is a file, not a directory"):
        check_output_dir(f / "a" / "b", "--out", tr.RunError)
    with pytest.raises(tr.RunError, match=r"is a FIFO \(named pipe\), not a directory"):
        check_output_dir(pipe, "--out", tr.RunError)


def test_run_directory_turns_os_errors_into_run_errors(tmp_path, monkeypatch):
    run = tr.RunDirectory(str(tmp_path / "out"), {}, resume=False, kind="finetune")

    def no_space(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "makedirs", no_space)
    with pytest.raises(tr.RunError, match=r"output directory '.*out' cannot be written \(No space left on device\)"):
        run.start()


def test_a_foreign_pickle_is_refused_without_running_it_or_warning(tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("ran code from the file",))

    path = tmp_path / "state.pt"
    path.write_bytes(pickle.dumps({"payload": Payload()}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(tr.RunError, match=r"is not a checkpoint written by cofi_kernels"):
            tr.load_checkpoint(str(path))
    assert caught == [] and "ran code" not in capsys.readouterr().out


# ---------------------------------------------------------------------- model directories


def _copy(src, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, **changes):
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def test_read_task_checks_labels_and_max_length_against_the_model(teacher_dir, tmp_path):
    assert model_io.read_task(teacher_dir)["spec"].names == ["money", "music", "sport"]
    d = _copy(teacher_dir, tmp_path)
    task = d / model_io.TASK_FILE
    for changes, message in [
        ({"labels": ["a", "b"]}, r"lists 2 class\(es\) for a classification task, but the model has 3 output"),
        ({"labels": ["a", "a", "b"]}, r"lists a class twice"),
        ({"labels": "abc"}, r"must be a list of class names"),
        ({"labels": ["a"]}, r"needs at least 2 class names"),
        ({"task": "regression"}, r"a regression task has no class names"),
        ({"max_length": 81}, r"max_length must be in \[8, 80\]"),
        ({"max_length": 8.5}, r"max_length must be an integer"),
        ({"max_length": True}, r"max_length must be an integer"),
    ]:
        original = task.read_text()
        _edit_json(task, **changes)
        with pytest.raises(tr.RunError, match=message):
            model_io.read_task(str(d))
        task.write_text(original)
    model_io.read_task(str(d))


def test_read_model_config_refuses_pickles_and_configs_bigger_than_the_weights(teacher_dir, tmp_path):
    config = model_io.read_model_config(teacher_dir)
    assert model_io.hf_token_limit(config) == 80
    d = _copy(teacher_dir, tmp_path)
    _edit_json(d / "config.json", num_hidden_layers=400)
    with pytest.raises(tr.RunError, match=r"describes at least [\d,]+ weights but its safetensors files hold"):
        model_io.read_model_config(str(d))
    d = _copy(teacher_dir, tmp_path, "pickled")
    os.replace(d / "model.safetensors", d / "pytorch_model.bin")
    with pytest.raises(tr.RunError, match=r"holds its weights only as pytorch_model\.bin, a pickle"):
        model_io.load_task_model(str(d))
    os.remove(d / "pytorch_model.bin")
    with pytest.raises(tr.RunError, match=r"has no model\.safetensors"):
        model_io.read_model_config(str(d))


def test_check_max_length():
    model_io.check_max_length(80, 80, "x")
    for bad, message in [(81, r"must be in \[8, 80\]"), (7, r"must be in \[8, 80\]"), ("9", "must be an integer")]:
        with pytest.raises(tr.RunError, match=message):
            model_io.check_max_length(bad, 80, "x")


def test_finetune_refuses_max_length_beyond_the_model_before_writing(base_dir, toy, tmp_path):
    from cofi_kernels.training.finetune import finetune

    with pytest.raises(tr.RunError, match=r"finetune: max_length must be in \[8, 80\]"):
        finetune(base_dir, *toy, str(tmp_path / "out"), FinetuneConfig(max_length=81), progress=False)
    assert not (tmp_path / "out").exists()


def test_evaluate_dir_checks_batch_size_and_device(teacher_dir, toy):
    from cofi_kernels.cli import evaluate_dir

    with pytest.raises(tr.RunError, match=r"batch size must be an integer >= 1, got 0"):
        evaluate_dir(teacher_dir, toy[1], batch_size=0)
    with pytest.raises(tr.RunError, match=r"device 'nope' is not a device name"):
        evaluate_dir(teacher_dir, toy[1], device="nope")
