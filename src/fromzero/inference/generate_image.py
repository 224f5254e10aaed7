"""Images from a diffusion checkpoint (``fromzero generate-image``): by class label or free text.

The checkpoint is what ``finetune`` of task ``image-generation`` writes (config.json of a
``fromzero-diffusion`` U-Net, its EMA weights, info.json). A prompt is embedded with the
checkpoint's sentence encoder (all-MiniLM-L6-v2) at run time, so any text works; how well a
phrasing far from the training templates works is what the benchmark's held-out prompts measure.

    images = generate_images("runs/mnist-diffusion/checkpoints/best", prompt="a thick seven", num=16)
    # (16, 1, 28, 28) in [-1, 1]; save_image_grid(images, "seven.png")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fromzero.errors import FromzeroError


@dataclass
class ImageSampling:
    """How ``generate-image`` samples."""

    num: int = 16
    """Images to draw."""
    steps: int = 50
    """Denoising steps (DDIM: any number up to the model's T; DDPM: the same steps, ancestral)."""
    guidance: float = 3.0
    """Classifier-free guidance scale: 1 = the conditional model alone; higher follows the condition more."""
    seed: int = 0
    """Random seed (same seed, same images, on any device)."""
    sampler: str = "ddim"
    """ddim (deterministic, eta 0) | ddpm (ancestral: fresh noise at every step)."""
    device: str = "auto"
    """auto | cpu | cuda | mps."""

    def validate(self) -> None:
        if self.num <= 0:
            raise FromzeroError(f"--num must be positive, got {self.num}")
        if self.steps <= 0:
            raise FromzeroError(f"--steps must be positive, got {self.steps}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise FromzeroError(f"--guidance must be a number >= 0, got {self.guidance}")
        if self.sampler not in ("ddim", "ddpm"):
            raise FromzeroError(f"--sampler must be ddim or ddpm, got {self.sampler!r}")


def load_generator(directory: str | Path, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """(the U-Net with its EMA weights, info.json) of an image-generation checkpoint; anything
    else is refused with one line saying what it is."""
    from fromzero.checkpoint import CONFIG_FILE, checkpoint_info, load_model, read_json
    from fromzero.models.diffusion import UNet

    directory = Path(directory)
    if not directory.is_dir():
        raise FromzeroError(f"checkpoint directory not found: {directory}")
    config = read_json(directory / CONFIG_FILE, "model config")
    if config.get("model_type") != "fromzero-diffusion":
        raise FromzeroError(f"{directory} holds a {config.get('model_type')!r} model, not an image generator "
                            "(a fromzero-diffusion checkpoint: `fromzero finetune` of task image-generation)")
    model = load_model(directory, device)
    assert isinstance(model, UNet)
    return model, checkpoint_info(directory)


def condition_for(model: Any, prompt: str | None, label: int | str | None, num: int,
                  encoder: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(labels, text vectors) for ``num`` images from a label or a prompt, checked against what
    the model was trained on."""
    cfg = model.config
    if prompt is not None and label is not None:
        raise FromzeroError("give --prompt or --label, not both")
    if prompt is None and label is None:
        kinds = (("--prompt TEXT", cfg.text_dim), ("--label N", cfg.num_classes))
        what = " or ".join(w for w, ok in kinds if ok)
        raise FromzeroError(f"say what to draw: {what or 'nothing (an unconditional model)'}")
    if label is not None:
        if not cfg.num_classes:
            raise FromzeroError("this model was trained on text only: give --prompt instead of --label")
        names = list(cfg.labels or [])
        text = str(label)
        if text in names:
            index = names.index(text)
        else:
            try:
                index = int(text)
            except ValueError:
                index = -1
        if not 0 <= index < cfg.num_classes:
            raise FromzeroError(f"--label {label} is not one of the model's classes "
                                f"({', '.join(names) if names else f'0-{cfg.num_classes - 1}'})")
        return torch.full((num,), index, dtype=torch.long), None
    if not cfg.text_dim:
        raise FromzeroError("this model was trained on class labels only: give --label instead of --prompt")
    if not str(prompt).strip():
        raise FromzeroError("--prompt is empty")
    from fromzero.finetune.diffusion import embed_prompts

    vector = embed_prompts([str(prompt)], encoder or cfg.text_encoder, cache=False)[0]
    if vector.numel() != cfg.text_dim:
        raise FromzeroError(f"the text encoder gives {vector.numel()}-d vectors; the model takes "
                            f"{cfg.text_dim}")
    return None, vector.expand(num, -1).clone()


def generate_images(checkpoint: str | Path, prompt: str | None = None, label: int | str | None = None,
                    sampling: ImageSampling | None = None, progress: bool = False) -> torch.Tensor:
    """``sampling.num`` images (N, C, H, W) in [-1, 1] from a diffusion checkpoint."""
    from fromzero.devices import resolve_device
    from fromzero.models.diffusion import sample

    s = sampling or ImageSampling()
    s.validate()
    device = resolve_device(s.device)
    model, _ = load_generator(checkpoint, device)
    if s.steps > model.config.timesteps:
        raise FromzeroError(f"--steps {s.steps} is more than the model's {model.config.timesteps} "
                            "diffusion steps")
    labels, text = condition_for(model, prompt, label, s.num)
    generator = torch.Generator().manual_seed(s.seed)
    return sample(model, s.num, labels=labels, text=text, steps=s.steps, guidance=s.guidance,
                  sampler=s.sampler, eta=1.0 if s.sampler == "ddpm" else 0.0, generator=generator)


def save_image_grid(images: torch.Tensor, out: str | Path, columns: int = 0, force: bool = False) -> Path:
    """Write ``images`` as one PNG grid (``columns`` per row; 0 = about square); an existing
    file is refused unless ``force``."""
    from fromzero.checkpoint import atomic_write_bytes
    from fromzero.evaluation.plots import image_grid_png

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise FromzeroError(f"--out {out} must be a .png file")
    if out.exists() and not force:
        raise FromzeroError(f"{out} exists: use --force to overwrite it")
    if not out.parent.is_dir():
        raise FromzeroError(f"the folder of --out {out} does not exist")
    columns = columns or max(1, math.ceil(math.sqrt(len(images))))
    atomic_write_bytes(out, image_grid_png(images, nrow=columns))
    return out
