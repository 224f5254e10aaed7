"""Use a fine-tuned checkpoint: label texts or images (``predict``) and score a split (``evaluate``).

A checkpoint's ``info.json`` says what it is for (``task``): text-classification and
image-classification checkpoints label inputs with class probabilities; sft checkpoints and
pretrained GPTs are scored by loss and perplexity. LoRA adapter checkpoints load as base +
adapter, merged. Try it::

    fromzero predict --checkpoint runs/genre/checkpoints/best --text "Exeunt all but Falstaff."
    fromzero evaluate --checkpoint runs/genre/checkpoints/best --split test
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fromzero.checkpoint import checkpoint_info
from fromzero.errors import FromzeroError
from fromzero.tasks import finetuning_tasks, get_task


def run_config(directory: Path) -> dict[str, Any]:
    """The config.yaml of the run a checkpoint came from (runs/<run>/checkpoints/best), or {}."""
    import yaml

    path = Path(directory).resolve().parent.parent / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    if not isinstance(data, dict):
        return {}
    task = data.get("task")
    if task in finetuning_tasks():  # a fine-tuning run: its settings by field name (data, data_dir, ...)
        from fromzero.config import flatten_recipe
        from fromzero.finetune.recipe import task_config_class

        recipe = {k: v for k, v in data.items() if k != "task"}
        try:
            return {"task": task, **flatten_recipe(task_config_class(task), recipe, str(path), notes=False)}
        except FromzeroError:
            return {}
    return data


class Classifier:
    """A text or image classification checkpoint, ready to label inputs."""

    def __init__(self, directory: Path, device: str = "cpu") -> None:
        from fromzero.checkpoint import CONFIG_FILE, load_model, read_json
        from fromzero.devices import resolve_device

        self.directory = Path(directory)
        self.info = checkpoint_info(self.directory)
        self.task = self.info["task"]
        task = get_task(self.task)
        if task is None or not task.is_classifier:
            hint = "; draw with `fromzero generate-image`" if task is not None and task.kind == "image-generator" else ""
            raise FromzeroError(f"{directory} is not a classifier (its task is {self.task}){hint}")
        self.inputs = task.inputs  # text | image
        self.config = read_json(self.directory / CONFIG_FILE, "model config")
        self.device = resolve_device(device)
        self.model = load_model(self.directory, self.device)
        labels = self.config.get("labels")
        if not labels:
            raise FromzeroError(f"{self.directory / CONFIG_FILE} has no class names (labels)")
        self.labels: list[str] = list(labels)

    def _autocast(self) -> Any:
        from fromzero.devices import autocast_context, resolve_dtype

        return autocast_context(self.device, resolve_dtype(self.device, "auto"))

    def text_logits(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N, K) logits of ``texts`` (truncated to the max_length the model was tuned with)."""
        from fromzero.data.classification import encode_texts
        from fromzero.finetune.text import TextBatches, predict_logits
        from fromzero.models.bert import BertConfig, encoder_limit, load_encoder_tokenizer

        if self.inputs != "text":
            raise FromzeroError(f"{self.directory} labels {self.inputs}s, not texts (use --{self.inputs})")
        bert_config = BertConfig.from_dict(self.config)
        tokenizer = load_encoder_tokenizer(self.directory, bert_config)
        max_length = int(self.info.get("max_length") or encoder_limit(self.directory, bert_config))
        ids, _ = encode_texts(tokenizer, texts, max_length)
        batches = TextBatches(ids, None, batch_size, False, 0, bert_config.pad_token_id or 0, 8)
        return predict_logits(self.model, batches, self.device, self._autocast)

    def image_transform(self) -> Any:
        from fromzero.data.images import build_transforms

        info = self.info
        mean, std = info.get("mean"), info.get("std")
        return build_transforms(False, image_size=int(info["image_size"]), resize_size=info.get("resize_size"),
                                channels=int(info.get("channels", 3)), normalize=mean is not None, mean=mean, std=std)

    def image_logits(self, paths: list[Path]) -> torch.Tensor:
        """(N, K) logits of image files (converted to the model's channels, eval transforms)."""
        if self.inputs != "image":
            raise FromzeroError(f"{self.directory} labels {self.inputs}s, not images (use --{self.inputs})")
        transform, channels = self.image_transform(), int(self.info.get("channels", 3))
        tensors = [open_image(path, transform, channels) for path in paths]
        self.model.eval()
        with torch.no_grad(), self._autocast():
            return self.model(torch.stack(tensors).to(self.device)).float().cpu()

    def label(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        """Per input: the predicted label and every class's probability."""
        probs = torch.softmax(logits, dim=-1)
        return [{"label": self.labels[int(p.argmax())],
                 "probabilities": {name: round(float(v), 6) for name, v in zip(self.labels, p)}} for p in probs]


def open_image(path: Path, transform: Any, channels: int) -> torch.Tensor:
    """The image file ``path`` in ``channels`` (3: RGB, else grey), transformed; one-line errors."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return transform(image.convert("RGB" if channels == 3 else "L"))
    except FileNotFoundError:
        raise FromzeroError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise FromzeroError(f"{path} is a directory, not an image (use --input DIR for a folder)") from None
    except (UnidentifiedImageError, OSError) as e:
        raise FromzeroError(f"cannot read image {path}: {e}") from None


def read_inputs(path: Path) -> list[str]:
    """Texts from a .txt (one per line), .csv (a 'text' column) or .jsonl ('text' key) file."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise FromzeroError(f"input file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise FromzeroError(f"{path} is not UTF-8 text") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(raw.splitlines())
        if "text" not in (reader.fieldnames or []):
            raise FromzeroError(f"{path} has no 'text' column (columns: {', '.join(reader.fieldnames or [])})")
        texts = [row["text"] for row in reader]
    elif path.suffix in (".jsonl", ".json-lines"):
        texts = []
        for n, line in enumerate(raw.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FromzeroError(f"{path}:{n}: invalid JSON: {e.msg}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise FromzeroError(f"{path}:{n}: expected an object with a string 'text'")
            texts.append(obj["text"])
    else:
        texts = raw.splitlines()
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise FromzeroError(f"{path} holds no text")
    return texts


# ---------------------------------------------------------------------------------------------
# evaluate


def evaluate_checkpoint(directory: Path, data: str | None = None, split: str = "test",
                        batch_size: int = 64, device: str = "cpu", limit: int = 0) -> dict[str, Any]:
    """Metrics of a checkpoint on one split of ``data`` (default: the data of the run that made it).

    A decoder (sft or converted chat model) with ``data`` rotten-tomatoes is asked for labels
    (:func:`fromzero.inference.chat_eval.evaluate_chat`). ``limit``: only the first N examples
    (classifiers and chat evaluation; 0 = all)."""
    from fromzero.data.rotten_tomatoes import NAME as ROTTEN_TOMATOES

    if limit < 0:
        raise FromzeroError(f"--limit must be >= 0, got {limit}")
    directory = Path(directory)
    best = directory / "checkpoints" / "best"
    if not (directory / "config.json").is_file() and (best / "config.json").is_file():
        directory = best  # a run directory: its best checkpoint
    info = checkpoint_info(directory)
    task = info["task"]
    made_by = run_config(directory)
    about = get_task(task)
    if about is not None and about.is_reader:
        return _evaluate_reader(directory, data, made_by, split, batch_size, device, limit)
    if about is not None and about.kind == "translator":
        from fromzero.finetune.translation import evaluate_translator

        return evaluate_translator(directory, made_by, data, split, batch_size, device, limit)
    if about is not None and about.kind == "detector":
        from fromzero.inference.detection import evaluate_detector

        return evaluate_detector(directory, data, made_by, split, batch_size, device)
    if about is not None and about.kind == "recommender":
        from fromzero.devices import resolve_device
        from fromzero.finetune.recsys import evaluate_recommender

        return evaluate_recommender(directory, made_by, data, split, str(resolve_device(device)))
    data = data or made_by.get("data") or made_by.get("data_dir")
    if not data:
        raise FromzeroError("no --data given and the checkpoint's run config names none")
    if about is not None and about.is_generator and str(data) == ROTTEN_TOMATOES:
        from fromzero.inference.chat_eval import evaluate_chat

        return evaluate_chat(Path(directory), str(data), split, batch_size, device, limit=limit)
    if about is not None and about.is_classifier:
        evaluate_classifier = _evaluate_text if about.inputs == "text" else _evaluate_images
        return evaluate_classifier(Path(directory), str(data), split, batch_size, device, limit)
    if task in _EVALUATE_AS_LANGUAGE_MODEL:
        return _evaluate_lm(Path(directory), str(data), split, batch_size, device, task)
    raise FromzeroError(f"cannot evaluate a checkpoint for task {task!r}")


def recommend_for_user(directory: Path, user: str, k: int = 10, rated: Path | None = None,
                       device: str = "cpu") -> list[dict[str, Any]]:
    """The top ``k`` items for ``user`` from a recommendation checkpoint (or run directory), with
    titles when the checkpoint has them, leaving out what the user already rated in the training
    data and, with ``rated``, the items of that interactions file (its rows for ``user``)."""
    from fromzero.data.interactions import read_user_items
    from fromzero.devices import resolve_device
    from fromzero.finetune.recsys import Recommender, resolve_recommender_dir

    directory = resolve_recommender_dir(directory)
    about = get_task(checkpoint_info(directory).get("task", ""))
    if about is None or about.kind != "recommender":
        raise FromzeroError(f"{directory} is not a recommendation checkpoint (--user needs one)")
    recommender = Recommender(directory, str(resolve_device(device)))
    recommender.ids.user_index(user)  # an unknown user fails before the file is read
    exclude = read_user_items(rated, user) if rated is not None else []
    return [{"user": str(user), **row} for row in recommender.recommend(user, k, exclude)]


# Generators whose loss evaluate can score: SFT replies (chat data), pretraining (prepared tokens).
# A DPO model is scored on preference pairs by its own fine-tune, or asked for labels above.
_EVALUATE_AS_LANGUAGE_MODEL = ("sft", "language-model")


def _evaluate_text(directory: Path, data: str, split: str, batch_size: int, device: str,
                   limit: int = 0) -> dict[str, Any]:
    from fromzero.data.classification import load_text_classification
    from fromzero.finetune.text import score

    classifier = Classifier(directory, device)
    cfg = run_config(directory)
    rows = load_text_classification(data, cfg.get("text_column", "text"), cfg.get("label_column", "label"),
                                    cfg.get("val_fraction", 0.1), cfg.get("test_fraction", 0.1), cfg.get("seed", 0))[split]
    rows = rows[:limit] if limit else rows
    unknown = sorted({label for _, label in rows} - set(classifier.labels))
    if unknown:
        raise FromzeroError(f"{data} ({split}) has label {unknown[0]!r} that the model does not know "
                            f"({', '.join(classifier.labels)})")
    logits = classifier.text_logits([t for t, _ in rows], batch_size)
    index = {name: i for i, name in enumerate(classifier.labels)}
    return {**score(logits, [index[label] for _, label in rows], classifier.labels), "split": split}


def _evaluate_reader(directory: Path, data: str | None, made_by: dict[str, Any], split: str, batch_size: int,
                     device: str, limit: int = 0) -> dict[str, Any]:
    """SQuAD exact match / F1 of a question-answering checkpoint. ``data`` given and a file: every
    answerable question in it (a SQuAD dev file, say); else the ``split`` of ``data`` or of the
    run's data (split as the run split it)."""
    from fromzero.data.qa import load_qa_splits, read_qa_file
    from fromzero.finetune.qa import Reader, score_answers

    source = data or made_by.get("data")
    if not source:
        raise FromzeroError("no --data given and the checkpoint's run config names none")
    if data and Path(data).expanduser().is_file():
        read = read_qa_file(Path(data))
        examples, unanswerable, where = read.examples, read.unanswerable, "all"
    else:
        if split not in ("train", "val", "test"):
            raise FromzeroError(f"--split must be train, val or test, got {split!r}")
        splits, unanswerable = load_qa_splits(str(source), made_by.get("val_fraction", 0.1),
                                              made_by.get("test_fraction", 0.1))
        examples, where = splits[split], split
    examples = examples[:limit] if limit else examples
    if not examples:
        raise FromzeroError(f"{source} ({where}) holds no answerable questions")
    answers, loss = Reader(directory, device).answer(examples, batch_size)
    return {**score_answers(answers, examples, loss), "split": where, "data": str(source),
            "unanswerable_skipped": unanswerable}


def _evaluate_images(directory: Path, data: str, split: str, batch_size: int, device: str,
                     limit: int = 0) -> dict[str, Any]:
    """Classification metrics of an image classifier on ``data``/``split`` (an ImageFolder);
    ``limit`` is not applied (an image split is scored whole)."""
    from torch.utils.data import DataLoader

    from fromzero.data.images import load_image_folder
    from fromzero.finetune.images import (MEMORY_DATASETS, _score, builtin_image_data, memory_image_data,
                                          predict_loader)

    classifier = Classifier(directory, device)
    channels = int(classifier.info.get("channels", 3))
    if data in MEMORY_DATASETS:  # a built-in dataset held in memory: batches as the run made them
        from torch.utils.data import TensorDataset

        from fromzero.data.images import TensorImageBatch

        splits, names = memory_image_data(data)
        if split not in splits:
            raise FromzeroError(f"--split must be one of {', '.join(splits)} for {data}, got {split!r}")
        if names != classifier.labels:
            raise FromzeroError(f"{directory} has classes {classifier.labels}, the built-in {data} has {names}")
        info = classifier.info
        collate = TensorImageBatch(False, int(info.get("image_size", 28)), channels, mean=info.get("mean"),
                                   std=info.get("std"))
        loader = DataLoader(TensorDataset(splits[split].images, splits[split].labels), batch_size=batch_size,
                            collate_fn=collate)
    else:
        root = builtin_image_data(data)  # a folder, or the built-in digits (written once)
        folder = root / split if (root / split).is_dir() else root
        dataset = load_image_folder(folder, classifier.image_transform(), mode="RGB" if channels == 3 else "L",
                                    classes=classifier.labels)
        loader = DataLoader(dataset, batch_size=batch_size)
    logits, labels = predict_loader(classifier.model, loader, classifier.device, classifier._autocast)
    return {**_score(logits, labels, classifier.labels), "split": split}


def _evaluate_lm(directory: Path, data: str, split: str, batch_size: int, device: str, task: str) -> dict[str, Any]:
    """SFT data: loss on response tokens. A prepared data dir (meta.json): loss over its split."""
    from fromzero.data.tokenizers import TextTokenizer
    from fromzero.checkpoint import TOKENIZER_FILE, load_model
    from fromzero.devices import autocast_context, resolve_device, resolve_dtype

    dev = resolve_device(device)
    model = load_model(directory, dev)
    autocast = lambda: autocast_context(dev, resolve_dtype(dev, "auto"))  # noqa: E731
    if (Path(data) / "meta.json").is_file():
        return {**_prepared_split_loss(model, Path(data), split, batch_size, dev, autocast), "split": split}
    from torch.utils.data import DataLoader

    from fromzero.data.sft import (ChatTemplate, add_system_prompt, checkpoint_chat_template, collate_sft,
                                   load_sft_examples, tokenize_sft)
    from fromzero.finetune.sft import response_loss

    cfg = run_config(directory)
    template = checkpoint_chat_template(directory) or ChatTemplate()
    tokenizer = TextTokenizer.load(directory / TOKENIZER_FILE)
    examples = load_sft_examples(data, cfg.get("val_fraction", 0.1), cfg.get("test_fraction", 0.1), cfg.get("seed", 0))
    rows = add_system_prompt(examples[split], str(checkpoint_info(directory).get("system_prompt") or ""))
    sft_set = tokenize_sft(rows, tokenizer, template, model.config.block_size)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    loader = DataLoader(sft_set, batch_size=batch_size, collate_fn=lambda b: collate_sft(b, pad))
    return {**response_loss(model, loader, dev, autocast), "split": split, "n": len(sft_set)}


@torch.no_grad()
def _prepared_split_loss(model: Any, data_dir: Path, split: str, batch_size: int, device: torch.device,
                         autocast: Any) -> dict[str, Any]:
    """Mean next-token loss over consecutive, non-overlapping block_size windows of a split."""
    import numpy as np

    from fromzero.data.text import load_split
    from fromzero.evaluation.metrics import language_model_metrics

    if split not in ("train", "val"):
        raise FromzeroError(f"a prepared data directory has train and val splits, not {split!r}")
    tokens = load_split(data_dir, split)
    T = model.config.block_size
    n_windows = (len(tokens) - 1) // T
    if n_windows == 0:
        raise FromzeroError(f"{data_dir} {split} split is shorter than one block of {T} tokens")
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        rows = range(start, min(n_windows, start + batch_size))
        x = torch.from_numpy(np.stack([tokens[r * T:(r + 1) * T] for r in rows]).astype(np.int64)).to(device)
        y = torch.from_numpy(np.stack([tokens[r * T + 1:(r + 1) * T + 1] for r in rows]).astype(np.int64)).to(device)
        with autocast():
            _, loss = model(x, y)
        total += float(loss) * x.numel()
        count += x.numel()
    return {**language_model_metrics(total / count), "tokens": count}


def write_evaluation(metrics: dict[str, Any], out: Path) -> None:
    """metrics.json-style file (+ confusion matrix PNG next to it for classifiers)."""
    from fromzero.evaluation.metrics import write_metrics_json
    from fromzero.evaluation.plots import plot_confusion_matrix

    write_metrics_json(metrics, out)
    if "confusion_matrix" in metrics:
        plot_confusion_matrix(metrics["confusion_matrix"], metrics["labels"], out.with_suffix(".confusion_matrix.png"))


def to_json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False)
