"""Train a class- and text-conditional diffusion model on MNIST (task ``image-generation``).

The data is the built-in ``mnist`` (:func:`fromzero.data.mnist.load_mnist`), held in memory as
uint8 tensors. Each training image is conditioned, per step, on one of: its class label; a text
prompt drawn from the templates that fit its digit and measured stroke thickness
(:mod:`fromzero.data.digit_prompts`), as the all-MiniLM-L6-v2 sentence vector (embedded once and
cached in ``$FROMZERO_HOME/cache/prompt-vectors``); or nothing (probability ``cond_drop``: the
null condition that classifier-free guidance needs).

The model is the U-Net of :mod:`fromzero.models.diffusion`; training is the one loop every task
shares (:class:`fromzero.training.trainer.Trainer`), the loss the denoising MSE at random steps.
After each optimizer step an exponential moving average (EMA) of the weights is updated; the
EMA is a set of buffers of the trained module, so checkpoints/last keeps it and ``--resume`` is
exact. Validation scores the EMA weights' denoising loss on a fixed set of val images, noise
levels and noise (lower is better), and draws a sample grid (a row per digit, by class label,
and a row per digit from a text prompt) into ``samples/`` of the run directory. checkpoints/best
holds the EMA weights: what ``fromzero generate-image`` samples from.

Run it::

    fromzero finetune --config recipes/mnist-diffusion.yaml --out_dir runs/mnist-diffusion
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
import torch.nn as nn

from fromzero.errors import FromzeroError
from fromzero.finetune.engine import FinetuneConfig, FinetuneTask, run_finetune_task
from fromzero.training.trainer import FitResult

CONDITIONINGS = ("text+class", "class", "text")
BUILTIN_DATA = ("mnist",)


@dataclass
class ImageGenerationConfig(FinetuneConfig):
    """Training a conditional diffusion model (DDPM) on the built-in MNIST."""

    RECIPE_KEYS: ClassVar[dict[str, str]] = {
        "data_dir": "data.source", "train_images": "data.train_images", "eval_images": "data.eval_images",
        "conditioning": "model.conditioning", "text_encoder": "model.text_encoder",
        "text_norm": "model.text_norm",
        "base_channels": "model.base_channels", "channel_mults": "model.channel_mults",
        "layers_per_level": "model.layers_per_level", "attention_levels": "model.attention_levels",
        "heads": "model.heads", "groups": "model.groups", "dropout": "model.dropout",
        "timesteps": "model.timesteps", "schedule": "model.schedule", "prediction": "model.prediction"}

    UNUSED_KEYS: ClassVar[frozenset[str]] = frozenset({"init_from"})

    data_dir: str = "mnist"
    """The images: mnist (built in: 50,000 train / 10,000 val / 10,000 test digits)."""
    train_images: int = 0
    """Train on the first N training images (0 = all)."""
    eval_images: int = 1000
    """Val / test images whose denoising loss is scored (fixed noise levels and noise)."""
    conditioning: str = "text+class"
    """text+class (each step: the label, a prompt or nothing) | class | text."""
    text_encoder: str = "all-MiniLM-L6-v2"
    """Sentence encoder of the prompts: all-MiniLM-L6-v2 (built in) or a fromzero-bert checkpoint folder."""
    text_norm: bool = True
    """LayerNorm on the sentence vector before the U-Net's text MLP (see DiffusionConfig.text_norm)."""
    text_prob: float = 0.5
    """text+class: probability that a conditioned example gets a prompt rather than its label."""
    cond_drop: float = 0.15
    """Probability that an example gets the null condition (what classifier-free guidance needs)."""
    base_channels: int = 16
    """U-Net width at 28 x 28."""
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    """Width multipliers per level (28, 14, 7)."""
    layers_per_level: int = 1
    """Residual blocks per level (the up path has one more)."""
    attention_levels: list[int] = field(default_factory=lambda: [2])
    """Levels with self-attention (2 = 7 x 7)."""
    heads: int = 4
    """Attention heads."""
    groups: int = 8
    """GroupNorm groups."""
    dropout: float = 0.0
    """Dropout in the residual blocks."""
    timesteps: int = 1000
    """Diffusion steps T."""
    schedule: str = "cosine"
    """Noise schedule: cosine | linear."""
    prediction: str = "eps"
    """What the U-Net predicts: eps | v."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights (the weights checkpoints hold)."""
    sample_steps: int = 20
    """DDIM steps of the sample grids drawn at each evaluation."""
    guidance: float = 3.0
    """Classifier-free guidance scale of the sample grids (1 = none); recorded in info.json."""
    grid_columns: int = 8
    """Samples per row of the grids (a row per digit)."""
    epochs: int = 5
    """Maximum passes over the training images."""
    batch_size: int = 128
    """Images per micro-batch."""
    lr: float = 2e-3
    """Peak learning rate (cosine decay to lr * min_lr_ratio)."""
    warmup_ratio: float = 0.02
    """Fraction of the steps with linear warmup from 0 to lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    log_interval: int = 20
    """Write a metrics row every N optimizer steps."""

    def validate(self) -> None:
        """Raise FromzeroError for a value that cannot work."""
        if self.data_dir not in BUILTIN_DATA:
            raise FromzeroError(f"data_dir {self.data_dir!r} is not supported for image generation "
                                f"(supported: {', '.join(BUILTIN_DATA)})")
        if self.conditioning not in CONDITIONINGS:
            raise FromzeroError(f"conditioning {self.conditioning!r} is not supported "
                                f"(supported: {', '.join(CONDITIONINGS)})")
        if self.method != "full":
            raise FromzeroError("method: a diffusion model trains from scratch: method must be full")
        self.validate_common()
        for name in ("text_prob", "cond_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FromzeroError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise FromzeroError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("train_images", "eval_images", "sample_steps", "grid_columns"):
            value, low = getattr(self, name), 0 if name == "train_images" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FromzeroError(f"{name} must be a {'non-negative' if low == 0 else 'positive'} integer, "
                                    f"got {value!r}")
        if self.guidance < 0:
            raise FromzeroError(f"guidance must be >= 0, got {self.guidance}")

    def model_config(self) -> Any:
        """The U-Net's :class:`DiffusionConfig` (refused with one line if it cannot be built)."""
        from fromzero.data.mnist import CLASSES
        from fromzero.models.diffusion import DiffusionConfig

        mc = DiffusionConfig(
            image_size=28, channels=1, base_channels=self.base_channels,
            channel_mults=list(self.channel_mults),
            layers_per_level=self.layers_per_level, attention_levels=list(self.attention_levels),
            heads=self.heads, groups=self.groups, dropout=self.dropout,
            num_classes=10 if "class" in self.conditioning else 0,
            text_dim=384 if "text" in self.conditioning else 0, text_encoder=self.text_encoder,
            text_norm=self.text_norm,
            labels=list(CLASSES), timesteps=self.timesteps, schedule=self.schedule,
            prediction=self.prediction)
        try:
            mc.validate()
        except ValueError as e:
            raise FromzeroError(f"model: {e}") from None
        return mc


