"""Reading data (DESIGN §10): text files (CSV, JSONL), the shipped BBC News corpus, file checks.

Below :mod:`cofi_kernels.training` and :mod:`cofi_kernels.serving`, so both read data the same way;
the task layer (:mod:`cofi_kernels.tasks`) reads its own formats (CoNLL, SQuAD JSON) on top of it.
"""
