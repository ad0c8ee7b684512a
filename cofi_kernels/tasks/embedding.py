"""Sentence embeddings: one pooled, optionally normalised vector per text, distilled from the unpruned model.

Data: CSV / JSONL with ``text`` (:func:`~cofi_kernels.data.text.read_examples`);
a ``label`` column is optional and used only by the retrieval check of
:meth:`EmbeddingTask.metrics`. Text pairs are refused: an embedding takes one
text.

There are no labels to learn from: the *targets* are the unpruned teacher's
embeddings (:attr:`EmbeddingTask.teacher_targets`; ``cofi finetune`` refuses
this task). The caller runs the teacher over the data once and sets
``features.targets`` to its embeddings ``[N, D]``; batches then carry them as
``"teacher"``.

Model: a bare encoder (``AutoModel``: ``BertModel``, ``RobertaModel``) whose
last hidden state is pooled over the real tokens as the teacher's
sentence-transformers folder says (:func:`read_pooling`: mean for
all-MiniLM-L6-v2) and L2-normalised when it has a ``Normalize`` module. A
:class:`~cofi_kernels.models.pruned_model.PrunedModel` built with
``embedding=`` (task ``"embedding"``) pools in its own forward; a transformers
model reads the pooling from ``model.config.cofi_pooling`` /
``cofi_normalize``, which :func:`configure` sets from the spec (mean and
normalised when unset).

Loss: per example ``1 − cos(student, teacher)``, for the task loss (against
the teacher's stored embeddings) and for CoFi's distillation (against the
frozen teacher's outputs of the same batch; the temperature is ignored). The
cosine is what retrieval with these embeddings measures, and it is invariant
to the norm, so an unnormalised model is not pushed to match a length nobody
uses. For unit vectors it is the MSE up to a factor: ``‖s − t‖² = 2(1 − cos)``,
so nothing is lost against MSE on normalised vectors, and the gradient does
not depend on whether the model normalises.

Metrics: ``cosine_to_teacher`` (the mean cosine of each embedding to the
teacher's), ``loss`` (the mean loss) and, for labelled data,
``retrieval_accuracy`` (:func:`retrieval_accuracy`). A prediction is
``{"embedding": [floats]}``.

Deployment (DESIGN §12): :func:`write_sentence_transformers_files` makes a
saved pruned model directory a sentence-transformers folder as well. Its first
module is :class:`PrunedTransformer`, module type
``"cofi_kernels.tasks.embedding.PrunedTransformer"`` (:data:`ST_MODULE_TYPE`),
then sentence-transformers' own ``Pooling`` and ``Normalize``. The class is
defined on first access (sentence-transformers is an optional dependency, not
imported by this module otherwise). See
:func:`load_sentence_transformer` for how sentence-transformers 6 resolves
that type and why loading needs ``trust_remote_code=True``.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.text import DataError, TextDataset, read_examples
from .base import Features, Task, reduce_examples

__all__ = [
    "EmbeddingTask", "EmbeddingSpec", "EmbeddingFeatures", "TASK", "POOLINGS", "ST_MODULE_TYPE",
    "pool", "configure", "embedding_outputs", "cosine_loss", "retrieval_accuracy", "read_pooling",
    "write_sentence_transformers_files", "load_sentence_transformer",
]  # and PrunedTransformer, defined on first access (module __getattr__): it needs sentence-transformers

#: the poolings this task computes (sentence-transformers' ``pooling_mode`` names)
POOLINGS = ("mean", "cls", "max")
#: the ``type`` of a pruned folder's first module in ``modules.json``
ST_MODULE_TYPE = f"{__name__}.PrunedTransformer"
# What sentence-transformers 6 writes for its own modules (older folders say sentence_transformers.models.*).
_ST_POOLING_TYPE = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
_ST_NORMALIZE_TYPE = "sentence_transformers.base.modules.normalize.Normalize"
# Legacy pooling config keys (sentence-transformers < 6) and the mode each one means.
_LEGACY_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


# ---------------------------------------------------------------------- spec


@dataclass(frozen=True)
class EmbeddingSpec:
    """How the teacher turns its last hidden state into an embedding (saved in ``cofi_task.json``).

    Attributes:
        pooling: ``"mean"`` (over real tokens), ``"cls"`` (the first real token) or ``"max"`` (per dim, over
            real tokens).
        normalize: whether the pooled vector is L2-normalised.
        dimension: the embedding width ``D``: the original model's hidden size (a pruned model's pruned
            dims are 0).
        task: always ``"embedding"``.
    """

    pooling: str
    normalize: bool
    dimension: int
    task: str = "embedding"

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise DataError(f"embedding pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if not isinstance(self.normalize, bool):
            raise DataError(f"embedding normalize must be true or false, got {self.normalize!r}")
        if isinstance(self.dimension, bool) or not isinstance(self.dimension, int) or self.dimension < 1:
            raise DataError(f"embedding dimension must be a positive integer, got {self.dimension!r}")

    @property
    def num_outputs(self) -> int:
        """The embedding width ``D``."""
        return self.dimension

    def to_json(self) -> dict:
        """``{"task": "embedding", "pooling", "normalize", "dimension"}``."""
        return {"task": self.task, "pooling": self.pooling, "normalize": self.normalize, "dimension": self.dimension}

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "EmbeddingSpec":
        """Inverse of :meth:`to_json`; DataError naming ``where`` when malformed."""
        if not isinstance(obj, dict) or obj.get("task") != "embedding" or not {"pooling", "normalize",
                                                                              "dimension"} <= set(obj):
            raise DataError(f"{where}: malformed embedding spec {obj!r}; expected task 'embedding' with "
                            "pooling, normalize and dimension")
        try:
            return cls(obj["pooling"], obj["normalize"], obj["dimension"])
        except DataError as e:
            raise DataError(f"{where}: {e}") from None


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: cannot read the {what} ({' '.join(str(e).split())})") from None


def _hidden_size(model_dir: str) -> int | None:
    """The model's hidden size ``D`` from ``cofi_config.json`` (its original size) or ``config.json``."""
    for name, key in (("cofi_config.json", "original_hidden_size"), ("config.json", "hidden_size")):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            value = _read_json(path, "model config").get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _pooling_mode(cfg: dict, path: str) -> str:
    """The one pooling mode of a sentence-transformers ``Pooling`` config (new or legacy keys)."""
    if "pooling_mode" in cfg:
        mode = cfg["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode) if isinstance(mode, list) else [repr(mode)]
    else:
        modes = [m for k, m in _LEGACY_MODES.items() if cfg.get(k)] or ["mean"]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise DataError(f"{path}: pooling {modes!r} is not supported; the embedding task pools with one of "
                        f"{', '.join(POOLINGS)}")
    return modes[0]


def read_pooling(model_dir: str | os.PathLike) -> EmbeddingSpec:
    """The embedding spec of a model directory: how its embeddings are pooled and normalised.

    - A sentence-transformers folder (``modules.json``): the ``Pooling`` module's config gives the pooling
      (``pooling_mode``, or the legacy ``pooling_mode_mean_tokens`` / ``_cls_token`` / ``_max_tokens``
      flags; no flag set means mean, as sentence-transformers reads it) and the dimension
      (``embedding_dimension`` / ``word_embedding_dimension``); a ``Normalize`` module means
      ``normalize=True``. Modules after the first other than ``Pooling`` and ``Normalize`` (``Dense``, ...)
      are refused: the task could not reproduce them.
    - A pruned embedding model without ``modules.json``: the ``pooling`` / ``normalize`` of its
      ``cofi_config.json``.
    - A plain transformers directory: mean pooling, not normalised (what sentence-transformers does with a
      bare transformers model), dimension its ``hidden_size``.

    Raises:
        DataError: a missing directory, an unreadable or unsupported configuration, no dimension found.
    """
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise DataError(f"model directory {model_dir!r} does not exist")
    modules_path = os.path.join(model_dir, "modules.json")
    if os.path.isfile(modules_path):
        return _read_st_pooling(model_dir, modules_path)
    cofi_path = os.path.join(model_dir, "cofi_config.json")
    if os.path.isfile(cofi_path):
        cfg = _read_json(cofi_path, "model config")
        if isinstance(cfg, dict) and cfg.get("task") == "embedding":
            return _spec(cofi_path, cfg.get("pooling"), cfg.get("normalize"), cfg.get("original_hidden_size"))
    dimension = _hidden_size(model_dir)
    if dimension is None:
        raise DataError(f"{model_dir}: no modules.json, cofi_config.json or config.json with the hidden size; "
                        "give a sentence-transformers or transformers model directory")
    return EmbeddingSpec("mean", False, dimension)


def _spec(where: str, pooling, normalize, dimension) -> EmbeddingSpec:
    try:
        return EmbeddingSpec(pooling, normalize, dimension)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _read_st_pooling(model_dir: str, modules_path: str) -> EmbeddingSpec:
    modules = _read_json(modules_path, "sentence-transformers module list")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                                                 for m in modules):
        raise DataError(f"{modules_path}: expected a list of modules with a 'type' each")
    pooling_cfg, normalize = None, False
    for m in modules[1:]:
        kind = m["type"].rsplit(".", 1)[-1]
        if kind == "Pooling" and pooling_cfg is None:
            cfg_path = os.path.join(model_dir, m.get("path") or "", "config.json")
            cfg = _read_json(cfg_path, "pooling config") if os.path.isfile(cfg_path) else {}
            if not isinstance(cfg, dict):
                raise DataError(f"{cfg_path}: expected a JSON object")
            pooling_cfg = (cfg_path, cfg)
        elif kind == "Normalize":
            normalize = True
        else:
            raise DataError(f"{modules_path}: module {m['type']!r} is not supported; the embedding task "
                            "reproduces a transformer, one Pooling and an optional Normalize")
    if pooling_cfg is None:
        raise DataError(f"{modules_path}: no Pooling module; the embedding task needs the model's pooling")
    cfg_path, cfg = pooling_cfg
    dimension = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension")) or _hidden_size(model_dir)
    return _spec(cfg_path, _pooling_mode(cfg, cfg_path), normalize, dimension)


