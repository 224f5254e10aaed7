"""Object-detection data: MNIST scenes built reproducibly, and a validating COCO reader.

**The format** is COCO's object-detection JSON, so a user's own data goes through the same
reader. A data folder holds one annotation file per split, its images beside it::

    DATA/train/annotations.json   DATA/train/images/000000.png ...
    DATA/val/annotations.json     ...
    DATA/test/annotations.json    ...

Each ``annotations.json`` has ``images`` (``id``, ``file_name`` relative to the JSON's folder,
``width``, ``height``), ``annotations`` (``id``, ``image_id``, ``category_id``, ``bbox`` =
``[x, y, w, h]`` in pixels from the top-left corner, ``area``, ``iscrowd``) and ``categories``
(``id``, ``name``). :func:`read_coco` refuses, with one line naming the file and the image or
annotation id: an image that is missing or corrupt (or not the size it claims), a box outside its
image or with ``w``/``h`` <= 0, an annotation file with no annotations, an unknown category or
image id, duplicate image or annotation ids.

**The built-in ``mnist-detection``** (:func:`make_scenes`, :func:`write_mnist_detection`): 64 x 64
canvases with 1-5 real MNIST digits each, every digit rescaled (its 28 x 28 cell to 18-34 px)
and placed at a random position; a placement whose box overlaps an earlier one by IoU > 0.3 is
drawn again (rejection sampling). Digits are composited with ``max()`` (ink over ink stays ink),
and each box is the tight box around that digit's own ink (pixels >= 64 of 255) -- not its
28 x 28 cell. Train scenes use train digits, val scenes val digits, test scenes test digits, so
no digit is shared between splits. 64 x 64 rather than 128: at stride 4 the detector's grid is
16 x 16, which still separates digits 14+ px apart, at a quarter of the CPU time per image.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fromzero.errors import FromzeroError

NAME = "mnist-detection"
SPLITS = ("train", "val", "test")
ANNOTATIONS = "annotations.json"
CANVAS = 64
"""Side of the built-in scenes."""
INK = 64
"""A pixel is ink when >= this (of 255): what the tight boxes enclose."""
MAX_IOU = 0.3
"""Largest IoU between two digits' boxes in one scene."""
SCALE_RANGE = (18, 34)
"""Side (px) a digit's 28 x 28 cell is resized to, uniformly drawn."""
DIGITS_PER_SCENE = (1, 5)
SCENES = {"train": 10_000, "val": 1_000, "test": 1_000}
"""Scenes per split of the built-in data."""
SEED = 0
VERSION = 2
"""Bumped whenever the generator's output changes (the cached folder's name carries it); 2: annotation
ids from 1 (COCO's convention), the scenes unchanged."""


