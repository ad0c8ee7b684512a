"""Training a pruned architecture from scratch (DESIGN §8; Liu et al., ICLR 2019): :func:`scratch_train`.

The model has exactly the per-layer shapes of a given pruned model (head
counts, FFN widths, removed sublayers, the reduced hidden size) and is trained
on the task with cross-entropy (MSE for regression) on the one trainer, like
:func:`~cofi_kernels.training.finetune.finetune`: AdamW, linear warm-up then
linear decay, evaluation once per epoch (or every ``eval_every`` steps), the
best evaluation's weights kept. No distillation and no dropout (a
:class:`~cofi_kernels.models.pruned_model.PrunedModel` has none), as the
original comparison trains the small model on the task alone.

Its length in epochs is Scratch-E or Scratch-B (:mod:`.budget`). Its start:

- ``random``: BERT's initialisation (the
  :class:`~cofi_kernels.models.pruned_model.PrunedModel` docstring), drawn from
  ``seed``;
- ``pretrained-slice``: the kept heads, FFN units and hidden dims cut from the
  pretrained model *before* fine-tuning (``--pretrained DIR``, the directory
  ``cofi finetune --model`` was given), through the generic builder with no
  scaling; the embeddings, LayerNorms, biases and BERT's pooler come from it
  too, the classifier is new (seeded). Which heads / units / dims were kept is
  read from the pruning run's ``gates.safetensors`` (a CoFi output): a pruned
  model's own files record only how many. A pruning run's ``run.json`` holds
  digests, not paths, and its teacher is already fine-tuned, so the pretrained
  directory is an argument; a directory whose ``cofi_task.json`` says it was
  fine-tuned is refused.

Runs resume after a kill to a bit-identical result, as every trainer run does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ...models.arch import encoder_dims, token_limit
from ...models.builder import KeptLayer, build_pruned_model
from ...models.plots import write_shapes_png
from ...models.pruned_model import CONFIG_NAME, PrunedModel
from ...training.config import RunSettings, check_run_settings, documented, setting
from ...data.text import steps_per_epoch
from ...tasks.base import Dataset
from ...training.distributed import local_device
from ...training.finetune import FinetuneHooks
from ...training.model_io import (
    TASK_FILE,
    check_max_length,
    load_task_model,
    load_tokenizer,
    read_model_config,
    read_task,
    saved_settings,
    write_task,
)
from ..registry import labelled_task
from ...training.optim import freeze_embeddings
from ...training.trainer import Phase, RunDirectory, RunError, RunResult, Trainer, run_fingerprint
from .budget import BUDGETS, pruning_run_record, scratch_budget

__all__ = ["GATES_FILE", "INITS", "ScratchConfig", "check_scratch_config", "kept_indices", "scratch_model",
           "scratch_train"]

INITS = ("random", "pretrained-slice")
GATES_FILE = "gates.safetensors"  # written by the CoFi method beside its model


def _choice(name: str, values: tuple[str, ...]):
    def parse(text: str) -> str:
        import argparse

        if text not in values:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(values)}, got {text!r}")
        return text

    parse.__name__ = name  # argparse names the type in some messages
    return parse


@documented
@dataclass
class ScratchConfig(RunSettings):
    """Settings of :func:`scratch_train` (``cofi prune --method scratch``)."""

    budget: str = setting("E", "E: as many epochs as the pruning run in total (Scratch-E); B: those epochs x dense "
                               "FLOPs / pruned FLOPs, at most 2x (Scratch-B)",
                          cli_type=_choice("budget", BUDGETS), required=True, choices=BUDGETS)
    init: str = setting("random", "random: BERT's initialisation (normal(0, 0.02) weights, zero biases, LayerNorm "
                                  "1 / 0); pretrained-slice: the kept heads, units and hidden dims of --pretrained",
                        cli_type=_choice("init", INITS), choices=INITS)
    lr: float = setting(1e-4, "peak AdamW learning rate (linear warm-up, then linear decay to 0)")
    warmup_fraction: float = setting(0.1, "share of the steps spent warming up the learning rate")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases and LayerNorms)")
    eval_every: int = setting(0, "evaluate every N steps (0: once per epoch); the best evaluation's weights are kept")
    freeze_embeddings: bool = setting(False, "do not train the embedding tables")


def check_scratch_config(cfg: ScratchConfig) -> None:
    """Refuse bad settings (:class:`RunError` naming the setting): the shared checks, then scratch's."""
    check_run_settings(cfg, "prune")
    if cfg.budget not in BUDGETS:
        raise RunError(f"prune: budget must be one of {', '.join(BUDGETS)}, got {cfg.budget!r}")
    if cfg.init not in INITS:
        raise RunError(f"prune: init must be one of {', '.join(INITS)}, got {cfg.init!r}")
    if not cfg.lr > 0:
        raise RunError(f"prune: lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.warmup_fraction < 1:
        raise RunError(f"prune: warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")
    if cfg.weight_decay < 0:
        raise RunError(f"prune: weight_decay must be >= 0, got {cfg.weight_decay}")


def _read_architecture(architecture_dir: str) -> PrunedModel:
    """The pruned model in ``architecture_dir`` (fully checked; :class:`RunError` naming the flag)."""
    where = f"--architecture {architecture_dir!r}"
    if not os.path.isfile(os.path.join(architecture_dir, CONFIG_NAME)):
        raise RunError(f"{where} has no {CONFIG_NAME}, so it is not a pruned model; give the output directory of "
                       "`cofi prune`")
    try:
        model = PrunedModel.from_pretrained(architecture_dir)
    except (OSError, ValueError) as e:
        raise RunError(f"{where}: {e}") from None
    if model.head is None:
        raise RunError(f"{where} holds a model without a head to train ({model.config['task']}); scratch training "
                       "needs a classifier's, tagger's or QA model's architecture")
    return model


def kept_indices(architecture_dir: str, config: dict, hidden_index: torch.Tensor):
    """Per layer ``(heads, units)``, the kept original indices (``None`` = sublayer removed), read from
    the CoFi run's ``gates.safetensors``: in a kept sublayer, the heads / units whose deterministic
    gate ``z`` is non-zero, as CoFi's fold keeps them (a gate type that was not learned keeps all).

    :class:`RunError` when the file is missing or unreadable or disagrees with the model's shapes.
    """
    from safetensors.torch import load_file

    path = os.path.join(architecture_dir, GATES_FILE)
    if not os.path.isfile(path):
        raise RunError(f"--init pretrained-slice: --architecture {architecture_dir!r} has no {GATES_FILE}, which names "
                       "the kept heads, units and hidden dims; give the output directory of `cofi prune --method cofi`")
    try:
        z = {k[2:]: v for k, v in load_file(path).items() if k.startswith("z.")}
    except Exception as e:  # safetensors raises its own types for a truncated or foreign file
        raise RunError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {e})") from None
    L, H, I = config["num_layers"], config["original_num_heads"], config["original_intermediate_size"]
    D = config["original_hidden_size"]
    for t, shape in (("head", (L, H)), ("int", (L, I)), ("hidden", (D,))):
        if t in z and tuple(z[t].shape) != shape:
            raise RunError(f"{path}: gate 'z.{t}' has shape {list(z[t].shape)}, expected {list(shape)} for the "
                           f"model in {CONFIG_NAME}")
    if "hidden" in z and not torch.equal(torch.nonzero(z["hidden"] != 0).flatten(), hidden_index.cpu()):
        raise RunError(f"{path}: the hidden dims with non-zero gates are not the model's hidden_index")

    def kept(t: str, i: int, n: int, count):
        if count is None:
            return None
        idx = torch.arange(n) if t not in z else torch.nonzero(z[t][i] != 0).flatten()
        if idx.numel() != count:
            name = "heads" if t == "head" else "FFN units"
            raise RunError(f"{path}: layer {i} has {idx.numel()} {name} with non-zero gates, but the model in "
                           f"{CONFIG_NAME} keeps {count}")
        return idx

    return [(kept("head", i, H, s["heads"]), kept("int", i, I, s["ffn_width"])) for i, s in enumerate(config["layers"])]