# ---------------------------------------------------------------------- pooling and outputs


def pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str,
         normalize: bool) -> torch.Tensor:
    """Pool ``last_hidden [B, T, D]`` over each row's real tokens (``attention_mask`` 1; None: all) into
    ``[B, D]`` float32, L2-normalised when ``normalize``.

    ``"mean"``: the sum of the real rows over their count, in float32; ``"cls"``: the first real token;
    ``"max"``: per dim, the largest value over the real tokens (what sentence-transformers' ``Pooling``
    computes for each mode).
    """
    h = last_hidden.float()
    if attention_mask is None:
        attention_mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
    mask = attention_mask.to(h.device) != 0
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(h.dtype)
        out = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    elif pooling == "cls":
        first = mask.int().argmax(dim=1)
        out = h[torch.arange(h.shape[0], device=h.device), first]
    elif pooling == "max":
        out = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
    else:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return F.normalize(out, p=2, dim=-1) if normalize else out


def configure(model, spec: EmbeddingSpec) -> None:
    """Tell ``model`` how :meth:`EmbeddingTask.outputs` pools it.

    A transformers model gets ``config.cofi_pooling`` and ``config.cofi_normalize`` (the training code calls
    this on the model it loads, teacher and student; a model never configured pools with mean and
    normalises). A PrunedModel's pooling is fixed when it is built (its ``cofi_config.json``): ValueError
    when it differs from ``spec``.
    """
    from ..models.pruned_model import PrunedModel

    if isinstance(model, PrunedModel):
        cfg = model.config
        if cfg.get("task") != "embedding" or (cfg.get("pooling"), cfg.get("normalize")) != (spec.pooling,
                                                                                             spec.normalize):
            raise ValueError(f"configure: the pruned model (task {cfg.get('task')!r}, pooling {cfg.get('pooling')!r}, "
                             f"normalize {cfg.get('normalize')!r}) does not pool as the spec says "
                             f"({spec.pooling!r}, normalize {spec.normalize})")
        return
    model.config.cofi_pooling = spec.pooling
    model.config.cofi_normalize = spec.normalize


