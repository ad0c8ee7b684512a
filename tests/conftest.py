import os

# Triton kernels run through the interpreter on CPU-only machines; this must be
# set before any kernel module is imported.
if os.environ.get("COFI_TEST_NO_INTERPRET") != "1":
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _triton_device() -> str | None:
    from cofi_kernels.ops.triton import support

    if torch.cuda.is_available() and not support.INTERPRET:
        return "cuda"
    return "cpu" if support.INTERPRET else None


# Where the Triton kernel tests run: the GPU, else the CPU through the interpreter, else nowhere.
TRITON_DEVICE = _triton_device()
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="no GPU and not under TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test (and per run unless COFI_TEST_SEED is set):
    # kernels must compute the same function on any valid input.
    seed = int(os.environ.get("COFI_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(seed)
    print(f"torch seed {seed} (rerun with COFI_TEST_SEED={seed})")  # shown when the test fails
    yield


def pytest_report_header(config):
    import cofi_kernels.info

    return cofi_kernels.info.report().splitlines()


# Tiny BERT, toy data and a teacher fine-tuned on it, shared by the training, pruning and CLI tests.


@pytest.fixture(scope="session")
def toy():
    from tests.training_support import dataset, toy_rows

    return dataset(toy_rows(48, seed=1)), dataset(toy_rows(24, seed=2))


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    from tests.training_support import tiny_bert_dir

    return tiny_bert_dir(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, base_dir, toy):
    from cofi_kernels.training import finetune as ft
    from tests.training_support import FAST_FINETUNE

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = str(tmp_path_factory.mktemp("runs") / "teacher")
    ft.finetune(base_dir, *toy, out, ft.FinetuneConfig(**FAST_FINETUNE), progress=False)
    return out
