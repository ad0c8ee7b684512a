"""The ``@triton.jit`` kernels, one module per fused op.

Importing a module here imports Triton; the launchers and op registrations
live in :mod:`cofi_kernels.ops`. Kernels upcast every load to float32 (bf16
arithmetic is wrong in the interpreter) and use int64 offsets.
"""