def embedding_outputs(model, batch: dict, output_hidden_states: bool = False):
    """The embeddings ``[B, D]`` of ``model`` on ``batch``; with ``output_hidden_states``,
    ``(embeddings, [every layer's output])``.

    A PrunedModel with task ``"embedding"`` pools in its forward; a transformers model's
    ``last_hidden_state`` is pooled by :func:`pool` as ``model.config.cofi_pooling`` / ``cofi_normalize``
    say (see :func:`configure`; default mean, normalised).
    """
    from ..models.pruned_model import PrunedModel

    if isinstance(model, PrunedModel):
        if model.config.get("task") != "embedding":
            raise ValueError(f"the pruned model's task is {model.config.get('task')!r}, not 'embedding'; build it "
                             "with embedding={'pooling': ..., 'normalize': ...}")
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     output_hidden_states=output_hidden_states)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"], output_hidden_states=output_hidden_states)
    cfg = model.config
    pooled = pool(out.last_hidden_state, batch["attention_mask"], getattr(cfg, "cofi_pooling", None) or "mean",
                  bool(getattr(cfg, "cofi_normalize", True)))
    return (pooled, list(out.hidden_states[1:])) if output_hidden_states else pooled


# ---------------------------------------------------------------------- losses and metrics


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``1 − cos(student_i, teacher_i)`` per example (float32; a zero vector has cosine 0), reduced with
    :func:`~cofi_kernels.tasks.base.reduce_examples` (``"mean"`` or ``"sum"``)."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"cosine_loss: student and teacher must both be [B, D], got {list(student.shape)} "
                         f"and {list(teacher.shape)}")
    cos = F.cosine_similarity(student.float(), teacher.float().to(student.device), dim=-1, eps=1e-8)
    return reduce_examples(1.0 - cos, reduction)


