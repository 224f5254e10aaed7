"""Train an object detector on COCO-format data: train / val / test, best by val mAP@0.5.

The data is ``mnist-detection`` (built in: scenes of real MNIST digits, see
:mod:`fromzero.data.detection`) or a folder with ``train/``, ``val/`` and ``test/``, each an
``annotations.json`` in COCO's format with its images; every file is checked before the run
directory is touched. Two detectors (``model.arch``):

* ``centernet``: the compact anchor-free detector written from scratch
  (:mod:`fromzero.models.centernet`: heat map per class + size + offset at stride 4);
* ``fcos``: torchvision's FCOS on a ResNet-18 + FPN (:mod:`fromzero.models.fcos`), every weight
  trained here.

Both train in the loop every fine-tuning task shares (exact resume, metrics.jsonl, TensorBoard,
plots); validation and test are scored with pycocotools' COCOeval (mAP@[.5:.95], mAP@0.5,
per-class AP). Images are held in memory as bytes and padded (bottom / right) to the batch's
largest size rounded up to 32, so a batch may mix sizes; boxes are unchanged by padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from fromzero.data.detection import DetectionSplit, builtin_detection_data, read_coco_folder
from fromzero.errors import FromzeroError
from fromzero.finetune.engine import FinetuneConfig, FinetuneTask, run_finetune_task
from fromzero.training.trainer import FitResult, ShuffledEpochs

ARCHS = ("centernet", "fcos")
PAD_TO = 32
"""Batches are padded to a multiple of this (CenterNet needs 8, torchvision's FCOS pads to 32)."""


@dataclass
class DetectionConfig(FinetuneConfig):
    """Training an object detector on COCO-format DATA/{train,val,test}/annotations.json."""

    RECIPE_KEYS: ClassVar[dict[str, str]] = {
        "data_dir": "data.source", "channels": "data.channels", "arch": "model.arch", "width": "model.width",
        "blocks": "model.blocks", "image_size": "model.image_size", "fpn_channels": "model.fpn_channels",
        "head_convs": "model.head_convs"}

    # Inherited options a detector refuses (it trains every weight from scratch): left out of --help.
    UNUSED_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"method", "unfreeze_top", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "init_from"})

    data_dir: str = "mnist-detection"
    """mnist-detection (built in: 64 x 64 scenes of 1-5 MNIST digits) or a folder with train/, val/ and
    test/, each holding a COCO annotations.json and its images."""
    channels: int = 1
    """1 (grayscale, L) or 3 (RGB): every image is converted to it."""
    arch: str = "centernet"
    """centernet (from scratch, fromzero.models.centernet) | fcos (torchvision FCOS, ResNet-18 + FPN)."""
    width: int = 32
    """centernet: channels at stride 2 (stride 4 has 2x, stride 8 4x)."""
    blocks: int = 2
    """centernet: residual blocks at stride 4 and at stride 8."""
    image_size: int = 64
    """fcos: short side images are resized to inside the model."""
    fpn_channels: int = 128
    """fcos: channels of the FPN levels and the head."""
    head_convs: int = 2
    """fcos: convolutions per head branch."""
    max_detections: int = 100
    """Most detections per image scored by COCOeval (COCO's limit is 100)."""
    epochs: int = 10
    """Maximum number of passes over the training split."""
    batch_size: int = 32
    """Images per micro-batch."""
    lr: float = 2e-3
    """Peak learning rate (cosine decay to lr * min_lr_ratio over all steps)."""
    warmup_ratio: float = 0.02
    """Fraction of the steps with linear warmup from 0 to lr."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    grad_clip: float = 5.0
    """Clip the global gradient norm to this (0 = off)."""

    def validate(self) -> None:
        """Raise FromzeroError for a value that cannot work."""
        if not str(self.data_dir).strip():
            raise FromzeroError("data.source is required: mnist-detection or a COCO folder with train/, "
                                "val/, test/")
        if self.method != "full":
            raise FromzeroError(f"method {self.method!r} is not supported for object detection (it trains "
                                "every weight from scratch: method full)")
        self.validate_common()
        if self.arch not in ARCHS:
            raise FromzeroError(f"arch {self.arch!r} is not supported (supported: {', '.join(ARCHS)})")
        if self.channels not in (1, 3):
            raise FromzeroError(f"channels must be 1 or 3, got {self.channels!r}")
        for name in ("width", "blocks", "image_size", "fpn_channels", "head_convs", "max_detections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FromzeroError(f"{name} must be a positive integer, got {value!r}")
        if self.dist_strategy != "none":
            raise FromzeroError("object detection trains in one process (dist_strategy none)")


# ---------------------------------------------------------------------------------------------
# Model


def build_detector(cfg: DetectionConfig, labels: list[str],
                   category_ids: list[int]) -> tuple[nn.Module, dict]:
    """The detector for ``cfg.arch`` and its config.json."""
    if cfg.arch == "centernet":
        from fromzero.models.centernet import CenterNet, CenterNetConfig

        config: Any = CenterNetConfig(num_classes=len(labels), in_channels=cfg.channels, width=cfg.width,
                                      blocks=cfg.blocks, labels=labels, category_ids=category_ids)
        return CenterNet(config), config.to_dict()
    from fromzero.models.fcos import FCOSConfig, FCOSDetector

    config = FCOSConfig(num_classes=len(labels), in_channels=cfg.channels, image_size=cfg.image_size,
                        fpn_channels=cfg.fpn_channels, head_convs=cfg.head_convs,
                        detections_per_image=cfg.max_detections, labels=labels, category_ids=category_ids)
    return FCOSDetector(config), config.to_dict()


def is_centernet(model: nn.Module) -> bool:
    from fromzero.models.centernet import CenterNet

    return isinstance(model, CenterNet)


def pad_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (C, H, W) images -> float (B, C, H', W') in [0, 1], zero-padded bottom / right to a
    multiple of PAD_TO."""
    C = images[0].shape[0]
    H = max(im.shape[1] for im in images)
    W = max(im.shape[2] for im in images)
    H, W = -(-H // PAD_TO) * PAD_TO, -(-W // PAD_TO) * PAD_TO
    out = torch.zeros(len(images), C, H, W)
    for i, im in enumerate(images):
        out[i, :, :im.shape[1], :im.shape[2]] = im.float() / 255.0
    return out


@torch.no_grad()
def detect(model: nn.Module, images: list[torch.Tensor], device: torch.device, threshold: float = 0.0,
           max_detections: int = 100) -> list[dict[str, torch.Tensor]]:
    """Detections of ``images`` (uint8 (C, H, W) each): per image ``boxes`` (n, 4) [x1, y1, x2, y2]
    pixels clipped to the image, ``scores``, ``labels`` (class indices), best first, score >= threshold."""
    model.eval()
    x = pad_batch(images).to(device)
    if is_centernet(model):
        from fromzero.models.centernet import decode

        out = decode(*model(x), max_detections=max_detections, threshold=threshold)
    else:
        out = model(x)
    results = []
    for im, d in zip(images, out):
        boxes = d["boxes"].float().cpu()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, im.shape[2])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, im.shape[1])
        keep = (d["scores"].cpu() >= threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        scores, order = d["scores"].float().cpu()[keep].sort(descending=True)
        results.append({"boxes": boxes[keep][order][:max_detections], "scores": scores[:max_detections],
                        "labels": d["labels"].cpu()[keep][order][:max_detections]})
    return results


def score_split(model: nn.Module, split: DetectionSplit, category_ids: list[int], device: torch.device,
                batch_size: int = 64, max_detections: int = 100) -> dict[str, Any]:
    """COCO metrics of ``model`` on ``split`` (every detection kept: AP needs the low-scoring ones too)."""
    from fromzero.evaluation.detection import coco_metrics

    detections = []
    for start in range(0, len(split), batch_size):
        images = split.images[start:start + batch_size]
        for image_id, d in zip(split.image_ids[start:start + batch_size],
                               detect(model, images, device, 0.0, max_detections)):
            found = zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist())
            for (x1, y1, x2, y2), s, c in found:
                detections.append({"image_id": image_id, "category_id": category_ids[c],
                                   "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    return coco_metrics(split.coco, detections)


# ---------------------------------------------------------------------------------------------
# Task


class _Scenes(Dataset):
    def __init__(self, split: DetectionSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.split.images[i], self.split.boxes[i], self.split.labels[i]


def _collate(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list, list]:
    return pad_batch([im for im, _, _ in items]), [b for _, b, _ in items], [c for _, _, c in items]


def finetune_detection(cfg: DetectionConfig, resume: bool = False) -> dict[str, Any]:
    """Run an ObjectDetectionTask (train, keep the best val mAP@0.5 weights, test once); its summary."""
    return run_finetune_task(ObjectDetectionTask, cfg, resume)


class ObjectDetectionTask(FinetuneTask):
    """One detector training run (see :class:`fromzero.finetune.engine.FinetuneTask`)."""

    name = "object-detection"
    monitor, higher_is_better = "val_map_50", True

    def __init__(self, cfg: DetectionConfig, ctx: Any, device: torch.device, dtype: str) -> None:
        self.cfg, self.ctx, self.device, self.dtype = cfg, ctx, device, dtype
        data_dir = builtin_detection_data(str(cfg.data_dir))
        self.splits, cats = read_coco_folder(data_dir, cfg.channels)  # every file checked before the run dir
        self.data_dir = data_dir
        self.labels = [c["name"] for c in cats]
        self.category_ids = [c["id"] for c in cats]
        torch.manual_seed(cfg.seed)
        model, self.config = build_detector(cfg, self.labels, self.category_ids)
        self.model = model.to(device)
        self.params = sum(p.numel() for p in model.parameters())
        generator = torch.Generator().manual_seed(cfg.seed)
        train = _Scenes(self.splits["train"])
        self.train_loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                                       drop_last=len(train) > 4 * cfg.batch_size, collate_fn=_collate,
                                       num_workers=cfg.num_workers)
        self.train_batches = ShuffledEpochs(self.train_loader, generator)

    def start(self, run_dir: Path) -> None:
        s = self.splits
        print(f"object detection ({self.cfg.arch}, {self.params:,} parameters): {len(self.labels)} classes, "
              f"train/val/test {len(s['train'])}/{len(s['val'])}/{len(s['test'])} images "
              f"({s['train'].num_objects}/{s['val'].num_objects}/{s['test'].num_objects} objects) from "
              f"{self.data_dir}; device {self.device}, {self.dtype}")
        self.base_info = {"task": self.name, "channels": self.cfg.channels, "data": str(self.cfg.data_dir)}

    def batches(self) -> tuple[Any, int]:
        return self.train_batches, len(self.train_loader)

    def loss(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, int, int]:
        x, boxes, labels = batch
        x = x.to(self.device, non_blocking=True)
        if is_centernet(self.model):
            from fromzero.models.centernet import STRIDE, centernet_loss, encode_targets

            heads = net(x)
            h, w = heads[0].shape[-2:]
            assert (h * STRIDE, w * STRIDE) == tuple(x.shape[-2:]), "input sides must be multiples of 8"
            targets = {k: v.to(self.device) for k, v in
                       encode_targets(boxes, labels, len(self.labels), h, w).items()}
            loss, _ = centernet_loss(heads, targets)
        else:
            targets = [{"boxes": b.to(self.device), "labels": c.to(self.device)}
                       for b, c in zip(boxes, labels)]
            loss = sum(net(x, targets).values())
        return loss, x.size(0), 0

    def _score(self, split: str, per_class: bool = False) -> dict[str, Any]:
        # In float32 (no autocast) whatever the training dtype: `fromzero evaluate` reproduces it exactly.
        m = score_split(self.model, self.splits[split], self.category_ids, self.device,
                        max_detections=self.cfg.max_detections)
        return m if per_class else {k: m[k] for k in ("map", "map_50", "map_75", "ar_100")}

    def evaluate(self, _: nn.Module) -> dict[str, Any]:
        return self._score("val")

    def write_best(self, extra: dict[str, Any]) -> None:
        self.save_model(self.best_dir, {**self.base_info, **extra}, None)

    def save_best(self, info: dict[str, Any]) -> None:
        self.write_best({"best_epoch": info["best_epoch"], "best_step": info["best_step"],
                         "val_map_50": info["val"]["map_50"], "val_map": info["val"]["map"]})

    def test(self) -> dict[str, Any]:
        return self._score("test", per_class=True)

    def test_row(self, fit: FitResult, test: dict[str, Any]) -> dict[str, Any]:
        return {"step": fit.steps, "epoch": fit.best_epoch, "test_map": test["map"],
                "test_map_50": test["map_50"], "test_map_75": test["map_75"]}

    def finish(self, fit: FitResult, test: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        from fromzero.evaluation.detection import draw_detections, format_detection_report
        from fromzero.evaluation.metrics import write_metrics_json

        best_val = fit.best_metrics
        report = {**test, "split": "test", "best_epoch": fit.best_epoch, "best_step": fit.best_step,
                  "epochs_run": fit.epochs_run, "val_map_50": best_val["map_50"], "val_map": best_val["map"]}
        write_metrics_json(report, self.run_dir / "metrics.json")
        test_split = self.splits["test"]
        shown = test_split.images[:8]
        found = detect(self.model, shown, self.device, 0.3, self.cfg.max_detections)
        draw_detections(shown, found, self.labels, self.run_dir / "plots" / "test_detections.png",
                        truth=list(zip(test_split.boxes[:8], test_split.labels[:8])))
        self.write_best({"best_epoch": fit.best_epoch, "best_step": fit.best_step,
                         "val_map_50": best_val["map_50"], "val_map": best_val["map"],
                         "test_map_50": test["map_50"], "test_map": test["map"]})
        print(f"test ({len(test_split)} images, best epoch {fit.best_epoch}):")
        print(format_detection_report(test))
        return self.summary(fit, test, labels=self.labels, params=self.params)
