"""Layer 6: pruning methods, one subpackage each, registered by name (:mod:`~cofi_kernels.pruning.registry`).

- ``cofi`` (:mod:`cofi_kernels.pruning.cofi`): CoFi, L0 gates at five granularities with layerwise distillation.
"""

from .registry import MethodArgument, PruningMethod, get_method, method_names, register_method

__all__ = ["MethodArgument", "PruningMethod", "get_method", "method_names", "register_method"]
