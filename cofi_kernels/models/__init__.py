"""Layer 4: models (the compact :class:`~cofi_kernels.models.pruned_model.PrunedModel` and its format)."""
