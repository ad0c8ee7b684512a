"""Layer 6: training.

- :mod:`~cofi_kernels.training.trainer`: the one training loop (:class:`Trainer` with the hooks a method
  fills in) and its run directory, checkpoints, fingerprints and seeding;
- :mod:`~cofi_kernels.training.config`: the settings every run shares, declared with their help texts;
- :mod:`~cofi_kernels.training.distill`,
  :mod:`~cofi_kernels.training.evaluation`, :mod:`~cofi_kernels.training.model_io`,
  :mod:`~cofi_kernels.training.optim`: distillation losses, metrics, model directories, optimizers;
- :mod:`~cofi_kernels.training.finetune`: fine-tuning a teacher.
"""
