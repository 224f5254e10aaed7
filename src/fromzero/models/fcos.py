"""torchvision's FCOS detector (Tian et al. 2019) on a small ResNet-18 + FPN, trained from scratch.

The library that owns the detector does the work: :class:`torchvision.models.detection.FCOS`
(its resize/normalise transform, per-level targets with centre sampling, sigmoid focal loss, GIoU
box loss, centre-ness, box NMS). What this file adds is a builder sized for small images and a
CPU, from a typed config: a ResNet-18 body with BatchNorm that trains (torchvision's
``resnet_fpn_backbone`` freezes BatchNorm, right for pretrained weights, wrong from scratch; here
``weights=None`` and ``weights_backbone=None``: every weight is learned on the task), an input
convolution for grayscale images, an FPN of ``fpn_channels`` (torchvision's 256 is sized for
800 px COCO images) on layer2-4 (strides 8, 16, 32) + P6/P7, and a head of ``head_convs``
convolutions per branch.

:class:`FCOSDetector` wraps the model so it behaves like our other families: ``forward(images,
targets)`` returns the losses in training mode and detections in eval mode (torchvision's
contract, boxes as [x1, y1, x2, y2] pixels of the input image), images are a (B, C, H, W)
float batch in [0, 1]; the transform rescales them so the short side is ``image_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fromzero.models import ConfigDict, FamilyFacts


@dataclass
class FCOSConfig(ConfigDict):
    """An FCOS checkpoint's architecture (its config.json)."""

    MODEL_TYPE = "fromzero-fcos"

    num_classes: int = 10
    """K: classes (no background class: FCOS scores each class with a sigmoid)."""
    in_channels: int = 1
    """Channels of the input images (1 grayscale, 3 RGB)."""
    image_size: int = 64
    """The transform resizes each image so its short side is this (the 64 px scenes stay at 64: the
    stride-8 level P3 has an 8 x 8 grid; 128 gives 16 x 16 at 4x the CPU time)."""
    fpn_channels: int = 128
    """Channels of every FPN level and of the head."""
    head_convs: int = 2
    """Convolutions (GroupNorm + ReLU) before the classification and box outputs (FCOS paper: 4)."""
    score_threshold: float = 0.05
    """Detections scoring below this are dropped before NMS."""
    nms_threshold: float = 0.6
    """Box NMS IoU (per class)."""
    detections_per_image: int = 100
    """Most detections kept per image."""
    mean: float = 0.5
    """Normalisation mean of every channel (images in [0, 1])."""
    std: float = 0.5
    """Normalisation std of every channel."""
    labels: list[str] | None = None
    """Class names, index = class id."""
    category_ids: list[int] | None = None
    """The COCO category id of each class index."""

    def validate(self) -> None:
        for name in ("num_classes", "in_channels", "image_size", "fpn_channels", "head_convs",
                     "detections_per_image"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.fpn_channels % 16:
            raise ValueError(f"model.fpn_channels must be a multiple of 16 (GroupNorm groups), "
                             f"got {self.fpn_channels}")


class FCOSDetector(nn.Module):
    """torchvision FCOS built from :class:`FCOSConfig` (see the module docstring)."""

    def __init__(self, config: FCOSConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        import torchvision
        from torchvision.models.detection import FCOS
        from torchvision.models.detection.backbone_utils import BackboneWithFPN
        from torchvision.models.detection.fcos import FCOSHead
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7

        body = torchvision.models.resnet18(weights=None)  # trainable BatchNorm (not Frozen)
        if config.in_channels != 3:
            body.conv1 = nn.Conv2d(config.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        c = config.fpn_channels
        backbone = BackboneWithFPN(body, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
                                   in_channels_list=[128, 256, 512], out_channels=c,
                                   extra_blocks=LastLevelP6P7(c, c))
        head = FCOSHead(c, 1, config.num_classes, num_convs=config.head_convs)
        mean, std = [config.mean] * config.in_channels, [config.std] * config.in_channels
        self.net = FCOS(backbone, config.num_classes, min_size=config.image_size,
                        max_size=config.image_size * 4, image_mean=mean, image_std=std,
                        head=head, score_thresh=config.score_threshold, nms_thresh=config.nms_threshold,
                        detections_per_img=config.detections_per_image)

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> object:
        """Training: ``{"classification", "bbox_regression", "bbox_ctrness"}`` losses; eval: detections."""
        return self.net(list(images), targets)


def build_from_config(config: dict) -> FCOSDetector:
    return FCOSDetector(FCOSConfig.from_dict(config))


def _head_modules(model: FCOSDetector) -> list[nn.Module]:
    return [model.net.head]


def _layers(model: FCOSDetector) -> tuple[list[nn.Module], list[nn.Module]]:
    body = model.net.backbone.body
    layers = [body[name] for name in ("layer1", "layer2", "layer3", "layer4")]
    return layers, [model.net.backbone.fpn, model.net.head]


FACTS = FamilyFacts(layer_stack=_layers, head_modules=_head_modules)
