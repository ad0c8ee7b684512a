"""Every setting of every config has a ``cofi`` flag, and the flag reaches the config."""

from __future__ import annotations

import dataclasses

import pytest

from cofi_kernels import cli
from cofi_kernels.pruning import get_method, method_names
from cofi_kernels.training.config import config_flag, settings_of
from cofi_kernels.training.finetune import FinetuneConfig

# Flags the command had before they were generated; they must keep working.
EXISTING = {
    "finetune": ["--data", "--device", "--batch-size", "--eval-data", "--eval-fraction", "--out", "--resume",
                 "--max-length", "--eval-every", "--checkpoint-every", "--seed", "--bf16", "--quiet", "--model",
                 "--epochs", "--lr", "--task", "--freeze-embeddings"],
    "prune": ["--data", "--device", "--batch-size", "--eval-data", "--eval-fraction", "--out", "--resume",
              "--max-length", "--eval-every", "--checkpoint-every", "--seed", "--bf16", "--quiet", "--teacher",
              "--target-sparsity", "--student", "--no-distill", "--distill-epochs", "--prune-epochs",
              "--sparsity-warmup-epochs", "--finetune-epochs", "--lr", "--reg-lr", "--lambda-lr", "--finetune-lr",
              "--temperature", "--alpha-pred", "--alpha-layer", "--epsilon", "--train-embeddings"],
    "eval": ["--model", "--data", "--device", "--batch-size", "--json"],
    "demo": ["--out", "--resume", "--target-sparsity", "--max-length", "--seed", "--quiet"],
}


def _flags(command: str, argv=None) -> set[str]:
    parser = cli.build_parser(argv)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {s for a in sub._actions for s in a.option_strings}


def _configs():
    yield "finetune", FinetuneConfig, []
    for name in method_names():
        yield "prune", get_method(name).config, ["prune", "--method", name]


@pytest.mark.parametrize("command", list(EXISTING))
def test_existing_flags_are_kept(command):
    assert set(EXISTING[command]) <= _flags(command)


@pytest.mark.parametrize("command, config, argv", list(_configs()), ids=lambda v: getattr(v, "__name__", None))
def test_every_config_field_has_a_flag(command, config, argv):
    flags = _flags(command, argv)
    missing = [f.name for f in settings_of(config) if config_flag(f) not in flags]
    assert not missing, f"{config.__name__} fields without a flag: {missing}"
    assert all(f.metadata.get("help") for f in settings_of(config)), "every setting needs a help text"


def _changed_value(f):
    """A value different from the default, and its command-line text."""
    d = f.default
    if isinstance(d, bool):
        return (not d), []
    if f.name == "learn":
        return ("head", "int"), ["head", "int"]
    if f.name == "teacher_layers":
        return [1, 3], ["1", "3"]
    if f.name == "device":
        return "cuda:1", ["cuda:1"]
    if isinstance(d, int):
        return d + 3, [str(d + 3)]
    if f.name == "target_sparsity":
        return 0.75, ["0.75"]
    if isinstance(d, str) and f.metadata.get("choices"):  # a named choice (e.g. theseus' --schedule)
        other = next(c for c in f.metadata["choices"] if c != d)
        return other, [other]
    return d * 0.5 + 0.125, [repr(d * 0.5 + 0.125)]


@pytest.mark.parametrize("command, config, argv", list(_configs()), ids=lambda v: getattr(v, "__name__", None))
def test_each_flag_sets_its_field(command, config, argv):
    required = ["--out", "o"]
    if command == "prune":  # each method's required inputs (cofi: --teacher, smp: --model)
        required += [x for a in get_method(argv[2]).arguments if a.required for x in (a.flag, "x")]
    line = [command, *argv[1:], *required]
    want = {}
    for f in settings_of(config):
        value, text = _changed_value(f)
        want[f.name] = value
        line += [config_flag(f), *text]
    args = cli.build_parser(line).parse_args(line)
    got = dataclasses.asdict(cli._config_from(args, config))
    assert got == want