# ---------------------------------------------------------------------------------------------
# Prompt vectors: embedded once per (encoder, prompt set), cached


def embed_prompts(texts: list[str], encoder: str = "all-MiniLM-L6-v2", cache: bool = True) -> torch.Tensor:
    """(len(texts), dim) L2-normalised sentence vectors of ``texts`` from ``encoder`` (built-in
    name or a fromzero-bert checkpoint directory); with ``cache`` read from / written to
    ``$FROMZERO_HOME/cache/prompt-vectors`` (keyed by the encoder's weights and the texts)."""
    from fromzero.checkpoint import CONFIG_FILE, read_json
    from fromzero.finetune.text import resolve_checkpoint

    directory = resolve_checkpoint(encoder)
    weights = directory / "model.safetensors"
    raw = read_json(directory / CONFIG_FILE, "model config")
    if raw.get("model_type") != "fromzero-bert":
        raise FromzeroError(f"text_encoder {encoder} holds a {raw.get('model_type')!r} model, not a sentence "
                            "encoder (a fromzero-bert checkpoint such as all-MiniLM-L6-v2)")
    stat = weights.stat()
    key = hashlib.sha256("\n".join([str(directory.resolve()), str(stat.st_size), str(stat.st_mtime_ns),
                                    *texts]).encode()).hexdigest()[:32]
    from fromzero.data.corpora import fromzero_home

    path = fromzero_home() / "cache" / "prompt-vectors" / f"{key}.safetensors"
    if cache and path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path))["vectors"]
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            pass
    from fromzero.checkpoint import load_model
    from fromzero.models.bert import BertConfig, embed_texts, load_encoder_tokenizer

    config = BertConfig.from_dict(raw)
    model = load_model(directory, "cpu")
    vectors = torch.tensor(embed_texts(model, load_encoder_tokenizer(directory, config), config, texts),
                           dtype=torch.float32)
    if cache:
        from fromzero.checkpoint import write_safetensors

        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors({"vectors": vectors.contiguous()}, path)
    return vectors


