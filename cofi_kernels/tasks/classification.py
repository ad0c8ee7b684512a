"""Sequence classification and regression: a label (or a score) per text or text pair.

Data: CSV / JSONL with ``text`` [, ``text_pair``], ``label``
(:func:`~cofi_kernels.data.text.read_examples`); the head reads the first token
(BERT's pooler + classifier, RoBERTa's classification head); the loss is
cross-entropy (MSE for regression); CoFi distils with KL on the class
distributions at temperature T, times T² (MSE for regression); metrics are
accuracy, or Pearson and MSE for regression; a prediction is the most likely
label with every class's probability, or the score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..data.text import DataError, LabelSpace, TextDataset, read_examples
from .base import Features, Task, reduce_total

__all__ = ["ClassificationTask", "Encoded", "TASK", "LabelSpace"]


class Encoded(Features):
    """A tokenized text data set: token ids per example (unpadded) and targets.

    Attributes:
        input_ids, token_type_ids: lists of int lists (truncated to ``max_length``).
        targets: ``[N]`` int64 class ids or float32 values; ``None`` when built with ``labels=None``
            (data to predict on; batches then have no ``labels``).
        pad_id: the tokenizer's padding id.
    """

    def __init__(self, data: TextDataset, labels: LabelSpace | None, tokenizer, max_length: int):
        if tokenizer.pad_token_id is None:
            raise DataError("the tokenizer has no padding token; set one in the model directory's tokenizer config")
        enc = tokenizer(
            data.texts,
            data.text_pairs,
            truncation="longest_first" if data.text_pairs is not None else True,
            max_length=max_length,
            return_token_type_ids=True,
            return_attention_mask=False,
        )
        super().__init__(enc["input_ids"], enc["token_type_ids"], tokenizer.pad_token_id)
        self.targets = None if labels is None else labels.encode(data)

    def batch(self, index: Sequence[int], device="cpu") -> dict[str, torch.Tensor]:
        """Examples ``index`` padded to the longest of them: ``input_ids``, ``attention_mask``,
        ``token_type_ids`` ``[b, T]`` and ``labels`` ``[b]`` (when the data has targets)."""
        out = self.inputs(index, device)
        if self.targets is not None:
            out["labels"] = self.targets[list(index)].to(device)
        return out


def task_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy for class ids, MSE for regression values (``logits [B, 1]``), averaged
    over the batch (``reduction="sum"``: summed)."""
    # Summed in one call over the batch, as before the task layer (the demo's numbers depend on the order).
    if logits.shape[-1] == 1:
        total = ((logits.float().squeeze(-1) - labels.float()) ** 2).sum()
    else:
        total = F.cross_entropy(logits.float(), labels, reduction="sum")
    return reduce_total(total, logits.shape[0], reduction)


def prediction_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    reduction: str = "mean") -> torch.Tensor:
    """``KL(softmax(t/T) ‖ softmax(s/T)) · T²`` averaged over the batch; for one output
    (regression) the MSE between the two predictions. ``reduction="sum"``: summed over
    the examples instead (a process's part of a global batch's mean)."""
    if student_logits.shape[-1] == 1:
        total = ((student_logits.float() - teacher_logits.float()) ** 2).sum()
    else:
        T = temperature
        log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.float() / T, dim=-1)
        total = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) * (T * T)
    return reduce_total(total, student_logits.shape[0], reduction)


def metrics_of(logits: torch.Tensor, targets: torch.Tensor, labels: LabelSpace) -> dict:
    """``{"metric": "accuracy", "accuracy", "loss"}``, or for regression ``{"metric": "pearson",
    "pearson", "mse", "loss"}``, of ``logits`` against ``targets``."""
    loss = float(task_loss(logits, targets))
    if labels.task == "regression":
        p = logits.squeeze(-1).double()
        y = targets.double()
        pc, yc = p - p.mean(), y - y.mean()
        denom = float(pc.norm() * yc.norm())
        pearson = float((pc * yc).sum()) / denom if denom > 0 else 0.0
        return {"metric": "pearson", "pearson": pearson, "mse": float(((p - y) ** 2).mean()), "loss": loss}
    acc = float((logits.argmax(-1) == targets).double().mean())
    return {"metric": "accuracy", "accuracy": acc, "loss": loss}


