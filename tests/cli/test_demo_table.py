"""The demo's table: speed-ups against the fp32 teacher, a bf16 row only where one was measured."""

from __future__ import annotations

from cofi_kernels.cli import _demo_table


def _result(accuracy, eps):
    return {"accuracy": accuracy, "sparsity": 0.9, "parameters": 2.5e6, "encoder_parameters": 1.9e6,
            "examples_per_second": eps, "examples": 445, "threads": 2}


def test_rows_and_speedups_against_the_fp32_teacher():
    teacher, fp32, bf16 = _result(0.97, 20.0), _result(0.96, 180.0), _result(0.955, 400.0)
    table = _demo_table(teacher, fp32, bf16, "AMX").splitlines()
    assert table[0] == "BBC News held-out test (445 articles), CPU, 2 threads, batch 32"
    assert table[4].endswith("| 20.0 | 1.00x |") and "fp32" in table[4]
    assert table[5].startswith("| CoFi-pruned, fp32 | 96.00% |") and table[5].endswith("| 180.0 | 9.00x |")
    assert table[6].startswith("| CoFi-pruned, bf16 (AMX) | 95.50% |") and table[6].endswith("| 400.0 | 20.00x |")


def test_no_bf16_row_without_a_bf16_measurement():
    table = _demo_table(_result(0.97, 20.0), _result(0.96, 100.0))
    assert len(table.splitlines()) == 6 and "bf16" not in table
