"""A denoising diffusion model (DDPM, Ho et al. 2020) with a small U-Net, written from scratch.

Training: take a clean image x_0 (pixels in [-1, 1]), a step t in [0, T) and Gaussian noise e;
the forward process gives the noisy image in closed form,

    x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * e,      abar_t = prod_{s <= t} (1 - beta_s),

and the U-Net learns to predict e (``prediction="eps"``) or v = sqrt(abar_t) e - sqrt(1 - abar_t) x_0
(``"v"``, Salimans & Ho 2022) with a plain mean-squared error. Sampling runs the process backwards
from pure noise: DDPM's ancestral steps (:func:`ddpm_step`, the posterior q(x_{t-1} | x_t, x_0))
or DDIM's (:func:`ddim_step`, Song et al. 2021), which may skip steps (25-50 instead of 1000) and
is deterministic with ``eta=0``; with ``eta=1`` it is DDPM on the chosen steps (tested).

Conditioning (the U-Net's one "what to draw" vector, added to the time embedding and applied
in every residual block as a scale and shift, FiLM): a class label (``num_classes`` > 0) and/or
a text vector (``text_dim`` > 0: a 384-d MiniLM sentence embedding, projected by an MLP). Each has
a learned "null" value; training drops the condition now and then, so one network is both the
conditional and the unconditional model, and classifier-free guidance (Ho & Salimans 2022)
extrapolates from one to the other at sampling time (:func:`guided`):
out = out_null + scale * (out_cond - out_null).

The U-Net (28 x 28 -> 14 -> 7 and back): a sinusoidal time embedding and an MLP; per resolution
``layers_per_level`` residual blocks (GroupNorm, SiLU, 3x3 convs), self-attention at the
resolutions listed in ``attention_levels`` (7 x 7 by default), stride-2 convs down, nearest
upsampling + conv up, and skip connections from every down-path activation to the up path.
:class:`EMA` keeps the exponential moving average of the weights that checkpoints hold.

Try it::

    from fromzero.models.diffusion import DiffusionConfig, UNet, sample
    model = UNet(DiffusionConfig())
    x = sample(model, 8, labels=torch.arange(8), steps=25, guidance=3.0)   # (8, 1, 28, 28) in [-1, 1]

Shapes: B = batch, C = channels, H x W = resolution, E = embedding width (4 x base_channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromzero.models import ConfigDict, FamilyFacts

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("eps", "v")
NULL_LABEL = -1
"""A label of -1 means "no class given" (the learned null class)."""


@dataclass
class DiffusionConfig(ConfigDict):
    """Architecture and noise process of a diffusion model (what config.json stores to rebuild it)."""

    MODEL_TYPE = "fromzero-diffusion"

    image_size: int = 28
    """Side of the square images (divisible by 2 ** (levels - 1))."""
    channels: int = 1
    """Image channels (1 = grayscale)."""
    base_channels: int = 32
    """Width of the first level; level i has base_channels * channel_mults[i]."""
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    """Width multipliers per level (one level per resolution: 28, 14, 7)."""
    layers_per_level: int = 1
    """Residual blocks per level on the way down (the way up has one more, for the downsampling skip)."""
    attention_levels: list[int] = field(default_factory=lambda: [2])
    """Levels with self-attention after each residual block (2 = 7 x 7 with three levels)."""
    heads: int = 4
    """Attention heads."""
    groups: int = 8
    """GroupNorm groups (divides every level's width)."""
    dropout: float = 0.0
    """Dropout inside the residual blocks."""
    num_classes: int = 10
    """Class-label conditioning: number of classes (0 = none)."""
    text_dim: int = 384
    """Text conditioning: size of the sentence vectors (0 = none; 384 = all-MiniLM-L6-v2)."""
    text_norm: bool = False
    """LayerNorm on the sentence vector before its MLP. Sentence vectors of different prompts are
    close (cosine ~0.8) and small (unit length over 384 dims); normalised, their differences start
    at the scale of the class embeddings, and text conditioning is learned from the first epoch."""
    text_encoder: str = "all-MiniLM-L6-v2"
    """The sentence encoder whose vectors the model was trained on (prompts are embedded with it)."""
    labels: list[str] | None = None
    """Class names (index -> name), e.g. the digits."""
    timesteps: int = 1000
    """Steps T of the forward (noising) process."""
    schedule: str = "cosine"
    """Noise schedule: cosine (Nichol & Dhariwal 2021) | linear (Ho et al.: beta from 1e-4 to 0.02)."""
    prediction: str = "eps"
    """What the network predicts: eps (the noise) | v (sqrt(abar) eps - sqrt(1 - abar) x0)."""

    def validate(self) -> None:
        """Raise ValueError for an architecture that cannot be built."""
        levels = len(self.channel_mults)
        if levels < 1 or any(int(m) <= 0 for m in self.channel_mults):
            raise ValueError("channel_mults must be a non-empty list of positive integers")
        if self.image_size % (2 ** (levels - 1)):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2 ** {levels - 1} "
                             f"({levels} levels)")
        for name in ("base_channels", "layers_per_level", "heads", "groups", "timesteps", "channels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for m in self.channel_mults:
            if (self.base_channels * m) % self.groups or (self.base_channels * m) % self.heads:
                raise ValueError(f"width {self.base_channels * m} is not divisible by groups ({self.groups}) "
                                 f"and heads ({self.heads})")
        if any(not 0 <= lv < levels for lv in self.attention_levels):
            raise ValueError(f"attention_levels {self.attention_levels} must be in [0, {levels})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction {self.prediction!r} is not one of {', '.join(PREDICTIONS)}")
        if self.num_classes < 0 or self.text_dim < 0:
            raise ValueError("num_classes and text_dim must be >= 0")


# ---------------------------------------------------------------------------------------------
# The noise schedule: everything the forward process and the samplers need, from the betas


class Schedule:
    """beta_t, alpha_t = 1 - beta_t and abar_t = prod_{s<=t} alpha_s for t = 0..T-1 (float64)."""

    def __init__(self, timesteps: int, kind: str = "cosine") -> None:
        T = timesteps
        if kind == "linear":  # Ho et al. 2020, scaled to T (for T = 1000: 1e-4 .. 0.02)
            scale = 1000 / T
            betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
        elif kind == "cosine":  # Nichol & Dhariwal 2021: abar(t) = f(t) / f(0),
            # f(t) = cos^2((t/T + s) / (1 + s) * pi/2)
            s = 0.008
            steps = torch.arange(T + 1, dtype=torch.float64) / T
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            abar = f / f[0]
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)  # clipped: no infinite last step
        else:
            raise ValueError(f"unknown schedule {kind!r}")
        self.timesteps = T
        self.betas = betas
        self.alphas = 1 - betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t for integer steps t (t = -1 gives 1: the clean image), float64."""
        t = torch.as_tensor(t, dtype=torch.long)
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar])
        return padded[t + 1]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (the forward process in one jump)."""
        ab = self.abar(t.cpu()).to(x0.device, torch.float32).view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
        ab = self.abar(t.cpu()).to(x0.device, torch.float32).view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def split(self, x_t: torch.Tensor, out: torch.Tensor, t: int, prediction: str,
              clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the network's output at step t; with ``clip`` x0 is clamped to [-1, 1]
        and eps recomputed from it, so both samplers step from a consistent pair."""
        ab = float(self.abar(torch.tensor(t)))
        if prediction == "eps":
            eps = out
            x0 = (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        else:  # v: x0 = sqrt(ab) x_t - sqrt(1 - ab) v, eps = sqrt(1 - ab) x_t + sqrt(ab) v
            x0 = math.sqrt(ab) * x_t - math.sqrt(1 - ab) * out
            eps = math.sqrt(1 - ab) * x_t + math.sqrt(ab) * out
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x_t - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        return x0, eps


def ddim_step(schedule: Schedule, x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
              eta: float, noise: torch.Tensor | None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) from step t to t_prev < t (t_prev = -1: the clean image):
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)."""
    ab, ab_prev = float(schedule.abar(torch.tensor(t))), float(schedule.abar(torch.tensor(t_prev)))
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
    x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
    if sigma > 0 and noise is not None:
        x = x + sigma * noise
    return x


def ddpm_step(schedule: Schedule, x_t: torch.Tensor, x0: torch.Tensor, t: int, t_prev: int,
              noise: torch.Tensor | None) -> torch.Tensor:
    """DDPM's ancestral step: a draw from the posterior q(x_prev | x_t, x0) of the (re-spaced)
    forward process from t_prev to t, whose beta is 1 - abar_t / abar_prev:
    mean = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(1 - beta) (1 - abar_prev) / (1 - abar_t) x_t,
    variance = beta (1 - abar_prev) / (1 - abar_t)."""
    ab, ab_prev = float(schedule.abar(torch.tensor(t))), float(schedule.abar(torch.tensor(t_prev)))
    beta = 1 - ab / ab_prev
    mean = ((math.sqrt(ab_prev) * beta / (1 - ab)) * x0
            + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x_t)
    var = beta * (1 - ab_prev) / (1 - ab)
    if var > 0 and noise is not None:
        mean = mean + math.sqrt(var) * noise
    return mean


def timestep_sequence(timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced steps from T-1 down to 0 (all of them when steps >= T)."""
    steps = max(1, min(int(steps), timesteps))
    return sorted({int(round(i * (timesteps - 1) / max(steps - 1, 1))) for i in range(steps)}, reverse=True)


def guided(out_cond: torch.Tensor, out_null: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: out_null + scale * (out_cond - out_null) (scale 1 = conditional alone)."""
    return out_null + scale * (out_cond - out_null)


# ---------------------------------------------------------------------------------------------
# The U-Net


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps (B,) -> (B, dim): [cos(t f_i), sin(t f_i)], f_i geometric."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, the embedding as a per-channel scale and shift (FiLM), again, + skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, c_out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map (pre-GroupNorm, residual)."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)  # starts as the identity
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        # (B, heads, HW, C/heads) each
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(out)


class Block(nn.Module):
    """A residual block, followed by self-attention where the level has it."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, cfg: DiffusionConfig, attention: bool) -> None:
        super().__init__()
        self.res = ResBlock(c_in, c_out, emb_dim, cfg.groups, cfg.dropout)
        self.attn = SelfAttention(c_out, cfg.heads, cfg.groups) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """The noise predictor: (x_t, t, condition) -> eps (or v), same shape as x_t."""

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__()
        config.validate()
        self.config = cfg = config
        C = cfg.base_channels
        E = 4 * C
        self.time_mlp = nn.Sequential(nn.Linear(C, E), nn.SiLU(), nn.Linear(E, E))
        # class conditioning: one extra row is the learned null class (label -1)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, E) if cfg.num_classes else None
        if cfg.text_dim:  # text conditioning: the sentence vector through an MLP; a learned null vector
            self.text_norm = nn.LayerNorm(cfg.text_dim) if cfg.text_norm else None
            self.text_mlp = nn.Sequential(nn.Linear(cfg.text_dim, E), nn.SiLU(), nn.Linear(E, E))
            self.null_text = nn.Parameter(torch.zeros(E))
        else:
            self.text_norm, self.text_mlp, self.null_text = None, None, None

        widths = [C * m for m in cfg.channel_mults]
        levels = len(widths)
        self.conv_in = nn.Conv2d(cfg.channels, C, 3, padding=1)
        # down path: remember each output's width (the up path concatenates them back, last first)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, c = [C], C
        for i, w in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(cfg.layers_per_level):
                blocks.append(Block(c, w, E, cfg, i in cfg.attention_levels))
                c = w
                skips.append(c)
            self.down.append(blocks)
            if i < levels - 1:  # stride-2 conv: 28 -> 14 -> 7
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([Block(c, c, E, cfg, True), Block(c, c, E, cfg, False)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(levels)):
            blocks = nn.ModuleList()
            for _ in range(cfg.layers_per_level + 1):
                blocks.append(Block(c + skips.pop(), widths[i], E, cfg, i in cfg.attention_levels))
                c = widths[i]
            self.up.append(blocks)
            if i > 0:  # nearest x2, then a conv: 7 -> 14 -> 28
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = nn.GroupNorm(cfg.groups, c)
        self.conv_out = nn.Conv2d(c, cfg.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.schedule = Schedule(cfg.timesteps, cfg.schedule)

    def condition(self, t: torch.Tensor, labels: torch.Tensor | None = None, text: torch.Tensor | None = None,
                  text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding (B, E) every block reads: time + class (label -1 or None: null) + text
        (rows where text_mask is False, or text None: the null text)."""
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        B = t.shape[0]
        if self.class_emb is not None:
            if labels is None:
                labels = torch.full((B,), NULL_LABEL, dtype=torch.long, device=t.device)
            idx = torch.where(labels < 0, torch.full_like(labels, self.config.num_classes), labels)
            emb = emb + self.class_emb(idx)
        if self.text_mlp is not None:
            null = self.null_text.expand(B, -1)
            if text is None:
                emb = emb + null
            else:
                mask = torch.ones(B, dtype=torch.bool, device=t.device) if text_mask is None else text_mask
                text = text.to(emb.dtype)
                if self.text_norm is not None:
                    text = self.text_norm(text)
                emb = emb + torch.where(mask[:, None], self.text_mlp(text), null)
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, channels, H, W) noisy images, t: (B,) integer steps -> (B, channels, H, W)."""
        emb = self.condition(t, labels, text, text_mask)  # (B, E)
        h = self.conv_in(x)
        hs = [h]
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None = None, text: torch.Tensor | None = None,
             text_mask: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training loss of a batch of clean images in [-1, 1]: MSE of the predicted eps (or v)
        at uniformly drawn steps (from ``generator``, else the global RNG)."""
        B = x0.shape[0]
        t = torch.randint(0, self.config.timesteps, (B,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = self.schedule.q_sample(x0, t, noise)
        target = noise if self.config.prediction == "eps" else self.schedule.v_target(x0, t, noise)
        return F.mse_loss(self(x_t, t, labels, text, text_mask).float(), target)


# ---------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def sample(model: UNet, n: int, labels: torch.Tensor | None = None, text: torch.Tensor | None = None,
           steps: int = 50, guidance: float = 1.0, sampler: str = "ddim", eta: float = 0.0,
           generator: torch.Generator | None = None, batch_size: int = 256,
           on_step: Callable[[int], None] | None = None, clip: bool = True) -> torch.Tensor:
    """``n`` images (n, channels, H, W) in [-1, 1]: ``steps`` denoising steps from pure noise.

    labels: (n,) class indices (-1 = none); text: (n, text_dim) or (text_dim,) sentence vectors;
    neither: unconditional. guidance != 1: classifier-free guidance (each step also runs the
    null condition, in the same forward pass). sampler: ddim (with ``eta``; 0 = deterministic)
    | ddpm (ancestral). Noise comes from ``generator`` (CPU), so a seed gives the same images on
    any device. on_step: called with the images finished so far after each batch. clip: clamp each
    step's x0 estimate to [-1, 1] (off, DDIM from an undertrained model drifts into noise)."""
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be ddim or ddpm, got {sampler!r}")
    device = next(model.parameters()).device
    if text is not None and text.dim() == 1:
        text = text.expand(n, -1)
    out = []
    for start in range(0, n, batch_size):
        end = min(n, start + batch_size)
        lab = labels[start:end].to(device) if labels is not None else None
        txt = text[start:end].to(device) if text is not None else None
        out.append(_sample_batch(model, end - start, lab, txt, steps, guidance, sampler, eta, generator,
                                 device, clip))
        if on_step is not None:
            on_step(end)
    return torch.cat(out)


def _sample_batch(model: UNet, B: int, labels: torch.Tensor | None, text: torch.Tensor | None, steps: int,
                  guidance: float, sampler: str, eta: float, generator: torch.Generator | None,
                  device: torch.device, clip: bool = True) -> torch.Tensor:
    cfg, sch = model.config, model.schedule
    shape = (B, cfg.channels, cfg.image_size, cfg.image_size)
    x = torch.randn(shape, generator=generator).to(device)
    conditioned = labels is not None or text is not None
    guide = conditioned and guidance != 1.0
    if guide:  # one forward pass over [conditional; null] rows
        null_labels = torch.full((B,), NULL_LABEL, dtype=torch.long, device=device)
        lab2 = torch.cat([labels, null_labels]) if labels is not None else None
        txt2 = torch.cat([text, torch.zeros_like(text)]) if text is not None else None
        mask2 = torch.cat([torch.ones(B, dtype=torch.bool, device=device),
                           torch.zeros(B, dtype=torch.bool, device=device)]) if text is not None else None
    seq = timestep_sequence(cfg.timesteps, steps)
    for i, t in enumerate(seq):
        t_prev = seq[i + 1] if i + 1 < len(seq) else -1
        tt = torch.full((B,), t, dtype=torch.long, device=device)
        if guide:
            both = model(torch.cat([x, x]), torch.cat([tt, tt]), lab2, txt2, mask2).float()
            out = guided(both[:B], both[B:], guidance)
        else:
            out = model(x, tt, labels, text).float()
        x0, eps = sch.split(x, out, t, cfg.prediction, clip=clip)
        noise = torch.randn(shape, generator=generator).to(device) if t_prev >= 0 else None
        if sampler == "ddpm":
            x = ddpm_step(sch, x, x0, t, t_prev, noise)
        else:
            x = ddim_step(sch, x, x0, eps, t, t_prev, eta, noise)
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# EMA weights


class EMA(nn.Module):
    """An exponential moving average of a model's parameters, kept as *buffers* (so the training
    loop saves them with checkpoints/last and a resumed run continues the same average).

    After each optimizer step: ema = d * ema + (1 - d) * param, with d = min(decay, (1 + n) / (10 + n))
    (n = updates so far): a short average at first, when the weights move fast."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.names = [n for n, p in model.named_parameters()]
        for name, p in model.named_parameters():
            self.register_buffer(self._key(name), p.detach().clone().float())
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")  # buffer names cannot hold dots

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = int(self.updates)
        d = min(self.decay, (1 + n) / (10 + n))
        for name, p in model.named_parameters():
            self.get_buffer(self._key(name)).lerp_(p.detach().float(), 1 - d)
        self.updates += 1

    def state_for(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's parameter names."""
        return {name: self.get_buffer(self._key(name)) for name in self.names}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (same architecture)."""
        params = dict(model.named_parameters())
        for name, value in self.state_for().items():
            params[name].copy_(value.to(params[name].dtype))


def build_from_config(config: dict) -> nn.Module:
    """A fresh U-Net from a checkpoint's config.json."""
    return UNet(DiffusionConfig.from_dict(config))


FACTS = FamilyFacts()  # trained from scratch, every weight: nothing to freeze, adapt or export
