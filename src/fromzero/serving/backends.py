"""What a served checkpoint can do: load it once, then generate, embed or classify.

A server serves one checkpoint; its kind decides the endpoints (:func:`load_backend`): a GPT
serves completions, and chat too when it has a chat template (its own, an SFT run's, or
``--chat-template``); a BERT text classifier serves classify; another BERT encoder, embeddings.
Chat renders messages as ``fromzero chat`` does (:func:`fromzero.inference.chat.load_chat_format`);
a plain pretrained GPT has no template, so chat is refused for it (HTTP 400 saying so) rather
than guessing a format the model never saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fromzero.errors import FromzeroError
from fromzero.tasks import get_task

__all__ = ["Backend", "GeneratorBackend", "EmbeddingBackend", "ClassifierBackend", "load_backend"]


@dataclass
class Backend:
    """A loaded checkpoint: ``kind`` is generate | embed | classify."""

    name: str
    """The model id clients use (GET /v1/models)."""
    directory: Path
    kind: str
    task: str
    """info.json's task: language-model, sft, text-classification, ... (or encoder)."""
    description: str
    """What the checkpoint is, for error messages: e.g. 'a text-classification (BERT classifier) checkpoint'."""
    endpoints: tuple[str, ...] = field(default=())


@dataclass
class GeneratorBackend(Backend):
    model: Any = None
    tokenizer: Any = None
    template: Any = None  # the chat template (chat.template), else None
    stop_ids: list[int] = field(default_factory=list)
    chat: Any = None  # fromzero.inference.chat.ChatFormat: prompt ids + stop tokens of a chat, else None

    @property
    def block_size(self) -> int:
        return int(self.model.config.block_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


@dataclass
class EmbeddingBackend(Backend):
    model: Any = None
    tokenizer: Any = None  # tokenizers.Tokenizer truncating at the encoder's limit
    config: Any = None  # BertConfig
    batch_size: int = 32

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalised sentence vectors of ``texts`` (exactly what
        ``fromzero embed`` / ``embed_checkpoint`` computes) and the number of tokens read."""
        from fromzero.models.bert import embed_texts

        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        vectors = embed_texts(self.model, self.tokenizer, self.config, texts, True, self.batch_size,
                              encodings=encodings)
        return vectors, sum(len(e.ids) for e in encodings)


@dataclass
class ClassifierBackend(Backend):
    classifier: Any = None  # fromzero.inference.predict.Classifier
    batch_size: int = 64

    def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        """Per text: the predicted label and every class's probability (as ``fromzero predict``)."""
        logits = self.classifier.text_logits(list(texts), self.batch_size)
        return self.classifier.label(logits)


_GENERATE = ("/v1/completions",)
_CHAT = ("/v1/completions", "/v1/chat/completions")


def load_backend(checkpoint: str | Path, device: torch.device, name: str = "",
                 chat_template: str | Path | None = None) -> Backend:
    """Load ``checkpoint`` for serving; FromzeroError for a missing, broken or unservable one.

    ``chat_template``: a Jinja chat template file for /v1/chat/completions (default: the
    checkpoint's own)."""
    from fromzero.checkpoint import CONFIG_FILE, checkpoint_info, read_json

    directory = Path(checkpoint)
    info = checkpoint_info(directory)  # raises for a missing directory / config.json
    config = read_json(directory / CONFIG_FILE, "model config")
    model_type = config.get("model_type")
    task = str(info.get("task"))
    name = name or str(checkpoint).rstrip("/") or str(directory)
    if model_type == "fromzero-gpt":
        return _load_generator(directory, device, name, task, info, chat_template)
    about = get_task(task)
    if about is not None and about.is_classifier and about.inputs == "text":
        from fromzero.inference.predict import Classifier

        classifier = Classifier(directory, str(device))
        return ClassifierBackend(name, directory, "classify", task,
                                 "a text-classification (BERT classifier) checkpoint", ("/v1/classify",),
                                 classifier=classifier)
    if model_type == "fromzero-bert":
        from fromzero.models.bert import BertConfig, load_encoder_tokenizer
        from fromzero.checkpoint import load_model

        bert_config = BertConfig.from_dict(config)
        tokenizer = load_encoder_tokenizer(directory, bert_config)
        model = load_model(directory, device)
        return EmbeddingBackend(name, directory, "embed", "encoder", "an encoder (BERT) checkpoint",
                                ("/v1/embeddings",), model=model, tokenizer=tokenizer, config=bert_config)
    raise FromzeroError(
        f"cannot serve {directory}: it is a {task} checkpoint ({model_type}); serve takes a GPT "
        "(completions, chat), a BERT encoder (embeddings) or a text classifier (classify)"
    )


def _load_generator(directory: Path, device: torch.device, name: str, task: str, info: dict,
                    chat_template: str | Path | None = None) -> GeneratorBackend:
    from fromzero.data.sft import ChatTemplate
    from fromzero.data.tokenizers import TextTokenizer
    from fromzero.inference.chat import eos_ids, load_chat_format
    from fromzero.models.gpt import GPT
    from fromzero.checkpoint import load_model

    model = load_model(directory, device)
    if not isinstance(model, GPT):
        raise FromzeroError(f"cannot serve {directory}: expected a GPT, got {type(model).__name__}")
    tokenizer = TextTokenizer.load(directory)
    chat = load_chat_format(directory, chat_template, tokenizer=tokenizer, required=False)
    if chat is None:
        description = "a pretrained GPT language model without a chat template"
    elif isinstance(chat.template, ChatTemplate):
        description = "an instruction-tuned (sft) GPT checkpoint"
    else:
        description = f"a GPT chat model (chat template: {chat.source})"
    return GeneratorBackend(name, directory, "generate", task, description, _CHAT if chat else _GENERATE,
                            model=model, tokenizer=tokenizer, template=chat.template if chat else None,
                            stop_ids=eos_ids(directory, tokenizer), chat=chat)
