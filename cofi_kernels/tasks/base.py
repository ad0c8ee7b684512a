"""What a task is (DESIGN §10): :class:`Task`, the one place that knows a kind of example.

A task says how its examples are read (:meth:`Task.read`) and encoded into
model inputs (:meth:`Task.encode`), which head the model carries
(:attr:`Task.auto_class`, :meth:`Task.head_config`, :attr:`Task.pruned_task`),
how outputs are computed from a batch (:meth:`Task.outputs`), the task loss
(:meth:`Task.loss`), the loss CoFi distils with (:meth:`Task.distill_loss`), the
metrics (:meth:`Task.metrics`) and how outputs become predictions
(:meth:`Task.decode`). Training, every pruning method, evaluation, prediction,
the engine and the export ask the task; none tests for one inline.

Conventions every task keeps:

- *Outputs* are one float tensor per batch: ``[B, C]`` per sequence
  (:attr:`Task.per_token` False) or ``[B, T, C]`` per token (True). Per-token
  outputs of padding positions are never read by a loss or a metric.
- *Losses* return the sum over the batch's examples (``reduction="sum"``) or
  its mean (``"mean"``): one value per example (a per-token loss is averaged
  over the example's scored tokens first), so a process's share of a global
  batch is its sum over the global count (:class:`~cofi_kernels.training.distributed.BatchPart`).
- *Features* (:class:`Features`) are what a model runs on: one per example,
  or several per example where a long input is split (question answering);
  ``features.example_of[f]`` is the example of feature ``f``.
- A task's *spec* (:class:`Spec`) is what training learns about the task from
  its data (classes, tags, QA settings), saved in ``cofi_task.json``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Protocol

import torch

__all__ = ["Dataset", "Features", "Spec", "Task", "gather_rows", "reduce_examples", "reduce_total"]


class Dataset(Protocol):
    """Examples as read from a file, in file order (each task has its own dataclass)."""

    source: str

    def __len__(self) -> int: ...

    def subset(self, index: Sequence[int], source: str | None = None) -> "Dataset":
        """The examples at ``index``, in that order."""

    def rows(self) -> Iterator[Any]:
        """One JSON-able value per example (what a run's fingerprint hashes)."""


class Spec(Protocol):
    """What a task learned from its training data; ``task`` is the task's name as saved."""

    task: str

    def to_json(self) -> dict:
        """``{"task": name, ...}``: merged into ``cofi_task.json``."""

    @property
    def num_outputs(self) -> int:
        """Width of the model's head (classes, tags, 2 for start/end; the hidden size for embeddings)."""


class Features:
    """Encoded inputs of a data set (see the module docstring).

    Attributes:
        input_ids, token_type_ids: per feature, a list of ints (no padding).
        pad_id: the tokenizer's padding id.
        example_of: per feature, the index of its example (identity unless a task splits inputs).
        targets: per-feature targets of the task (``batch`` puts them in under the task's keys), or None.

    Subclasses add what their loss, metrics and decoding need and extend :meth:`batch`.
    """

    def __init__(self, input_ids: list[list[int]], token_type_ids: list[list[int]], pad_id: int,
                 example_of: list[int] | None = None):
        self.input_ids = input_ids
        self.token_type_ids = token_type_ids
        self.pad_id = int(pad_id)
        self.example_of = list(range(len(input_ids))) if example_of is None else example_of
        self.targets = None
        self.data = None  # the examples they encode (set by Task.featurize)

    def __len__(self) -> int:
        return len(self.input_ids)

    def set_targets(self, targets: torch.Tensor) -> None:
        """Targets computed outside the data (a teacher's outputs, :attr:`Task.teacher_targets`)."""
        self.targets = targets

    def max_length(self) -> int:
        """The longest feature's token count."""
        return max((len(x) for x in self.input_ids), default=0)

    def inputs(self, index: Sequence[int], device="cpu") -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``token_type_ids`` ``[b, T]`` of features ``index``,
        right-padded to the longest of them."""
        index = list(index)
        T = max(len(self.input_ids[i]) for i in index)
        ids = torch.full((len(index), T), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(index), T), dtype=torch.long)
        mask = torch.zeros((len(index), T), dtype=torch.long)
        for r, i in enumerate(index):
            n = len(self.input_ids[i])
            ids[r, :n] = torch.tensor(self.input_ids[i])
            types[r, :n] = torch.tensor(self.token_type_ids[i])
            mask[r, :n] = 1
        out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {k: v.to(device) for k, v in out.items()}

    def batch(self, index: Sequence[int], device="cpu") -> dict[str, torch.Tensor]:
        """:meth:`inputs` plus the task's targets of ``index`` (none when built unlabelled)."""
        return self.inputs(index, device)

    def in_order(self, batch_size: int):
        """Index lists covering every feature once, in order (for evaluation and prediction)."""
        for s in range(0, len(self), batch_size):
            yield list(range(s, min(s + batch_size, len(self))))


def gather_rows(rows: Sequence[torch.Tensor], seq_len: int | None = None) -> torch.Tensor:
    """Stack per-feature outputs: ``[C]`` rows → ``[N, C]``; ``[n_i, C]`` rows → ``[N, T, C]`` zero-padded
    to ``seq_len`` (default: the longest)."""
    if rows[0].dim() == 1:
        return torch.stack(list(rows))
    T = seq_len if seq_len is not None else max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), T, *rows[0].shape[1:])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


