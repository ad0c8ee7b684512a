"""python/compare_methods.py: its table and picture from given results, and its row commands."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("compare_methods", os.path.join(ROOT, "python", "compare_methods.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(names):
    return [{"row": n, "metric": "accuracy", "score": 0.9 - 0.01 * i, "accuracy": 0.9 - 0.01 * i,
             "sparsity": 0.1 * i, "encoder_parameters": 1e6 * (10 - i), "examples_per_second": 50.0 * (i + 1),
             "seconds": 60.0 * (i + 1)} for i, n in enumerate(names)]


def test_every_method_has_rows_with_its_own_flags(recipe, tmp_path):
    table = recipe.rows(str(tmp_path), "/pretrained")
    methods = {args[2] for name, (_, args, _) in table.items() if args[0] == "prune"}
    assert methods == {"cofi", "theseus", "smp", "scratch"}
    assert table["theseus-6to2"][1][table["theseus-6to2"][1].index("--layers") + 1] == "2"
    assert "--structured" in table["smp-structured"][1] and "--unstructured" in table["smp-unstructured"][1]
    scratch = table["scratch-B-pretrained-slice"][1]
    assert scratch[scratch.index("--architecture") + 1].endswith("cofi-0.9") and "--pretrained" in scratch


def test_table_and_picture(recipe, tmp_path):
    from matplotlib.image import imread

    table = recipe.rows(str(tmp_path), "/pretrained")
    results = _results(list(table))
    md = recipe.table_md(results, table, "title")
    assert md.count("\n| ") == len(results) + 1 and "90.00%" in md and "`cofi prune --method smp --model /pretrained" in md
    path = tmp_path / "methods_bbc.png"
    recipe.plot(results, str(path), "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(str(path)).shape[0] > 100
