"""``fromzero explain``: why did a checkpoint decide as it did? Attributions, heat maps, attention maps.

Three methods (:data:`KINDS` says which applies to which model): ``ig``, Integrated
Gradients on a text classifier's word embeddings (:mod:`~fromzero.inference.explain_text`, an
HTML page); ``gradcam``, Grad-CAM of an image classifier (:mod:`~fromzero.inference.explain_image`,
a heat map PNG); ``attention``, every layer's and head's attention of a transformer
(:mod:`~fromzero.inference.explain_attention`, a PNG grid); each with a JSON file. Inputs are
preprocessed exactly as ``fromzero predict`` does; the model runs in float32 (gradients of bf16
models are too coarse for a path integral). Files are named by the input's position
(``001.ig.html``, ...) in ``--out``; existing files are refused unless ``force``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fromzero.errors import FromzeroError
from fromzero.tasks import get_task

METHODS = ("ig", "gradcam", "attention")
# The convergence delta of IG is flagged when above this fraction of |F(input) - F(baseline)|.
DELTA_WARN_FRACTION = 0.05
# The fallback preprocessing of a ViT without an info.json (e.g. converted from Hugging Face):
# Google's ViT checkpoints are trained on images normalised with mean = std = 0.5.
VIT_DEFAULT_MEAN_STD = 0.5


@dataclass
class ExplainConfig:
    """What ``fromzero explain`` does (its command-line options)."""

    checkpoint: str  # a text or image classifier, a BERT encoder or a GPT
    method: str = "auto"  # ig | gradcam | attention | auto (the first the model supports)
    target: str = "auto"  # ig / gradcam: the class to explain, by name; auto = the predicted class
    steps: int = 50  # ig: integration steps (more: smaller convergence delta, slower)
    baseline: str = "pad"  # ig: the token that replaces every non-special token in the baseline: pad | mask
    out: str = "explanations"
    force: bool = False  # overwrite existing output files
    device: str = "auto"


@dataclass
class Explanation:
    """One input's explanation: the files to write (suffix -> content) and a one-line summary."""

    files: dict[str, str | bytes]
    summary: str
    data: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# What can be explained how


def model_kind(config: dict, info: dict) -> str:
    """text-classifier | encoder | gpt | cnn | vit-classifier | vit | other."""
    model_type, task = config.get("model_type"), get_task(info.get("task"))
    classifier = task is not None and task.is_classifier
    if model_type == "fromzero-bert":
        return "text-classifier" if classifier and config.get("head") == "classification" else "encoder"
    if model_type in ("fromzero-gpt", "fromzero-cnn"):
        return model_type.removeprefix("fromzero-")
    if model_type == "fromzero-vit":
        return "vit-classifier" if classifier and config.get("num_labels", 0) > 0 else "vit"
    return "other"


# Per kind: what it is (for messages) and the methods that apply to it (the first is auto's).
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "text-classifier": ("a text classifier (fromzero-bert)", ("ig", "attention")),
    "encoder": ("a BERT encoder without a text-classification head", ("attention",)),
    "gpt": ("a GPT language model", ("attention",)),
    "cnn": ("a CNN image classifier", ("gradcam",)),
    "vit-classifier": ("a ViT image classifier", ("gradcam", "attention")),
    "vit": ("a ViT that is not a fine-tuned image classifier (no image-classification info.json)",
            ("attention",)),
}
IMAGE_KINDS = ("cnn", "vit-classifier", "vit")


def choose_method(kind: str, method: str, model_type: Any = None) -> str:
    """The method to run: ``method`` checked against what ``kind`` supports, or its first for auto."""
    if method != "auto" and method not in METHODS:
        raise FromzeroError(f"unknown --method {method!r} (choose from {', '.join(METHODS)} or auto)")
    if kind not in KINDS:
        raise FromzeroError(f"explain supports BERT, GPT, CNN and ViT checkpoints, not a {model_type!r} model")
    name, works = KINDS[kind]
    if method == "auto":
        return works[0]
    if method not in works:
        raise FromzeroError(f"--method {method} does not apply to {name}; use {' or '.join(works)}")
    return method


# ---------------------------------------------------------------------------------------------
# The explainer


