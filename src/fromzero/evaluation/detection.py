"""Detection metrics by the library that defines them: pycocotools' COCOeval.

:func:`coco_metrics` scores detections against a COCO ground truth (the annotation dict as
read, crowd regions included: COCOeval ignores detections matched to them): mAP@[.5:.95] (COCO's
headline ``map``), mAP@0.5, mAP@0.75, mAP for small / medium / large objects, AR@100, and the
per-class AP (@[.5:.95] and @0.5), each class named. AP is COCO's: 101-point interpolated
precision, at most 100 detections per image. A class with no ground-truth box gets no AP
(None), as COCOeval leaves it out of the mean.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from fromzero.errors import FromzeroError


def coco_metrics(coco_gt: dict[str, Any], detections: list[dict[str, Any]]) -> dict[str, Any]:
    """COCO metrics of ``detections`` (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # Annotation ids renumbered from 1: COCOeval records a match as the matched annotation's id and
    # tests it for truth, so a ground-truth box with id 0 would never count as found.
    annotations = [{**a, "id": k + 1, "area": a.get("area", a["bbox"][2] * a["bbox"][3]),
                    "iscrowd": a.get("iscrowd", 0)} for k, a in enumerate(coco_gt["annotations"])]
    gt_dict = {"images": coco_gt["images"], "categories": coco_gt["categories"], "annotations": annotations}
    image_ids = {im["id"] for im in gt_dict["images"]}
    cat_ids = {c["id"] for c in gt_dict["categories"]}
    for d in detections:
        if d["image_id"] not in image_ids or d["category_id"] not in cat_ids:
            raise FromzeroError(f"a detection names image {d['image_id']} / category {d['category_id']}, "
                                "which the ground truth does not have")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        if detections:
            keys = ("image_id", "category_id", "bbox", "score")
            dt = gt.loadRes([{k: d[k] for k in keys} for d in detections])
        else:
            dt = COCO()
            dt.dataset = {"images": gt_dict["images"], "categories": gt_dict["categories"], "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = [float(v) for v in ev.stats]
    names = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "ar_1", "ar_10", "ar_100",
             "ar_small", "ar_medium", "ar_large"]
    out: dict[str, Any] = {k: (v if v >= 0 else None) for k, v in zip(names, s)}
    # precision: [IoU thresholds (10), recall points (101), classes, area ranges (all first),
    # maxDets (100 last)]
    precision = ev.eval["precision"]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        name = str(gt.cats[cat_id].get("name", cat_id))
        p_all, p_50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]
        per_class[name] = {"ap": float(np.mean(p_all[p_all > -1])) if (p_all > -1).any() else None,
                           "ap_50": float(np.mean(p_50[p_50 > -1])) if (p_50 > -1).any() else None}
    out["per_class"] = per_class
    out["images"], out["detections"] = len(gt_dict["images"]), len(detections)
    out["objects"] = sum(1 for a in gt_dict["annotations"] if not a.get("iscrowd", 0))
    return out


def format_detection_report(m: dict[str, Any]) -> str:
    """A few lines: the headline numbers, then AP per class."""
    def f(v: Any) -> str:
        return "  n/a" if v is None else f"{v:.3f}"

    lines = [f"mAP@[.5:.95] {f(m['map'])}   mAP@0.5 {f(m['map_50'])}   mAP@0.75 {f(m['map_75'])}   "
             f"AR@100 {f(m['ar_100'])}   ({m['images']} images, {m['objects']} objects, "
             f"{m['detections']} detections)",
             "class   AP@[.5:.95]  AP@0.5"]
    for name, v in m["per_class"].items():
        lines.append(f"{name:>5}   {f(v['ap']):>11}  {f(v['ap_50']):>6}")
    return "\n".join(lines)


COLORS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
          (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))
"""One colour per class index (cycled)."""


def render_detections(image: Any, detections: dict[str, Any], labels: list[str], scale: int = 0,
                      truth: tuple[Any, Any] | None = None) -> Any:
    """A PIL RGB image: ``image`` (uint8 (C, H, W) tensor) enlarged ``scale`` times (0: to ~256 px
    on the short side, at least 1x), each detection's box in its class colour with "label score",
    and the ``truth`` boxes (boxes, labels) as thin white outlines."""
    from PIL import Image, ImageDraw

    pixels = image.numpy()
    pil = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)).convert("RGB")
    scale = scale or max(1, 256 // min(pil.size))
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(pil)
    if truth is not None:
        for box in truth[0].tolist():
            draw.rectangle([v * scale for v in box], outline=(255, 255, 255), width=1)
    for box, score, label in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                 detections["labels"].tolist()):
        color = COLORS[int(label) % len(COLORS)]
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
        text = f"{labels[int(label)]} {score:.2f}"
        draw.text((x1 + 2, max(0, y1 - 11)), text, fill=color)
    return pil


def draw_detections(images: list[Any], detections: list[dict[str, Any]], labels: list[str], out: Any,
                    truth: list[tuple[Any, Any]] | None = None) -> None:
    """Images side by side with their detections (see :func:`render_detections`) in one PNG."""
    from pathlib import Path

    from PIL import Image

    tiles = [render_detections(im, d, labels, truth=truth[i] if truth else None)
             for i, (im, d) in enumerate(zip(images, detections))]
    if not tiles:
        return
    width = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
    sheet = Image.new("RGB", (width, max(t.height for t in tiles)))
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + 4
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
