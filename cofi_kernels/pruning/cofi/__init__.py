"""CoFi (Xia et al., ACL 2022): L0 gates (:mod:`.gates`), the Hugging Face patch (:mod:`.patch`),
the fold into a compact model (:mod:`.fold`) and the training loop on the trainer (:mod:`.loop`).

Registered as the pruning method ``cofi``.
"""

from ...tasks import TASK_NAMES
from ..registry import MethodArgument, PruningMethod, register_method
from .loop import PruneConfig, cofi_prune


def _run(train, eval_data, out, config, *, resume=False, progress=True, stop_at=None, task=None, teacher,
         student=None, no_distill=False):
    return cofi_prune(teacher, train, eval_data, out, config, student_dir=student, distill=not no_distill,
                      resume=resume, progress=progress, stop_at=stop_at, task=task)


register_method(PruningMethod(
    name="cofi",
    summary="CoFi: L0 gates on heads, sublayers, FFN units and hidden dims, with layer distillation",
    config=PruneConfig,
    run=_run,
    tasks=TASK_NAMES,
    arguments=(
        MethodArgument("--teacher", "directory written by `cofi finetune` (the model to prune); with --task "
                                    "embedding the pre-trained embedding model itself",
                       required=True),
        MethodArgument("--student", "start the student from this pretrained model instead of a copy of the teacher"),
        MethodArgument("--no-distill", "train with cross-entropy only (no teacher)", switch=True),
    ),
))
