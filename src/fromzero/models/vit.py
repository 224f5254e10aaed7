"""ViT: a Vision Transformer image encoder / classifier, written from scratch.

An image is cut into P x P patches; each patch is linearly projected to a D-wide token (one
convolution with kernel = stride = P does exactly that); a learned class token is put in front;
learned position embeddings are added; a stack of pre-LayerNorm encoder blocks (bidirectional
self-attention, GELU MLP, residual connections) follows; a final LayerNorm closes the stack.
The class token's final state represents the image: a Linear head turns it into class logits.

The maths is Hugging Face ``ViTModel`` / ``ViTForImageClassification``'s (Dosovitskiy et al.,
"An Image is Worth 16x16 Words"), so their weights convert one to one
(:mod:`fromzero.models.convert_vit`). Parameter names follow timm / this package's GPT:
``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks.0.attn.qkv``, ``ln_f``, ``head``.

Try it::

    from fromzero.models.vit import ViT, ViTConfig
    model = ViT(ViTConfig(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=6,
                          num_attention_heads=3, intermediate_size=768, num_labels=10))
    logits = model(images)                        # images: (B, 3, 32, 32) float -> (B, 10)
    loss = torch.nn.functional.cross_entropy(logits, labels)

Like torchvision's CNNs, ``model(images)`` returns logits and the caller computes the loss, so
the image models of this package are interchangeable in one training loop.

Shapes: B = batch, Ch = image channels, Hi x Wi = image size, N = patches, T = 1 + N tokens
(class token first), D = width (hidden_size), H = heads, Dh = head size (D / H).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromzero.models import ConfigDict, FamilyFacts
from fromzero.models.layers import HF_ACTIVATIONS, attention, init_normal

# Activations by their Hugging Face names (``hidden_act`` / ``pooler_act`` in a HF config).
ACTIVATIONS = HF_ACTIVATIONS


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    """An image or patch size as (height, width): 224 -> (224, 224); [224, 160] stays."""
    if isinstance(value, bool):
        raise TypeError(f"expected an int or [height, width], got {value!r}")
    if isinstance(value, int):
        return value, value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return int(value[0]), int(value[1])
    raise TypeError(f"expected an int or [height, width], got {value!r}")


@dataclass
class ViTConfig(ConfigDict):
    """Architecture of a ViT: everything needed to rebuild it (saved as config.json).

    The defaults are ViT-Base/16 at 224 x 224 (Hugging Face's ``ViTConfig`` defaults).
    """

    MODEL_TYPE = "fromzero-vit"

    image_size: int | list[int] = 224
    """Input image size in pixels: an int for square images, or [height, width]."""
    patch_size: int | list[int] = 16
    """Patch size in pixels (int or [height, width]); the image size must be divisible by it."""
    num_channels: int = 3
    """Channels of the input images (3 for RGB)."""
    hidden_size: int = 768
    """Width D of the residual stream (every token is a D-vector)."""
    num_hidden_layers: int = 12
    """Number of encoder blocks."""
    num_attention_heads: int = 12
    """Attention heads per block (hidden_size must be divisible by it)."""
    intermediate_size: int = 3072
    """Hidden width of each block's MLP (4 x hidden_size in ViT-Base)."""
    hidden_act: str = "gelu"
    """MLP activation, by its Hugging Face name ("gelu" is the exact erf GELU)."""
    layer_norm_eps: float = 1e-12
    """Epsilon of every LayerNorm (HF's ViT default; Google's original ViT used 1e-6)."""
    hidden_dropout_prob: float = 0.0
    """Dropout on the embeddings and on each residual branch."""
    attention_probs_dropout_prob: float = 0.0
    """Dropout on the attention weights."""
    qkv_bias: bool = True
    """Biases in the query/key/value projection."""
    num_labels: int = 0
    """Classes of the classification head; 0 = no head (an encoder: the model returns hidden states)."""
    pooler: bool = False
    """Add HF ViTModel's pooler (dense + activation on the class token). The classification head
    does not use it (HF's ViTForImageClassification has none), so it is off by default:
    unused parameters get no gradient, which DDP rejects."""
    pooler_output_size: int = 0
    """Output width of the pooler; 0 = hidden_size."""
    pooler_act: str = "tanh"
    """Activation of the pooler, by its Hugging Face name."""
    labels: list[str] | None = None
    """Optional class names, index = class id (num_labels of them)."""

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along the height and the width of an image."""
        (ih, iw), (ph, pw) = _pair(self.image_size), _pair(self.patch_size)
        return ih // ph, iw // pw

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    def validate(self) -> None:
        """Raise ValueError for shapes that cannot be built."""
        try:
            (ih, iw), (ph, pw) = _pair(self.image_size), _pair(self.patch_size)
        except TypeError as e:
            raise ValueError(f"model.image_size / model.patch_size: {e}") from None
        for name in ("num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if min(ih, iw, ph, pw) <= 0:
            raise ValueError(
                f"model.image_size ({self.image_size}) and model.patch_size ({self.patch_size}) "
                "must be positive"
            )
        if ih % ph or iw % pw:
            raise ValueError(
                f"model.image_size ({self.image_size}) must be divisible by model.patch_size "
                f"({self.patch_size}): the image is cut into whole patches"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {p}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"model.layer_norm_eps must be positive, got {self.layer_norm_eps}")
        if self.num_labels < 0:
            raise ValueError(f"model.num_labels must be >= 0 (0 = no head), got {self.num_labels}")
        if self.pooler_output_size < 0:
            raise ValueError(
                f"model.pooler_output_size must be >= 0 (0 = hidden_size), got {self.pooler_output_size}"
            )
        for name in ("hidden_act", "pooler_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ValueError(
                    f"model.{name} {getattr(self, name)!r} is not supported "
                    f"(supported: {', '.join(sorted(ACTIVATIONS))})"
                )
        if self.labels is not None and len(self.labels) != self.num_labels:
            raise ValueError(
                f"model.labels has {len(self.labels)} names but model.num_labels is {self.num_labels}"
            )


class ViTSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention: every token attends to every token.

    Query, key and value come from one fused Linear (one matmul instead of three); HF's separate
    ``query``/``key``/``value`` weights are stacked into it by the converter.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        D = config.hidden_size
        self.n_head = config.num_attention_heads
        self.head_size = D // self.n_head
        self.qkv = nn.Linear(D, 3 * D, bias=config.qkv_bias)  # rows: q, then k, then v
        self.proj = nn.Linear(D, D)  # back into the residual stream (always with a bias, as HF)
        self.dropout = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # (B, T, 3D) -> (3, B, H, T, Dh): every head attends independently.
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_size).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, D)  # re-assemble the heads
        return self.proj(y)


class ViTMLP(nn.Module):
    """Position-wise feed-forward: D -> intermediate_size -> activation -> D."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-LayerNorm encoder block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.ln_1 = nn.LayerNorm(D, eps=eps)  # HF: layernorm_before
        self.attn = ViTSelfAttention(config)
        self.ln_2 = nn.LayerNorm(D, eps=eps)  # HF: layernorm_after
        self.mlp = ViTMLP(config)
        self.drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))  # the residual stream carries x
        x = x + self.drop(self.mlp(self.ln_2(x)))
        return x


