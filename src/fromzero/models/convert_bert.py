"""Hugging Face BERT <-> fromzero-bert (see ``fromzero.models.hf`` for the converter protocol).

Reads the checkpoints of ``BertModel`` (bare keys, e.g. sentence-transformers' all-MiniLM-L6-v2),
``BertForSequenceClassification``, ``BertForQuestionAnswering``, ``BertForMaskedLM`` and
``BertForPreTraining`` (keys under ``bert.``, heads under ``classifier.`` / ``qa_outputs.`` /
``cls.``). The head is chosen from the config's
``architectures`` (or, without one, from the tensors present):

    BertModel                       -> head "embedding": mean pooling + L2 normalisation, i.e.
                                       sentence-transformers' default (HF's bare encoder has no
                                       head; its hidden states are ``Bert.encode``)
    BertForSequenceClassification   -> head "classification" (num_labels from the classifier)
    BertForQuestionAnswering        -> head "qa": start / end logits per token (``qa_outputs``)
    BertForMaskedLM / ForPreTraining -> head "mlm"; BertForPreTraining's next-sentence head
                                       (``cls.seq_relationship``) is not modelled and is dropped

Old TF-era checkpoints (LayerNorm ``gamma``/``beta``, a stored ``position_ids`` buffer, a stored
copy of the tied MLM decoder) read too. Any other missing or unexpected tensor is an error that
names it.
"""

from __future__ import annotations

import re

import torch

from fromzero.errors import FromzeroError
from fromzero.models.bert import ACTIVATIONS, BertConfig
from fromzero.models.hf import check_keys

HF_MODEL_TYPES = ("bert",)
FROMZERO_MODEL_TYPE = "fromzero-bert"


def _weight_and_bias(*modules: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((f"{fz}.{kind}", f"{hf}.{kind}") for fz, hf in modules for kind in ("weight", "bias"))


# fromzero name <-> HF BertModel name ("{i}" = layer index). Heads are outside BertModel.
HF_NAMES: tuple[tuple[str, str], ...] = (
    ("embeddings.word.weight", "embeddings.word_embeddings.weight"),
    ("embeddings.position.weight", "embeddings.position_embeddings.weight"),
    ("embeddings.token_type.weight", "embeddings.token_type_embeddings.weight"),
    *_weight_and_bias(
        ("embeddings.norm", "embeddings.LayerNorm"),
        ("layers.{i}.attn.query", "encoder.layer.{i}.attention.self.query"),
        ("layers.{i}.attn.key", "encoder.layer.{i}.attention.self.key"),
        ("layers.{i}.attn.value", "encoder.layer.{i}.attention.self.value"),
        ("layers.{i}.attn.out", "encoder.layer.{i}.attention.output.dense"),
        ("layers.{i}.attn_norm", "encoder.layer.{i}.attention.output.LayerNorm"),
        ("layers.{i}.mlp.fc", "encoder.layer.{i}.intermediate.dense"),
        ("layers.{i}.mlp.proj", "encoder.layer.{i}.output.dense"),
        ("layers.{i}.mlp_norm", "encoder.layer.{i}.output.LayerNorm"),
    ),
)
POOLER_NAMES = _weight_and_bias(("pooler.dense", "pooler.dense"))
# Head names are given as the full HF key (outside the "bert." base model).
CLASSIFIER_NAMES = _weight_and_bias(("classifier", "classifier"))
QA_NAMES = _weight_and_bias(("qa_outputs", "qa_outputs"))
MLM_NAMES = (
    *_weight_and_bias(("mlm_head.dense", "cls.predictions.transform.dense"),
                      ("mlm_head.norm", "cls.predictions.transform.LayerNorm")),
    ("mlm_head.decoder.bias", "cls.predictions.bias"),  # decoder.weight is the word embedding
)

ARCHITECTURES = {
    "BertModel": "embedding",
    "BertForSequenceClassification": "classification",
    "BertForQuestionAnswering": "qa",
    "BertForMaskedLM": "mlm",
    "BertForPreTraining": "mlm",
}
HEAD_ARCHITECTURE = {"embedding": "BertModel", "none": "BertModel",
                     "classification": "BertForSequenceClassification", "qa": "BertForQuestionAnswering",
                     "mlm": "BertForMaskedLM"}
# HF config fields that are BertConfig fields with the same meaning.
_SHARED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                  "type_vocab_size", "layer_norm_eps", "pad_token_id", "initializer_range")
_DEFAULT_LABEL = re.compile(r"LABEL_\d+")


