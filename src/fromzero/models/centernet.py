"""A compact CenterNet ("Objects as Points", Zhou et al. 2019), written from scratch to be read.

An object is the peak of a heat map: the network predicts, on a grid 4x coarser than the
image (stride 4), one heat map per class (is there an object's centre here?), and at every cell
the object's size (w, h) and the sub-cell offset of its centre. Decoding is three lines: keep the
cells that are the maximum of their 3 x 3 neighbourhood (max-pool "NMS"), take the best K, read
size and offset there. No anchors, no box NMS. Why CenterNet rather than FCOS: one output grid
and one positive cell per object make targets, loss and decoding each a few readable lines.

Pieces, top to bottom:

* :class:`CenterNet`: a small conv backbone (stride 2 -> 4 -> 8, residual blocks, BatchNorm)
  whose stride-8 features are upsampled and added to the stride-4 ones (so every output cell sees
  ~60 px, more than a digit), then three heads: ``heatmap`` (B, K, H/4, W/4) logits, ``size``
  (B, 2, H/4, W/4) in output cells, ``offset`` (B, 2, H/4, W/4) in [0, 1) cells.
* :func:`encode_targets`: boxes -> the target heat map (an elliptical Gaussian per object, sigma
  proportional to its width and height, as TTFNet does: a size-aware spread that needs no
  radius formula), the size and offset at each centre cell, and the mask of those cells.
* :func:`focal_loss`: the penalty-reduced pixel-wise focal loss of CornerNet / CenterNet
  (alpha = 2, beta = 4), normalised by the number of objects; :func:`centernet_loss` adds L1 on
  size (weight 0.1) and offset (weight 1) at the centre cells.
* :func:`decode`: heads -> boxes [x1, y1, x2, y2] in input pixels, scores, labels.

Try it::

    model = CenterNet(CenterNetConfig(num_classes=10, in_channels=1))
    heat, size, offset = model(images)        # images: (B, 1, H, W) float in [0, 1], H, W % 4 == 0
    detections = decode(heat, size, offset, stride=4, max_detections=100, threshold=0.05)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromzero.models import ConfigDict, FamilyFacts


@dataclass
class CenterNetConfig(ConfigDict):
    """A CenterNet checkpoint's architecture (its config.json)."""

    MODEL_TYPE = "fromzero-centernet"

    num_classes: int = 10
    """K: heat maps, one per class."""
    in_channels: int = 1
    """Channels of the input images (1 grayscale, 3 RGB)."""
    width: int = 32
    """Channels at stride 2; stride 4 has 2x, stride 8 has 4x, the heads 2x."""
    blocks: int = 2
    """Residual blocks at stride 4 and at stride 8."""
    labels: list[str] | None = None
    """Class names, index = class id (num_classes of them)."""
    category_ids: list[int] | None = None
    """The COCO category id of each class index (what predictions are reported with)."""

    def validate(self) -> None:
        for name in ("num_classes", "in_channels", "width", "blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"model.labels has {len(self.labels)} names but num_classes is "
                             f"{self.num_classes}")


