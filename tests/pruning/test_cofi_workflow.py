"""The user's path end to end: apply_cofi → gates with learned-looking log α → prune → save → load.

The pieces are tested against an independent reference elsewhere; this checks
that they fit: ``prune(model, gates)`` on the *patched* model, with the
deterministic gates the patched model uses in eval mode, gives its outputs.
"""

from __future__ import annotations

import torch

import cofi_kernels

from tests.cofi_model_ref import minilm_model, padded_batch, small_model


def _learned_looking(gates, seed):
    # Spread log α over [log 0.01, log 100] so that deterministic() has zeros
    # in every group type, soft values and whole dead sublayers.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gates.log_alpha.values():
            p.copy_(torch.empty(p.shape).uniform_(-4.6, 4.6, generator=gen))


def _check_prune_matches_patched(model, batch, tmp_path, seed):
    gates = cofi_kernels.apply_cofi(model)
    _learned_looking(gates, seed)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=batch[0], attention_mask=batch[1], token_type_ids=batch[2])
    want = want.logits if hasattr(want, "logits") else want.last_hidden_state
    z = gates.deterministic()
    assert any((v == 0).any() for v in z.values() if v is not None)
    pruned = cofi_kernels.prune(model, gates)
    with torch.no_grad():
        got = pruned(*batch, backend="reference")
    if got.shape != want.shape:  # a bare encoder returns the reduced hidden size
        got = pruned.expand_hidden(got)
    assert (got - want).abs().max() <= 1e-5, (got - want).abs().max()
    assert pruned.sparsity > 0
    pruned.save_pretrained(tmp_path)
    loaded = cofi_kernels.PrunedModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(*batch), pruned(*batch))


def test_classifier_prune_matches_patched_model(tmp_path):
    for kind, seed in (("bert", 1), ("roberta", 2)):
        model = small_model(kind, classifier=True, layers=4, seed=seed)
        _check_prune_matches_patched(model, padded_batch(model, seed=seed), tmp_path / kind, seed)


def test_minilm_prune_matches_patched_model(tmp_path):
    model = minilm_model()
    _check_prune_matches_patched(model, padded_batch(model, batch=3, seq=24), tmp_path, 3)
