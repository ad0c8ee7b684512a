"""ONNX export of a :class:`~cofi_kernels.models.pruned_model.PrunedModel` (DESIGN §7, "Export").

The graph is the model's plain PyTorch reference forward, exported in fp32 on
the CPU with dynamic batch and sequence axes, so that it runs in ONNX Runtime
(or any ONNX runtime) without this package: only standard ``ai.onnx`` ops, no
``cofi::`` custom op.

Exporter: torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``,
which needs the PyPI packages ``onnx`` and ``onnxscript``; ``pip install
cofi-kernels[onnx]``). The TorchScript exporter (``dynamo=False``, deprecated
since torch 2.9) fails on this forward under torch 2.14: the tracer records
the ``normalized_shape`` of the reference LayerNorm (taken from the
activation's last dim) as a computed value, which its LayerNormalization
symbolic refuses. The dynamo exporter traces with ``torch.export`` and names
the dynamic axes ``batch`` and ``sequence`` in the file.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import secrets
import stat
import warnings
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["INPUT_NAMES", "MIN_OPSET", "OnnxExport", "check_export_settings", "export_onnx", "max_opset",
           "output_names"]

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
MIN_OPSET = 18  # the opset torch's ONNX function library is written in; lower ones need a version conversion
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 8  # example sizes to trace with (not 0 or 1: those would be specialised)
_STANDARD_DOMAINS = ("", "ai.onnx")
_TAG_BYTES = 4  # random bytes in a temporary file's name (hex: twice as many characters)


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote: the file, its size in bytes, its opset and its output's name.

    ``output`` is the name of the first (for every task but question answering, the only)
    output; ``outputs`` names them all, in the file's order (``("start_logits",
    "end_logits")`` for question answering).
    """

    path: str
    size: int
    opset: int
    output: str
    outputs: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.outputs:
            object.__setattr__(self, "outputs", (self.output,))


def output_names(config: dict) -> tuple[str, ...]:
    """The ONNX output names of a pruned model with this config, by task: ``("logits",)`` for
    sequence and token classification, ``("start_logits", "end_logits")`` for question answering,
    ``("embedding",)`` for a sentence embedding, ``("last_hidden_state",)`` for a bare encoder."""
    return {
        "sequence_classification": ("logits",),
        "token_classification": ("logits",),
        "question_answering": ("start_logits", "end_logits"),
        "embedding": ("embedding",),
    }.get(config["task"], ("last_hidden_state",))


def max_opset() -> int:
    """The highest ONNX opset the installed ``onnx`` package knows (an ``ImportError`` without it)."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def _require_packages() -> None:
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"ONNX export needs the package(s) {', '.join(missing)}: pip install 'cofi-kernels[onnx]' "
            "(or pip install onnx onnxscript)"
        )


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"export_onnx: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        raise ValueError("export_onnx: path must be a str, got bytes")
    if path == "" or "\0" in path:
        raise ValueError(f"export_onnx: path {path!r} is empty or contains a NUL character")
    if not path.endswith(".onnx"):
        raise ValueError(f"export_onnx: path {path!r} must end in .onnx")
    if os.path.isdir(path):
        raise ValueError(f"export_onnx: path {path!r} is a directory; give a file name ending in .onnx")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"export_onnx: path {path!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"export_onnx: path {path!r}: directory {directory!r} is not writable")
    return path


def _check_opset(opset, what: str) -> int | None:
    if opset is None:
        return None
    top = max_opset()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= top:
        raise ValueError(f"{what} must be an integer in [{MIN_OPSET}, {top}] or None, got {opset!r}")
    return opset


def check_export_settings(opset=None, what: str = "export_onnx: opset") -> int | None:
    """The packages the export needs are installed (``ImportError`` naming them) and ``opset`` is
    ``None`` or an integer in ``[MIN_OPSET, max_opset()]`` (``ValueError`` naming it as ``what``,
    e.g. ``"--opset"``); returns ``opset``."""
    _require_packages()
    return _check_opset(opset, what)


def _cpu_fp32_copy(model):
    """``model`` itself when it is already fp32 on the CPU, else a CPU fp32 copy (``model`` unchanged)."""
    from .pruned_model import PrunedModel

    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" and (not t.is_floating_point() or t.dtype == torch.float32) for t in tensors):
        return model
    with torch.device("meta"):
        copy = PrunedModel(model.config)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
             for k, v in model.state_dict().items()}
    copy.load_state_dict(state, strict=True, assign=True)
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy


class _Reference(nn.Module):
    """The model's reference forward with the three inputs positional, in :data:`INPUT_NAMES` order."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        # `backend` is a newer keyword of PrunedModel.forward; without it the forward is the reference.
        self.kwargs = {"backend": "reference"} if "backend" in inspect.signature(model.forward).parameters else {}

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids, attention_mask, token_type_ids, **self.kwargs)
        if self.model.config.get("task") == "question_answering":  # [B, T, 2] → start, end [B, T]
            return out[..., 0], out[..., 1]
        return out


