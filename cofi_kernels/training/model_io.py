"""Model directories of training runs: what they promise, checked before anything is loaded;
loading a tokenizer and a classifier; the task file.

A model directory is checked in the order of cost: the path, the config, the
weights file's header against the config (so a hand-edited config never makes
us allocate a model it does not describe), and only then the weights. Weights
are read from safetensors only; a directory holding only a pickle
(``pytorch_model.bin``) is refused before anything is unpickled.

A dense model directory may hold unstructured weight masks beside its weights
(:data:`MASKS_FILE`, packed bits, written by ``cofi prune --method smp
--unstructured``); :func:`load_classifier` applies them.
"""

from __future__ import annotations

import json
import os

from ..models.arch import UnsupportedModelError, arch_for_model_type, encoder_dims, supported_model, token_limit
from ..models.pruned_model import CONFIG_NAME as PRUNED_CONFIG_NAME
from ..models.pruned_model import PrunedModel, check_finite
from ..models.size import dense_encoder_size
from .config import MIN_MAX_LENGTH
from ..data.paths import check_model_dir
from .trainer import RUN_FILE, RunError, first_line, read_json, write_json

TASK_FILE = "cofi_task.json"
MASKS_FILE = "weight_masks.safetensors"  # unstructured masks beside a dense model (`cofi prune --method smp`)
MASKS_FORMAT = "cofi-weight-masks"
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HF_CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt")
# The files a model directory of ours may hold; require_dir refuses any of them that is there but not a regular file.
MODEL_FILES = (HF_CONFIG, PRUNED_CONFIG_NAME, TASK_FILE, *SAFE_WEIGHTS, *PICKLED_WEIGHTS, MASKS_FILE, RUN_FILE,
               *TOKENIZER_FILES)


def require_dir(model_dir, what: str = "model directory") -> str:
    """``model_dir`` is an existing, readable directory, and each of its :data:`MODEL_FILES` that is
    there is a regular file (:class:`RunError` saying what the path is otherwise)."""
    return check_model_dir(model_dir, what, RunError, MODEL_FILES)