def _check_pretrained(pretrained_dir: str, config: dict) -> None:
    """``pretrained_dir`` holds a not fine-tuned model of the architecture's original sizes."""
    where = f"--pretrained {pretrained_dir!r}"
    task_path = os.path.join(pretrained_dir, TASK_FILE)
    if os.path.isfile(task_path):
        raise RunError(f"{where} holds a model written by `cofi finetune` or `cofi prune` ({TASK_FILE}); "
                       "pretrained-slice starts from the pretrained weights before fine-tuning: give the directory "
                       "that `cofi finetune --model` was given")
    hf = read_model_config(pretrained_dir)
    dims = encoder_dims(hf)
    want = {"model_type": config["model_type"], "layers": config["num_layers"],
            "hidden size": config["original_hidden_size"], "heads": config["original_num_heads"],
            "head size": config["head_dim"], "FFN width": config["original_intermediate_size"],
            "vocabulary": config["vocab_size"], "positions": config["max_position_embeddings"]}
    got = {"model_type": hf.model_type, "layers": dims.num_layers, "hidden size": dims.hidden_size,
           "heads": dims.num_heads, "head size": dims.head_dim, "FFN width": dims.intermediate_size,
           "vocabulary": hf.vocab_size, "positions": hf.max_position_embeddings}
    diff = [f"{k} {got[k]} (architecture's original: {want[k]})" for k in want if got[k] != want[k]]
    if diff:
        raise RunError(f"{where} is not the model the architecture was pruned from: {'; '.join(diff)}")


