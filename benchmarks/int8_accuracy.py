"""Held-out accuracy of a pruned model in fp32 and in int8 with 7-bit and 8-bit activations.

    .venv/bin/python benchmarks/int8_accuracy.py PRUNED_DIR DATA.jsonl

Prints one JSON line: the CPU, ATen's and FBGEMM's instruction sets as configured by the
environment (``ATEN_CPU_CAPABILITY``, ``FBGEMM_ENABLE_INSTRUCTIONS``), whether the int8 sums
saturate here (:func:`cofi_kernels.serving.int8_sums_saturate`), the default choice
(``quantize_int8``'s ``reduce_range=None``), and the accuracy in fp32, int8 with 7-bit
activations and int8 with 8-bit activations, on the labelled examples of ``DATA``. Run it
once as is and once with the CPU narrowed to AVX2 (the variables of tests/test_narrowed_cpu.py)
to see both choices; the results of issue 23 are in ``benchmarks/results/int8_bbc.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from cofi_kernels.models.pruned_model import PrunedModel
from cofi_kernels.serving import int8_sums_saturate, quantize_int8
from cofi_kernels.data.text import read_examples
from cofi_kernels.tasks.classification import Encoded
from cofi_kernels.training.evaluation import evaluate
from cofi_kernels.training.model_io import load_tokenizer, read_task


def cpu_name() -> str:
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    args = parser.parse_args()
    task = read_task(args.model)
    labels = task["spec"]
    enc = Encoded(read_examples(args.data), labels, load_tokenizer(args.model), task["max_length"])
    accuracy = {}
    for name, reduce_range in (("fp32", None), ("int8_7bit", True), ("int8_8bit", False)):
        model = PrunedModel.from_pretrained(args.model)
        if name != "fp32":
            quantize_int8(model, reduce_range=reduce_range)
        with torch.inference_mode():
            accuracy[name] = evaluate(model, enc, labels, batch_size=32)["accuracy"]
    print(json.dumps({
        "cpu": cpu_name(),
        "aten": torch.backends.cpu.get_cpu_capability(),
        "fbgemm_enable_instructions": os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "(all the CPU has)"),
        "int8_sums_saturate": int8_sums_saturate(),
        "default_reduce_range": quantize_int8(PrunedModel.from_pretrained(args.model)).int8_reduce_range,
        "examples": len(enc),
        **accuracy,
    }))


if __name__ == "__main__":
    main()
