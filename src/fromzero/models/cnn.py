"""CNN image classifiers: the guide's simple CNN, and torchvision ResNets, behind one builder.

The simple CNN is the one the classic guide (section 5.2.2) means: two 3x3 convolutions, global
average pooling, two Linear layers. Its code declared ``fc1 = nn.Linear(128 * 56 * 56, 1024)``
after pooling to 1x1; after global pooling each image is 128 numbers, so ``fc1`` is
``Linear(128, 1024)`` here, and the model takes any image size.

ResNets are torchvision's own modules (the library that owns the job); :func:`build_cnn` only
adds what a fine-tuning user needs around them: a new head for ``num_classes``, an input
convolution for ``in_channels`` != 3 (adapted from the pretrained one), pretrained weights from
torchvision's names or from a local file, and a one-line error when they cannot be downloaded.

Try it::

    from fromzero.models.cnn import CNNConfig, build_cnn
    model = build_cnn("resnet18", num_classes=5, weights="DEFAULT")          # ImageNet features
    model = build_cnn("resnet18", 5, weights="/data/resnet18-f37072fd.pth")  # offline
    model = build_cnn("simple", 10)
    logits = model(images)                 # images: (B, 3, H, W) float -> (B, num_classes)
    save_checkpoint(out_dir, model, CNNConfig("resnet18", 5).to_dict())  # load_model rebuilds it

Every model maps images to logits (the caller computes the loss, e.g. ``nn.CrossEntropyLoss``).
Shapes: B = batch, Ch = channels, H x W = image size, K = num_classes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromzero.errors import FromzeroError, first_line
from fromzero.models import ConfigDict, FamilyFacts

# ResNets that build_cnn offers: torchvision builder name == arch name.
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ARCHES = ("simple", *RESNETS)


@dataclass
class SimpleCNNConfig:
    """The simple CNN. The defaults are the guide's network: conv 3x3 (Ch->64) + ReLU, conv 3x3
    (64->128) + ReLU, global average pool, fc 128->1024 + ReLU, fc 1024->num_classes. The other
    fields grow it into the classic small CNN that reaches 99.5% on MNIST (more convolutions,
    BatchNorm, max-pooling between them, a pooled grid instead of one number per channel, dropout)."""

    num_classes: int = 10
    """Number of classes K (outputs of the last Linear layer)."""
    in_channels: int = 3
    """Channels of the input images (3 for RGB, 1 for grayscale)."""
    conv_channels: tuple[int, ...] = (64, 128)
    """Output channels of each 3x3 convolution, in order (conv1, conv2, ...)."""
    pool_after: tuple[int, ...] = ()
    """Convolutions (1-based) followed by a 2x2 max-pool that halves H and W."""
    batch_norm: bool = False
    """BatchNorm after every convolution (before its ReLU); the convolutions then have no bias."""
    head_pool: int = 1
    """Side of the adaptive average pool before the head: 1 = global average pooling (any input
    size, one number per channel); n > 1 keeps an n x n grid of where the features are."""
    hidden_size: int = 1024
    """Width of the hidden Linear layer of the head."""
    dropout: float = 0.0
    """Dropout before each Linear layer of the head (0 = none)."""

    def validate(self) -> None:
        _check_positive(num_classes=self.num_classes, in_channels=self.in_channels,
                        head_pool=self.head_pool, hidden_size=self.hidden_size)
        if not self.conv_channels:
            raise ValueError("model.conv_channels needs at least one convolution")
        _check_positive(**{f"conv_channels[{i}]": c for i, c in enumerate(self.conv_channels)})
        bad = [p for p in self.pool_after if isinstance(p, bool) or not isinstance(p, int)
               or not 1 <= p <= len(self.conv_channels)]
        if bad:
            raise ValueError(f"model.pool_after names convolutions 1-{len(self.conv_channels)}, got {bad}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout!r}")


class SimpleCNN(nn.Module):
    """3x3 convolutions (each + optional BatchNorm + ReLU, some followed by max-pooling), an
    adaptive average pool, a two-layer MLP head. Layers are named conv1..convN (bn1..bnN), fc1,
    fc2, so the guide's two-convolution checkpoints load unchanged."""

    def __init__(self, config: SimpleCNNConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.num_convs = len(config.conv_channels)
        channels = config.in_channels
        for i, out in enumerate(config.conv_channels, start=1):
            # padding 1 keeps H x W through a 3x3 convolution; BatchNorm has its own bias
            setattr(self, f"conv{i}", nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=not config.batch_norm))
            if config.batch_norm:
                setattr(self, f"bn{i}", nn.BatchNorm2d(out))
            channels = out
        self.pool_after = frozenset(config.pool_after)
        self.fc1 = nn.Linear(channels * config.head_pool ** 2, config.hidden_size)
        self.fc2 = nn.Linear(config.hidden_size, config.num_classes)

    def last_conv(self) -> tuple[str, nn.Module]:
        """(name, module) of the last convolution (where Grad-CAM looks)."""
        name = f"conv{self.num_convs}"
        return name, getattr(self, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.num_convs + 1):
            x = getattr(self, f"conv{i}")(x)  # (B, C_i, H, W)
            if self.config.batch_norm:
                x = getattr(self, f"bn{i}")(x)
            x = F.relu(x)
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)  # (B, C_i, H/2, W/2)
        # Adaptive average pooling to head_pool x head_pool: with 1, each channel's mean over the
        # image, which makes the head independent of the image size (any H x W works).
        x = F.adaptive_avg_pool2d(x, self.config.head_pool).flatten(1)  # (B, C_N * head_pool^2)
        p = self.config.dropout
        x = F.relu(self.fc1(F.dropout(x, p, self.training)))  # (B, hidden)
        return self.fc2(F.dropout(x, p, self.training))  # (B, K) logits