def scratch_model(architecture: PrunedModel, init: str, seed: int, labels,
                  pretrained_dir: str | None = None, kept=None) -> PrunedModel:
    """A fresh float32 :class:`PrunedModel` of ``architecture``'s exact shapes (on the CPU, eval mode,
    parameters without grad).

    ``init="random"``: BERT's initialisation drawn after ``torch.manual_seed(seed)``;
    ``hidden_index`` is the architecture's. ``init="pretrained-slice"``: the heads / units /
    hidden dims ``kept`` (:func:`kept_indices`) cut from the pretrained model in
    ``pretrained_dir`` with a new classifier for ``labels`` drawn after ``torch.manual_seed(seed)``.
    """
    torch.manual_seed(seed)
    if init == "random":
        model = PrunedModel(architecture.config)
        with torch.no_grad():
            model.hidden_index.copy_(architecture.hidden_index)
        model.requires_grad_(False)
    elif init == "pretrained-slice":
        hf = load_task_model(pretrained_dir, labels)
        layers = [KeptLayer(heads=h, units=u) for h, u in kept]
        model = build_pruned_model(hf, layers, hidden=architecture.hidden_index).float()
        model.config["id2label"] = architecture.config.get("id2label")
    else:
        raise RunError(f"prune: init must be one of {', '.join(INITS)}, got {init!r}")
    if model.layer_shapes() != architecture.layer_shapes():  # the builder and the architecture disagree: a bug
        raise RunError(f"scratch: the {init} model's shapes {model.layer_shapes()} differ from the architecture's "
                       f"{architecture.layer_shapes()}")
    return model.eval()