def load_tokenizer(model_dir: str):
    """The tokenizer saved in ``model_dir``, checked against the model's embedding table
    (:func:`check_tokenizer_fits`); :class:`RunError` when there is none or it does not fit."""
    from transformers import AutoTokenizer

    require_dir(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # transformers raises many types for a broken directory
        raise RunError(f"model directory {model_dir!r}: cannot load its tokenizer ({first_line(e)})") from None
    check_tokenizer_fits(tokenizer, *_embedding_table(model_dir), model_dir)
    return tokenizer


# A tokenizer with fewer tokens than this share of the model's embedding rows is not the model's own
# (vocabularies padded for speed keep 99% and more: ModernBERT 50,281 of 50,368, DeBERTa-v3 128,001 of
# 128,100); transformers builds a 5-token BertTokenizer from tokenizer_config.json alone.
MIN_VOCABULARY_SHARE = 0.9
SPECIAL_TOKENS = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")


def check_tokenizer_fits(tokenizer, vocab_size: int, pad_token_id: int | None, model_dir: str) -> None:
    """The tokenizer belongs to a model with ``vocab_size`` embedding rows (:class:`RunError` otherwise):
    it knows at most that many tokens and at least :data:`MIN_VOCABULARY_SHARE` of them, its
    special tokens' ids are rows of the table, and its padding id is the model's ``pad_token_id``."""
    n = len(tokenizer)
    where = f"model directory {model_dir!r}: its tokenizer"
    if n > vocab_size:
        raise RunError(f"{where} knows {n:,} tokens but the model embeds only {vocab_size:,}; "
                       "the tokenizer does not belong to this model")
    if n < MIN_VOCABULARY_SHARE * vocab_size:
        raise RunError(f"{where} knows only {n:,} tokens for the model's {vocab_size:,} embeddings; its "
                       "vocabulary is missing (a tokenizer.json, vocab.txt or vocab.json that cannot be read?)")
    for name in SPECIAL_TOKENS:
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None and not 0 <= token_id < vocab_size:
            raise RunError(f"{where}'s {name} token has id {token_id}, outside the model's {vocab_size:,} embeddings")
    if pad_token_id is not None and tokenizer.pad_token_id is not None and tokenizer.pad_token_id != pad_token_id:
        raise RunError(f"{where} pads with id {tokenizer.pad_token_id} but the model's config says "
                       f"pad_token_id {pad_token_id}; the tokenizer does not belong to this model")


def _embedding_table(model_dir: str) -> tuple[int, int | None]:
    """``(vocab_size, pad_token_id)`` of the model saved in ``model_dir``, from its config alone."""
    cfg = _pruned_config(model_dir)
    if cfg is not None:
        return cfg["vocab_size"], cfg["pad_token_id"]
    config = read_model_config(model_dir)
    return config.vocab_size, getattr(config, "pad_token_id", None)


def _pruned_config(model_dir: str) -> dict | None:
    """The validated ``cofi_config.json`` of a :class:`PrunedModel` directory, None for another
    directory (:class:`RunError` naming the directory when it cannot be read)."""
    if not os.path.isfile(os.path.join(model_dir, PRUNED_CONFIG_NAME)):
        return None
    try:
        return PrunedModel.read_config(model_dir)
    except (OSError, ValueError) as e:
        raise RunError(f"model directory {model_dir!r}: {e}") from None


def read_model_config(model_dir: str):
    """The Hugging Face config of ``model_dir``, checked against what the directory holds.

    Refused with :class:`RunError` naming the directory: a missing or
    unreadable ``config.json``, an unsupported ``model_type``, weights stored
    only as a pickle, and a config describing more weights than the
    safetensors files hold (checked from their headers, nothing is loaded).
    """
    import transformers as tf

    require_dir(model_dir)
    if not os.path.isfile(os.path.join(model_dir, HF_CONFIG)):
        raise RunError(f"model directory {model_dir!r} has no {HF_CONFIG}; give a directory a model was saved to "
                       "(save_pretrained, `cofi finetune`)")
    try:
        config = tf.AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        raise RunError(f"model directory {model_dir!r}: cannot read config.json ({first_line(e)})") from None
    try:
        arch_for_model_type(config.model_type)
        dims = encoder_dims(config)
    except (UnsupportedModelError, ValueError) as e:
        raise RunError(f"model directory {model_dir!r}: {e}") from None
    stored = _stored_weight_count(model_dir)
    # Every table the model allocates counts, so that a hand-edited size (2**62 positions) is refused
    # here instead of overflowing inside torch while the model is built.
    tables = config.vocab_size + config.max_position_embeddings + getattr(config, "type_vocab_size", 0)
    described = dense_encoder_size(dims.num_layers, dims.num_heads, dims.head_dim, dims.intermediate_size,
                                   dims.hidden_size) + tables * dims.hidden_size
    if described > stored:
        raise RunError(f"model directory {model_dir!r}: config.json describes at least {described:,} weights but "
                       f"its safetensors files hold {stored:,}; the config does not belong to these weights")
    return config


def _stored_weight_count(model_dir: str) -> int:
    """How many values the directory's safetensors files hold, from their headers."""
    from safetensors import safe_open

    files = [n for n in SAFE_WEIGHTS if os.path.isfile(os.path.join(model_dir, n))]
    if not files:
        pickled = [n for n in PICKLED_WEIGHTS if os.path.isfile(os.path.join(model_dir, n))]
        if pickled:
            raise RunError(f"model directory {model_dir!r} holds its weights only as {pickled[0]}, a pickle, which "
                           "cofi_kernels never loads; save the model with safetensors (save_pretrained's default)")
        raise RunError(f"model directory {model_dir!r} has no {SAFE_WEIGHTS[0]}")
    shards = [SAFE_WEIGHTS[0]]
    if files[0] == SAFE_WEIGHTS[1]:
        index = os.path.join(model_dir, SAFE_WEIGHTS[1])
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise RunError(f"{index}: not a safetensors index ({first_line(e)})") from None
    total = 0
    for shard in shards:
        path = os.path.join(model_dir, shard)
        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    n = 1
                    for s in f.get_slice(k).get_shape():
                        n *= s
                    total += n
        except Exception as e:  # safetensors raises its own types for a missing, truncated or foreign file
            raise RunError(f"model directory {model_dir!r}: {shard} cannot be read as safetensors "
                           f"({first_line(e)})") from None
    return total


def hf_token_limit(config) -> int:
    """The most tokens per sequence of a Hugging Face encoder config."""
    return token_limit(config.model_type, config.max_position_embeddings, getattr(config, "pad_token_id", None))


def check_max_length(max_length, limit: int, where: str) -> None:
    """``max_length`` is an integer in ``[MIN_MAX_LENGTH, limit]`` (:class:`RunError` naming ``where``)."""
    if not isinstance(max_length, int) or isinstance(max_length, bool):
        raise RunError(f"{where}: max_length must be an integer, got {max_length!r}")
    if not MIN_MAX_LENGTH <= max_length <= limit:
        raise RunError(f"{where}: max_length must be in [{MIN_MAX_LENGTH}, {limit}] (the model's position "
                       f"embeddings hold {limit} tokens), got {max_length}")


def load_task_model(model_dir: str, spec=None, *, task=None):
    """A BERT/RoBERTa model with ``task``'s head from ``model_dir`` (checked by
    :func:`read_model_config` first; safetensors only): ``*ForSequenceClassification``,
    ``*ForTokenClassification``, ``*ForQuestionAnswering``, or the bare encoder for embeddings
    (:attr:`~cofi_kernels.tasks.base.Task.auto_class`).

    With ``spec`` (a task's :class:`~cofi_kernels.tasks.base.Spec`) the head is sized for it (a new
    head when the directory holds a bare encoder or a head for other labels); without, the
    directory's own head is used. ``task`` defaults to the spec's, else the directory's
    ``cofi_task.json``, else classification.
    """
    import transformers as tf

    from ..tasks import get_task

    read_model_config(model_dir)
    if task is None:
        task = get_task(spec.task if spec is not None else _saved_task_name(model_dir))
    kw = {} if spec is None or task.teacher_targets else task.head_config(spec)
    try:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected here
        try:
            model = getattr(tf, task.auto_class).from_pretrained(
                model_dir, ignore_mismatched_sizes=bool(kw), use_safetensors=True, **kw
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as e:
        raise RunError(f"model directory {model_dir!r}: cannot load the model ({first_line(e)})") from None
    try:
        supported_model(model)
    except UnsupportedModelError as e:
        raise RunError(f"model directory {model_dir!r}: {e}") from None
    try:
        check_finite(model.state_dict().items(), f"model directory {model_dir!r}")
    except ValueError as e:
        raise RunError(str(e)) from None
    if os.path.isfile(os.path.join(model_dir, MASKS_FILE)):
        apply_weight_masks(model, read_weight_masks(model_dir))
    if spec is not None:
        task.prepare_model(model, spec)
    return model


def _saved_task_name(model_dir: str) -> str:
    """The task named in ``model_dir``'s ``cofi_task.json``; classification when it has none."""
    path = os.path.join(model_dir, TASK_FILE)
    if not os.path.isfile(path):
        return "classification"
    saved = read_json(path)
    return saved.get("task", "classification") if isinstance(saved, dict) else "classification"


def model_limits(model_dir: str) -> tuple[int, int]:
    """``(outputs, token limit)`` of the model saved in ``model_dir`` (a :class:`PrunedModel`'s
    ``cofi_config.json`` or a Hugging Face ``config.json``), read from its config alone."""
    cfg = _pruned_config(model_dir)
    if cfg is not None:
        # A model without a head (an encoder, an embedder) outputs vectors of the original hidden size.
        outputs = cfg["num_labels"] if cfg.get("num_labels") is not None else cfg["original_hidden_size"]
        return outputs, token_limit(cfg["model_type"], cfg["max_position_embeddings"], cfg["pad_token_id"])
    config = read_model_config(model_dir)
    from ..tasks import get_task

    return get_task(_saved_task_name(model_dir)).config_outputs(config), hf_token_limit(config)


def read_task(model_dir: str) -> dict:
    """``cofi_task.json`` of a model written by this package, checked against the model's own
    config: ``task`` (the task's name), ``spec`` (its :class:`~cofi_kernels.tasks.base.Spec`: class
    names, tags, QA settings, pooling; one output per class, one for regression), ``handler`` (the
    :class:`~cofi_kernels.tasks.base.Task`), ``max_length`` (fits the model's position embeddings),
    ``kind`` and anything else the run saved (``teacher`` for embeddings)."""
    from ..tasks import TASK_NAMES, get_task

    require_dir(model_dir)
    path = os.path.join(model_dir, TASK_FILE)
    if not os.path.isfile(path):
        raise RunError(f"model directory {model_dir!r} has no {TASK_FILE}; give a model written by "
                       "`cofi finetune` or `cofi prune`")
    task = read_json(path)
    if not isinstance(task, dict) or not {"task", "max_length"} <= task.keys():
        raise RunError(f"{path}: malformed (needs 'task' and 'max_length')")
    if task["task"] not in TASK_NAMES:
        raise RunError(f"{path}: 'task' must be one of {', '.join(TASK_NAMES)}, got {task['task']!r}")
    handler = get_task(task["task"])
    try:
        spec = handler.spec_from_json(task, path)
    except ValueError as e:
        raise RunError(str(e)) from None
    outputs, limit = model_limits(model_dir)
    if spec.num_outputs != outputs:
        names = task.get("labels")
        listed = f"lists {len(names)} class(es)" if isinstance(names, list) else f"needs {spec.num_outputs} output(s)"
        raise RunError(f"{path}: {listed} for a {task['task']} task, but the model has {outputs} output(s)")
    check_max_length(task["max_length"], limit, path)
    return {**task, "spec": spec, "handler": handler}


def teacher_task(teacher_dir: str, task: str | None, where: str) -> dict:
    """The task of a pruning run's teacher: :func:`read_task` of its ``cofi_task.json`` (``task``, when given,
    must agree), or, for a task whose targets are the teacher's own outputs (embeddings) and a teacher
    without one, the spec the task reads from the pre-trained directory. Adds ``token_limit``."""
    from ..tasks import get_task

    handler = None if task is None else get_task(task)
    if handler is not None and handler.teacher_targets and not os.path.isfile(os.path.join(teacher_dir, TASK_FILE)):
        require_dir(teacher_dir)
        try:
            spec = handler.spec_for_teacher(teacher_dir)
        except ValueError as e:
            raise RunError(f"{where}: {e}") from None
        limit = hf_token_limit(read_model_config(teacher_dir))
        return {"task": handler.name, "spec": spec, "handler": handler, "token_limit": limit}
    saved = read_task(teacher_dir)
    if handler is not None and handler is not saved["handler"]:
        raise RunError(f"{where}: --task {task} but the teacher {teacher_dir!r} was trained for {saved['task']} "
                       f"(its {TASK_FILE})")
    return {**saved, "token_limit": model_limits(teacher_dir)[1]}


def saved_settings(handler, teacher_dir: str, best: dict | None) -> dict:
    """What a pruned model's ``cofi_task.json`` keeps beyond the spec: the teacher of a task whose metric
    needs it (embeddings: ``cofi eval`` compares with it), settings chosen on the evaluation data
    (QA's no-answer threshold)."""
    extra = {}
    if handler.teacher_targets:
        extra["teacher"] = os.path.abspath(teacher_dir)
    if best and "best_null_threshold" in best:
        extra["null_threshold"] = best["best_null_threshold"]
    return extra


def write_task(directory: str, spec, max_length: int, kind: str, **extra) -> None:
    """``cofi_task.json``: the task's spec, ``max_length``, ``kind`` (finetuned, pruned, masked) and ``extra``."""
    write_json(os.path.join(directory, TASK_FILE), {**spec.to_json(), "max_length": max_length, "kind": kind,
                                                    **extra})


# ---------------------------------------------------------------------- weight masks (packed bits)


def pack_bits(mask) -> "torch.Tensor":
    """A bool tensor → uint8 ``[ceil(n/8)]``: its row-major entries 8 to a byte, the first in the
    highest bit, the last byte padded with 0 bits (``numpy.packbits(mask.ravel())``'s layout)."""
    import torch

    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed, shape) -> "torch.Tensor":
    """The inverse of :func:`pack_bits`: a bool tensor of ``shape`` (``ValueError`` when ``packed`` is
    not a 1-D uint8 tensor of ``ceil(n/8)`` bytes or its padding bits are not 0)."""
    import torch

    n = 1
    for d in shape:
        n *= int(d)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"expected {(n + 7) // 8} packed bytes (uint8, 1-D) for shape {list(shape)}, got "
                         f"{packed.dtype} of shape {list(packed.shape)}")
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = ((packed[:, None] >> shifts) & 1).reshape(-1)
    if bool(bits[n:].any()):
        raise ValueError("the padding bits after the last mask entry are not 0")
    return bits[:n].bool().view(*shape)


