"""Layer 3: ``nn`` building blocks on :mod:`cofi_kernels.functional`.

- :mod:`~cofi_kernels.modules.gated`: the gated sublayer computations used
  while CoFi gates are learned (on plain tensors: gates, live indices, the
  key-padding mask);
- :mod:`~cofi_kernels.modules.pruned`: the sublayers of a pruned model
  (their own parameters and forward), the reference path of serving.
"""
