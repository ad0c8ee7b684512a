"""The gated sublayers on plain tensors, without the CoFi patch: live-only equals dense compute."""

from __future__ import annotations

import pytest
import torch

from cofi_kernels.models.arch import supported_model
from cofi_kernels.modules.gated import HiddenGates, LayerGates, gated_layer, head_rows, live_layer
from tests.cofi_model_ref import padded_batch, small_model


def test_head_rows():
    assert head_rows(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


@pytest.mark.parametrize("case", ["soft", "no_head", "dead_attention", "dead_ffn", "no_unit"])
def test_live_plan_equals_dense(case):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = small_model("bert", seed=int(torch.randint(0, 2**31 - 1, ())))
    adapter, _, enc = supported_model(model)
    layer = adapter.layers(enc)[0]
    att, ffn = adapter.attention_parts(layer), adapter.ffn_parts(layer, enc.config)
    H, I, D = 4, 48, 32
    z = {"head": torch.rand(H, generator=gen), "mha": torch.rand((), generator=gen) + 0.1,
         "int": torch.rand(I, generator=gen), "ffn": torch.rand((), generator=gen) + 0.1,
         "hidden": torch.rand(D, generator=gen)}
    z["head"][1] = z["int"][::4] = z["hidden"][::3] = 0.0
    if case == "no_head":
        z["head"].zero_()
    elif case == "dead_attention":
        z["mha"].zero_()
    elif case == "dead_ffn":
        z["ffn"].zero_()
    elif case == "no_unit":
        z["int"].zero_()
    ids, mask, _ = padded_batch(model, seed=1)
    x = torch.randn(*ids.shape, D, generator=gen) * (z["hidden"] != 0)  # dropped dims are 0 in every hidden state
    kpm = mask.bool()
    plan = live_layer(z["head"], z["mha"], z["int"], z["ffn"], H, 8, I, torch.device("cpu"))
    kept = (z["hidden"] != 0).nonzero().flatten()
    with torch.no_grad():
        dense = gated_layer(x, kpm, att, ffn, LayerGates(z["head"], z["mha"], z["int"], z["ffn"]), HiddenGates(z["hidden"]))
        live = gated_layer(x, kpm, att, ffn, LayerGates(z["head"], z["mha"], z["int"], z["ffn"], plan),
                           HiddenGates(z["hidden"], kept, z["hidden"][kept]))
    assert torch.isfinite(live).all()
    assert (live - dense).abs().max() <= 1e-5 * dense.abs().max()
    if case in ("dead_attention",):
        assert not plan.mha_alive