def _name_pairs(config: BertConfig) -> list[tuple[str, str]]:
    """(fromzero name, HF name with the base model's prefix removed) for every stored tensor."""
    pairs = [(fz.format(i=i), hf.format(i=i)) for i in range(config.num_hidden_layers) for fz, hf in HF_NAMES
             if "{i}" in fz]
    pairs = [(fz, hf) for fz, hf in HF_NAMES if "{i}" not in fz] + pairs
    if config.pooler:
        pairs += POOLER_NAMES
    if config.head == "classification":
        pairs += CLASSIFIER_NAMES
    elif config.head == "qa":
        pairs += QA_NAMES
    elif config.head == "mlm":
        pairs += MLM_NAMES
    return pairs


def _is_head_key(name: str) -> bool:
    return name.startswith(("classifier.", "qa_outputs.", "cls."))


# ---------------------------------------------------------------------------------------------
# HF -> fromzero


def _config_from_hf(hf_config: dict, head: str, num_labels: int, pooler: bool) -> BertConfig:
    pet = hf_config.get("position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise FromzeroError(f"BERT with position_embedding_type {pet!r} is not supported (only 'absolute')")
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
        raise FromzeroError("BERT configured as a decoder (is_decoder / add_cross_attention) is not supported")
    act = hf_config.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise FromzeroError(f"BERT hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    if "embedding_size" in hf_config and hf_config["embedding_size"] != hf_config.get("hidden_size"):
        raise FromzeroError("BERT with embedding_size != hidden_size is not supported")
    fields = {k: hf_config[k] for k in _SHARED_FIELDS if k in hf_config}
    fields.update(head=head, pooler=pooler)
    if head == "embedding":  # sentence-transformers' all-MiniLM-* / all-mpnet-* recipe
        fields.update(pooling="mean", normalize=True)
    if head == "classification":
        fields["num_labels"] = num_labels
        fields["classifier_dropout"] = hf_config.get("classifier_dropout")
        id2label = hf_config.get("id2label") or {}
        try:
            names = [str(id2label.get(str(i), id2label.get(i))) for i in range(num_labels)]
        except AttributeError:
            names = []
        if len(id2label) == num_labels and not all(_DEFAULT_LABEL.fullmatch(n) for n in names):
            fields["labels"] = names
    config = BertConfig(**fields)
    try:
        config.validate()
    except ValueError as e:
        raise FromzeroError(f"invalid BERT config: {e}") from None
    return config


def _normalize_keys(hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Strip the ``bert.`` prefix, rename TF-era LayerNorm gamma/beta; returns (state, original names, prefix)."""
    prefix = "bert." if any(k.startswith("bert.") for k in hf_state) else ""
    state: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for key, tensor in hf_state.items():
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        state[name] = tensor
        original[name] = key
    return state, original, prefix


def from_hf(hf_config: dict, hf_state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """HF BERT config + state dict -> fromzero-bert config.json dict + state dict."""
    state, original, prefix = _normalize_keys(hf_state)
    # Buffers and copies that carry nothing of their own.
    state.pop("embeddings.position_ids", None)
    for name in [k for k in state if k.startswith("cls.seq_relationship.")]:
        del state[name]  # BertForPreTraining's next-sentence head: not modelled
    decoder_weight = state.pop("cls.predictions.decoder.weight", None)
    decoder_bias = state.pop("cls.predictions.decoder.bias", None)
    if decoder_bias is not None and "cls.predictions.bias" not in state:
        state["cls.predictions.bias"] = decoder_bias  # the same tensor under its older name
        original["cls.predictions.bias"] = original["cls.predictions.decoder.bias"]

    architectures = hf_config.get("architectures") or []
    arch = architectures[0] if architectures else None
    if arch is not None and arch not in ARCHITECTURES:
        raise FromzeroError(
            f"BERT architecture {arch} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    if arch is not None:
        head = ARCHITECTURES[arch]
    elif "classifier.weight" in state:
        head = "classification"
    elif "qa_outputs.weight" in state:
        head = "qa"
    elif any(k.startswith("cls.predictions.") for k in state):
        head = "mlm"
    else:
        head = "embedding" if not prefix else "none"
    if head == "classification" and "classifier.weight" in state:
        num_labels = int(state["classifier.weight"].shape[0])
    else:
        num_labels = int(hf_config.get("num_labels", len(hf_config.get("id2label") or {}) or 2))
    # The pooler is optional except under a classifier (which reads it); MLM models usually lack it,
    # HF's question-answering model never has one.
    pooler = head == "classification" or (head != "qa" and ("pooler.dense.weight" in state
                                                            or "pooler.dense.bias" in state))
    config = _config_from_hf(hf_config, head, num_labels, pooler)
    if head == "qa":  # a pooler stored beside a QA head (TF-era exports) is one HF ignores too
        for name in [k for k in state if k.startswith("pooler.")]:
            del state[name]

    pairs = _name_pairs(config)
    expected = {hf for _, hf in pairs}

    def shown(name: str) -> str:  # the name as it is (or would be) in the source file
        return original.get(name) or (name if _is_head_key(name) else prefix + name)

    check_keys({shown(n) for n in expected}, {shown(n) for n in state}, "BERT checkpoint")

    word = state["embeddings.word_embeddings.weight"]
    if decoder_weight is not None and head == "mlm" and (
        decoder_weight.shape != word.shape or not torch.equal(decoder_weight, word)
    ):
        raise FromzeroError(
            "BERT checkpoint: cls.predictions.decoder.weight differs from the word embedding "
            "(an untied MLM decoder is not supported)"
        )
    fz_state = {fz: state[hf] for fz, hf in pairs}
    return config.to_dict(), fz_state


# ---------------------------------------------------------------------------------------------
# fromzero -> HF


def to_hf(config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """fromzero-bert config + state -> a config.json + state dict that ``transformers`` loads.

    Heads embedding / none -> ``BertModel`` (AutoModel); classification ->
    ``BertForSequenceClassification``; qa -> ``BertForQuestionAnswering``; mlm -> ``BertForMaskedLM``.
    The sentence-embedding recipe (pooling, normalisation) has no place in a HF config: apply it
    to the hidden states.
    """
    cfg = BertConfig.from_dict(config)
    if cfg.head_size * cfg.num_attention_heads != cfg.hidden_size:
        raise FromzeroError(
            f"this encoder has {cfg.num_attention_heads} heads of width {cfg.head_size} for a {cfg.hidden_size}-wide "
            "model (structurally pruned): Hugging Face's BERT cannot express that; export it with fromzero export "
            "(ONNX) instead"
        )
    arch = HEAD_ARCHITECTURE[cfg.head]
    hf_config: dict = {
        "model_type": "bert",
        "architectures": [arch],
        **{k: getattr(cfg, k) for k in _SHARED_FIELDS},
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": False,
    }
    if cfg.head == "classification":
        names = cfg.labels or [f"LABEL_{i}" for i in range(cfg.num_labels)]
        hf_config["num_labels"] = cfg.num_labels
        hf_config["id2label"] = {str(i): n for i, n in enumerate(names)}
        hf_config["label2id"] = {n: i for i, n in enumerate(names)}
        hf_config["classifier_dropout"] = cfg.classifier_dropout
        if cfg.num_labels == 1:
            hf_config["problem_type"] = "regression"
    elif cfg.head == "qa":
        hf_config["num_labels"] = 2  # qa_outputs: start and end
    prefix = "" if arch == "BertModel" else "bert."
    own = set(state) - {"mlm_head.decoder.weight"}  # tied to embeddings.word.weight
    pairs = _name_pairs(cfg)
    check_keys({fz for fz, _ in pairs}, own, "fromzero-bert checkpoint")
    hf_state = {(hf if _is_head_key(hf) else prefix + hf): state[fz] for fz, hf in pairs}
    return hf_config, hf_state


def hf_module_names(config: dict) -> tuple[dict[str, str], dict]:
    """fromzero module name -> full HF module name (as in :func:`to_hf`'s model), for adapters.

    Returns the name map and the extra ``LoraConfig`` fields the HF model needs (none for
    BERT: its layers are ``nn.Linear`` like ours).
    """
    cfg = BertConfig.from_dict(config)
    prefix = "" if HEAD_ARCHITECTURE[cfg.head] == "BertModel" else "bert."
    names = {}
    for fz, hf in _name_pairs(cfg):
        module, hf_module = fz.rsplit(".", 1)[0], hf.rsplit(".", 1)[0]
        names[module] = hf_module if _is_head_key(hf) else prefix + hf_module
    return names, {}
