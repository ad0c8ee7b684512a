"""Training the pruned architecture from scratch (Liu et al., ICLR 2019, "Rethinking the Value of
Network Pruning"; DESIGN §8): the exact per-layer shapes of a pruned model, trained on the task
from BERT's random initialisation or from a slice of the pretrained weights, for the pruning
run's epochs (Scratch-E) or its computation (Scratch-B) (:mod:`.budget`, :mod:`.loop`).

Registered as the pruning method ``scratch``.
"""

from ..registry import LABELLED_TASKS, NOT_LABELLED, MethodArgument, PruningMethod, register_method
from .budget import B_CAP, BUDGETS, Budget, pruning_run_record, scratch_budget
from .loop import INITS, ScratchConfig, scratch_train


def _run(train, eval_data, out, config, *, resume=False, progress=True, stop_at=None, task=None, architecture,
         pretrained=None):
    return scratch_train(architecture, train, eval_data, out, config, pretrained_dir=pretrained, resume=resume,
                         progress=progress, stop_at=stop_at)


register_method(PruningMethod(
    name="scratch",
    summary="train a pruned model's exact shapes from scratch (Scratch-E / Scratch-B budgets; random or "
            "pretrained-slice start)",
    config=ScratchConfig,
    run=_run,
    tasks=LABELLED_TASKS,
    why_not=NOT_LABELLED,
    arguments=(
        MethodArgument("--architecture", "output directory of `cofi prune` whose per-layer shapes, labels, tokenizer "
                                         "and run.json (the pruning run's epochs) are used", required=True),
        MethodArgument("--pretrained", "with --init pretrained-slice: the pretrained model before fine-tuning "
                                       "(the directory `cofi finetune --model` was given)"),
    ),
))

__all__ = ["B_CAP", "BUDGETS", "Budget", "INITS", "ScratchConfig", "pruning_run_record", "scratch_budget",
           "scratch_train"]
