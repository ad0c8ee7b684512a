"""Batch prediction with a saved model directory (DESIGN §7): a label and its class
probabilities, or a score, per example, in input order.

A directory written by ``cofi prune`` (a :class:`~cofi_kernels.models.pruned_model.PrunedModel`,
``cofi_config.json``) runs in any precision :func:`~cofi_kernels.serving.load_for_inference`
serves; a dense directory written by ``cofi finetune`` runs in fp32 through the training
code's loader. Examples are sorted by token length into batches (less padding) and the
results put back in input order.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import torch

from ..models.pruned_model import CONFIG_NAME
from ..tasks.base import Dataset, gather_rows
from ..training.model_io import load_task_model, load_tokenizer, read_task
from ..training.trainer import RunError, progress_bar
from .precision import PRECISIONS, load_for_inference

__all__ = ["model_kind", "check_precision", "load_model", "predict", "predict_dir", "write_jsonl_atomically"]


def model_kind(model_dir: str | os.PathLike) -> str:
    """``"pruned"`` for a directory holding ``cofi_config.json``, else ``"dense"``."""
    return "pruned" if os.path.isfile(os.path.join(os.fspath(model_dir), CONFIG_NAME)) else "dense"


def check_precision(model_dir: str, precision: str, device: str | torch.device, where: str) -> None:
    """``precision`` is one the model in ``model_dir`` can run in on ``device`` (:class:`RunError`
    naming ``where`` otherwise): any of :data:`PRECISIONS` for a pruned model (int8 on the CPU,
    fp16 on CUDA), fp32 for a dense one. Reads nothing but the directory listing."""
    if precision not in PRECISIONS:
        raise RunError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "fp32" and model_kind(model_dir) == "dense":
        raise RunError(f"{where}: precision {precision!r} needs a pruned model directory (written by `cofi prune`, "
                       f"with {CONFIG_NAME}); {model_dir!r} holds a dense model, which runs in fp32 only")
    device_type = torch.device(device).type
    if precision == "int8" and device_type != "cpu":
        raise RunError(f"{where}: precision 'int8' runs on the CPU only (torch's quantized linear); use --device cpu "
                       "or another precision")
    if precision == "fp16" and device_type != "cuda":
        raise RunError(f"{where}: precision 'fp16' runs on a CUDA GPU only; use bf16 on the CPU")


def load_model(model_dir: str, *, precision: str = "fp32", device: str | torch.device = "cpu",
               where: str = "predict") -> tuple[torch.nn.Module, str]:
    """``(model, kind)`` of a directory written by ``cofi finetune`` (kind ``"dense"``) or
    ``cofi prune`` (``"pruned"``), in eval mode on ``device``, in ``precision``
    (:func:`check_precision` first; :class:`RunError` for anything wrong with the directory)."""
    check_precision(model_dir, precision, device, where)
    if model_kind(model_dir) == "pruned":
        try:
            model = load_for_inference(model_dir, precision=precision, device=device)
        except (OSError, ValueError) as e:
            raise RunError(f"model directory {model_dir!r}: {e}") from None
        return model.eval(), "pruned"
    task = read_task(model_dir)
    model = load_task_model(model_dir, task=task["handler"])
    task["handler"].prepare_model(model, task["spec"])
    return model.to(device).eval(), "dense"


def predict(model: torch.nn.Module, task: dict, data: Dataset, tokenizer, *, batch_size: int = 32,
            device: str | torch.device = "cpu", progress: bool = False) -> list[dict]:
    """One result per example of ``data``, in its order, as the task decodes it
    (:meth:`~cofi_kernels.tasks.base.Task.decode`): ``{"label": name, "probabilities": {name: p, ...}}``
    for classification (softmax of the logits in fp32; the label is the most likely class),
    ``{"score": x}`` for regression, ``{"entities": [...], "tags": [...]}`` for token classification,
    ``{"answer", "start", "end", "score"}`` for question answering, ``{"embedding": [...]}`` for embeddings.

    ``task`` is the directory's :func:`~cofi_kernels.training.model_io.read_task`; inputs are
    tokenized as in evaluation (truncated to its ``max_length``; long QA contexts split into windows).
    Labels in ``data`` are not used. Batches hold features of similar token length (longest first);
    ``progress`` shows a tqdm bar over features on stderr.
    """
    handler, spec = task["handler"], task["spec"]
    enc = handler.featurize(data, spec, tokenizer, task["max_length"], labelled=False)
    order = sorted(range(len(enc)), key=lambda i: -len(enc.input_ids[i]))  # stable: ties keep input order
    rows: list[torch.Tensor | None] = [None] * len(enc)
    model.eval()
    bar = progress_bar(len(enc), 0, "predict", progress)
    try:
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                index = order[s : s + batch_size]
                out = handler.outputs(model, enc.batch(index, device)).float().cpu()
                for r, i in enumerate(index):
                    rows[i] = out[r, : len(enc.input_ids[i])] if handler.per_token else out[r]
                if bar is not None:
                    bar.update(len(index))
    finally:
        if bar is not None:
            bar.close()
    if not rows:
        return []
    return handler.decode(gather_rows(rows), enc, data, spec)


def predict_dir(model_dir: str, data: Dataset, *, precision: str = "fp32", batch_size: int = 32,
                device: str | torch.device = "cpu", progress: bool = False) -> list[dict]:
    """:func:`predict` with the model, task and tokenizer of ``model_dir`` (see :func:`load_model`)."""
    from ..training.config import check_device

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise RunError(f"batch size must be an integer >= 1, got {batch_size!r}")
    check_device(device, "predict")
    task = read_task(model_dir)
    check_precision(model_dir, precision, device, "predict")
    tokenizer = load_tokenizer(model_dir)
    model, _ = load_model(model_dir, precision=precision, device=device)
    return predict(model, task, data, tokenizer, batch_size=batch_size, device=device, progress=progress)


def write_jsonl_atomically(path: str, rows) -> None:
    """Write ``rows`` as JSON Lines to ``path`` all at once: into a temporary file in the same
    directory, then renamed over ``path`` (an existing file is replaced and keeps its
    permissions). On any error the temporary file is removed and ``path`` is as it was."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(path):
        mode = os.stat(path).st_mode & 0o7777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
