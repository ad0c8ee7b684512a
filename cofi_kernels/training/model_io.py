"""Model directories of training runs: loading a tokenizer and a classifier, the task file."""

from __future__ import annotations

import json
import os

from ..models.arch import UnsupportedModelError, arch_for_model_type, supported_model
from .data import LabelSpace
from .trainer import RunError, first_line, write_json

TASK_FILE = "cofi_task.json"


def load_tokenizer(model_dir: str):
    """The tokenizer saved in ``model_dir``; :class:`RunError` when there is none."""
    from transformers import AutoTokenizer

    require_dir(model_dir)
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # transformers raises many types for a broken directory
        raise RunError(f"model directory {model_dir!r}: cannot load its tokenizer ({first_line(e)})") from None


def load_classifier(model_dir: str, labels: LabelSpace | None = None):
    """A BERT/RoBERTa ``*ForSequenceClassification`` from ``model_dir``.

    With ``labels`` the classification head is sized for them (a new head when
    the directory holds a bare encoder or a head for other labels); without,
    the directory's own head is used.
    """
    import transformers as tf

    require_dir(model_dir)
    try:
        config = tf.AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        raise RunError(f"model directory {model_dir!r}: cannot read config.json ({first_line(e)})") from None
    try:
        arch_for_model_type(config.model_type)
    except UnsupportedModelError as e:
        raise RunError(f"model directory {model_dir!r}: {e}") from None
    kw = {}
    if labels is not None:
        kw = {"num_labels": labels.num_labels, "problem_type": problem_type(labels)}
        if labels.task == "classification":
            kw["id2label"] = dict(enumerate(labels.names))
            kw["label2id"] = {n: i for i, n in enumerate(labels.names)}
    try:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected here
        try:
            model = tf.AutoModelForSequenceClassification.from_pretrained(
                model_dir, ignore_mismatched_sizes=labels is not None, **kw
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as e:
        raise RunError(f"model directory {model_dir!r}: cannot load the model ({first_line(e)})") from None
    try:
        supported_model(model)
    except UnsupportedModelError as e:
        raise RunError(f"model directory {model_dir!r}: {e}") from None
    return model


def problem_type(labels: LabelSpace) -> str:
    return "regression" if labels.task == "regression" else "single_label_classification"


def require_dir(model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        raise RunError(f"model directory {model_dir!r} does not exist")
    if not os.access(model_dir, os.R_OK | os.X_OK):
        raise RunError(f"model directory {model_dir!r} is not readable")




def read_task(model_dir: str) -> dict:
    """``cofi_task.json`` of a model written by this package (label space, max_length, kind)."""
    path = os.path.join(model_dir, TASK_FILE)
    if not os.path.isfile(path):
        raise RunError(f"model directory {model_dir!r} has no {TASK_FILE}; give a model written by `cofi finetune` or `cofi prune`")
    try:
        with open(path) as f:
            task = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: unreadable ({first_line(e)})") from None
    if not isinstance(task, dict) or "labels" not in task or "max_length" not in task:
        raise RunError(f"{path}: malformed (needs 'task', 'labels', 'max_length')")
    task["label_space"] = LabelSpace.from_json(task, path)
    return task


def write_task(directory: str, labels: LabelSpace, max_length: int, kind: str) -> None:
    write_json(os.path.join(directory, TASK_FILE), {**labels.to_json(), "max_length": max_length, "kind": kind})
