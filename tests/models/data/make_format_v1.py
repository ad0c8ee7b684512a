"""Writes the saved-format fixtures ``format_v1_bert/`` and ``format_v1_roberta/``.

The committed directories were written by this script at commit eb4eee1
(before the package was split into layers), so that
``tests/models/test_saved_format.py`` can check that a directory saved by
that code still loads and gives bit-identical logits. Do not regenerate them
with newer code: that would defeat the test.

Run from the repository root: ``python -m tests.models.data.make_format_v1``.
"""

from __future__ import annotations

import os

import torch
import transformers as tf
from safetensors.torch import save_file

import cofi_kernels

HERE = os.path.dirname(os.path.abspath(__file__))


def _model(kind: str):
    common = dict(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
                  max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "roberta":
        return tf.RobertaForSequenceClassification(tf.RobertaConfig(**common, pad_token_id=1)).eval()
    return tf.BertForSequenceClassification(tf.BertConfig(**common)).eval()


def _gates(shapes: dict, gen: torch.Generator) -> dict:
    """Soft gates in (0.2, 1] with every edge case of the format: a removed attention sublayer,
    an FFN sublayer with no unit left, an attention sublayer with no head left, a removed FFN."""
    z = {t: torch.rand(s, generator=gen) * 0.8 + 0.2 for t, s in shapes.items()}
    z["head"][0, 1] = 0.0
    z["int"][0, ::3] = 0.0
    z["mha"][1] = 0.0
    z["int"][1] = 0.0
    z["head"][2] = 0.0
    z["ffn"][2] = 0.0
    z["hidden"][::5] = 0.0
    return z


def main() -> None:
    for seed, kind in enumerate(("bert", "roberta")):
        torch.manual_seed(100 + seed)
        model = _model(kind)
        gates = cofi_kernels.apply_cofi(model)
        gen = torch.Generator().manual_seed(200 + seed)
        gates.fix(_gates(gates.shapes, gen))
        pruned = cofi_kernels.prune(model, gates)
        out = os.path.join(HERE, f"format_v1_{kind}")
        pruned.save_pretrained(out)
        ids = torch.randint(3, 120, (3, 11), generator=gen)
        mask = torch.ones(3, 11, dtype=torch.long)
        mask[1, 7:] = 0
        mask[2, 4:] = 0
        types = torch.zeros(3, 11, dtype=torch.long)
        types[:, 6:] = 1 if kind == "bert" else 0
        with torch.no_grad():
            logits = pruned(ids, mask, types)
            hidden = pruned.encode(ids, mask, types)
        save_file({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "logits": logits,
                   "last_hidden": hidden}, os.path.join(out, "expected.safetensors"))
        print(pruned.summary())


if __name__ == "__main__":
    main()