# ---------------------------------------------------------------------------------------------
# Scenes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a`` (N, 4) with ``b`` (M, 4), both [x, y, w, h] -> (N, M)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax2, ay2, bx2, by2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _resized(digit: torch.Tensor, side: int) -> np.ndarray:
    """A (28, 28) uint8 digit resized to (side, side) uint8 (bilinear with antialiasing)."""
    x = digit.float()[None, None]
    y = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False,
                                        antialias=True)
    return y[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def ink_box(patch: np.ndarray) -> tuple[int, int, int, int] | None:
    """[x, y, w, h] of the pixels >= INK in ``patch`` (None when it has none)."""
    rows, cols = np.nonzero(patch >= INK)
    if rows.size == 0:
        return None
    x, y = int(cols.min()), int(rows.min())
    return x, y, int(cols.max()) - x + 1, int(rows.max()) - y + 1


@dataclass
class Scene:
    """One generated image and its objects (boxes [x, y, w, h] in pixels, digit labels)."""

    image: np.ndarray  # uint8 (CANVAS, CANVAS), 255 = ink
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    digits: list[int] = field(default_factory=list)  # index of each placed digit in its MNIST split


def make_scenes(images: torch.Tensor, labels: torch.Tensor, count: int, seed: int, canvas: int = CANVAS,
                max_iou: float = MAX_IOU, scale_range: tuple[int, int] = SCALE_RANGE,
                digits_per_scene: tuple[int, int] = DIGITS_PER_SCENE, tries: int = 50) -> list[Scene]:
    """``count`` scenes from MNIST ``images`` (N, 1, 28, 28) uint8 / ``labels``; deterministic in ``seed``.

    Each scene draws its number of digits, then per digit: which digit, its size, its position
    (the resized cell lies inside the canvas); a position whose ink box has IoU > ``max_iou``
    with a box already placed is drawn again (up to ``tries`` times, then that digit is left
    out; a scene always keeps its first digit)."""
    rng = np.random.default_rng(seed)
    low, high = scale_range
    if not (0 < low <= high <= canvas):
        raise FromzeroError(f"scale_range {scale_range} must satisfy 0 < low <= high <= canvas ({canvas})")
    scenes = []
    for _ in range(count):
        scene = Scene(np.zeros((canvas, canvas), dtype=np.uint8))
        wanted = int(rng.integers(digits_per_scene[0], digits_per_scene[1] + 1))
        for _ in range(wanted):
            index = int(rng.integers(len(labels)))
            side = int(rng.integers(low, high + 1))
            patch = _resized(images[index, 0], side)
            local = ink_box(patch)
            if local is None:  # an empty digit (none in MNIST): nothing to detect
                continue
            for _ in range(tries):
                x0, y0 = int(rng.integers(0, canvas - side + 1)), int(rng.integers(0, canvas - side + 1))
                box = (x0 + local[0], y0 + local[1], local[2], local[3])
                if not scene.boxes or box_iou(np.array([box]), np.array(scene.boxes)).max() <= max_iou:
                    break
            else:
                continue
            region = scene.image[y0:y0 + side, x0:x0 + side]
            np.maximum(region, patch, out=region)  # composite: ink over ink stays ink
            scene.boxes.append(box)
            scene.labels.append(int(labels[index]))
            scene.digits.append(index)
        scenes.append(scene)
    return scenes


def scenes_to_coco(scenes: list[Scene], classes: tuple[str, ...], first_image_id: int = 0) -> dict[str, Any]:
    """The COCO annotation dict of ``scenes`` (images named ``images/NNNNNN.png``; category id = class
    index; annotation ids from 1, as COCO's own files: some tools take id 0 for "no match")."""
    images, annotations = [], []
    for i, scene in enumerate(scenes):
        image_id = first_image_id + i
        h, w = scene.image.shape
        images.append({"id": image_id, "file_name": f"images/{i:06d}.png", "width": int(w), "height": int(h)})
        for box, label in zip(scene.boxes, scene.labels):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [int(v) for v in box], "area": int(box[2] * box[3]), "iscrowd": 0})
    return {"info": {"description": "fromzero scenes of MNIST digits"}, "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": name} for i, name in enumerate(classes)]}