@dataclass
class CNNConfig(ConfigDict):
    """A CNN checkpoint's architecture (its config.json): which network, how many classes."""

    MODEL_TYPE = "fromzero-cnn"

    arch: str = "simple"
    """Network: "simple" or a torchvision ResNet ("resnet18", "resnet34", "resnet50", ...)."""
    num_classes: int = 10
    """Number of classes K."""
    in_channels: int = 3
    """Channels of the input images."""
    labels: list[str] | None = None
    """Optional class names, index = class id (num_classes of them)."""
    simple: dict | None = None
    """arch simple: the SimpleCNNConfig fields beyond the guide's defaults (conv_channels,
    pool_after, batch_norm, head_pool, hidden_size, dropout); None = the guide's network."""

    def validate(self) -> None:
        if self.simple is not None and self.arch != "simple":
            raise ValueError(f"model.simple describes the simple CNN, but arch is {self.arch!r}")
        if self.arch not in ARCHES:
            raise ValueError(f"model.arch {self.arch!r} is not supported (supported: {', '.join(ARCHES)})")
        _check_positive(num_classes=self.num_classes, in_channels=self.in_channels)
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(
                f"model.labels has {len(self.labels)} names but model.num_classes is {self.num_classes}"
            )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"model.{name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Building


def simple_config(num_classes: int, in_channels: int, simple: dict | None = None) -> SimpleCNNConfig:
    """The SimpleCNNConfig for ``simple`` (a dict of its architecture fields; None = the guide's)."""
    fields = dict(simple or {})
    known = set(SimpleCNNConfig.__dataclass_fields__) - {"num_classes", "in_channels"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"model.simple has unknown keys {unknown} (known: {sorted(known)})")
    for name in ("conv_channels", "pool_after"):
        if name in fields:
            fields[name] = tuple(fields[name])
    config = SimpleCNNConfig(num_classes=num_classes, in_channels=in_channels, **fields)
    config.validate()
    return config


