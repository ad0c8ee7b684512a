"""Architecture adapters: one per ``model_type`` (BERT, RoBERTa) of Hugging Face transformers 5.x.

An adapter knows which model classes are supported, refuses configurations
the package cannot represent (decoders, cross-attention, relative position
embeddings, activations a pruned model cannot compute), gives the encoder's
dimensions and CoFi's gate shapes from a config, and says where each weight
lives. The CoFi patch, the gates, the fold and the pruned-model builder all
ask it, so an unsupported model gets the same :class:`UnsupportedModelError`
with the same message from each of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules.gated import AttentionParts, EmbeddingParts, FFNParts
from ..modules.pruned import ACTIVATIONS

__all__ = [
    "ARCHS",
    "SUPPORTED_MODELS",
    "EncoderArch",
    "EncoderDims",
    "UnsupportedModelError",
    "arch_for_model_type",
    "encoder_dims",
    "gate_shapes",
    "supported_model",
    "token_limit",
]


class UnsupportedModelError(TypeError, ValueError):
    """The model is not a BERT/RoBERTa encoder (or its sequence-classification, token-classification or
    question-answering wrapper) this package supports."""


@dataclass(frozen=True)
class EncoderDims:
    """The dimensions of a BERT-family encoder."""

    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    hidden_size: int


def encoder_dims(config) -> EncoderDims:
    """Dimensions from a config with ``num_hidden_layers``, ``num_attention_heads``,
    ``hidden_size`` and ``intermediate_size`` (``head_dim`` when present, else hidden / heads)."""
    try:
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        hidden, inter = config.hidden_size, config.intermediate_size
    except AttributeError as e:
        raise ValueError(f"the config lacks a required field ({e})") from None
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return EncoderDims(layers, heads, head_dim, inter, hidden)


def gate_shapes(config) -> dict[str, tuple[int, ...]]:
    """CoFi's gate type → shape for an encoder config: head ``[L, H]``, mha ``[L]``,
    int ``[L, I]``, ffn ``[L]``, hidden ``[D]``."""
    d = encoder_dims(config)
    L = d.num_layers
    return {"head": (L, d.num_heads), "mha": (L,), "int": (L, d.intermediate_size), "ffn": (L,),
            "hidden": (d.hidden_size,)}


class EncoderArch:
    """BERT's layout; RoBERTa differs only in its classes, classification head and position ids."""

    model_type = "bert"
    base_class = "BertModel"
    classifier_class = "BertForSequenceClassification"
    token_classifier_class = "BertForTokenClassification"
    question_answering_class = "BertForQuestionAnswering"

    def class_names(self) -> tuple[str, ...]:
        """The names of the supported transformers classes, in :meth:`classes` order."""
        return (self.base_class, self.classifier_class, self.token_classifier_class, self.question_answering_class)

    def classes(self) -> dict[type, str]:
        """Supported class → task: ``"base"`` (the bare encoder), ``"sequence_classification"``,
        ``"token_classification"`` or ``"question_answering"``."""
        import transformers

        tasks = ("base", "sequence_classification", "token_classification", "question_answering")
        return {getattr(transformers, name): task for name, task in zip(self.class_names(), tasks)}

    def encoder(self, model: nn.Module) -> nn.Module:
        """The bare encoder inside ``model`` (the model itself for a bare encoder)."""
        return model.base_model

    def layers(self, encoder: nn.Module) -> nn.ModuleList:
        return encoder.encoder.layer

    def embedding_parts(self, encoder: nn.Module) -> EmbeddingParts:
        emb = encoder.embeddings
        return EmbeddingParts(emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings, emb.LayerNorm)

    def attention_parts(self, layer: nn.Module) -> AttentionParts:
        sa, so = layer.attention.self, layer.attention.output
        return AttentionParts(sa.query, sa.key, sa.value, so.dense, so.LayerNorm, sa.num_attention_heads,
                              sa.attention_head_size, sa.scaling, sa.dropout, so.dropout)

    def ffn_parts(self, layer: nn.Module, config) -> FFNParts:
        """``config`` is the encoder's: its ``hidden_act`` says whether the activation is exact-erf GELU."""
        inter, out = layer.intermediate, layer.output
        erf_gelu = config.hidden_act == "gelu"
        return FFNParts(inter.dense, out.dense, out.LayerNorm, inter.intermediate_act_fn, erf_gelu, out.dropout)

    def classification_head(self, model: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        """(dense, out) of ``out(tanh(dense(h[:, 0])))``: BERT's pooler and classifier."""
        return model.bert.pooler.dense, model.classifier

    def token_head(self, model: nn.Module) -> nn.Linear:
        """The linear map applied to every token's last hidden state: ``classifier`` ``[C, D]`` of a
        ``*ForTokenClassification`` (after dropout, the identity in eval), ``qa_outputs`` ``[2, D]``
        of a ``*ForQuestionAnswering`` (start logits from output 0, end logits from output 1)."""
        head = getattr(model, "qa_outputs", None)
        if head is None:
            head = model.classifier
        if not isinstance(head, nn.Linear):
            raise _unsupported(model, f"its token head is a {type(head).__name__}, not a Linear")
        return head

    @staticmethod
    def token_limit(max_position_embeddings: int, pad_token_id: int) -> int:
        """The most tokens one sequence may have: each needs its own position embedding."""
        return max_position_embeddings

    @staticmethod
    def position_ids(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
        """Position of every token: ``0..T-1``."""
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


class RobertaArch(EncoderArch):
    model_type = "roberta"
    base_class = "RobertaModel"
    classifier_class = "RobertaForSequenceClassification"
    token_classifier_class = "RobertaForTokenClassification"
    question_answering_class = "RobertaForQuestionAnswering"

    def classification_head(self, model: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        """(dense, out_proj) of RoBERTa's classification head."""
        return model.classifier.dense, model.classifier.out_proj

    @staticmethod
    def token_limit(max_position_embeddings: int, pad_token_id: int) -> int:
        """Positions start at ``pad_token_id + 1`` (see :meth:`position_ids`), so fewer tokens fit."""
        return max_position_embeddings - pad_token_id - 1

    @staticmethod
    def position_ids(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
        """As HF RoBERTa: padding tokens get ``pad_token_id``, real tokens count up from ``pad_token_id + 1``."""
        mask = input_ids.ne(pad_token_id).int()
        return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + pad_token_id


ARCHS: dict[str, EncoderArch] = {"bert": EncoderArch(), "roberta": RobertaArch()}
SUPPORTED_MODELS = tuple(name for a in ARCHS.values() for name in a.class_names())


def _unsupported(model: object, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"unsupported model {type(model).__name__}: {why}")


def arch_for_model_type(model_type: object) -> EncoderArch:
    """The adapter of a config's ``model_type``; :class:`UnsupportedModelError` for any other."""
    if model_type not in ARCHS:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}: cofi_kernels supports {', '.join(map(repr, ARCHS))} "
            f"({', '.join(SUPPORTED_MODELS)})"
        )
    return ARCHS[model_type]


def token_limit(model_type: str, max_position_embeddings: int, pad_token_id: int | None) -> int:
    """The most tokens per sequence a ``model_type`` encoder with these position embeddings takes
    (512 for BERT-base and all-MiniLM-L6-v2, 512 for RoBERTa-base's 514 positions)."""
    return arch_for_model_type(model_type).token_limit(max_position_embeddings, pad_token_id or 0)


def check_config(model: object, config) -> None:
    """Refuse a configuration the package cannot represent (the message names the model class)."""
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise _unsupported(model, "it is configured as a decoder (is_decoder / add_cross_attention); "
                                  "cofi_kernels supports encoders only")
    position = getattr(config, "position_embedding_type", "absolute")
    if position != "absolute":
        raise _unsupported(model, f"position_embedding_type {position!r} is not supported (only 'absolute')")
    act = getattr(config, "hidden_act", None)
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise _unsupported(model, f"hidden_act {act!r} is not one of {sorted(ACTIVATIONS)}")
    try:
        encoder_dims(config)
    except ValueError as e:
        raise _unsupported(model, str(e)) from None


def supported_model(model: object) -> tuple[EncoderArch, str, nn.Module]:
    """``(adapter, task, encoder)`` of a supported model; :class:`UnsupportedModelError` otherwise.

    ``task`` is ``"base"`` for a bare encoder, ``"sequence_classification"``,
    ``"token_classification"`` or ``"question_answering"`` for its wrappers
    (``*ForSequenceClassification``, ``*ForTokenClassification``,
    ``*ForQuestionAnswering``); ``encoder`` is the bare encoder.
    """
    for arch in ARCHS.values():
        for cls, task in arch.classes().items():
            if isinstance(model, cls):
                encoder = arch.encoder(model)
                check_config(model, encoder.config)
                return arch, task, encoder
    raise _unsupported(model, f"cofi_kernels supports {', '.join(SUPPORTED_MODELS)} (transformers 5.x)")
