"""Image folders for classification: transform / augmentation presets and a validating loader.

torchvision owns the job: ``ImageFolder`` reads ``root/<class>/<image>``, ``transforms.v2`` does
the preprocessing and augmentation. This module adds what a fine-tuning user needs around them:

- the classic preprocessing (resize the short side, random crop for training / center crop for
  evaluation, to a float tensor in [0, 1], normalise with ImageNet's mean and std);
- augmentation presets by name: ``none``, ``flip``, ``trivialaugment``, ``randaugment``;
- every image converted to the mode the model reads ("RGB", or "L" for 1-channel models),
  whatever it was on disk (L, P, RGBA, CMYK, 16-bit, ...); transparency is composited over white;
- a loader that checks the folder before training starts: an empty class folder, or an image
  that cannot be decoded (corrupt, truncated), is a :class:`FromzeroError` listing the files
  (``bad_images="skip"`` instead warns with the list and leaves those files out).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torchvision.datasets import ImageFolder

from fromzero.errors import FromzeroError, first_line

# ImageNet statistics (RGB), the normalisation every torchvision pretrained model expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUGMENTS = ("none", "flip", "affine", "trivialaugment", "randaugment")
# The augmentations that in-memory image tensors (the built-in mnist) support, applied per batch.
TENSOR_AUGMENTS = ("none", "flip", "affine")
# "affine": the classic MNIST augmentation -- rotate up to +-10 degrees, shift up to 10% of the
# side, scale by 0.9-1.1 (small enough that a 6 stays a 6 and a 1 stays inside the frame).
AFFINE_DEGREES, AFFINE_TRANSLATE, AFFINE_SCALE = 10.0, 0.1, (0.9, 1.1)
BAD_IMAGES = ("fail", "skip")
# torchvision's ImageFolder extensions (lower case); other files in a class folder are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# How many files an error message lists before "... and N more".
_LIST_LIMIT = 20


def normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for ``channels``: ImageNet's for RGB; their averages for grayscale (the gray
    image a pretrained RGB network sees through :func:`fromzero.models.cnn.adapt_input_channels`)."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if channels == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    raise FromzeroError(f"images have 1 (L) or 3 (RGB) channels, got channels={channels}")


def default_resize(image_size: int) -> int:
    """The classic short-side resize before a crop: 256 for 224 (ratio 0.875)."""
    return round(image_size * 256 / 224)


class ToMode:
    """Convert a PIL image to ``mode`` ("RGB" or "L"); transparency is composited over white.

    A plain ``convert("RGB")`` of an RGBA image keeps whatever colour hides under transparent
    pixels (often black), which is not what the image looks like; white is what viewers show.
    A class, not a lambda, so DataLoader workers can pickle it.
    """

    def __init__(self, mode: str) -> None:
        if mode not in ("RGB", "L"):
            raise FromzeroError(f"image mode must be RGB or L, got {mode!r}")
        self.mode = mode

    def __call__(self, img: Any) -> Any:
        from PIL import Image

        if not isinstance(img, Image.Image) or img.mode == self.mode:
            return img
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            # 16/32-bit grayscale: PIL's convert("L") clips to 255 instead of scaling.
            import numpy as np

            arr = np.asarray(img, dtype=np.float64)
            hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        return img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


def augmentation(name: str) -> list[Any]:
    """The v2 transforms of an augmentation preset (applied to the cropped PIL image).

    none: nothing. flip: random horizontal flip. affine: a small random rotation, shift and
    scale, no flip (see AFFINE_*; the classic augmentation for digits). trivialaugment /
    randaugment: the flip plus TrivialAugmentWide / RandAugment (torchvision's defaults: no
    hyperparameters to tune). Flips are wrong for data whose meaning changes when mirrored
    (digits, text): use none or affine there.
    """
    from torchvision.transforms import v2

    if name not in AUGMENTS:
        raise FromzeroError(f"augment {name!r} is not supported (supported: {', '.join(AUGMENTS)})")
    if name == "affine":
        return [v2.RandomAffine(degrees=AFFINE_DEGREES, translate=(AFFINE_TRANSLATE, AFFINE_TRANSLATE),
                                scale=AFFINE_SCALE)]
    extra = {"trivialaugment": [v2.TrivialAugmentWide()], "randaugment": [v2.RandAugment()]}
    return [] if name == "none" else [v2.RandomHorizontalFlip(), *extra.get(name, [])]


def augment_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    """The ``name`` augmentation applied to a batch ``x`` (B, C, H, W) of floats in [0, 1], each
    image drawn its own parameters from the global torch RNG (which checkpoints save, so a resumed
    run draws the same ones). flip: half the images mirrored. affine: as :func:`augmentation`'s,
    one ``grid_sample`` for the whole batch, zeros (black) coming in at the borders."""
    import math

    import torch.nn.functional as F

    if name not in TENSOR_AUGMENTS:
        raise FromzeroError(f"augment {name!r} works on image folders; in-memory images support "
                            f"{', '.join(TENSOR_AUGMENTS)}")
    if name == "none":
        return x
    n = x.size(0)
    if name == "flip":
        flip = torch.rand(n) < 0.5
        return torch.where(flip.view(n, 1, 1, 1).to(x.device), x.flip(-1), x)
    angle = (torch.rand(n) * 2 - 1) * math.radians(AFFINE_DEGREES)
    scale = AFFINE_SCALE[0] + torch.rand(n) * (AFFINE_SCALE[1] - AFFINE_SCALE[0])
    shift = (torch.rand(n, 2) * 2 - 1) * AFFINE_TRANSLATE * 2  # grid coordinates span [-1, 1]: 2 = the side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # output -> input: the inverse scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class TensorImageBatch:
    """A DataLoader ``collate_fn`` for images held in memory as uint8 tensors (the built-in mnist).

    [(uint8 (C, H, W), label), ...] -> (float (B, channels, image_size, image_size), labels): scaled
    to [0, 1], augmented (training only, per batch: :func:`augment_batch`), resized when
    ``image_size`` differs (bilinear, antialiased), grey repeated to 3 channels for an RGB model,
    normalised. The same steps as :func:`build_transforms` on the same pixels, minus the crop:
    in-memory images are taken whole. A class, so DataLoader workers can pickle it.
    """

    def __init__(self, train: bool, image_size: int, channels: int = 1, augment: str = "none",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        if augment not in TENSOR_AUGMENTS:
            augment_batch(torch.zeros(1, 1, 1, 1), augment)  # raises the error
        if (mean is None) != (std is None) or (mean is not None and (len(mean) != channels or len(std) != channels
                                                                     or min(std) <= 0)):
            raise FromzeroError(f"mean/std need {channels} values each (std > 0), got {mean} / {std}")
        self.train, self.image_size, self.channels, self.augment = train, image_size, channels, augment
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, items: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.nn.functional as F

        x = torch.stack([item[0] for item in items]).float().div_(255)
        y = torch.tensor([int(item[1]) for item in items], dtype=torch.long)
        if self.train:
            x = augment_batch(x, self.augment)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        if x.size(1) != self.channels:
            if x.size(1) != 1 or self.channels != 3:
                raise FromzeroError(f"images have {x.size(1)} channels; the model takes {self.channels}")
            x = x.expand(-1, 3, -1, -1)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x.contiguous(), y


def build_transforms(train: bool, image_size: int = 224, resize_size: int | None = None,
                     augment: str = "none", channels: int = 3, normalize: bool = True,
                     mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> Callable[[Any], torch.Tensor]:
    """PIL image (any mode) -> float tensor (channels, image_size, image_size).

    Train: to mode, resize short side to ``resize_size``, random crop ``image_size``, the
    ``augment`` preset, to tensor in [0, 1], normalise. Eval: the same with a center crop and no
    augmentation. ``resize_size`` defaults to ``image_size * 256 / 224``; give ``resize_size =
    image_size`` to keep the whole image (small images such as 8x8 digits are upscaled).
    ``normalize`` uses ImageNet's mean/std (averaged for 1 channel) unless ``mean``/``std`` given.
    """
    from torchvision.transforms import v2

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise FromzeroError(f"image_size must be a positive integer, got {image_size!r}")
    resize = default_resize(image_size) if resize_size in (None, 0) else resize_size
    if isinstance(resize, bool) or not isinstance(resize, int) or resize < image_size:
        raise FromzeroError(f"resize_size ({resize_size!r}) must be an integer >= image_size ({image_size})")
    steps: list[Any] = [ToMode("RGB" if channels == 3 else "L")]
    normalization(channels)  # validates channels
    # antialias: downscaling without it aliases (moire on fine patterns)
    steps.append(v2.Resize(resize, antialias=True))
    if train:
        steps.append(v2.RandomCrop(image_size))
        steps.extend(augmentation(augment))
    else:
        steps.append(v2.CenterCrop(image_size))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        dm, ds = normalization(channels)
        m, s = tuple(mean or dm), tuple(std or ds)
        if len(m) != channels or len(s) != channels or min(s) <= 0:
            raise FromzeroError(f"mean/std need {channels} values each (std > 0), got {m} / {s}")
        steps.append(v2.Normalize(mean=list(m), std=list(s)))
    return v2.Compose(steps)


# ---------------------------------------------------------------------------------------------
# The validating loader


class ImageLoader:
    """ImageFolder's loader: open a file and convert it to ``mode`` (torchvision's default
    loader always converts to RGB, which would give a 1-channel model three channels)."""

    def __init__(self, mode: str = "RGB") -> None:
        self.to_mode = ToMode(mode)

    def __call__(self, path: str) -> Any:
        from PIL import Image

        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
            return self.to_mode(img)


def _is_image(path: str | Path) -> bool:
    """An image by its extension; hidden files (macOS ``._x.png`` forks) are not images."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(path).startswith(".")