def _fresh(arch: str, num_classes: int, in_channels: int, simple: dict | None = None) -> nn.Module:
    """A randomly initialised network (no download ever happens here)."""
    if arch == "simple":
        return SimpleCNN(simple_config(num_classes, in_channels, simple))
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size,
                                stride=old.stride, padding=old.padding, bias=False)
        # torchvision's ResNet init for convolutions
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def _head_name(model: nn.Module) -> str:
    return "fc2" if isinstance(model, SimpleCNN) else "fc"


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` a freshly initialised last Linear layer with ``num_classes`` outputs.

    Everything before it (the pretrained features) is kept.
    """
    name = _head_name(model)
    old: nn.Linear = getattr(model, name)
    setattr(model, name, nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype))
    if isinstance(model, SimpleCNN):
        model.config.num_classes = num_classes
    return model


def adapt_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Make the first convolution take ``in_channels`` channels, reusing its trained filters.

    One channel (grayscale): the filters are summed over R, G, B, so a gray image gives exactly
    the response the RGB network gives to that image repeated in three channels. Otherwise the
    RGB filters are repeated cyclically and scaled by 3 / in_channels, keeping activations at
    the scale the rest of the network was trained with (as timm does).
    """
    old = model.conv1  # both SimpleCNN and torchvision ResNets call it conv1
    if old.in_channels == in_channels:
        return model
    new = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                    padding=old.padding, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        w = old.weight  # (out, Ch_old, k, k)
        if in_channels == 1:
            new.weight.copy_(w.sum(dim=1, keepdim=True))
        else:
            reps = -(-in_channels // w.size(1))  # ceil
            new.weight.copy_(w.repeat(1, reps, 1, 1)[:, :in_channels] * (w.size(1) / in_channels))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    model.conv1 = new
    if isinstance(model, SimpleCNN):
        model.config.in_channels = in_channels
    return model


def build_cnn(arch: str, num_classes: int, weights: str | os.PathLike[str] | None = None,
              in_channels: int = 3, simple: dict | None = None) -> nn.Module:
    """A CNN classifier mapping (B, in_channels, H, W) images to (B, num_classes) logits.

    arch: "simple" or a torchvision ResNet ("resnet18", "resnet50", ...; see ``ARCHES``).
    weights: None (random init); a torchvision weights name for ResNets ("DEFAULT",
        "IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2"), downloaded to / read from
        torchvision's cache ``torch.hub.get_dir()/checkpoints``; or a local file (.safetensors,
        or .pth/.pt/.bin loaded with ``weights_only=True``) or fromzero checkpoint directory.
        A pretrained head with a different number of classes is replaced by a fresh one and an
        input convolution with other channels is adapted (see :func:`adapt_input_channels`):
        the pretrained features are kept.
    simple: arch "simple" only: its architecture fields (see :class:`SimpleCNNConfig`).
    """
    try:
        CNNConfig(arch=arch, num_classes=num_classes, in_channels=in_channels, simple=simple).validate()
        if arch == "simple":
            simple_config(num_classes, in_channels, simple)
    except ValueError as e:  # a bad argument from the user (a recipe, the command line)
        raise FromzeroError(str(e).removeprefix("model.")) from None
    if weights is None:
        return _fresh(arch, num_classes, in_channels, simple)
    state, source = _weights_state(arch, weights)
    file_classes, file_in = _saved_shape(arch, state, source)
    if arch == "simple":  # a checkpoint directory says its architecture; a bare file is taken as `simple`
        simple = _checkpoint_simple(weights, simple)
    try:
        model = _fresh(arch, file_classes, file_in, simple)
    except ValueError as e:
        raise FromzeroError(f"{source}: {str(e).removeprefix('model.')}") from None
    _load_checked(model, state, source)
    if file_in != in_channels:
        adapt_input_channels(model, in_channels)
    if file_classes != num_classes:
        replace_head(model, num_classes)
    return model


def build_from_config(config: dict) -> nn.Module:
    """Rebuild a CNN from a checkpoint's config.json (weights are loaded separately, never downloaded)."""
    cfg = CNNConfig.from_dict(config)
    cfg.validate()
    return _fresh(cfg.arch, cfg.num_classes, cfg.in_channels, cfg.simple)


# ---------------------------------------------------------------------------------------------
# Weights


def _is_path(weights: str | os.PathLike[str]) -> bool:
    """A file path, not a torchvision weights name ("DEFAULT", "ResNet50_Weights.IMAGENET1K_V2")."""
    if isinstance(weights, os.PathLike):
        return True
    text = str(weights)
    return (os.sep in text or "/" in text or text.startswith((".", "~"))
            or text.endswith((".safetensors", ".pth", ".pt", ".bin")))


def _weights_state(arch: str, weights: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, where it came from) for a weights argument of build_cnn."""
    if not str(weights).strip():
        raise FromzeroError("weights is empty: give None, a torchvision weights name or a file path")
    if _is_path(weights):
        path = Path(weights).expanduser()
        return _read_local(path), str(path)
    if arch == "simple":
        raise FromzeroError(
            f"the simple CNN has no pretrained weights named {weights!r}; pass weights=PATH to a "
            ".safetensors/.pth file or checkpoint directory"
        )
    return _download(arch, str(weights))


def _checkpoint_simple(weights: str | os.PathLike[str], simple: dict | None) -> dict | None:
    """The ``simple`` architecture of a fromzero checkpoint directory's config.json (the weights
    define the network), else ``simple`` as given."""
    config_file = Path(weights).expanduser() / "config.json"
    if not config_file.is_file():
        return simple
    import json

    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FromzeroError(f"{config_file} is not readable JSON: {e}") from None
    return saved.get("simple") if isinstance(saved, dict) else simple


def _read_local(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise FromzeroError(f"weights directory {path} has no model.safetensors")
        path = path / "model.safetensors"
    if not path.is_file():
        raise FromzeroError(f"weights file not found: {path}")
    from fromzero.models.hf import _load_bin, _load_safetensors

    return _plain_state((_load_safetensors if path.suffix == ".safetensors" else _load_bin)(path), str(path))


def _plain_state(state: object, source: str) -> dict[str, torch.Tensor]:
    """A name -> tensor dict; unwraps {"state_dict": ...} and DDP / torch.compile prefixes."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise FromzeroError(f"{source} does not hold a state dict (names -> tensors)")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _download(arch: str, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's pretrained weights by name, from its cache or the network."""
    import torchvision
    from torchvision.models import get_model_weights, get_weight

    enum = get_model_weights(getattr(torchvision.models, arch))
    try:
        w = get_weight(name) if "." in name else enum[name]
    except (KeyError, ValueError, AttributeError):
        w = None
    if w is None or not isinstance(w, enum):
        options = ", ".join(enum.__members__)
        raise FromzeroError(f"unknown weights {name!r} for {arch} (torchvision has: {options}; or give a file path)")
    filename = os.path.basename(w.url)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        # weights_only=True: a cached or downloaded file is read as plain tensors, never run.
        state = torch.hub.load_state_dict_from_url(w.url, progress=False, check_hash=True,
                                                   map_location="cpu", weights_only=True)
    except OSError as e:  # URLError, HTTPError, timeouts, DNS failures are all OSErrors
        reason = getattr(e, "reason", None) or first_line(e)
        raise FromzeroError(
            f"cannot download {arch} weights {w!r} ({reason}); download {w.url} elsewhere and pass "
            f"weights=/path/to/{filename}, or put it in torchvision's cache {cache}"
        ) from None
    except Exception as e:  # noqa: BLE001 - a corrupt cached file, a download with a bad hash
        if (cache / filename).is_file():
            raise FromzeroError(
                f"cannot load {arch} weights {w!r} from torchvision's cache {cache / filename}: "
                f"{first_line(e)}; delete that file to download it again, or pass weights=/path/to/a/good/copy"
            ) from None
        raise FromzeroError(f"cannot download {arch} weights {w!r} from {w.url}: {first_line(e)}") from None
    return _plain_state(state, str(cache / filename)), str(cache / filename)


def _saved_shape(arch: str, state: dict[str, torch.Tensor], source: str) -> tuple[int, int]:
    """(classes, input channels) of the network a state dict was saved from."""
    head = "fc2.weight" if arch == "simple" else "fc.weight"
    for name, dims in ((head, 2), ("conv1.weight", 4)):
        if name not in state:
            raise FromzeroError(f"{source}: no tensor {name}: not {arch} weights")
        if state[name].dim() != dims:
            raise FromzeroError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}: not {arch} weights")
    return int(state[head].shape[0]), int(state["conv1.weight"].shape[1])


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; missing / unexpected / misshapen tensors are one-line errors."""
    from fromzero.models.hf import check_keys, check_shape

    own = model.state_dict()
    # BatchNorm's batch counter is absent from old torchvision checkpoints; it is not a weight.
    expected = {k for k in own if not (k.endswith("num_batches_tracked") and k not in state)}
    check_keys(expected, set(state), source)
    for name, tensor in state.items():
        check_shape(name, tensor, tuple(own[name].shape), source)
    model.load_state_dict(state, strict=False)


def _cnn_layers(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """A torchvision ResNet's four stages (what unfreeze_top counts); the simple CNN has none."""
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return [getattr(model, f"layer{i}") for i in range(1, 5)], []
    return [], []


def _cnn_head(model: nn.Module) -> list[nn.Module]:
    """The last Linear layer, the one replaced for new classes: fc2 (simple CNN) or fc (ResNet)."""
    head = getattr(model, _head_name(model), None)
    return [head] if isinstance(head, nn.Linear) else []


# What fine-tuning needs to know about this family (see fromzero.models).
FACTS = FamilyFacts(layer_stack=_cnn_layers, head_modules=_cnn_head, export_signature="image")
