"""Use an object-detection checkpoint: find boxes in images (``predict``) and score a split (``evaluate``).

Try it::

    fromzero predict --checkpoint runs/mnist-centernet/checkpoints/best --image scene.png --out boxes.png
    fromzero evaluate --checkpoint runs/mnist-centernet/checkpoints/best            # the run's test split
    fromzero evaluate --checkpoint runs/mnist-centernet/checkpoints/best --data my-coco-folder --split val
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fromzero.checkpoint import checkpoint_info
from fromzero.errors import FromzeroError


class Detector:
    """A detection checkpoint (CenterNet or FCOS), ready to find boxes."""

    def __init__(self, directory: Path, device: str = "cpu") -> None:
        from fromzero.checkpoint import CONFIG_FILE, load_model, read_json
        from fromzero.devices import resolve_device

        self.directory = Path(directory)
        self.info = checkpoint_info(self.directory)
        if self.info.get("task") != "object-detection":
            raise FromzeroError(f"{directory} is a {self.info.get('task')} checkpoint, not an object "
                                "detector")
        self.device = resolve_device(device)
        config = read_json(self.directory / CONFIG_FILE, "model config")
        self.model = load_model(self.directory, self.device).eval()
        self.channels = int(self.info.get("channels", config.get("in_channels", 1)))
        k = int(config["num_classes"])
        self.labels = list(config.get("labels") or [str(i) for i in range(k)])
        self.category_ids = list(config.get("category_ids") or range(k))

    def categories(self) -> list[dict[str, Any]]:
        return [{"id": c, "name": n} for c, n in zip(self.category_ids, self.labels)]

    def read_image(self, path: Path) -> torch.Tensor:
        """uint8 (C, H, W) of an image file, converted to the model's channels."""
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB" if self.channels == 3 else "L"))
        except FileNotFoundError:
            raise FromzeroError(f"image not found: {path}") from None
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise FromzeroError(f"{path} is not a readable image ({e})") from None
        t = torch.from_numpy(pixels.copy())
        return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()

    def detect(self, images: list[torch.Tensor], threshold: float,
               max_detections: int = 100) -> list[dict[str, Any]]:
        from fromzero.finetune.detection import detect

        return detect(self.model, images, self.device, threshold, max_detections)

    def rows(self, name: str, found: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """One JSON-able row per box: image, label, score, box [x, y, w, h] (pixels, top-left origin)."""
        rows = []
        boxes = zip(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist())
        for (x1, y1, x2, y2), s, c in boxes:
            rows.append({"image": name, "label": self.labels[c], "score": round(s, 4),
                         "box": [round(x1, 1), round(y1, 1), round(x2 - x1, 1), round(y2 - y1, 1)]})
        return rows


def predict_boxes(directory: Path, paths: list[Path], threshold: float = 0.3, out: Path | None = None,
                  force: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    """Boxes in each image scoring >= ``threshold`` (rows of :meth:`Detector.rows`); with ``out``,
    the image with its boxes drawn as a PNG (one image: ``out`` is the file; several: ``out`` is
    a folder receiving ``<stem>.boxes.png`` each). Existing files are replaced only with ``force``."""
    from fromzero.evaluation.detection import render_detections

    if not 0.0 <= threshold <= 1.0:
        raise FromzeroError(f"--threshold must be in [0, 1], got {threshold}")
    detector = Detector(directory, device)
    images = [detector.read_image(p) for p in paths]  # every image read before anything is written
    targets: list[Path] = []
    if out is not None:
        targets = [out] if len(paths) == 1 else [out / f"{p.stem}.boxes.png" for p in paths]
        if len(paths) == 1 and out.suffix.lower() != ".png":
            raise FromzeroError(f"--out {out}: give a .png file name")
        for t in targets:
            if t.exists() and not force:
                raise FromzeroError(f"{t} already exists: choose another --out or pass --force to replace it")
    rows = []
    for i, (path, image) in enumerate(zip(paths, images)):
        found = detector.detect([image], threshold)[0]
        rows += detector.rows(str(path), found)
        if targets:
            from fromzero.checkpoint import atomic_write_bytes

            import io

            buffer = io.BytesIO()
            render_detections(image, found, detector.labels).save(buffer, format="PNG")
            targets[i].parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(targets[i], buffer.getvalue())
    return rows


def evaluate_detector(directory: Path, data: str | None, made_by: dict[str, Any], split: str = "test",
                      batch_size: int = 64, device: str = "cpu") -> dict[str, Any]:
    """COCO metrics of a detection checkpoint on ``split`` of ``data`` (a COCO folder with
    ``<split>/annotations.json``, an annotation file, or mnist-detection), default the run's data."""
    from fromzero.data.detection import ANNOTATIONS, builtin_detection_data, read_coco
    from fromzero.finetune.detection import score_split

    source = data or made_by.get("data_dir")
    if not source:
        raise FromzeroError("no --data given and the checkpoint's run config names none")
    detector = Detector(directory, device)
    root = builtin_detection_data(str(source))
    if root.is_file():
        path = root
    else:
        if split not in ("train", "val", "test"):
            raise FromzeroError(f"--split must be train, val or test, got {split!r}")
        path = root / split / ANNOTATIONS
    coco_split = read_coco(path, detector.channels, detector.categories())
    metrics = score_split(detector.model, coco_split, detector.category_ids, detector.device, batch_size)
    return {"task": "object-detection", **metrics, "split": split if not root.is_file() else "all",
            "data": str(path)}