def scratch_train(
    architecture_dir: str,
    train: Dataset,
    eval_data: Dataset,
    out: str,
    config: ScratchConfig | None = None,
    *,
    pretrained_dir: str | None = None,
    resume: bool | str = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> RunResult:
    """Train the architecture of the pruned model in ``architecture_dir`` from scratch.

    Args:
        architecture_dir: the output directory of a finished ``cofi prune`` run: its
            ``cofi_config.json`` gives the shapes, its ``cofi_task.json`` the labels, its
            tokenizer the tokens, its ``run.json`` the pruning run's epochs and max_length
            (:mod:`.budget`), and with ``pretrained-slice`` its ``gates.safetensors`` the kept indices.
        train, eval_data: training data, and the data the best state is chosen on.
        out: the run directory; at the end it holds the model (``PrunedModel`` files, tokenizer,
            ``cofi_task.json``), ``shapes.png``, ``log.jsonl`` and ``run.json`` (with the budget).
        config: :class:`ScratchConfig`.
        pretrained_dir: with ``init="pretrained-slice"`` (required there, refused otherwise):
            the pretrained model before fine-tuning.
        resume: continue the unfinished run in ``out`` from its checkpoint (``"any-world-size"``:
            also one written by another number of processes).
        stop_at: stop after that many steps, with a checkpoint
            (:class:`~cofi_kernels.training.trainer.RunStopped`).
        progress: show a progress bar.

    Raises:
        DataError: unusable data (labels outside the architecture's classes, ...).
        RunError: bad settings, an architecture directory without a pruned model, task file,
            ``run.json`` epochs (or, for pretrained-slice, gates), a pretrained directory of
            other sizes or already fine-tuned, ``out`` not usable.
    """
    cfg = config or ScratchConfig()
    check_scratch_config(cfg)
    if cfg.init == "pretrained-slice" and pretrained_dir is None:
        raise RunError("prune: --init pretrained-slice needs --pretrained DIR (the pretrained model before "
                       "fine-tuning that the pruned model came from)")
    if cfg.init != "pretrained-slice" and pretrained_dir is not None:
        raise RunError(f"prune: --pretrained is used with --init pretrained-slice only (this run's init is "
                       f"{cfg.init!r})")
    handler, labels = labelled_task(read_task(architecture_dir), cfg, "scratch")
    architecture = _read_architecture(architecture_dir)
    arch_cfg = architecture.config
    pruning_epochs, pruning_length = pruning_run_record(architecture_dir)
    budget = scratch_budget(arch_cfg, pruning_epochs, pruning_length, cfg.budget)
    kept = None
    if cfg.init == "pretrained-slice":
        kept = kept_indices(architecture_dir, arch_cfg, architecture.hidden_index)
        _check_pretrained(pretrained_dir, arch_cfg)
    check_max_length(cfg.max_length, token_limit(arch_cfg["model_type"], arch_cfg["max_position_embeddings"],
                                                 arch_cfg["pad_token_id"]), "prune")
    tokenizer = load_tokenizer(architecture_dir)
    train_enc = handler.featurize(train, labels, tokenizer, cfg.max_length)
    eval_enc = handler.featurize(eval_data, labels, tokenizer, cfg.max_length)
    fingerprint = run_fingerprint(cfg, models={"architecture": architecture_dir, "pretrained": pretrained_dir},
                                  data={"train": train, "eval": eval_data}, method="scratch")
    run = RunDirectory(out, fingerprint, resume, "prune")
    device = local_device(cfg.device, run.world)
    model = scratch_model(architecture, cfg.init, cfg.seed, labels, pretrained_dir, kept).to(device)
    model.requires_grad_(True)
    if cfg.freeze_embeddings:
        freeze_embeddings(model)

    spe = steps_per_epoch(len(train_enc), cfg.batch_size)
    total = max(1, math.ceil(budget.epochs * spe))
    hooks = _Scratch(model, cfg, eval_enc, labels, total, device, run.world)
    trainer = Trainer(run, hooks, [Phase("scratch", total, cfg.eval_every or spe)], train_enc, seed=cfg.seed,
                      batch_size=cfg.batch_size, device=device, checkpoint_every=cfg.checkpoint_every,
                      description=f"scratch-{cfg.budget}")
    trainer.fit(progress, stop_at)

    model.requires_grad_(False)
    model.eval()

    def write():
        model.save_pretrained(run.out)
        write_shapes_png(model, run.out)
        tokenizer.save_pretrained(run.out)
        write_task(run.out, labels, cfg.max_length, "pruned", **saved_settings(handler, architecture_dir, best))

    best = trainer.best["scratch"]
    run.write(write)
    summary = {
        "kind": "prune",
        "method": "scratch",
        "architecture": os.path.abspath(architecture_dir),
        "pretrained": None if pretrained_dir is None else os.path.abspath(pretrained_dir),
        "init": cfg.init,
        "budget": budget.to_json(),
        "epochs": budget.epochs,
        "best": best,
        "sparsity": model.sparsity,
        "parameters": model.num_parameters(),
        "layer_shapes": model.layer_shapes(),
        "steps": total,
        "seconds": trainer.seconds,
        "config": fingerprint["config"],
    }
    run.finish(summary)
    return RunResult(run.out, best, total, trainer.seconds, {"sparsity": model.sparsity, "budget": budget})


class _Scratch(FinetuneHooks):
    """Fine-tuning's hooks (task loss, AdamW with linear warm-up and decay, best evaluation kept) on
    the freshly initialised model."""