def write_coco_split(folder: Path, scenes: list[Scene], classes: tuple[str, ...]) -> None:
    """Write ``folder/annotations.json`` and ``folder/images/*.png`` (folder is new or empty)."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    coco = scenes_to_coco(scenes, classes)
    for scene, entry in zip(scenes, coco["images"]):
        Image.fromarray(scene.image).save(folder / entry["file_name"])
    (folder / ANNOTATIONS).write_text(json.dumps(coco) + "\n")


def write_mnist_detection(out: Path, force: bool = False, sizes: dict[str, int] | None = None,
                          seed: int = SEED) -> Path:
    """Build the ``mnist-detection`` scenes from the built-in MNIST into ``out`` (atomically: a
    temporary folder renamed into place; an existing ``out`` is replaced only with ``force``)."""
    from fromzero.data.datasets import staged_folder
    from fromzero.data.mnist import CLASSES, load_mnist

    out = Path(out)
    if out.exists() and not force:  # before loading MNIST
        raise FromzeroError(f"{out} already exists: choose another folder or pass --force to replace it")
    sizes = dict(SCENES if sizes is None else sizes)
    mnist = load_mnist()
    with staged_folder(out, force) as tmp:
        counts = {}
        for k, split in enumerate(SPLITS):
            scenes = make_scenes(mnist[split].images, mnist[split].labels, sizes[split], seed=seed * 1000 + k)
            write_coco_split(tmp / split, scenes, CLASSES)
            counts[split] = {"images": len(scenes), "objects": sum(len(s.boxes) for s in scenes)}
        meta = {"source": NAME, "version": VERSION, "seed": seed, "canvas": CANVAS, "max_iou": MAX_IOU,
                "scale_range": list(SCALE_RANGE), "digits_per_scene": list(DIGITS_PER_SCENE), "ink": INK,
                "classes": list(CLASSES), "splits": counts,
                "note": "white ink on black; boxes are [x, y, w, h], tight around each digit's ink"}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def builtin_detection_data(source: str) -> Path:
    """``mnist-detection`` -> the scenes in $FROMZERO_HOME (generated once); else ``source`` as a path."""
    if source != NAME:
        return Path(source).expanduser()
    from fromzero.data.corpora import fromzero_home

    target = fromzero_home() / "datasets" / f"{NAME}-v{VERSION}"
    if not (target / "meta.json").is_file():
        write_mnist_detection(target, force=True)
    return target


def copy_builtin_detection(out: Path, force: bool = False) -> dict[str, Any]:
    """Copy the built-in ``mnist-detection`` (generated first if needed) to ``out``; its meta.json.
    Copied into a temporary folder beside ``out`` and renamed into place."""
    from fromzero.data.datasets import move_into_place
    from fromzero.files import temp_dir_beside

    out = Path(out)
    if out.exists() and not force:
        raise FromzeroError(f"{out} already exists: choose another folder or pass --force to replace it")
    source = builtin_detection_data(NAME)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(out, f".{out.name}.tmp-")
        try:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        raise FromzeroError(f"cannot write {out}: {e.strerror or e}") from None
    return json.loads((out / "meta.json").read_text())


# ---------------------------------------------------------------------------------------------
# Reading COCO


@dataclass
class DetectionSplit:
    """One split of a COCO detection dataset, in memory.

    ``images[i]`` is uint8 (C, H, W); ``boxes[i]`` float32 (n, 4) as [x1, y1, x2, y2] pixels;
    ``labels[i]`` int64 (n,) class *indices* (0..K-1, categories sorted by id); ``coco`` is the
    annotation dict as read (the ground truth COCOeval scores against)."""

    path: Path
    image_ids: list[int]
    images: list[torch.Tensor]
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    coco: dict[str, Any]

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_objects(self) -> int:
        return sum(int(b.shape[0]) for b in self.boxes)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FromzeroError(f"{path} not found (a COCO annotation file is needed for each split)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FromzeroError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise FromzeroError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise FromzeroError(f"{path}: a COCO annotation file is a JSON object with images, annotations, "
                            "categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise FromzeroError(f"{path}: {key!r} is missing or not a list")
    return data


def _int(value: Any, what: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FromzeroError(f"{path}: {what} must be an integer, got {value!r}")
    return value


def check_categories(data: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """The categories sorted by id (ids unique integers, names strings)."""
    cats, seen = [], set()
    for c in data["categories"]:
        if not isinstance(c, dict):
            raise FromzeroError(f"{path}: a category is not an object: {c!r}")
        cid = _int(c.get("id"), "category id", path)
        if cid in seen:
            raise FromzeroError(f"{path}: duplicate category id {cid}")
        seen.add(cid)
        cats.append({"id": cid, "name": str(c.get("name", cid))})
    if not cats:
        raise FromzeroError(f"{path}: no categories")
    return sorted(cats, key=lambda c: c["id"])


def read_coco(path: str | Path, channels: int = 1, categories: list[dict[str, Any]] | None = None,
              load_images: bool = True) -> DetectionSplit:
    """Read and check one COCO annotation file and its images (see the module docstring).

    ``channels``: images are converted to 1 (L) or 3 (RGB) channels. ``categories``: those of
    the training split, which val/test must use (same ids); None = this file's own."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    data = _load_json(path)
    own = check_categories(data, path)
    cats = categories if categories is not None else own
    index = {c["id"]: i for i, c in enumerate(cats)}
    images_by_id: dict[int, dict[str, Any]] = {}
    for entry in data["images"]:
        if not isinstance(entry, dict):
            raise FromzeroError(f"{path}: an image entry is not an object: {entry!r}")
        image_id = _int(entry.get("id"), "image id", path)
        if image_id in images_by_id:
            raise FromzeroError(f"{path}: duplicate image id {image_id}")
        if not isinstance(entry.get("file_name"), str):
            raise FromzeroError(f"{path}: image {image_id} has no file_name")
        for key in ("width", "height"):
            if _int(entry.get(key), f"image {image_id}'s {key}", path) <= 0:
                raise FromzeroError(f"{path}: image {image_id} has {key} {entry[key]} (must be > 0)")
        images_by_id[image_id] = entry
    if not data["annotations"]:
        raise FromzeroError(f"{path} holds no annotations: a detector needs boxes to learn from and to be "
                            "scored on")
    per_image: dict[int, list[tuple[list[float], int]]] = {i: [] for i in images_by_id}
    ann_ids: set[int] = set()
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            raise FromzeroError(f"{path}: an annotation is not an object: {ann!r}")
        aid = _int(ann.get("id"), "annotation id", path)
        if aid in ann_ids:
            raise FromzeroError(f"{path}: duplicate annotation id {aid}")
        ann_ids.add(aid)
        image_id = ann.get("image_id")
        if image_id not in images_by_id:
            raise FromzeroError(f"{path}: annotation {aid} refers to image id {image_id!r}, which is not in "
                                "images")
        cat = ann.get("category_id")
        if cat not in index:
            known = ", ".join(str(c["id"]) for c in cats)
            raise FromzeroError(f"{path}: annotation {aid} has unknown category id {cat!r} "
                                f"(categories: {known})")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise FromzeroError(f"{path}: annotation {aid} has bbox {bbox!r}, expected [x, y, w, h] numbers")
        x, y, w, h = (float(v) for v in bbox)
        if not (w > 0 and h > 0):
            raise FromzeroError(f"{path}: annotation {aid} (image {image_id}) has a box of width {w:g} and "
                                f"height {h:g}: both must be > 0")
        img = images_by_id[image_id]
        tol = 1e-3  # rounding in other tools' writers
        if x < -tol or y < -tol or x + w > img["width"] + tol or y + h > img["height"] + tol:
            raise FromzeroError(f"{path}: annotation {aid} has box [{x:g}, {y:g}, {w:g}, {h:g}] outside "
                                f"image {image_id} ({img['width']} x {img['height']})")
        if not ann.get("iscrowd", 0):  # crowd regions are ignored in training; COCOeval ignores them too
            per_image[image_id].append(([x, y, x + w, y + h], index[cat]))
    ids = list(images_by_id)
    images, boxes, labels = [], [], []
    mode = "RGB" if channels == 3 else "L"
    for image_id in ids:
        entry = images_by_id[image_id]
        objects = per_image[image_id]
        boxes.append(torch.tensor([b for b, _ in objects], dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor([c for _, c in objects], dtype=torch.int64))
        if not load_images:
            continue
        file = path.parent / entry["file_name"]
        try:
            with Image.open(file) as im:
                im.load()
                pixels = np.asarray(im.convert(mode))
        except FileNotFoundError:
            raise FromzeroError(f"{path}: image {image_id}: {file} not found") from None
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise FromzeroError(f"{path}: image {image_id}: {file} is not a readable image ({e})") from None
        if pixels.shape[:2] != (entry["height"], entry["width"]):
            raise FromzeroError(f"{path}: image {image_id}: {file} is {pixels.shape[1]} x {pixels.shape[0]}, "
                                f"the annotations say {entry['width']} x {entry['height']}")
        t = torch.from_numpy(pixels.copy())
        images.append(t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous())
    coco = {"images": [images_by_id[i] for i in ids], "annotations": data["annotations"], "categories": cats}
    return DetectionSplit(path, ids, images, boxes, labels, coco)


def read_coco_folder(data_dir: Path, channels: int = 1, splits: tuple[str, ...] = SPLITS
                     ) -> tuple[dict[str, DetectionSplit], list[dict[str, Any]]]:
    """The ``splits`` of a COCO data folder (``DATA/<split>/annotations.json``), all with the
    training split's categories (val/test may not add any), and those categories."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FromzeroError(f"data folder {data_dir} not found (give mnist-detection or a folder with "
                            f"train/, val/ and test/ each holding {ANNOTATIONS})")
    first = data_dir / "train" / ANNOTATIONS
    cats = check_categories(_load_json(first), first) if first.is_file() else None
    out = {}
    for split in splits:
        out[split] = read_coco(data_dir / split / ANNOTATIONS, channels, cats)
        cats = out[split].coco["categories"]
    return out, list(cats or [])
