"""The task layer (DESIGN §10): one module per task, registered by name.

=========================  =============================================  =========================
task                       data                                           model output
=========================  =============================================  =========================
``classification``         ``text`` [, ``text_pair``], ``label``          class logits per sequence
(``regression``)           the same, numeric labels                       one value per sequence
``token_classification``   ``tokens`` + ``tags`` JSONL, CoNLL columns     tag logits per token
``question_answering``     SQuAD JSON, ``question`` / ``context`` JSONL   start / end logits per token
``embedding``              ``text``                                       the pooled sentence embedding
=========================  =============================================  =========================

:func:`get_task` gives the :class:`~cofi_kernels.tasks.base.Task` of a name,
:func:`task_of_file` the task a data file's columns say. Metric functions:
:func:`entity_scores` (token classification), :func:`squad_scores` (QA).
"""

from __future__ import annotations

from .registry import TASK_NAMES, get_task, task_of_data, task_of_file

__all__ = ["TASK_NAMES", "get_task", "task_of_data", "task_of_file", "entity_scores", "squad_scores"]


def entity_scores(references, predictions) -> dict:
    """Entity-level micro precision / recall / F1 (fractions) of tag sequences, conlleval chunking
    (see :func:`cofi_kernels.tasks.token_classification.entity_scores`)."""
    from .token_classification import entity_scores as scores

    return scores(references, predictions)


def squad_scores(predictions, references) -> dict:
    """SQuAD exact match and F1 in percent, as the official script computes them
    (see :func:`cofi_kernels.tasks.question_answering.squad_scores`)."""
    from .question_answering import squad_scores as scores

    return scores(predictions, references)