# ---------------------------------------------------------------------------------------------
# The module the loop trains: the U-Net and its EMA (buffers, so checkpoints/last keeps them)


class DiffusionTraining(nn.Module):
    """The trained U-Net (``unet``) and the moving average of its weights (``ema``)."""

    def __init__(self, unet: nn.Module, ema_decay: float) -> None:
        super().__init__()
        from fromzero.models.diffusion import EMA

        self.unet = unet
        self.ema = EMA(unet, ema_decay)

    def forward(self, x0: torch.Tensor, labels: torch.Tensor | None, text: torch.Tensor | None,
                text_mask: torch.Tensor | None) -> torch.Tensor:
        """The training loss of clean images x0 (so a compiled or DDP-wrapped module computes it)."""
        return self.unet.loss(x0, labels, text, text_mask)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255, 255 = ink) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def finetune_image_generation(cfg: ImageGenerationConfig, resume: bool = False) -> dict[str, Any]:
    """Run an ImageGenerationTask (train, keep the best EMA weights by val loss, score test once)."""
    return run_finetune_task(ImageGenerationTask, cfg, resume)


class ImageGenerationTask(FinetuneTask):
    """One diffusion training run (see :class:`fromzero.finetune.engine.FinetuneTask`)."""

    name = "image-generation"
    monitor, higher_is_better = "val_loss", False

    def __init__(self, cfg: ImageGenerationConfig, ctx: Any, device: torch.device, dtype: str) -> None:
        from fromzero.data.digit_prompts import measure_styles, prompt_table, prompts_for
        from fromzero.data.mnist import load_mnist
        from fromzero.models.diffusion import UNet
        from fromzero.training.optim import build_optimizer

        self.cfg, self.ctx, self.device, self.dtype = cfg, ctx, device, dtype
        cfg.validate()
        mc = cfg.model_config()
        data = load_mnist()
        train = data["train"]
        n = cfg.train_images or len(train)
        if n > len(train):
            raise FromzeroError(f"train_images {n} is more than the {len(train)} training images")
        self.images, self.labels = train.images[:n], train.labels[:n]
        self.styles = measure_styles(self.images, self.labels, reference=(train.images, train.labels))
        self.use_text, self.use_class = mc.text_dim > 0, mc.num_classes > 0
        if self.use_text:
            self.prompts, self.candidates, self.counts = prompt_table()
            self.grid_prompts = [prompts_for(d)[0] for d in range(10)]  # "a handwritten zero", ...
            vectors = embed_prompts(self.prompts + self.grid_prompts, cfg.text_encoder)
            self.prompt_vectors = vectors[: len(self.prompts)].to(device)
            self.grid_vectors = vectors[len(self.prompts):]
            if self.prompt_vectors.shape[1] != mc.text_dim:
                raise FromzeroError(f"text_encoder {cfg.text_encoder} gives {self.prompt_vectors.shape[1]}-d "
                                    f"vectors; the model takes {mc.text_dim}")
        # fixed val / test subsets, steps and noise: the loss is comparable between evaluations
        g = torch.Generator().manual_seed(cfg.seed + 1)
        self.eval_sets = {}
        for split in ("val", "test"):
            s = data[split]
            k = min(cfg.eval_images, len(s))
            steps = torch.randint(0, mc.timesteps, (k,), generator=g)
            noise = torch.randn((k, 1, 28, 28), generator=g)
            self.eval_sets[split] = (s.images[:k], s.labels[:k], steps, noise)
        self.sizes = n, min(cfg.eval_images, len(data["val"])), min(cfg.eval_images, len(data["test"]))

        torch.manual_seed(cfg.seed)
        self.mc = mc
        self.config = mc.to_dict()
        unet = UNet(mc)
        self.model = DiffusionTraining(unet, cfg.ema_decay).to(device)
        self.sampler = UNet(mc).to(device).eval()  # holds the EMA weights for evaluation and saving
        self.trainable = sum(p.numel() for p in unet.parameters())
        # The EMA follows every optimizer step (a step skipped by the float16 scaler is no step).
        self.optimizer = build_optimizer(self.model, cfg, device)
        self.optimizer.register_step_post_hook(lambda *_: self.model.ema.update(self.model.unet))

    def start(self, run_dir: Path) -> None:
        cfg = self.cfg
        print(f"image generation (diffusion U-Net, {self.trainable:,} parameters; "
              f"conditioning {cfg.conditioning}): "
              f"train/val/test {self.sizes[0]}/{self.sizes[1]}/{self.sizes[2]} images; T={self.mc.timesteps} "
              f"({self.mc.schedule}), predicts {self.mc.prediction}; device {self.device}, {self.dtype}")
        self.base_info = {"task": "image-generation", "image_size": 28, "channels": 1,
                          "conditioning": cfg.conditioning, "text_encoder": cfg.text_encoder,
                          "sample_steps": cfg.sample_steps, "guidance": cfg.guidance}

    # -- data

    def batches(self) -> tuple[Any, int]:
        n, bs = len(self.images), self.cfg.batch_size
        per_epoch = n // bs if n >= bs else 1

        def epoch_batches(epoch: int) -> Iterator[torch.Tensor]:
            seed = self.cfg.seed * 100_003 + epoch
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            for i in range(per_epoch):
                yield order[i * bs : (i + 1) * bs]  # indices: the images stay in one tensor

        return epoch_batches, per_epoch

    def conditions(self, idx: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """(labels, text vectors, text mask) of a training batch, drawn with the global RNG (so
        a resumed run draws the same): null with cond_drop, else a prompt (text_prob) or the label."""
        B = len(idx)
        cfg = self.cfg
        r = torch.rand(B)
        conditioned = r >= cfg.cond_drop
        if self.use_text and self.use_class:
            as_text = conditioned & (torch.rand(B) < cfg.text_prob)
            as_class = conditioned & ~as_text
        else:
            as_text = conditioned if self.use_text else torch.zeros(B, dtype=torch.bool)
            as_class = conditioned if self.use_class else torch.zeros(B, dtype=torch.bool)
        labels = text = mask = None
        if self.use_class:
            null = torch.full((B,), -1, dtype=torch.long)
            labels = torch.where(as_class, self.labels[idx], null).to(self.device)
        if self.use_text:
            row = self.labels[idx] * 3 + self.styles[idx]
            pick = (torch.rand(B) * self.counts[row]).long()
            prompt = self.candidates[row, pick]
            text = self.prompt_vectors[prompt.to(self.device)]
            mask = as_text.to(self.device)
        return labels, text, mask

    def loss(self, net: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x0 = to_unit_range(self.images[idx]).to(self.device)
        labels, text, mask = self.conditions(idx)
        with self.autocast():
            out = net(x0, labels, text, mask)
        return out, len(idx), 0

    # -- evaluation: the EMA weights

    def ema_sampler(self) -> nn.Module:
        self.model.ema.copy_to(self.sampler)
        return self.sampler

    @torch.no_grad()
    def denoising_loss(self, split: str) -> float:
        """Mean denoising MSE of the EMA weights on the fixed subset of ``split`` (class-conditioned
        when the model has labels, else text, else unconditional)."""
        images, labels, t, noise = self.eval_sets[split]
        net = self.ema_sampler()
        total, n = 0.0, len(images)
        for start in range(0, n, 256):
            sl = slice(start, min(n, start + 256))
            x0 = to_unit_range(images[sl]).to(self.device)
            tt, eps = t[sl].to(self.device), noise[sl].to(self.device)
            x_t = net.schedule.q_sample(x0, tt, eps)
            target = eps if self.mc.prediction == "eps" else net.schedule.v_target(x0, tt, eps)
            lab = labels[sl].to(self.device) if self.use_class else None
            text = mask = None
            if self.use_text and not self.use_class:
                text = self.grid_vectors[labels[sl]].to(self.device)
            with self.autocast():
                out = net(x_t, tt, lab, text, mask).float()
            total += float(((out - target) ** 2).mean(dim=(1, 2, 3)).sum())
        return total / n

    def evaluate(self, _: nn.Module) -> dict[str, Any]:
        loss = self.denoising_loss("val")
        if self.ctx.is_main:
            self.write_grid(self.run_dir / "samples" / f"step-{self.step_count():06d}.png")
        return {"loss": loss}

    def step_count(self) -> int:
        return int(self.model.ema.updates)

    def write_grid(self, path: Path) -> None:
        """A sample grid from the EMA weights: a row per digit by label, then (text models) a row
        per digit from the prompt "a handwritten <digit>"; fixed seed, so grids compare."""
        from fromzero.checkpoint import atomic_write_bytes
        from fromzero.evaluation.plots import image_grid_png
        from fromzero.models.diffusion import sample

        cfg, k = self.cfg, self.cfg.grid_columns
        net = self.ema_sampler()
        digits = torch.arange(10).repeat_interleave(k)
        rows = []
        g = torch.Generator().manual_seed(0)
        if self.use_class:
            rows.append(sample(net, 10 * k, labels=digits, steps=cfg.sample_steps, guidance=cfg.guidance,
                               generator=g))
        if self.use_text:
            g = torch.Generator().manual_seed(0)
            rows.append(sample(net, 10 * k, text=self.grid_vectors[digits], steps=cfg.sample_steps,
                               guidance=cfg.guidance, generator=g))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, image_grid_png(torch.cat(rows), nrow=k))

    def write_best(self, extra: dict[str, Any]) -> None:
        from fromzero.checkpoint import save_checkpoint

        save_checkpoint(self.best_dir, self.ema_sampler(), self.config, info={**self.base_info, **extra})

    def save_best(self, info: dict[str, Any]) -> None:
        self.write_best({"best_epoch": info["best_epoch"], "best_step": info["best_step"],
                         "val_denoising_loss": info["val"]["loss"]})

    def test(self) -> dict[str, Any]:
        # the runner restored the best weights (and with them the best EMA) before this
        return {"loss": self.denoising_loss("test")}

    def finish(self, fit: FitResult, test: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        from fromzero.evaluation.metrics import write_metrics_json

        report = {"split": "test", "denoising_loss": test["loss"],
                  "val_denoising_loss": fit.best_metrics["loss"],
                  "best_epoch": fit.best_epoch, "best_step": fit.best_step, "epochs_run": fit.epochs_run}
        write_metrics_json(report, self.run_dir / "metrics.json")
        self.write_best({"best_epoch": fit.best_epoch, "best_step": fit.best_step,
                         "val_denoising_loss": fit.best_metrics["loss"], "test_denoising_loss": test["loss"]})
        self.write_grid(self.run_dir / "samples" / "final.png")
        print(f"test denoising loss ({self.sizes[2]} images): {test['loss']:.4f}; sample grids in "
              f"{self.run_dir / 'samples'}; checkpoint (EMA weights) {self.best_dir}")
        return self.summary(fit, test, trainable_params=self.trainable)