def _listing(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:_LIST_LIMIT])
    more = len(paths) - _LIST_LIMIT
    return shown + (f" ... and {more} more" if more > 0 else "")


def _check_image(path: str) -> str | None:
    """None if the file decodes completely; else the reason (one line)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # a full decode: verify() alone misses truncated pixel data
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return first_line(e)
    return None


def scan_image_folder(root: str | Path, check_images: bool = True, workers: int = 8) -> dict[str, Any]:
    """Look at ``root/<class>/<image>`` without loading a dataset.

    Returns ``{"classes": [...sorted folder names], "files": {class: [paths]}, "empty": [class
    folders with no image], "bad": {path: reason}}``. ``check_images`` decodes every image once
    (in a thread pool: PIL releases the GIL while decoding) to find corrupt or truncated ones.
    """
    root = Path(root)
    if not root.is_dir():
        raise FromzeroError(f"image folder not found: {root}")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FromzeroError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    files: dict[str, list[str]] = {}
    for c in classes:
        found = []
        for dirpath, _, names in os.walk(root / c, followlinks=True):
            found += [os.path.join(dirpath, n) for n in sorted(names) if _is_image(n)]
        files[c] = sorted(found)
    empty = [str(root / c) for c in classes if not files[c]]
    bad: dict[str, str] = {}
    if check_images:
        every = [p for c in classes for p in files[c]]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for path, reason in zip(every, pool.map(_check_image, every)):
                if reason is not None:
                    bad[path] = reason
    return {"classes": classes, "files": files, "empty": empty, "bad": bad}


def load_image_folder(root: str | Path, transform: Callable[[Any], Any] | None = None, mode: str = "RGB",
                      bad_images: str = "fail", classes: Sequence[str] | None = None,
                      check_images: bool = True) -> Any:
    """A checked ``torchvision.datasets.ImageFolder`` of ``root/<class>/<image>``.

    mode: what every image becomes ("RGB", or "L" for 1-channel models).
    bad_images: "fail" (default) raises FromzeroError listing corrupt / truncated images;
        "skip" warns with the list and leaves them out.
    classes: the class names another split uses (e.g. train's): this split must have exactly
        these folders, so class ids mean the same in every split.
    An empty class folder is always an error (a class with no examples cannot be learned or
    scored), also when it only became empty by skipping bad images.
    """
    if bad_images not in BAD_IMAGES:
        raise FromzeroError(f"bad_images must be one of {', '.join(BAD_IMAGES)}, got {bad_images!r}")
    root = Path(root)
    scan = scan_image_folder(root, check_images=check_images)
    if classes is not None and list(classes) != scan["classes"]:
        missing = sorted(set(classes) - set(scan["classes"]))
        extra = sorted(set(scan["classes"]) - set(classes))
        raise FromzeroError(
            f"{root} has other class folders than the training split: missing {missing}, extra {extra}"
        )
    if scan["empty"]:
        raise FromzeroError(f"empty class folder(s) in {root} (no images): {_listing(scan['empty'])}")
    bad = scan["bad"]
    if bad:
        listed = _listing([f"{p} ({r})" for p, r in bad.items()])
        if bad_images == "fail":
            raise FromzeroError(f"{len(bad)} unreadable image(s) in {root} (corrupt or truncated; pass "
                                f"bad_images=skip to leave them out): {listed}")
        warnings.warn(f"skipping {len(bad)} unreadable image(s) in {root}: {listed}", stacklevel=2)
        emptied = [str(root / c) for c in scan["classes"] if all(p in bad for p in scan["files"][c])]
        if emptied:
            raise FromzeroError(f"no readable images left in class folder(s) after skipping: {_listing(emptied)}")
    bad_set = set(bad)

    def valid(path: str) -> bool:
        return _is_image(path) and path not in bad_set

    return CheckedImageFolder(str(root), scan["classes"], transform=transform, loader=ImageLoader(mode),
                              is_valid_file=valid)


class CheckedImageFolder(ImageFolder):
    """ImageFolder whose classes are the ones :func:`scan_image_folder` found (hidden folders
    such as ``.ipynb_checkpoints`` are not classes). Module-level so DataLoader workers can pickle it."""

    def __init__(self, root: str, classes: Sequence[str], **kwargs: Any) -> None:
        self._fixed_classes = list(classes)
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self._fixed_classes), {c: i for i, c in enumerate(self._fixed_classes)}
