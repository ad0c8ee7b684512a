"""Layer 7: pruning methods, one subpackage each, registered by name (:mod:`~cofi_kernels.pruning.registry`).

- ``cofi`` (:mod:`cofi_kernels.pruning.cofi`): CoFi, L0 gates at five granularities with layerwise distillation.
- ``theseus`` (:mod:`cofi_kernels.pruning.theseus`): BERT-of-Theseus, module replacing into a shallower successor.
- ``smp`` (:mod:`cofi_kernels.pruning.static`): static model pruning, scores on frozen pre-trained weights.
- ``scratch`` (:mod:`cofi_kernels.pruning.scratch`): a pruned architecture trained from scratch.
"""

from .registry import MethodArgument, PruningMethod, get_method, method_names, register_method

__all__ = ["MethodArgument", "PruningMethod", "get_method", "method_names", "register_method"]