STRIDE = 4
"""Input pixels per output cell."""
SIZE_WEIGHT, OFFSET_WEIGHT = 0.1, 1.0
"""CenterNet's loss weights of the size and offset L1 terms."""
GAUSSIAN_ALPHA = 0.54
"""sigma_x = alpha * w / 6, sigma_y = alpha * h / 6 (TTFNet's setting), w and h in output cells."""


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)  # no bias: BatchNorm has one
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """x + conv-bn-relu-conv-bn(x), then ReLU (ResNet's basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(self.conv1(x))))


def _head(cin: int, mid: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, mid, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(mid, cout, 1))


class CenterNet(nn.Module):
    """Backbone (stride 4 output, stride 8 context) + heat map / size / offset heads."""

    def __init__(self, config: CenterNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c = config.width
        self.stem = nn.Sequential(_conv(config.in_channels, c), _conv(c, c, stride=2))        # stride 2
        n = config.blocks
        self.stage4 = nn.Sequential(_conv(c, 2 * c, stride=2), *[ResidualBlock(2 * c) for _ in range(n)])
        self.stage8 = nn.Sequential(_conv(2 * c, 4 * c, stride=2), *[ResidualBlock(4 * c) for _ in range(n)])
        self.lateral = nn.Conv2d(4 * c, 2 * c, 1)  # stride-8 context, projected to stride 4's width
        self.fuse = _conv(2 * c, 2 * c)
        self.heatmap = _head(2 * c, 2 * c, config.num_classes)
        self.size = _head(2 * c, 2 * c, 2)
        self.offset = _head(2 * c, 2 * c, 2)
        # Start the heat map at p = 0.1 everywhere (CenterNet's prior): the focal loss of a
        # zero-initialised logit (p = 0.5 on ~all-background cells) would swamp the first steps.
        nn.init.constant_(self.heatmap[-1].bias, -2.19)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f4 = self.stage4(self.stem(x))                                       # (B, 2c, H/4, W/4)
        f8 = self.stage8(f4)                                                 # (B, 4c, H/8, W/8)
        up = F.interpolate(self.lateral(f8), size=f4.shape[-2:], mode="nearest")
        f = self.fuse(f4 + up)                                               # (B, 2c, H/4, W/4)
        return self.heatmap(f), self.size(f), self.offset(f)                 # logits, cells, cells


def build_from_config(config: dict) -> CenterNet:
    return CenterNet(CenterNetConfig.from_dict(config))


# ---------------------------------------------------------------------------------------------
# Targets and loss


def encode_targets(boxes: list[torch.Tensor], labels: list[torch.Tensor], num_classes: int, out_h: int,
                   out_w: int, stride: int = STRIDE) -> dict[str, torch.Tensor]:
    """Training targets of a batch: per image ``boxes`` (n, 4) [x1, y1, x2, y2] pixels, ``labels`` (n,).

    Returns ``heatmap`` (B, K, h, w) in [0, 1] (1 exactly at each centre cell), ``size`` and
    ``offset`` (B, 2, h, w) filled at centre cells, ``mask`` (B, h, w) = 1 there. Where two
    objects' Gaussians of one class overlap the larger value wins (CenterNet's rule)."""
    B = len(boxes)
    heat = torch.zeros(B, num_classes, out_h, out_w)
    size = torch.zeros(B, 2, out_h, out_w)
    offset = torch.zeros(B, 2, out_h, out_w)
    mask = torch.zeros(B, out_h, out_w)
    ys = torch.arange(out_h, dtype=torch.float32)[:, None]
    xs = torch.arange(out_w, dtype=torch.float32)[None, :]
    for b in range(B):
        for box, label in zip(boxes[b].tolist(), labels[b].tolist()):
            x1, y1, x2, y2 = (v / stride for v in box)       # in output cells
            cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
            ix, iy = min(int(cx), out_w - 1), min(int(cy), out_h - 1)  # the centre's cell
            sx, sy = max(GAUSSIAN_ALPHA * w / 6, 1e-3), max(GAUSSIAN_ALPHA * h / 6, 1e-3)
            g = torch.exp(-((xs - ix) ** 2) / (2 * sx * sx) - ((ys - iy) ** 2) / (2 * sy * sy))
            heat[b, label] = torch.maximum(heat[b, label], g)   # g == 1 at (iy, ix)
            size[b, :, iy, ix] = torch.tensor([w, h])
            offset[b, :, iy, ix] = torch.tensor([cx - ix, cy - iy])
            mask[b, iy, ix] = 1.0
    return {"heatmap": heat, "size": size, "offset": offset, "mask": mask}


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0,
               beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of centres.

    At a centre (target == 1): -(1 - p)^alpha log p. Elsewhere: -(1 - y)^beta p^alpha log(1 - p),
    so cells near a centre (y close to 1) are barely punished for firing."""
    p = torch.sigmoid(logits.float())
    log_p, log_not_p = F.logsigmoid(logits.float()), F.logsigmoid(-logits.float())
    pos = target.eq(1).float()
    pos_loss = -((1 - p) ** alpha) * log_p * pos
    neg_loss = -((1 - target) ** beta) * (p ** alpha) * log_not_p * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def centernet_loss(heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Focal loss on the heat map + 0.1 * L1(size) + 1 * L1(offset) at the centre cells; the parts too."""
    heat, size, offset = heads
    mask = targets["mask"].unsqueeze(1)                       # (B, 1, h, w)
    n = mask.sum().clamp(min=1.0)
    hm = focal_loss(heat, targets["heatmap"])
    sz = (F.l1_loss(size.float(), targets["size"], reduction="none") * mask).sum() / n
    off = (F.l1_loss(offset.float(), targets["offset"], reduction="none") * mask).sum() / n
    loss = hm + SIZE_WEIGHT * sz + OFFSET_WEIGHT * off
    return loss, {"heatmap": float(hm.detach()), "size": float(sz.detach()), "offset": float(off.detach())}


# ---------------------------------------------------------------------------------------------
# Decoding


@torch.no_grad()
def decode(heat: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, stride: int = STRIDE,
           max_detections: int = 100, threshold: float = 0.0,
           logits: bool = True) -> list[dict[str, torch.Tensor]]:
    """Heads -> per image ``{"boxes": (n, 4) [x1, y1, x2, y2] pixels, "scores": (n,), "labels": (n,)}``.

    A cell is a detection when its heat is the maximum of its 3 x 3 neighbourhood (in its class)
    and among the ``max_detections`` best of the image, with score >= ``threshold``."""
    p = torch.sigmoid(heat.float()) if logits else heat.float()
    B, K, h, w = p.shape
    peaks = p * (F.max_pool2d(p, 3, stride=1, padding=1) == p).float()  # max-pool NMS
    scores, flat = peaks.reshape(B, -1).topk(min(max_detections, K * h * w))
    out = []
    for b in range(B):
        keep = scores[b] >= threshold
        s, idx = scores[b][keep], flat[b][keep]
        cls, cell = idx // (h * w), idx % (h * w)
        iy, ix = cell // w, cell % w
        wh = size[b].float().reshape(2, -1)[:, cell]           # (2, n) in cells
        off = offset[b].float().reshape(2, -1)[:, cell]
        cx, cy = ix.float() + off[0], iy.float() + off[1]
        half_w, half_h = wh[0].clamp(min=0) / 2, wh[1].clamp(min=0) / 2
        boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1) * stride
        out.append({"boxes": boxes, "scores": s, "labels": cls})
    return out


def _head_modules(model: CenterNet) -> list[nn.Module]:
    return [model.heatmap, model.size, model.offset]


FACTS = FamilyFacts(head_modules=_head_modules, export_signature="detector")
