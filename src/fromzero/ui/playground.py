"""The Playground page: try a classifier or an encoder on one input, as ``fromzero predict``,
``fromzero embed`` and ``fromzero explain`` would (the same library functions).

Models: the checkpoints/{best,last} of runs whose task is a classifier (text or image), and the
``--model`` checkpoints that are not chat models (e.g. a BERT encoder). One model stays loaded.
"""

from __future__ import annotations

import base64
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

from fromzero.errors import FromzeroError

MAX_IMAGE_BYTES = 8 << 20


def _kind(directory: Path) -> str:
    """text-classifier | image-classifier | encoder | '' (not for the playground)."""
    from fromzero.inference.explain import model_kind

    try:
        config = json.loads((directory / "config.json").read_text())
        info_path = directory / "info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    except (OSError, ValueError):
        return ""
    kind = model_kind(config, info)
    if kind in ("cnn", "vit-classifier") and info.get("task") == "image-classification":
        return "image-classifier"
    return kind if kind in ("text-classifier", "encoder") else ""


def playground_models(runs_root: Path, extra: dict[str, Path]) -> dict[str, tuple[Path, str]]:
    """Name -> (checkpoint directory, kind) of every model the Playground can run."""
    from fromzero.evaluation.runs import list_runs

    found = {}
    for name, directory in extra.items():
        if kind := _kind(directory):
            found[name] = (directory, kind)
    for row in list_runs(runs_root):
        for which in ("best", "last"):
            directory = runs_root / row.name / "checkpoints" / which
            if (directory / "config.json").is_file() and (kind := _kind(directory)):
                found[f"{row.name}:{which}"] = (directory, kind)
    return found


class Playground:
    """The loaded playground model (a Classifier, or an encoder's directory) and its explainer."""

    def __init__(self, device: str = "auto") -> None:
        self.device = device
        self._lock = threading.Lock()
        self._loaded: tuple[str, Any] | None = None
        self._explainer: tuple[str, Any] | None = None

    def _classifier(self, name: str, directory: Path) -> Any:
        from fromzero.inference.predict import Classifier

        if self._loaded is None or self._loaded[0] != name:
            self._loaded = (name, Classifier(directory, self.device))
        return self._loaded[1]

    def classify(self, name: str, directory: Path, text: str | None = None, image: bytes | None = None) -> dict:
        with self._lock:
            classifier = self._classifier(name, directory)
            if image is not None:
                with tempfile.TemporaryDirectory(prefix="fromzero-ui-") as tmp:
                    path = Path(tmp) / "image"
                    path.write_bytes(image)
                    logits = classifier.image_logits([path])
            else:
                logits = classifier.text_logits([text or ""])
            return classifier.label(logits)[0]

    def embed(self, directory: Path, texts: list[str]) -> dict:
        import torch

        from fromzero.devices import resolve_device
        from fromzero.models.bert import embed_checkpoint

        with self._lock:
            vectors = embed_checkpoint(directory, texts, normalize=True, batch_size=8, device=resolve_device(self.device))
        out: dict[str, Any] = {"dim": len(vectors[0]), "heads": [[round(x, 4) for x in v[:8]] for v in vectors]}
        if len(vectors) == 2:
            a, b = torch.tensor(vectors[0]), torch.tensor(vectors[1])
            out["cosine"] = round(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 6)
        return out

    def explain(self, name: str, directory: Path, text: str | None = None, image: bytes | None = None) -> dict:
        """Integrated Gradients (text) or Grad-CAM (image) of the predicted class: the page's HTML or a PNG."""
        from fromzero.inference.explain import ExplainConfig, Explainer

        with self._lock:
            if self._explainer is None or self._explainer[0] != name:
                self._explainer = (name, Explainer(ExplainConfig(checkpoint=str(directory), device=self.device,
                                                                 steps=32)))
            explainer = self._explainer[1]
            if image is not None:
                with tempfile.TemporaryDirectory(prefix="fromzero-ui-") as tmp:
                    path = Path(tmp) / "image"
                    path.write_bytes(image)
                    result = explainer.explain_image(path)
            else:
                if not (text or "").strip():
                    raise FromzeroError("cannot explain an empty text")
                result = explainer.explain_text(text)
        out: dict[str, Any] = {"summary": result.summary, "method": explainer.method}
        for suffix, content in result.files.items():
            if suffix.endswith("html"):
                out["html"] = content if isinstance(content, str) else content.decode("utf-8")
            elif suffix.endswith("png"):
                data = content if isinstance(content, bytes) else content.encode()
                out["png"] = "data:image/png;base64," + base64.b64encode(data).decode()
        return out


def decode_image(data_url: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL from the page (size-checked)."""
    head, _, payload = data_url.partition(",")
    if not head.startswith("data:image/") or ";base64" not in head:
        raise FromzeroError("the image must be sent as a data:image/...;base64 URL")
    try:
        raw = base64.b64decode(payload, validate=True)
    except ValueError:
        raise FromzeroError("the image is not valid base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise FromzeroError(f"the image is larger than {MAX_IMAGE_BYTES >> 20} MB")
    return raw
