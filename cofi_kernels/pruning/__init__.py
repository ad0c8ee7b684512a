"""Layer 6: pruning methods, one subpackage each (:mod:`cofi_kernels.pruning.cofi`)."""