class ClassificationTask(Task):
    """Sequence classification and regression (see the module docstring)."""

    name = "classification"
    aliases = ("regression",)
    auto_class = "AutoModelForSequenceClassification"
    pruned_task = "sequence_classification"
    per_token = False
    metric = "accuracy"
    formats = "CSV or JSONL with text [, text_pair], label"
    default_data = True

    def matches(self, columns: set[str]) -> bool:
        return "text" in columns and "label" in columns

    def read(self, path: str, *, labelled: bool = True) -> TextDataset:
        return read_examples(path, labelled=labelled)

    def spec(self, train: TextDataset, forced: str | None = None) -> LabelSpace:
        return LabelSpace.from_labels(train.labels, forced if forced in ("classification", "regression") else None,
                                      source=train.source)

    def spec_from_json(self, obj: dict, where: str) -> LabelSpace:
        """The label space saved in ``cofi_task.json``: distinct class names (at least 2), none for
        regression; ``DataError`` naming ``where`` otherwise."""
        names = obj.get("labels")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{where}: 'labels' must be a list of class names (strings), got {names!r}")
        if len(set(names)) != len(names):
            raise DataError(f"{where}: 'labels' lists a class twice: {names!r}")
        if obj.get("task") == "classification" and len(names) < 2:
            raise DataError(f"{where}: a classification task needs at least 2 class names in 'labels', got {names!r}")
        if obj.get("task") == "regression" and names:
            raise DataError(f"{where}: a regression task has no class names, but 'labels' is {names!r}")
        return LabelSpace.from_json(obj, where)

    def encode(self, data: TextDataset, spec: LabelSpace, tokenizer, max_length: int, *, labelled: bool = True,
               **options) -> Encoded:
        return Encoded(data, spec if labelled else None, tokenizer, max_length)

    def head_config(self, spec: LabelSpace) -> dict:
        kw = {"num_labels": spec.num_labels,
              "problem_type": "regression" if spec.task == "regression" else "single_label_classification"}
        if spec.task == "classification":
            kw["id2label"] = dict(enumerate(spec.names))
            kw["label2id"] = {n: i for i, n in enumerate(spec.names)}
        return kw

    def outputs(self, model, batch: dict, output_hidden_states: bool = False):
        return model_outputs(model, batch, output_hidden_states)

    def loss(self, outputs, batch, reduction="mean"):
        return task_loss(outputs, batch["labels"], reduction)

    def distill_loss(self, student, teacher, batch, temperature, reduction="mean"):
        return prediction_loss(student, teacher, temperature, reduction)

    def metrics(self, outputs, features, data, spec):
        return metrics_of(outputs, features.targets, spec)

    def decode(self, outputs, features, data, spec):
        logits = outputs.float()
        if spec.task == "regression":
            return [{"score": v} for v in logits[:, 0].tolist()]
        probs = logits.softmax(-1)
        best = logits.argmax(-1).tolist()
        return [{"label": spec.names[b], "probabilities": dict(zip(spec.names, p))}
                for b, p in zip(best, probs.tolist())]


def model_outputs(model, b: dict, output_hidden_states: bool = False):
    """The outputs of a transformers model (its ``logits``) or of a PrunedModel (what its forward
    returns) on batch ``b``; with ``output_hidden_states``, ``(outputs, [every layer's output])``."""
    from ..models.pruned_model import PrunedModel

    if isinstance(model, PrunedModel):
        return model(b["input_ids"], b["attention_mask"], b["token_type_ids"], output_hidden_states=output_hidden_states)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                output_hidden_states=output_hidden_states)
    return (out.logits, list(out.hidden_states[1:])) if output_hidden_states else out.logits


TASK = ClassificationTask()
