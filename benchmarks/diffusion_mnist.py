"""Image generation on MNIST, measured: conditioning accuracy and a classifier-feature FID.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diffusion_mnist.py \\
        --checkpoint runs/mnist-diffusion/checkpoints/best --classifier runs/mnist-cnn/checkpoints/best \\
        [--per-digit 1000] [--steps 20] [--guidance 3.0] [--out benchmarks/results/diffusion_mnist.json]

What it measures, with an MNIST classifier (a fromzero image-classification checkpoint):

1. Conditioning accuracy: ``--per-digit`` samples per digit drawn by class label, and as many by
   text prompt (half with phrasings used in training, half with phrasings held out of it:
   :data:`fromzero.data.digit_prompts.HELD_OUT_TEMPLATES`); the share the classifier labels
   as the asked-for digit. Prompts that ask for a stroke ("a thin 1") are also checked against
   the measured ink count: above (thick) or below (thin) the median of that digit's training
   images (chance: 50%).
2. FID between the label-conditioned samples (10 x per-digit) and the 10,000 test images, on the
   classifier's penultimate features (a domain feature extractor, not Inception: comparable
   only between models scored with the same classifier).
3. The same for real images (the ceiling: as many val images as label-conditioned samples,
   against test: FID is biased upwards for small sets, so both sides get the same n) and for an
   untrained model of the same architecture (the floor; ``--floor-samples`` label-conditioned
   samples, fewer because they cost as much as real ones and only bound the scale).

Sampling is DDIM (eta 0) with classifier-free guidance. Samples are cached in ``--work`` (per
part, keyed by the settings), so ``--parts`` can run in separate processes and a last run with
all parts only scores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fromzero.data.digit_prompts import (  # noqa: E402
    HELD_OUT_TEMPLATES, STYLES, TEMPLATES, ink_counts, render)
from fromzero.data.mnist import load_mnist  # noqa: E402
from fromzero.evaluation.fid import ClassifierFeatures, fid_from_features  # noqa: E402

PARTS = ("labels", "text", "floor")


def prompt_plan(per_digit: int) -> list[tuple[int, str, str, bool]]:
    """(digit, prompt, style, held_out) for every text sample: per digit, half the samples cycle
    through the training phrasings and half through the held-out ones (all styles)."""
    plan = []
    for d in range(10):
        for held_out, table, count in ((False, TEMPLATES, per_digit - per_digit // 2),
                                       (True, HELD_OUT_TEMPLATES, per_digit // 2)):
            by_style = [[(render(t, d), style) for t in table[style]] for style in STYLES]
            # interleaved (plain, thick, thin, plain, ...) so that a few samples already cover every style
            options = [o for i in range(max(map(len, by_style))) for group in by_style for o in group[i:i + 1]]
            plan += [(d, *options[i % len(options)], held_out) for i in range(count)]
    return plan


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def draw(model: Any, labels: torch.Tensor | None, text: torch.Tensor | None, args: argparse.Namespace,
         what: str) -> torch.Tensor:
    """uint8 samples (N, 1, 28, 28), in batches, with a progress line on stderr."""
    from fromzero.models.diffusion import sample

    n = len(labels) if labels is not None else len(text)
    start = time.perf_counter()

    def report(done: int) -> None:
        rate = done / max(time.perf_counter() - start, 1e-9)
        print(f"\r{what}: {done}/{n} samples ({rate:.1f}/s)", end="", file=sys.stderr, flush=True)

    import contextlib

    autocast = torch.autocast("cpu", torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()
    with autocast:  # the U-Net's forward in bf16; the sampler's arithmetic stays float32
        images = sample(model, n, labels=labels, text=text, steps=args.steps, guidance=args.guidance,
                        generator=torch.Generator().manual_seed(args.seed), batch_size=args.batch,
                        on_step=report)
    print(file=sys.stderr)
    return to_uint8(images)


def cached(work: Path, key: dict[str, Any], make: Any) -> tuple[torch.Tensor, float]:
    """The samples of ``key`` from the work folder, or made now (and the seconds it took then)."""
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = work / f"{key['part']}-{digest}.safetensors"
    if path.is_file():
        data = load_file(str(path))
        return data["images"], float(data["seconds"])
    start = time.perf_counter()
    images = make()
    seconds = time.perf_counter() - start
    work.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"images": images.contiguous(), "seconds": torch.tensor(seconds)}, str(tmp))
    tmp.replace(path)
    return images, seconds


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return float((logits.argmax(1) == target).float().mean())


def share(hits: torch.Tensor) -> float | None:
    """The share of True in ``hits`` (None when empty)."""
    return float(hits.float().mean()) if hits.numel() else None


def per_digit(logits: torch.Tensor, target: torch.Tensor) -> list[float]:
    hit = logits.argmax(1) == target
    return [round(float(hit[target == d].float().mean()), 4) for d in range(10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="image-generation checkpoint (EMA weights)")
    parser.add_argument("--classifier", required=True, help="MNIST image-classification checkpoint")
    parser.add_argument("--per-digit", type=int, default=1000, help="samples per digit, by label and by text")
    parser.add_argument("--floor-samples", type=int, default=2000, help="samples of the untrained model")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--batch", type=int, default=250, help="images per sampling batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the U-Net's forward passes while sampling (bfloat16: CPU autocast, ~2x faster "
                             "where the CPU has native bf16)")
    parser.add_argument("--parts", default=",".join(PARTS), help="what to sample: labels,text,floor")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "diffusion_mnist_samples"),
                        help="folder for the cached samples")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "diffusion_mnist.json"))
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        parser.error(f"--parts: unknown {sorted(set(parts) - set(PARTS))}")

    from fromzero.finetune.diffusion import embed_prompts
    from fromzero.inference.generate_image import load_generator
    from fromzero.models.diffusion import UNet

    model, info = load_generator(args.checkpoint)
    work = Path(args.work)
    base_key = {"checkpoint": str(Path(args.checkpoint).resolve()),
                "weights_mtime": (Path(args.checkpoint) / "model.safetensors").stat().st_mtime_ns,
                "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "dtype": args.dtype,
                "per_digit": args.per_digit}
    digits = torch.arange(10).repeat_interleave(args.per_digit)
    samples: dict[str, tuple[torch.Tensor, float]] = {}
    if "labels" in parts:
        samples["labels"] = cached(work, {**base_key, "part": "labels"},
                                   lambda: draw(model, digits, None, args, "by label"))
    plan = prompt_plan(args.per_digit)
    if "text" in parts:
        texts = sorted({p for _, p, _, _ in plan})
        vectors = embed_prompts(texts, model.config.text_encoder)
        index = {t: i for i, t in enumerate(texts)}
        text = vectors[torch.tensor([index[p] for _, p, _, _ in plan])]
        samples["text"] = cached(work, {**base_key, "part": "text"},
                                 lambda: draw(model, None, text, args, "by text"))
    if "floor" in parts:
        torch.manual_seed(args.seed)
        untrained = UNet(model.config).eval()
        floor_digits = torch.arange(10).repeat_interleave(max(1, args.floor_samples // 10))
        samples["floor"] = cached(work, {**base_key, "part": "floor", "n": len(floor_digits)},
                                  lambda: draw(untrained, floor_digits, None, args, "untrained"))
    if set(parts) != set(PARTS):
        print(f"sampled {', '.join(parts)} into {work}; run with every part to score")
        return

    # -- scoring
    data = load_mnist()
    features = ClassifierFeatures(args.classifier)
    test_logits, test_feats = features(data["test"].images.float() / 255)
    val_logits, val_feats = features(data["val"].images.float() / 255)
    train = data["train"]
    train_ink = ink_counts(train.images)
    medians = torch.stack([train_ink[train.labels == d].float().median() for d in range(10)])
    rows: dict[str, dict[str, Any]] = {}
    # the ceiling with as many images as the label-conditioned samples (FID grows as n shrinks)
    n_real = min(len(val_feats), len(samples["labels"][0]))
    rows["real (val vs test)"] = {"n": n_real,
                                  "accuracy": accuracy(val_logits[:n_real], data["val"].labels[:n_real]),
                                  "fid": fid_from_features(val_feats[:n_real], test_feats)}
    label_logits, label_feats = features(samples["labels"][0].float() / 255)
    rows["by label"] = {"n": len(label_feats), "accuracy": accuracy(label_logits, digits),
                        "per_digit": per_digit(label_logits, digits),
                        "fid": fid_from_features(label_feats, test_feats),
                        "sampling_s": samples["labels"][1]}
    text_logits, text_feats = features(samples["text"][0].float() / 255)
    target = torch.tensor([d for d, _, _, _ in plan])
    held = torch.tensor([h for _, _, _, h in plan])
    style = torch.tensor([STYLES.index(s) for _, _, s, _ in plan])
    ink = ink_counts(samples["text"][0]).float()
    thick_ok = (ink > medians[target]) & (style == 1)
    thin_ok = (ink < medians[target]) & (style == 2)
    styled = style > 0
    rows["by text (all)"] = {"n": len(plan), "accuracy": accuracy(text_logits, target),
                             "per_digit": per_digit(text_logits, target),
                             "fid": fid_from_features(text_feats, test_feats),
                             "style_agreement": share((thick_ok | thin_ok)[styled]),
                             "style_n": int(styled.sum()), "sampling_s": samples["text"][1]}
    for name, rows_mask in (("by text (seen phrasings)", ~held), ("by text (held-out phrasings)", held)):
        rows[name] = {"n": int(rows_mask.sum()),
                      "accuracy": accuracy(text_logits[rows_mask], target[rows_mask]),
                      "style_agreement": share((thick_ok | thin_ok)[styled & rows_mask]),
                      "style_n": int((styled & rows_mask).sum())}
    floor_digits = torch.arange(10).repeat_interleave(max(1, args.floor_samples // 10))
    floor_logits, floor_feats = features(samples["floor"][0].float() / 255)
    rows["untrained model (floor)"] = {"n": len(floor_feats),
                                       "accuracy": accuracy(floor_logits, floor_digits),
                                       "fid": fid_from_features(floor_feats, test_feats)}
    result = {"checkpoint": args.checkpoint, "classifier": args.classifier,
              "classifier_test_accuracy": accuracy(test_logits, data["test"].labels),
              "sampler": f"DDIM eta 0, {args.steps} steps, guidance {args.guidance}, {args.dtype}",
              "threads": torch.get_num_threads(),
              "fid_features": "the classifier's penultimate layer (a domain feature extractor, "
                              "not Inception)",
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"classifier: {args.classifier} (test accuracy {result['classifier_test_accuracy']:.4f}); "
          f"{result['sampler']}; FID on the classifier's penultimate features vs the 10,000 test images")
    print(f"{'':32} {'n':>6} {'accuracy':>9} {'FID':>8} {'style':>6} {'sampling':>9}")
    for name, r in rows.items():
        fid = f"{r['fid']:8.2f}" if "fid" in r else f"{'':8}"
        style_txt = f"{r['style_agreement']:6.3f}" if r.get("style_agreement") is not None else f"{'':6}"
        secs = f"{r['sampling_s']:8.0f}s" if "sampling_s" in r else ""
        print(f"{name:32} {r['n']:>6} {r['accuracy']:9.4f} {fid} {style_txt} {secs:>9}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