class Explainer:
    """A loaded checkpoint that explains one text or image at a time with ``cfg.method``."""

    def __init__(self, cfg: ExplainConfig) -> None:
        from fromzero.checkpoint import CONFIG_FILE, checkpoint_info, load_model, read_json
        from fromzero.devices import resolve_device

        if cfg.steps <= 0:
            raise FromzeroError(f"--steps must be positive, got {cfg.steps}")
        self.cfg = cfg
        self.directory = Path(cfg.checkpoint)
        self.info = checkpoint_info(self.directory)  # also: a missing directory / config.json is one line
        self.config = read_json(self.directory / CONFIG_FILE, "model config")
        self.kind = model_kind(self.config, self.info)
        self.method = choose_method(self.kind, cfg.method, self.config.get("model_type"))
        quantized = self.config.get("quantization")
        if quantized and self.method != "attention":
            how = quantized.get("method", "?") if isinstance(quantized, dict) else "?"
            raise FromzeroError(f"{self.directory} is quantized ({how}); {self.method} needs the gradients of a "
                                "float model: explain the checkpoint it was made from")
        if self.method == "ig":
            from fromzero.inference.explain_text import BASELINES

            if cfg.baseline not in BASELINES:
                raise FromzeroError(f"unknown --baseline {cfg.baseline!r} (choose from {', '.join(BASELINES)})")
        labels = self.config.get("labels")
        self.labels: list[str] = list(labels) if labels else []
        if self.method in ("ig", "gradcam") and not self.labels:
            raise FromzeroError(f"{self.directory / CONFIG_FILE} has no class names (labels)")
        self.target: str | None = None
        if cfg.target not in ("auto", "", None):
            if self.method == "attention":
                raise FromzeroError("--target applies to ig and gradcam; attention maps do not depend on a class")
            if cfg.target not in self.labels:
                raise FromzeroError(f"unknown --target {cfg.target!r} (labels: {', '.join(self.labels)})")
            self.target = cfg.target
        self.device = resolve_device(cfg.device)
        self.model: nn.Module = load_model(self.directory, self.device).eval()
        if not quantized:  # gradients and path integrals in fp32, whatever dtype the weights were saved in
            self.model.float()
        self._tokenizer: Any = None
        self._transform: Any = None

    @property
    def takes_images(self) -> bool:
        return self.kind in IMAGE_KINDS

    def check_inputs(self, images: bool) -> None:
        """Refuse texts for an image model and images for a text model."""
        if images != self.takes_images:
            give = "--image FILE or --input FOLDER" if self.takes_images else "--text TEXT or --input FILE"
            raise FromzeroError(f"{self.directory} is {KINDS[self.kind][0]}: give {give}")

    # -- inputs ----------------------------------------------------------------------------------

    def _text_tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.kind == "gpt":
                from fromzero.data.tokenizers import TextTokenizer

                self._tokenizer = TextTokenizer.load(self.directory)
            else:
                from fromzero.models.bert import BertConfig, load_encoder_tokenizer

                self._tokenizer = load_encoder_tokenizer(self.directory, BertConfig.from_dict(self.config))
        return self._tokenizer

    def _max_length(self) -> int:
        from fromzero.models.bert import BertConfig, encoder_limit

        return int(self.info.get("max_length") or encoder_limit(self.directory, BertConfig.from_dict(self.config)))

    def _image_mean_std(self) -> tuple[list[float] | None, list[float] | None]:
        if "image_size" in self.info:
            return self.info.get("mean"), self.info.get("std")
        channels = int(self.config.get("num_channels", 3))
        return [VIT_DEFAULT_MEAN_STD] * channels, [VIT_DEFAULT_MEAN_STD] * channels

    def image_tensor(self, path: Path) -> torch.Tensor:
        """The preprocessed image (1, Ch, H, W): the checkpoint's eval transforms, as predict uses."""
        from fromzero.data.images import build_transforms
        from fromzero.inference.predict import open_image

        info = self.info
        if "image_size" in info:
            channels = int(info.get("channels", 3))
            size, resize = int(info["image_size"]), info.get("resize_size")
        elif self.kind in ("vit", "vit-classifier"):  # no info.json: the ViT's own input size
            channels = int(self.config.get("num_channels", 3))
            h, w = self.model.image_size
            if h != w:
                raise FromzeroError(f"{self.directory} has no info.json to say how to preprocess its {h}x{w} images")
            size, resize = h, h
        else:
            raise FromzeroError(f"{self.directory} has no image preprocessing (image_size) in its info.json")
        if self._transform is None:
            mean, std = self._image_mean_std()
            self._transform = build_transforms(False, image_size=size, resize_size=resize, channels=channels,
                                               normalize=mean is not None, mean=mean, std=std)
        return open_image(path, self._transform, channels)[None].to(self.device)

    def _text_ids(self, text: str) -> tuple[torch.Tensor, list[str], bool]:
        """(ids (1, T), token strings, truncated) for attention maps of a text model."""
        from fromzero.inference.explain_text import check_ids

        if not text.strip():
            raise FromzeroError("cannot explain an empty text")
        tokenizer = self._text_tokenizer()
        if self.kind == "gpt":
            ids = tokenizer.encode(text)
            limit = int(self.config.get("block_size", len(ids)))
            truncated = len(ids) > limit
            ids = ids[:limit]
            tokens = [tokenizer.decode([i]) for i in ids]
        else:
            tokenizer.enable_truncation(max_length=self._max_length())
            encoding = tokenizer.encode(text, add_special_tokens=True)
            ids, tokens, truncated = list(encoding.ids), list(encoding.tokens), bool(encoding.overflowing)
        check_ids(ids, int(self.config.get("vocab_size", 0)))
        return torch.tensor([ids], dtype=torch.long, device=self.device), tokens, truncated

    # -- methods ---------------------------------------------------------------------------------

    def explain_text(self, text: str) -> Explanation:
        self.check_inputs(images=False)
        if self.method == "ig":
            return self._integrated_gradients(text)
        ids, tokens, truncated = self._text_ids(text)
        return self._attention(ids, tokens, {"input": text, "truncated": truncated})

    def explain_image(self, path: Path) -> Explanation:
        self.check_inputs(images=True)
        pixels = self.image_tensor(path)
        if self.method == "gradcam":
            return self._grad_cam(pixels, str(path))
        gh, gw = self.model.config.grid
        tokens = ["[CLS]"] + [f"{r},{c}" for r in range(gh) for c in range(gw)]
        return self._attention(pixels, tokens, {"input": str(path), "patch_grid": [gh, gw]})

    def _prediction(self, logits: torch.Tensor) -> dict[str, Any]:
        probs = torch.softmax(logits.float()[0], dim=-1)
        return {"label": self.labels[int(probs.argmax())] if self.labels else str(int(probs.argmax())),
                "probabilities": {name: round(float(p), 6) for name, p in zip(self.labels, probs)}}

    def _integrated_gradients(self, text: str) -> Explanation:
        from fromzero.inference.explain_text import integrated_gradients, render_html

        result = integrated_gradients(self.model, self._text_tokenizer(), text, self.labels, target=self.target,
                                      steps=self.cfg.steps, baseline=self.cfg.baseline, max_length=self._max_length())
        data = {"checkpoint": str(self.directory), "input": text, **result.to_json()}
        top = result.top_tokens(1)
        summary = (f"{result.label} (p {result.probabilities[result.label]:.3f}); explained {result.target}; "
                   f"top token {top[0][0]!r} ({top[0][1]:+.3f}); delta {result.delta:.1e}" if top else
                   f"{result.label}; no word tokens")
        if abs(result.delta) > DELTA_WARN_FRACTION * abs(result.logit_difference) + 1e-4:
            summary += " (large: raise --steps)"
        return Explanation({"html": render_html(result, f"Why {result.target}?"), "json": _json(data)}, summary, data)

    def _grad_cam(self, pixels: torch.Tensor, source: str) -> Explanation:
        from fromzero.inference.explain_attention import figure_png
        from fromzero.inference.explain_image import display_image, grad_cam, overlay_figure

        with torch.no_grad():
            prediction = self._prediction(self.model(pixels))
        target = self.target or prediction["label"]
        cam = grad_cam(self.model, pixels, self.labels.index(target))
        row, col = cam.peak()
        data = {"checkpoint": str(self.directory), "input": source, "method": "gradcam", **prediction,
                "target": target, "layer": cam.layer, "image_size": list(cam.heatmap.shape), "peak": [row, col],
                "grid": [[round(float(v), 6) for v in r] for r in cam.grid.tolist()]}
        mean, std = self._image_mean_std()
        image = display_image(pixels, mean, std)
        title = f"{Path(source).name}: {prediction['label']} (p {prediction['probabilities'][prediction['label']]:.2f})" \
                f"; Grad-CAM for {target}"
        png = figure_png(overlay_figure(image, cam.heatmap, title))
        summary = (f"{prediction['label']} (p {prediction['probabilities'][prediction['label']]:.3f}); explained "
                   f"{target}; peak at row {row}, column {col} of {cam.heatmap.size(0)}x{cam.heatmap.size(1)}")
        return Explanation({"png": png, "json": _json(data)}, summary, data)

    def _attention(self, inputs: torch.Tensor, tokens: list[str], meta: dict[str, Any]) -> Explanation:
        from fromzero.inference.explain_attention import (attention_figure, attention_maps, entropy, figure_png,
                                                          maps_summary)

        maps = attention_maps(self.model, inputs)
        data = {"checkpoint": str(self.directory), **meta, "method": "attention", "tokens": tokens}
        if self.kind in ("text-classifier", "vit-classifier"):
            with torch.no_grad():
                out = self.model(inputs)
            data.update(self._prediction(out[0] if isinstance(out, tuple) else out))
        data.update(maps_summary(maps))
        data["entropy"] = [[round(float(v), 4) for v in layer] for layer in entropy(maps).tolist()]
        L, H, T, _ = maps.shape
        label = f"; predicted {data['label']}" if "label" in data else ""
        png = figure_png(attention_figure(maps, tokens, f"attention ({L} layers x {H} heads, {T} tokens){label}"))
        summary = f"{L} layers x {H} heads over {T} tokens{label}"
        return Explanation({"png": png, "json": _json(data)}, summary, data)