def retrieval_accuracy(embeddings: torch.Tensor, labels: Sequence) -> float:
    """The share of texts whose nearest neighbour by cosine among the *other* texts has the same label.

    ``embeddings [N, D]``, ``labels``: ``N`` comparable values; ``N >= 2``. Ties go to the lowest index.
    """
    n = embeddings.shape[0]
    if embeddings.dim() != 2 or len(labels) != n:
        raise ValueError(f"retrieval_accuracy: need embeddings [N, D] and N labels, got {list(embeddings.shape)} "
                         f"and {len(labels)} labels")
    if n < 2:
        raise ValueError("retrieval_accuracy: needs at least 2 texts")
    e = F.normalize(embeddings.double(), p=2, dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(float("-inf"))
    nearest = sim.argmax(dim=1).tolist()
    return sum(labels[j] == labels[i] for i, j in enumerate(nearest)) / n


# ---------------------------------------------------------------------- data


class EmbeddingFeatures(Features):
    """Tokenized texts; ``targets`` are the teacher's embeddings once the caller sets them.

    Attributes:
        targets: ``[N, D]`` float32 teacher embeddings, or None until set (:meth:`set_targets` checks
            the shape); :meth:`batch` then adds ``"teacher"`` ``[b, D]``.
        labels: the examples' raw labels (for :func:`retrieval_accuracy`), or None when the data has none.
    """

    def __init__(self, input_ids, token_type_ids, pad_id: int, labels: list | None = None):
        super().__init__(input_ids, token_type_ids, pad_id)
        self.labels = labels

    def set_targets(self, embeddings: torch.Tensor) -> None:
        """Set :attr:`targets` to the teacher's embeddings ``[N, D]`` (stored float32 on the CPU)."""
        if embeddings.dim() != 2 or embeddings.shape[0] != len(self):
            raise ValueError(f"teacher embeddings must be [{len(self)}, D], got {list(embeddings.shape)}")
        self.targets = embeddings.detach().to("cpu", torch.float32)

    def batch(self, index: Sequence[int], device="cpu") -> dict[str, torch.Tensor]:
        """:meth:`inputs` of ``index`` plus ``"teacher"`` ``[b, D]`` once :attr:`targets` is set."""
        out = self.inputs(index, device)
        if self.targets is not None:
            out["teacher"] = self.targets[list(index)].to(device)
        return out


def _has_label_column(path: str) -> bool:
    """Whether a (readable) CSV header or some JSONL record has a ``label`` column."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8-sig", errors="replace")
    if os.path.splitext(path)[1].lower() == ".csv":
        for row in csv.reader(io.StringIO(text, newline="")):
            if row and any(c.strip() for c in row):
                return "label" in row
        return False
    for line in io.StringIO(text, newline=""):
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "label" in obj:
                return True
    return False


class EmbeddingTask(Task):
    """Sentence embeddings distilled from the unpruned model (see the module docstring)."""

    name = "embedding"
    auto_class = "AutoModel"
    pruned_task = "embedding"
    per_token = False
    metric = "cosine_to_teacher"
    teacher_targets = True
    formats = "CSV or JSONL with text [, label (only for the retrieval check)]"
    default_data = True

    def config_outputs(self, config) -> int:
        """The embedding's width: the encoder's hidden size."""
        return config.hidden_size

    def prepare_model(self, model, spec: EmbeddingSpec) -> None:
        """The pooling of ``spec`` on a transformers encoder (:func:`configure`)."""
        configure(model, spec)

    def finish_pruned(self, pruned, spec: EmbeddingSpec):
        """The compact encoder as an embedding model: the same tensors, with the teacher's pooling."""
        from ..models.pruned_model import PrunedModel

        embedder = PrunedModel({**pruned.config, "task": "embedding", "pooling": spec.pooling,
                                "normalize": spec.normalize})
        embedder.load_state_dict(pruned.state_dict())
        return embedder.to(pruned.hidden_index.device).requires_grad_(False)

    def write_extras(self, directory: str, spec: EmbeddingSpec, max_length: int) -> None:
        """The sentence-transformers files (:func:`write_sentence_transformers_files`)."""
        write_sentence_transformers_files(directory, spec, max_length)

    def matches(self, columns: set[str]) -> bool:
        """Records with ``text`` (the registry asks classification, ``text`` + ``label``, first)."""
        return "text" in columns

    def read(self, path: str, *, labelled: bool = True) -> TextDataset:
        """The texts of a CSV / JSONL file, with their labels when it has a ``label`` column (and
        ``labelled``), else labels None. DataError for a ``text_pair`` column (an embedding takes one text)
        and for everything :func:`~cofi_kernels.data.text.read_examples` refuses."""
        if labelled:
            try:
                data = read_examples(path, labelled=True)
            except DataError as e:
                data = read_examples(path, labelled=False)  # its DataError, if any, is the file's problem
                if _has_label_column(os.fspath(path)):
                    raise e from None
        else:
            data = read_examples(path, labelled=False)
        if data.text_pairs is not None:
            raise DataError(f"{data.source}: the file has 'text_pair', but an embedding takes one text; give "
                            "'text' only (and optionally 'label' for the retrieval check)")
        return data

    def spec(self, train: TextDataset, forced: str | None = None) -> EmbeddingSpec:
        """Always DataError: the spec is not in the data but in the teacher (:meth:`spec_for_teacher`)."""
        raise DataError("the embedding task's spec (pooling, normalisation, dimension) comes from the teacher "
                        "model directory, not from the data: use spec_for_teacher(teacher_dir)")

    def spec_for_teacher(self, teacher_dir: str | os.PathLike) -> EmbeddingSpec:
        """The spec of the teacher model directory (:func:`read_pooling`)."""
        return read_pooling(teacher_dir)

    def spec_from_json(self, obj: dict, where: str) -> EmbeddingSpec:
        """:meth:`EmbeddingSpec.from_json`."""
        return EmbeddingSpec.from_json(obj, where)

    def encode(self, data: TextDataset, spec: EmbeddingSpec, tokenizer, max_length: int, *, labelled: bool = True,
               **options) -> EmbeddingFeatures:
        """Token ids of each text, truncated to ``max_length``; the features keep the examples' labels
        (when ``labelled`` and every example has one) and have no targets until the caller sets the
        teacher's embeddings (:meth:`EmbeddingFeatures.set_targets`)."""
        if data.text_pairs is not None:
            raise DataError(f"{data.source}: an embedding takes one text; the data has text pairs")
        if tokenizer.pad_token_id is None:
            raise DataError("the tokenizer has no padding token; set one in the model directory's tokenizer config")
        enc = tokenizer(data.texts, truncation=True, max_length=max_length, return_token_type_ids=True,
                        return_attention_mask=False)
        labels = list(data.labels) if labelled and data.labels and all(v is not None for v in data.labels) else None
        return EmbeddingFeatures(enc["input_ids"], enc["token_type_ids"], tokenizer.pad_token_id, labels)

    def head_config(self, spec: EmbeddingSpec) -> dict:
        """Nothing: ``AutoModel`` has no head (a BERT pooler, if loaded, is not used)."""
        return {}

    def outputs(self, model, batch: dict, output_hidden_states: bool = False):
        """:func:`embedding_outputs`."""
        return embedding_outputs(model, batch, output_hidden_states)

    def loss(self, outputs, batch, reduction="mean"):
        """:func:`cosine_loss` against the teacher's stored embeddings (``batch["teacher"]``)."""
        if "teacher" not in batch:
            raise ValueError("the embedding loss needs the teacher's embeddings: set features.targets first")
        return cosine_loss(outputs, batch["teacher"], reduction)

    def distill_loss(self, student, teacher, batch, temperature, reduction="mean"):
        """:func:`cosine_loss` of the student's embeddings against the teacher's (temperature ignored)."""
        return cosine_loss(student, teacher, reduction)

    def metrics(self, outputs, features: EmbeddingFeatures, data, spec):
        """``{"metric": "cosine_to_teacher", "cosine_to_teacher", "loss"}`` and, when the features have
        labels and at least 2 examples, ``"retrieval_accuracy"``."""
        if features.targets is None:
            raise ValueError("embedding metrics need the teacher's embeddings: set features.targets first")
        cos = F.cosine_similarity(outputs.float(), features.targets.float().to(outputs.device), dim=-1, eps=1e-8)
        result = {"metric": self.metric, "cosine_to_teacher": float(cos.double().mean()),
                  "loss": float((1.0 - cos).double().mean())}
        labels = getattr(features, "labels", None)
        if labels is not None and len(labels) >= 2:
            result["retrieval_accuracy"] = retrieval_accuracy(outputs, labels)
        return result

    def decode(self, outputs, features, data, spec):
        """``{"embedding": [D floats]}`` per example."""
        return [{"embedding": row} for row in outputs.float().tolist()]


TASK = EmbeddingTask()


# ---------------------------------------------------------------------- sentence-transformers folder


def _versions() -> dict:
    out = {}
    for dist in ("sentence-transformers", "transformers", "torch"):
        try:
            out[dist.replace("-", "_") if dist != "torch" else "pytorch"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_sentence_transformers_files(directory: str | os.PathLike, spec: EmbeddingSpec, max_length: int) -> None:
    """Make a saved pruned embedding model's directory a sentence-transformers folder too.

    ``directory`` holds the pruned model (``cofi_config.json`` + ``model.safetensors`` from
    ``PrunedModel.save_pretrained``) and its tokenizer (``tokenizer.save_pretrained``). Written beside them:

    - ``modules.json``: module 0 :data:`ST_MODULE_TYPE` (:class:`PrunedTransformer`, in the folder's root),
      1 ``Pooling`` (``1_Pooling``), and 2 ``Normalize`` (``2_Normalize``) when ``spec.normalize``;
    - ``1_Pooling/config.json``: ``embedding_dimension`` ``spec.dimension``, ``pooling_mode``
      ``spec.pooling``, ``include_prompt`` true (sentence-transformers 6's keys);
    - ``2_Normalize/config.json`` when normalising;
    - ``sentence_bert_config.json``: ``max_seq_length`` ``max_length``, ``do_lower_case`` false (the
      tokenizer lower-cases by itself where it should);
    - ``config_sentence_transformers.json``: model type ``SentenceTransformer``, cosine similarity.

    Load it with :func:`load_sentence_transformer` (or ``SentenceTransformer(directory,
    trust_remote_code=True)``); the embeddings are the PrunedModel's.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"write_sentence_transformers_files: directory {directory!r} does not exist")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"write_sentence_transformers_files: max_length must be a positive int, got {max_length!r}")
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_MODULE_TYPE},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_POOLING_TYPE}]
    os.makedirs(os.path.join(directory, "1_Pooling"), exist_ok=True)
    _write_json(os.path.join(directory, "1_Pooling", "config.json"),
                {"embedding_dimension": spec.dimension, "pooling_mode": spec.pooling, "include_prompt": True})
    if spec.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST_NORMALIZE_TYPE})
        os.makedirs(os.path.join(directory, "2_Normalize"), exist_ok=True)
        _write_json(os.path.join(directory, "2_Normalize", "config.json"),
                    {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})
    _write_json(os.path.join(directory, "modules.json"), modules)
    _write_json(os.path.join(directory, "sentence_bert_config.json"),
                {"max_seq_length": max_length, "do_lower_case": False})
    _write_json(os.path.join(directory, "config_sentence_transformers.json"),
                {"__version__": _versions(), "model_type": "SentenceTransformer", "prompts": {},
                 "default_prompt_name": None, "similarity_fn_name": "cosine"})


def load_sentence_transformer(directory: str | os.PathLike, device: str | None = None, **kwargs):
    """``sentence_transformers.SentenceTransformer`` of a folder written by
    :func:`write_sentence_transformers_files`, loaded from local files only.

    How the first module is found: sentence-transformers 6 imports a ``modules.json`` type under
    ``sentence_transformers.*`` directly; any other type (ours is ``cofi_kernels.tasks.embedding.PrunedTransformer``)
    is third-party code, which since version 6.0 needs ``trust_remote_code=True`` even for a local folder
    (without it, a ValueError naming the type). With it, sentence-transformers first asks transformers for
    a modeling file in the folder, which fails for a dotted path of more than two parts (so no file from
    the folder is run), then imports the class from the installed ``cofi_kernels``. This function passes
    ``trust_remote_code=True`` and ``local_files_only=True``; ``kwargs`` go to ``SentenceTransformer``.
    """
    from sentence_transformers import SentenceTransformer

    kwargs.setdefault("trust_remote_code", True)
    kwargs.setdefault("local_files_only", True)
    return SentenceTransformer(os.fspath(directory), device=device, **kwargs)


def _make_pruned_transformer():
    """Define :class:`PrunedTransformer` (needs sentence-transformers, an optional dependency)."""
    from sentence_transformers.base.modules.input_module import InputModule

    from ..models.pruned_model import PrunedModel

    class PrunedTransformer(InputModule):
        """sentence-transformers' first module for a pruned model: tokenizer + PrunedModel.

        Its forward adds ``token_embeddings`` ``[B, T, D]`` (the last hidden state scattered back to the
        original hidden size, pruned dims 0) to the features; sentence-transformers' ``Pooling`` and
        ``Normalize`` then compute the same embedding as the PrunedModel's own forward. Saved in the
        folder's root: the PrunedModel's files, the tokenizer's and ``sentence_bert_config.json``.
        """

        config_file_name = "sentence_bert_config.json"
        config_keys = ["max_seq_length", "do_lower_case"]
        save_in_root = True

        def __init__(self, model: PrunedModel, tokenizer, max_seq_length: int | None = None,
                     do_lower_case: bool = False):
            super().__init__()
            self.model = model
            self.tokenizer = tokenizer
            if max_seq_length is None:
                max_seq_length = min(int(model.config["max_position_embeddings"]),
                                     int(getattr(tokenizer, "model_max_length", 512) or 512))
            self.max_seq_length = int(max_seq_length)
            self.do_lower_case = bool(do_lower_case)

        def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict:
            """Tokenize texts (one text each; ``prompt`` is prepended), padded, truncated to ``max_seq_length``."""
            texts = []
            for x in inputs:
                if not isinstance(x, str):
                    raise ValueError(f"PrunedTransformer takes one text per input, got {type(x).__name__}")
                x = prompt + x if prompt else x
                texts.append(x.lower() if self.do_lower_case else x)
            max_length = kwargs.get("max_length") or self.max_seq_length
            return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                                       return_tensors="pt", return_token_type_ids=True))

        def forward(self, features: dict, **kwargs) -> dict:
            """Add ``token_embeddings`` ``[B, T, D]`` to ``features``."""
            ids = features["input_ids"]
            mask = features.get("attention_mask")
            types = features.get("token_type_ids")
            h = self.model.encode(ids, mask, types)
            features["token_embeddings"] = self.model.expand_hidden(h)
            return features

        def get_embedding_dimension(self) -> int:
            """The original hidden size ``D``."""
            return int(self.model.config["original_hidden_size"])

        def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
            """Write the PrunedModel, the tokenizer and ``sentence_bert_config.json`` into ``output_path``."""
            self.model.save_pretrained(output_path)
            self.save_tokenizer(output_path)
            self.save_config(output_path)

        @classmethod
        def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
                 local_files_only: bool = False, **kwargs) -> "PrunedTransformer":
            """Load from a folder written by :func:`write_sentence_transformers_files` (local folders only)."""
            from transformers import AutoTokenizer

            path = os.path.join(os.fspath(model_name_or_path), subfolder)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"PrunedTransformer: {path!r} is not a local directory")
            config = cls.load_config(path)
            config = {k: v for k, v in config.items() if k in cls.config_keys}
            model = PrunedModel.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            return cls(model, tokenizer, **config)

    PrunedTransformer.__module__ = __name__
    PrunedTransformer.__qualname__ = "PrunedTransformer"
    return PrunedTransformer


def __getattr__(name: str):
    """``PrunedTransformer`` is defined on first use (it needs sentence-transformers, an optional dependency)."""
    if name == "PrunedTransformer":
        cls = _make_pruned_transformer()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
