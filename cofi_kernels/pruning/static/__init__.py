"""Static model pruning, SMP (Jiang et al., ACL 2023): the pre-trained weights stay frozen and only
scores (:mod:`.scores`) and a linear classification head are trained (:mod:`.loop`).

Registered as the pruning method ``smp``:
``cofi prune --method smp --model PRETRAINED_DIR --remaining V --structured|--unstructured``.
"""

from ...training.trainer import RunError
from ..registry import MethodArgument, PruningMethod, register_method
from .loop import SMPConfig, smp_prune

__all__ = ["SMPConfig", "smp_prune"]


def _run(train, eval_data, out, config, *, resume=False, progress=True, stop_at=None, task=None, model, teacher=None,
         structured=False, unstructured=False):
    if structured == unstructured:  # both or neither
        raise RunError("prune: --method smp needs exactly one of --structured (whole heads and FFN units: a compact, "
                       "faster model) or --unstructured (per-weight masks: no speed-up on dense hardware)")
    return smp_prune(model, train, eval_data, out, config, structured=structured, teacher_dir=teacher,
                     resume=resume, progress=progress, stop_at=stop_at)


register_method(PruningMethod(
    name="smp",
    summary="static model pruning (SMP): frozen pre-trained weights, learned top-v masks and a classification head",
    config=SMPConfig,
    run=_run,
    why_not="it trains a sentence classifier's head beside the masks (the setting of its paper); token, span and "
            "embedding outputs are not wired into its masked model",
    arguments=(
        MethodArgument("--model", "the pre-trained (not fine-tuned) model directory; its weights stay frozen",
                       required=True),
        MethodArgument("--teacher", "a fine-tuned model (`cofi finetune`) to distil from: loss "
                                    "alpha_ce * CE + alpha_distil * KL(T) * T^2 (default: CE only)"),
        MethodArgument("--structured", "prune whole attention heads and FFN units per layer into a compact model "
                                       "(exactly one of --structured / --unstructured)", switch=True),
        MethodArgument("--unstructured", "prune single weights of each matrix (masks saved as packed bits beside "
                                         "the dense model; no speed-up on dense hardware)", switch=True),
    ),
))
