"""Split an ImageFolder (one subfolder per class) into the train/ val/ test/ layout that
`fromzero finetune --task image-classification` reads (docs/own-data.md, example 4).

    python examples/split_image_folder.py examples/shapes data/shapes --val 0.15 --test 0.15

Copies SRC/<class>/<image> to DST/{train,val,test}/<class>/<image>: per class, shuffled with
--seed, the first --val and --test shares of its images go to val and test (at least one each),
the rest to train. Files that are not images (by extension) are left out. DST must not exist
unless --force.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="folder with one subfolder of images per class")
    parser.add_argument("dst", help="output folder (gets train/, val/, test/)")
    parser.add_argument("--val", type=float, default=0.15, help="share of each class for validation")
    parser.add_argument("--test", type=float, default=0.15, help="share of each class for test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing DST")
    args = parser.parse_args()
    src, dst = Path(args.src), Path(args.dst)
    classes = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        sys.exit(f"error: {src} needs at least 2 class subfolders, found {len(classes)}")
    if dst.exists():
        if not args.force:
            sys.exit(f"error: {dst} exists (add --force to replace it)")
        shutil.rmtree(dst)
    rng = random.Random(args.seed)
    counts = {"train": 0, "val": 0, "test": 0}
    for folder in classes:
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
        if len(images) < 3:
            sys.exit(f"error: {folder} has {len(images)} images; each class needs at least 3 (train, val, test)")
        rng.shuffle(images)
        n_val = max(1, round(len(images) * args.val))
        n_test = max(1, round(len(images) * args.test))
        parts = {"val": images[:n_val], "test": images[n_val:n_val + n_test], "train": images[n_val + n_test:]}
        for split, files in parts.items():
            (dst / split / folder.name).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, dst / split / folder.name / f.name)
            counts[split] += len(files)
    print(f"wrote {dst}: {len(classes)} classes; train/val/test {counts['train']}/{counts['val']}/{counts['test']} images")


if __name__ == "__main__":
    main()