def _example_inputs(config: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .arch import ARCHS

    pad = config["pad_token_id"]
    limit = ARCHS[config["model_type"]].token_limit(config["max_position_embeddings"], pad)
    B, T = _EXAMPLE_BATCH, max(2, min(_EXAMPLE_SEQ, limit))
    gen = torch.Generator().manual_seed(0)
    low = 0 if pad is None else pad + 1
    ids = torch.randint(min(low, config["vocab_size"] - 1), config["vocab_size"], (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T // 2:] = 0
    types = torch.zeros(B, T, dtype=torch.long)
    return ids, mask, types


def _custom_ops(proto) -> list[str]:
    """``domain::op`` of every node outside the standard ONNX domain (graph and local functions)."""
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    return sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in _STANDARD_DOMAINS})


def _free_output_names(graph, outputs) -> None:
    """Rename the inner values of the exported graph (an ``onnx_ir`` graph) that carry one of the
    ``outputs`` names: the exporter names values after their aten op (``embedding`` for the word
    lookup) and then gives the graph output its requested name, which would appear twice (ONNX
    requires each name once)."""
    from onnx_ir.traversal import RecursiveGraphIterator

    wanted = set(outputs)
    graph_outputs = {id(v) for v in graph.outputs}
    values = list(graph.inputs) + list(graph.initializers.values())
    values += [v for node in RecursiveGraphIterator(graph) for v in node.outputs]
    taken = {v.name for v in values if v.name}
    for v in values:
        if v.name in wanted and id(v) not in graph_outputs:
            k = 1
            while f"{v.name}_inner_{k}" in taken:
                k += 1
            new = f"{v.name}_inner_{k}"
            taken.add(new)
            if v.name in graph.initializers and graph.initializers[v.name] is v:
                graph.initializers.pop(v.name)
                v.name = new
                graph.initializers[new] = v
            else:
                v.name = new


def _temp_path(directory: str, name: str) -> str:
    """A new hidden name beside the target ``name``: ``.NAME.PID.HEX.tmp`` (the pattern
    :func:`_sweep_stale_temp_files` matches)."""
    return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(_TAG_BYTES)}.tmp")


def _sweep_stale_temp_files(directory: str, name: str) -> None:
    """Remove what exports to ``name`` left when their process was killed (SIGKILL skips the clean-up):
    regular files named exactly as :func:`_temp_path` names them whose PID is no running process.
    Only the same ``name``, whose file this export replaces anyway: another target's temporary file
    may belong to a live export whose PID means nothing here (another PID namespace sharing the
    directory). Best effort: what cannot be removed stays."""
    if os.name != "posix":  # os.kill(pid, 0) probes a process on POSIX only (on Windows it would end it)
        return
    pattern = re.compile(rf"\.{re.escape(name)}\.([1-9][0-9]*)\.[0-9a-f]{{{2 * _TAG_BYTES}}}\.tmp")
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match is None or _may_be_running(int(match.group(1))):
            continue
        path = os.path.join(directory, entry)
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):  # never a directory or link that merely has the name
                os.remove(path)
        except OSError:  # removed meanwhile by another export's sweep, or not ours to remove
            pass


def _may_be_running(pid: int) -> bool:
    """False only when no process has the number ``pid``."""
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, the kernel only checks that the process exists
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (EPERM); a number beyond any PID
        return True
    return True


def export_onnx(model, path, *, opset: int | None = None) -> OnnxExport:
    """Write ``model``'s reference forward as an ONNX file at ``path``; see
    :meth:`PrunedModel.export_onnx <cofi_kernels.models.pruned_model.PrunedModel.export_onnx>`."""
    from .pruned_model import PrunedModel

    if not isinstance(model, PrunedModel):
        raise ValueError(f"export_onnx: model must be a PrunedModel, got {type(model).__name__}")
    path = _check_path(path)
    opset = check_export_settings(opset)
    outputs = output_names(model.config)
    target = _cpu_fp32_copy(model)
    was_training = target.training  # the export runs in eval mode; a caller's model is left as it was
    module = _Reference(target)
    inputs = _example_inputs(model.config)
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    dynamic = {name: {0: batch, 1: seq} for name in INPUT_NAMES}

    directory, name = os.path.split(os.path.abspath(path))
    _sweep_stale_temp_files(directory, name)
    # A new name beside the target (same file system, so the final rename is atomic); created by the
    # save itself, so the file gets the usual permissions (mkstemp's would be 0600).
    tmp = _temp_path(directory, name)
    # The exporter's registry logs a warning per torchvision op it cannot find (irrelevant here).
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    try:
        try:
            registry_log.setLevel(logging.ERROR)
            module.eval()
            with warnings.catch_warnings(), torch.no_grad():
                # The exporter warns that the three inputs share their axes (they do, by design).
                warnings.filterwarnings("ignore", message=r".*axis name.*will not be used.*", category=UserWarning)
                program = torch.onnx.export(
                    module, inputs, dynamo=True, opset_version=opset, input_names=list(INPUT_NAMES),
                    output_names=list(outputs), dynamic_shapes=dynamic, verbose=False, report=False,
                )
        finally:
            registry_log.setLevel(level)
            target.train(was_training)
        _free_output_names(program.model.graph, outputs)
        proto = program.model_proto
        custom = _custom_ops(proto)
        if custom:
            raise RuntimeError(f"export_onnx: the exported graph has non-standard op(s) {custom}; "
                               "the reference forward must export to standard ONNX ops only")
        written = {o.domain: o.version for o in proto.opset_import}[""]
        program.save(tmp, external_data=False)
        import onnx

        onnx.checker.check_model(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return OnnxExport(path=path, size=os.path.getsize(path), opset=int(written), output=outputs[0], outputs=outputs)
