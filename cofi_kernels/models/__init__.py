"""Layer 4: models.

- :mod:`~cofi_kernels.models.arch`: one adapter per ``model_type`` (BERT, RoBERTa): supported classes,
  refused configurations, dimensions and gate shapes, where each weight lives;
- :mod:`~cofi_kernels.models.size`: the one count of encoder weights (DESIGN §4);
- :mod:`~cofi_kernels.models.pruned_model`: :class:`PrunedModel` and its saved format;
- :mod:`~cofi_kernels.models.builder`: kept index sets and scales → :class:`PrunedModel`;
- :mod:`~cofi_kernels.models.onnx_export`: a :class:`PrunedModel` as an ONNX file (:meth:`PrunedModel.export_onnx`).
"""
