"""BERT-of-Theseus (Xu et al., EMNLP 2020): progressive module replacing (DESIGN §8).

The fine-tuned n-layer predecessor is cut into m modules of n/m layers; each
module's successor (one layer, a copy of predecessor layer j) gradually
replaces it (:mod:`.schedule`, :mod:`.model`), then the successor is
fine-tuned alone (:mod:`.loop`). Registered as the pruning method ``theseus``.
"""

from ..registry import LABELLED_TASKS, NOT_LABELLED, MethodArgument, PruningMethod, register_method
from .loop import TheseusConfig, check_theseus_config, theseus_prune
from .model import TheseusModel, successor_pruned_model
from .schedule import ReplaceSchedule

__all__ = ["ReplaceSchedule", "TheseusConfig", "TheseusModel", "check_theseus_config", "successor_pruned_model",
           "theseus_prune"]


def _run(train, eval_data, out, config, *, resume=False, progress=True, stop_at=None, task=None, teacher):
    return theseus_prune(teacher, train, eval_data, out, config, resume=resume, progress=progress, stop_at=stop_at)


register_method(PruningMethod(
    name="theseus",
    summary="BERT-of-Theseus: successor layers progressively replace modules of n/m teacher layers, leaving m layers",
    config=TheseusConfig,
    run=_run,
    tasks=LABELLED_TASKS,
    why_not=NOT_LABELLED,
    arguments=(
        MethodArgument("--teacher", "directory written by `cofi finetune` (the predecessor to compress)",
                       required=True),
    ),
))