def write_weight_masks(path: str, masks: dict) -> None:
    """Save ``{parameter name: bool mask}`` to ``path`` as packed bits (safetensors, no pickle):
    one uint8 tensor per name (:func:`pack_bits`), the shapes in the file's metadata."""
    from safetensors.torch import save_file

    shapes = {name: list(m.shape) for name, m in masks.items()}
    tensors = {name: pack_bits(m.detach().cpu()) for name, m in masks.items()}
    save_file(tensors, path, metadata={"format": MASKS_FORMAT, "version": "1", "shapes": json.dumps(shapes)})


def read_weight_masks(model_dir: str) -> dict:
    """``{parameter name: bool mask}`` from the :data:`MASKS_FILE` of ``model_dir`` (:class:`RunError`
    naming the file when it is not such a file)."""
    from safetensors import safe_open

    path = os.path.join(model_dir, MASKS_FILE)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != MASKS_FORMAT:
                raise ValueError(f"its metadata does not name the format {MASKS_FORMAT!r}")
            shapes = json.loads(meta["shapes"])
            if set(shapes) != set(f.keys()):
                raise ValueError("its metadata's shapes do not list exactly its tensors")
            return {name: unpack_bits(f.get_tensor(name), shapes[name]) for name in f.keys()}
    except Exception as e:  # safetensors raises its own types for a truncated or foreign file
        raise RunError(f"{path}: not a weight-mask file ({first_line(e)})") from None


def apply_weight_masks(model, masks: dict) -> None:
    """Zero the entries of ``model``'s parameters where ``masks`` (name → bool mask of the
    parameter's shape) is False (:class:`RunError` for a name or shape the model does not have)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            p = params.get(name)
            if p is None or tuple(p.shape) != tuple(m.shape):
                got = "no such parameter" if p is None else f"the parameter has shape {list(p.shape)}"
                raise RunError(f"{MASKS_FILE}: mask {name!r} of shape {list(m.shape)} does not fit the model "
                               f"({got})")
            p.mul_(m.to(device=p.device, dtype=p.dtype))


def weight_mask_counts(model_dir: str) -> tuple[int, int] | None:
    """``(kept, total)`` entries of the masked weights of ``model_dir``, or None without a :data:`MASKS_FILE`."""
    if not os.path.isfile(os.path.join(model_dir, MASKS_FILE)):
        return None
    masks = read_weight_masks(model_dir)
    return sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