class ViT(nn.Module):
    """Vision Transformer: patch embedding + class token + encoder, optional pooler and head."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        D = config.hidden_size
        self.patch_size = _pair(config.patch_size)
        self.image_size = _pair(config.image_size)
        # A convolution with kernel = stride = patch size is a Linear layer applied to each
        # non-overlapping patch (flattened to Ch * P * P numbers): the "patch embedding".
        self.patch_embed = nn.Conv2d(config.num_channels, D, kernel_size=self.patch_size,
                                     stride=self.patch_size)
        # The class token is the same learned vector for every image; after the encoder its
        # state summarises the image (it attended to every patch).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # Attention is blind to order: a learned vector per position (class token + patches in
        # row-major order) tells each token where it is.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, D))
        self.drop = nn.Dropout(config.hidden_dropout_prob)
        self.blocks = nn.ModuleList(ViTBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.pooler = nn.Linear(D, config.pooler_output_size or D) if config.pooler else None
        self.pooler_act = ACTIVATIONS[config.pooler_act]
        self.head = nn.Linear(D, config.num_labels) if config.num_labels > 0 else None
        self.apply(init_normal)
        # As HF: truncated normal for the class token and position embeddings.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def position_embeddings(self, height: int, width: int, interpolate: bool) -> torch.Tensor:
        """Position embeddings (1, T, D) for an image of height x width pixels.

        Without ``interpolate`` the image must have the configured size. With it, the patch
        position grid is resized bicubically to the image's grid, so a model trained at one
        resolution can run (or be fine-tuned) at another, as HF's ``interpolate_pos_encoding``.
        """
        (ph, pw), (ih, iw) = self.patch_size, self.image_size
        if not interpolate:
            if (height, width) != (ih, iw):
                raise ValueError(
                    f"input image size ({height}x{width}) doesn't match the model ({ih}x{iw}); "
                    "resize the images or pass interpolate_pos_encoding=True"
                )
            return self.pos_embed
        gh, gw = self.config.grid
        new_h, new_w = height // ph, width // pw
        if (new_h, new_w) == (gh, gw):
            return self.pos_embed
        D = self.pos_embed.size(-1)
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]  # (1, 1, D), (1, N, D)
        grid = patch_pos.reshape(1, gh, gw, D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
        grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, D)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def encode(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Final (LayerNormed) hidden states (B, T, D) of images (B, Ch, Hi, Wi); token 0 is the class token.

        This is HF ViTModel's ``last_hidden_state``.
        """
        if pixel_values.dim() != 4 or pixel_values.size(1) != self.config.num_channels:
            raise ValueError(
                f"expected images of shape (batch, {self.config.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}"
            )
        B, _, Hi, Wi = pixel_values.shape
        pixel_values = pixel_values.to(self.patch_embed.weight.dtype)
        x = self.patch_embed(pixel_values)  # (B, D, Hi / P, Wi / P)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D): patches in row-major order
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, T, D)
        x = self.drop(x + self.position_embeddings(Hi, Wi, interpolate_pos_encoding))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """HF ViTModel's ``pooler_output``: activation(dense(class token)) -> (B, pooler width)."""
        if self.pooler is None:
            raise ValueError("this ViT has no pooler (config.pooler is false)")
        return self.pooler_act(self.pooler(hidden[:, 0]))

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Class logits (B, num_labels) of images (B, Ch, Hi, Wi).

        The head reads the final LayerNormed class token (as HF ViTForImageClassification).
        A model without a head (num_labels = 0) returns its hidden states (B, T, D) instead.
        """
        hidden = self.encode(pixel_values, interpolate_pos_encoding)
        if self.head is None:
            return hidden
        return self.head(hidden[:, 0])  # (B, num_labels)


def build_from_config(config: dict) -> ViT:
    """Rebuild a ViT from a checkpoint's config.json (see fromzero.models.build_model)."""
    return ViT(ViTConfig.from_dict(config))


# What fine-tuning and LoRA need to know about this family (see fromzero.models).
FACTS = FamilyFacts(
    lora_targets=("attn.qkv", "attn.proj"), hf_mapping="fromzero.models.convert_vit",
    layer_stack=lambda model: (list(model.blocks), [model.ln_f]),
    head_modules=lambda model: [model.head] if isinstance(getattr(model, "head", None), nn.Module) else [],
    attention=lambda model: ([block.attn for block in model.blocks], model.encode),
    export_signature="image",
)
