"""Draw the sample images of docs/own-data.md, example 4: an ImageFolder of small shapes.

    python examples/make_shapes.py            # (re)writes examples/shapes/<class>/*.png|*.jpg

Three classes (circle, square, triangle), 60 images each, 32x32 pixels: a shape of random size,
position and colour on a random background colour, every fifth image saved as JPEG (an
ImageFolder may mix formats). Deterministic: the same files every time (seed 0).
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
SIZE = 32


def draw(shape: str, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(0, 110) for _ in range(3))
    colour = tuple(rng.randint(140, 255) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    pen = ImageDraw.Draw(image)
    side = rng.randint(12, 24)
    x, y = rng.randint(2, SIZE - side - 2), rng.randint(2, SIZE - side - 2)
    if shape == "circle":
        pen.ellipse((x, y, x + side, y + side), fill=colour)
    elif shape == "square":
        pen.rectangle((x, y, x + side, y + side), fill=colour)
    else:
        pen.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=colour)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "shapes"), help="output folder")
    parser.add_argument("--per-class", type=int, default=60, help="images per class")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    rng = random.Random(0)
    for shape in CLASSES:
        (out / shape).mkdir(parents=True)
        for i in range(args.per_class):
            image = draw(shape, rng)
            if i % 5 == 4:
                image.save(out / shape / f"{shape}-{i:03d}.jpg", quality=90)
            else:
                image.save(out / shape / f"{shape}-{i:03d}.png", optimize=True)
    print(f"wrote {out}: {len(CLASSES)} classes x {args.per_class} images")


if __name__ == "__main__":
    main()