def _json(data: dict[str, Any]) -> str:
    """A JSON object with one top-level key per line and each value compact (lists stay on one line)."""
    lines = [f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}" for key, value in data.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


# ---------------------------------------------------------------------------------------------
# Running it


def output_paths(out: Path, method: str, count: int, suffixes: list[str]) -> list[dict[str, Path]]:
    """Per input i: {suffix: out/NNN.method.suffix}, NNN = i + 1 zero-padded to 3 digits (or more)."""
    width = max(3, len(str(count)))
    return [{s: out / f"{i + 1:0{width}d}.{method}.{s}" for s in suffixes} for i in range(count)]


METHOD_FILES = {"ig": ["html", "json"], "gradcam": ["png", "json"], "attention": ["png", "json"]}


def explain(cfg: ExplainConfig, texts: list[str] | None = None, images: list[Path] | None = None,
            echo: Any = print) -> list[dict[str, Any]]:
    """Load ``cfg.checkpoint`` and explain ``texts`` or ``images`` (see :func:`write_explanations`)."""
    return write_explanations(Explainer(cfg), texts, images, echo)


def write_explanations(explainer: Explainer, texts: list[str] | None = None, images: list[Path] | None = None,
                       echo: Any = print) -> list[dict[str, Any]]:
    """Explain every text (or image) and write its files; returns one record per input.

    The inputs' kind and the output paths are checked before any file is written (existing files
    are refused unless ``force``); ``echo`` gets one line per input as its files land.
    """
    from fromzero.checkpoint import atomic_write_bytes

    cfg = explainer.cfg
    if bool(texts) == bool(images):
        raise FromzeroError("give texts or images to explain (one kind)")
    items: list[Any] = list(texts or images or [])
    explainer.check_inputs(images=bool(images))
    for item in items:  # before any work: a bad input found half-way would leave half the files
        if images and not Path(item).is_file():
            raise FromzeroError(f"image not found: {item}")
        if texts and not str(item).strip():
            raise FromzeroError("cannot explain an empty text")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise FromzeroError(f"--out {out} exists and is not a directory")
    paths = output_paths(out, explainer.method, len(items), METHOD_FILES[explainer.method])
    if not cfg.force:
        taken = [p for item in paths for p in item.values() if p.exists()]
        if taken:
            more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
            raise FromzeroError(f"{taken[0]} already exists{more}; pass --force to overwrite")
    records = []
    for item, where in zip(items, paths):
        result = explainer.explain_image(Path(item)) if images else explainer.explain_text(item)
        for suffix, path in where.items():
            content = result.files[suffix]
            atomic_write_bytes(path, content.encode("utf-8") if isinstance(content, str) else content)
        echo(f"wrote {', '.join(str(p) for p in where.values())}: {result.summary}")
        records.append({"input": str(item), "files": {s: str(p) for s, p in where.items()}, **result.data})
    return records
