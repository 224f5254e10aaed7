"""Grad-CAM heat maps of image classifiers (the simple CNN, torchvision ResNets, ViT) and their overlay PNG.

Grad-CAM (Selvaraju et al., 2017): each channel k of a late feature map A (K, h, w) is weighted
by the mean gradient of the class logit over the map; the map ``relu(sum_k w_k A_k)`` (h, w) is
upsampled (bilinear) to the input size. CNNs: captum's ``LayerGradCam`` on the last
convolutional stage (the simple CNN's last convolution, ``conv2`` in the guide's; ``layer4`` of a
ResNet, 1/32 of the input side). ViT: the same formula on the patch tokens that *enter* the last block, on the patch grid:
the classifier reads only the class token after the last block, so the gradient reaching that
block's other output tokens is zero, while the tokens entering it reach the class token through
its attention ("where did the model look", for the target class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromzero.errors import FromzeroError


@dataclass
class GradCam:
    """A Grad-CAM heat map of one image for one class."""

    grid: torch.Tensor
    """(h, w) the map at the feature map's resolution (ReLU applied, unnormalised)."""
    heatmap: torch.Tensor
    """(H, W) the map upsampled (bilinear) to the model input and scaled to [0, 1] (all 0 if flat)."""
    layer: str
    """The layer the map was computed on (e.g. conv2, layer4, blocks.5 input)."""

    def peak(self) -> tuple[int, int]:
        """(row, column) of the hottest pixel of ``heatmap``."""
        index = int(self.heatmap.argmax())
        return divmod(index, self.heatmap.size(1))


def cam_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the feature map Grad-CAM reads for a CNN: its last convolutional stage."""
    from fromzero.models.cnn import SimpleCNN

    if isinstance(model, SimpleCNN):
        return model.last_conv()
    layer4 = getattr(model, "layer4", None)
    if isinstance(layer4, nn.Module):
        return "layer4", layer4
    raise FromzeroError(f"no known last convolutional stage in a {type(model).__name__}")


def _normalised_upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    up = F.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    top = float(up.max())
    return up / top if top > 0 else torch.zeros_like(up)


def grad_cam(model: nn.Module, pixels: torch.Tensor, target: int) -> GradCam:
    """Grad-CAM of ``pixels`` (1, Ch, H, W), already preprocessed, for class index ``target``."""
    from fromzero.models.vit import ViT

    model.eval()
    size = (pixels.size(-2), pixels.size(-1))
    if isinstance(model, ViT):
        grid, name = _vit_grad_cam(model, pixels, target)
    else:
        from captum.attr import LayerGradCam

        name, layer = cam_layer(model)
        # relu_attributions: keep only the places that raise the class's score (Grad-CAM's ReLU).
        attribution = LayerGradCam(model, layer).attribute(pixels, target=target, relu_attributions=True)
        grid = attribution[0, 0].detach().float()  # (h, w)
    grid = grid.cpu()
    return GradCam(grid=grid, heatmap=_normalised_upsample(grid, size), layer=name)


def _vit_grad_cam(model: nn.Module, pixels: torch.Tensor, target: int) -> tuple[torch.Tensor, str]:
    """Grad-CAM on the patch tokens entering the last block (see the module docstring)."""
    captured: dict[str, torch.Tensor] = {}

    def keep_input(module: nn.Module, args: tuple) -> None:
        tokens = args[0]  # (1, T, D), part of the graph: its gradient is what Grad-CAM weighs
        tokens.retain_grad()
        captured["tokens"] = tokens

    last = len(model.blocks) - 1
    handle = model.blocks[last].register_forward_pre_hook(keep_input)
    try:
        with torch.enable_grad():
            pixels = pixels.detach().requires_grad_(True)  # a graph exists even if weights are frozen
            logits = model(pixels)
            logits[0, target].backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    tokens = captured["tokens"]
    activations, gradients = tokens[0, 1:].detach(), tokens.grad[0, 1:]  # (N, D): drop the class token
    weights = gradients.mean(dim=0)  # (D,): each channel's mean gradient over the patches
    gh, gw = model.config.grid
    cam = F.relu(activations @ weights).reshape(gh, gw)  # (gh, gw) patch grid, row-major as the patches
    return cam.float(), f"blocks.{last} input"


# ---------------------------------------------------------------------------------------------
# Pictures


def display_image(pixels: torch.Tensor, mean: list[float] | None, std: list[float] | None) -> Any:
    """The model input (1, Ch, H, W) as an (H, W, 3) float array in [0, 1]: normalisation undone."""
    x = pixels[0].detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    x = x.clamp(0, 1)
    if x.size(0) == 1:
        x = x.expand(3, -1, -1)
    return x.permute(1, 2, 0).numpy()


def overlay_figure(image: Any, heatmap: torch.Tensor, title: str = "") -> Any:
    """A matplotlib Figure: the image, and the heat map (jet, alpha 0.5) over it, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    left, right = fig.subplots(1, 2)
    left.imshow(image, interpolation="nearest")
    left.set_title("input", fontsize=9)
    right.imshow(image, interpolation="nearest")
    shown = right.imshow(heatmap.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear")
    right.set_title("Grad-CAM", fontsize=9)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=right, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