class Task:
    """One kind of example; subclasses fill in every method (see the module docstring)."""

    #: the name under which it is registered, saved and chosen with ``--task``
    name: ClassVar[str]
    #: more names that select it (``regression`` selects classification with a numeric label)
    aliases: ClassVar[tuple[str, ...]] = ()
    #: transformers' auto class of the dense model with this task's head
    auto_class: ClassVar[str]
    #: the ``task`` of a :class:`~cofi_kernels.models.pruned_model.PrunedModel` built from it
    pruned_task: ClassVar[str]
    #: outputs per token ([B, T, C]) rather than per sequence ([B, C])
    per_token: ClassVar[bool] = False
    #: the headline metric's key in :meth:`metrics`
    metric: ClassVar[str]
    #: the task's targets are the teacher's outputs (no labels to fine-tune on): `cofi finetune` refuses it
    teacher_targets: ClassVar[bool] = False
    #: the commands' default data (BBC News) serves this task when no --data is given
    default_data: ClassVar[bool] = False
    #: the class of the examples :meth:`read` returns
    dataset_class: ClassVar[type | None] = None
    #: one line per data format, for `--help` and errors
    formats: ClassVar[str] = ""

    # -- data ---------------------------------------------------------------

    def matches(self, columns: set[str]) -> bool:
        """Whether JSONL / CSV records with these keys are this task's examples."""
        raise NotImplementedError

    def read(self, path: str, *, labelled: bool = True) -> Dataset:
        """The examples of a file; ``labelled=False`` for data to predict on (labels optional, ignored).

        Raises :class:`~cofi_kernels.data.text.DataError` with one line naming the file, the line and
        what was expected."""
        raise NotImplementedError

    def spec(self, train: Dataset, forced: str | None = None) -> Spec:
        """The task's spec learned from the training data (``forced``: the name given with ``--task``)."""
        raise NotImplementedError

    def with_settings(self, spec: Spec, settings) -> Spec:
        """The spec with what the run's settings decide for this task (QA: ``doc_stride``); here ``spec``."""
        return spec

    def spec_from_json(self, obj: dict, where: str) -> Spec:
        """Inverse of ``Spec.to_json``; DataError naming ``where`` when malformed."""
        raise NotImplementedError

    def spec_for_teacher(self, model_dir: str) -> Spec:
        """The spec of a task whose targets are the teacher's outputs, read from the pre-trained
        teacher's directory (:attr:`teacher_targets` tasks only)."""
        raise ValueError(f"the {self.name} task takes its spec from training data, not from a model directory")

    def encode(self, data: Dataset, spec: Spec, tokenizer, max_length: int, *, labelled: bool = True,
               **options) -> Features:
        """Tokenize ``data``; with ``labelled`` the features carry targets (DataError for a label the spec lacks)."""
        raise NotImplementedError

    def config_outputs(self, config) -> int:
        """The head width of a transformers model of this task with ``config`` (its ``num_labels``)."""
        return config.num_labels

    def featurize(self, data: Dataset, spec: Spec, tokenizer, max_length: int, *, labelled: bool = True,
                  **options) -> Features:
        """:meth:`encode`, with the features remembering their examples (``features.data``) for
        :meth:`metrics` and :meth:`decode`. What training, evaluation and prediction call."""
        features = self.encode(data, spec, tokenizer, max_length, labelled=labelled, **options)
        features.data = data
        return features

    # -- model --------------------------------------------------------------

    def head_config(self, spec: Spec) -> dict:
        """Keyword arguments for ``auto_class.from_pretrained`` that size and name the head."""
        raise NotImplementedError

    def prepare_model(self, model, spec: Spec) -> None:
        """Set on a freshly loaded transformers model what :meth:`outputs` needs from the spec (no-op here)."""

    def finish_pruned(self, pruned, spec: Spec):
        """The :class:`~cofi_kernels.models.pruned_model.PrunedModel` to save for a compact model built
        from this task's transformers model (here: ``pruned`` itself)."""
        return pruned

    def write_extras(self, directory: str, spec: Spec, max_length: int) -> None:
        """Write what else a saved model of this task needs beside the model, tokenizer and
        ``cofi_task.json`` (embeddings: the sentence-transformers files); nothing here."""

    def outputs(self, model, batch: dict, output_hidden_states: bool = False):
        """The task's outputs of ``model`` (a transformers model with this head, or a PrunedModel built
        from one) on ``batch``; with ``output_hidden_states``, ``(outputs, per-layer hidden states)``."""
        raise NotImplementedError

    def from_model_output(self, output) -> torch.Tensor:
        """The task's outputs from a transformers ``ModelOutput`` of this task's head (here its ``logits``);
        for code that calls a wrapped transformers model itself (Theseus' module replacing)."""
        return output.logits

    def loss(self, outputs: torch.Tensor, batch: dict, reduction: str = "mean") -> torch.Tensor:
        """The task loss against ``batch``'s targets."""
        raise NotImplementedError

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, batch: dict, temperature: float,
                     reduction: str = "mean") -> torch.Tensor:
        """CoFi's prediction-distillation loss of ``student`` outputs against the frozen ``teacher``'s."""
        raise NotImplementedError

    # -- results ------------------------------------------------------------

    def metrics(self, outputs: torch.Tensor, features: Features, data: Dataset, spec: Spec) -> dict:
        """``{"metric": name, name: value, ...}`` of every feature's outputs (``[N, C]`` or ``[N, T, C]``)."""
        raise NotImplementedError

    def decode(self, outputs: torch.Tensor, features: Features, data: Dataset, spec: Spec) -> list[dict]:
        """One JSON-able prediction per example of ``data`` (what ``cofi predict`` writes)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def reduce_total(total: torch.Tensor, examples: int, reduction: str) -> torch.Tensor:
    """A loss summed over ``examples`` examples, as asked: the sum (``"sum"``) or the mean (``"mean"``)."""
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / examples
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def reduce_examples(per_example: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum (``"sum"``) or mean (``"mean"``) of one loss value per example (``[B]``)."""
    return reduce_total(per_example.sum(), per_example.shape[0], reduction)
