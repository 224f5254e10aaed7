"""Fine-tune an image classifier on an ImageFolder: train / val / test, best by val macro-F1.

The data directory holds three splits with the same class folders (``DATA/train/<class>/*.png``,
``val/``, ``test/``), or names a built-in dataset: ``digits`` (written once as an ImageFolder) or
``mnist`` (50k / 10k / 10k held in memory as uint8 tensors and augmented per batch: 70,000 PNG
decodes per epoch would cost more than the small CNN that learns from them). :func:`finetune_images` builds the model (the
simple CNN, a torchvision ResNet, or a ViT) and the data (augmentation, label smoothing, MixUp /
CutMix) and trains in the loop every fine-tuning task shares; the test split is scored once, with
the best weights. ``method="frozen"`` trains the head alone (linear probing), the backbone in eval
mode, so BatchNorm statistics stay those of the pretrained model too.

``privacy`` (``target_epsilon`` or ``noise_multiplier``) trains with DP-SGD through Opacus (see
:mod:`fromzero.training.privacy`): Poisson-sampled batches, per-example clipping and noise, in
float32; val rows carry the ``epsilon`` spent so far. Not with MixUp / CutMix (they mix examples),
l1, or trained BatchNorm layers (a ResNet trains privately with ``method: frozen``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from fromzero.data.images import (AUGMENTS, BAD_IMAGES, TENSOR_AUGMENTS, TensorImageBatch, build_transforms,
                                  default_resize, load_image_folder, normalization)
from fromzero.errors import FromzeroError
from fromzero.finetune.engine import FinetuneConfig, FinetuneTask, run_finetune_task
from fromzero.finetune.lora import apply_lora
from fromzero.finetune.methods import freeze
from fromzero.training.privacy import PrivacyConfig
from fromzero.training.trainer import FitResult, ShuffledEpochs

ARCHS = ("simple", "resnet18", "resnet50", "vit")
METHODS = ("full", "frozen", "lora")
SPLITS = ("train", "val", "test")
# Built-in datasets held in memory (name -> loader of {split: ImageSplit}); the rest are folders.
MEMORY_DATASETS = ("mnist",)


@dataclass
class ImageFinetuneConfig(FinetuneConfig):
    """Fine-tuning an image classifier on DATA/{train,val,test}/<class>/<image>."""

    RECIPE_KEYS: ClassVar[dict[str, str]] = {
        "data_dir": "data.source", "image_size": "data.image_size", "resize_size": "data.resize_size",
        "channels": "data.channels", "normalize": "data.normalize", "mean": "data.mean", "std": "data.std",
        "augment": "data.augment", "bad_images": "data.bad_images", "arch": "model.arch", "weights":
        "model.weights", "vit_patch_size": "model.vit_patch_size", "vit_hidden_size": "model.vit_hidden_size",
        "vit_layers": "model.vit_layers", "vit_heads": "model.vit_heads", "cnn_channels": "model.cnn_channels",
        "cnn_pool_after": "model.cnn_pool_after", "cnn_batch_norm": "model.cnn_batch_norm",
        "cnn_head_pool": "model.cnn_head_pool", "cnn_hidden_size": "model.cnn_hidden_size",
        "cnn_dropout": "model.cnn_dropout"}

    # Inherited options images do not use (the model comes from arch + weights): left out of
    # --help, refused by validate() when a recipe sets them.
    UNUSED_KEYS: ClassVar[frozenset[str]] = frozenset({"init_from"})

    data_dir: str = ""
    """Folder with train/, val/ and test/ ImageFolders (the same class folders in each), or a built-in dataset:
    digits (sklearn's 8x8) | mnist (28x28, held in memory)."""
    arch: str = "simple"
    """simple | resnet18 | resnet50 | vit."""
    weights: str | None = None
    """Pretrained weights: None (random init); for ResNets a torchvision name ("DEFAULT") or a
    file; for any arch a fromzero checkpoint directory (the head is replaced for these classes)."""
    image_size: int = 224
    """Side of the square crop the model sees."""
    resize_size: int = 0
    """Short side the image is resized to before cropping; 0 = image_size * 256 / 224."""
    channels: int = 3
    """3 (RGB) or 1 (grayscale, L): every image is converted to it."""
    normalize: bool = True
    """Normalise with ImageNet's mean/std (averaged for 1 channel); what pretrained models expect."""
    mean: list[float] | None = None
    """Per-channel mean to normalise with instead of ImageNet's (e.g. [0.5, 0.5, 0.5] for HF ViT weights)."""
    std: list[float] | None = None
    """Per-channel std to normalise with instead of ImageNet's."""
    augment: str = "none"
    """Training augmentation: none | flip | affine (small rotation / shift / scale) | trivialaugment | randaugment
    (built-in mnist: none, flip or affine)."""
    bad_images: str = "fail"
    """Corrupt / truncated images: fail (error listing them) | skip (warn and leave them out)."""
    epochs: int = 10
    """Maximum number of passes over the training split."""
    batch_size: int = 32
    """Images per micro-batch."""
    lr: float = 1e-3
    """Peak learning rate (cosine decay to lr * min_lr_ratio over all steps)."""
    warmup_ratio: float = 0.0
    """Fraction of the steps with linear warmup from 0 to lr."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this (0 = off)."""
    log_interval: int = 1
    """Write a metrics row every N optimizer steps."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing in [0, 1)."""
    mixup_alpha: float = 0.0
    """MixUp Beta(alpha, alpha) on training batches; 0 = off."""
    cutmix_alpha: float = 0.0
    """CutMix Beta(alpha, alpha) on training batches; 0 = off (both on: one of the two per batch)."""
    method: str = "full"
    """full (train every weight) | frozen (train the classification head, plus unfreeze_top blocks) | lora (ViT from weights: adapters on attn.qkv / attn.proj, the head in full)."""
    unfreeze_top: int = 0
    """method frozen: also train the last N blocks (ResNet stages layer1-4, ViT blocks); 0 = the head only."""
    vit_patch_size: int = 4
    """ViT trained from scratch: patch size (image_size must be divisible by it)."""
    vit_hidden_size: int = 192
    """ViT trained from scratch: width."""
    vit_layers: int = 6
    """ViT trained from scratch: encoder blocks."""
    vit_heads: int = 3
    """ViT trained from scratch: attention heads."""
    cnn_channels: list[int] = field(default_factory=lambda: [64, 128])
    """arch simple: output channels of each 3x3 convolution (the guide's two: [64, 128])."""
    cnn_pool_after: list[int] = field(default_factory=list)
    """arch simple: convolutions (1-based) followed by a 2x2 max-pool (e.g. [2, 4])."""
    cnn_batch_norm: bool = False
    """arch simple: BatchNorm after every convolution."""
    cnn_head_pool: int = 1
    """arch simple: side of the average pool before the head (1 = global average pooling)."""
    cnn_hidden_size: int = 1024
    """arch simple: width of the head's hidden layer."""
    cnn_dropout: float = 0.0
    """arch simple: dropout before each Linear layer of the head."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """Differential privacy (DP-SGD through Opacus); on when privacy.target_epsilon or noise_multiplier is set."""

    def validate(self) -> None:
        """Raise FromzeroError for a value that cannot work."""
        def one_of(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise FromzeroError(f"{name} {getattr(self, name)!r} is not supported (supported: {', '.join(options)})")

        if not str(self.data_dir).strip():
            raise FromzeroError("data_dir is required (a folder with train/, val/ and test/)")
        one_of("method", METHODS)
        self.validate_common()
        one_of("arch", ARCHS)
        one_of("augment", AUGMENTS)
        if self.data_dir in MEMORY_DATASETS and self.augment not in TENSOR_AUGMENTS:
            raise FromzeroError(f"augment {self.augment!r} works on image folders; the built-in {self.data_dir} "
                                f"supports {', '.join(TENSOR_AUGMENTS)} (or export it with `fromzero data "
                                f"export-images {self.data_dir} DIR` and give DIR)")
        simple = self.simple_cnn()
        if simple and self.arch != "simple":
            names = ", ".join("cnn_channels" if k == "conv_channels" else f"cnn_{k}" for k in simple)
            raise FromzeroError(f"{names} shape the simple CNN (arch simple); arch is {self.arch}")
        if self.arch == "simple":
            from fromzero.models.cnn import simple_config

            try:
                simple_config(2, self.channels, simple)
            except ValueError as e:
                raise FromzeroError(str(e).replace("model.", "cnn_", 1)) from None
        one_of("bad_images", BAD_IMAGES)
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise FromzeroError(f"image_size must be a positive integer, got {self.image_size!r}")
        if self.channels not in (1, 3):
            raise FromzeroError(f"channels must be 1 or 3, got {self.channels!r}")
        if self.resize_size and self.resize_size < self.image_size:
            raise FromzeroError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size}) or 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise FromzeroError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise FromzeroError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if self.method == "frozen" and self.weights is None:
            raise FromzeroError("method=frozen trains only the head: it needs pretrained weights (weights=...)")
        if self.method == "lora" and (self.arch != "vit" or self.weights is None):
            raise FromzeroError("method=lora adapts a pretrained ViT: set arch vit and weights to a fromzero ViT "
                                "checkpoint directory (e.g. one converted with `fromzero convert from-hf`)")
        if self.method == "lora" and self.privacy.enabled:
            raise FromzeroError("privacy: DP-SGD with LoRA adapters is not supported: use method full or frozen")
        self.privacy.validate()
        if self.privacy.enabled:
            if self.mixup_alpha or self.cutmix_alpha:
                raise FromzeroError("privacy: MixUp / CutMix blend examples, so one example's gradient depends on "
                                    "others and the per-example bound fails: set mixup_alpha and cutmix_alpha to 0")
            if self.l1:
                raise FromzeroError("privacy: the l1 penalty's gradient would bypass per-example clipping: set l1 to 0")
            if self.dtype in ("bfloat16", "float16"):
                raise FromzeroError(f"privacy: dtype {self.dtype} is not supported (per-example gradients are "
                                    "computed in float32): use dtype float32 or auto")
            if self.grad_accum != 1 or self.dist_strategy != "none" or self.compile:
                raise FromzeroError("privacy: DP-SGD runs in one process, uncompiled, with grad_accum 1")


    def simple_cnn(self) -> dict:
        """The cnn_* options that differ from the guide's network, as SimpleCNNConfig fields."""
        from fromzero.models.cnn import SimpleCNNConfig

        chosen = {"conv_channels": tuple(self.cnn_channels), "pool_after": tuple(self.cnn_pool_after),
                  "batch_norm": self.cnn_batch_norm, "head_pool": self.cnn_head_pool,
                  "hidden_size": self.cnn_hidden_size, "dropout": self.cnn_dropout}
        default = SimpleCNNConfig()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in chosen.items() if getattr(default, k) != v}


# ---------------------------------------------------------------------------------------------
# Model: build, name the head, save


def build_image_model(cfg: ImageFinetuneConfig, num_classes: int) -> nn.Module:
    """The classifier for ``cfg.arch`` with ``num_classes`` outputs, from ``cfg.weights`` if given."""
    if cfg.arch == "vit":
        return _build_vit(cfg, num_classes)
    from fromzero.models.cnn import build_cnn

    return build_cnn(cfg.arch, num_classes, weights=cfg.weights, in_channels=cfg.channels,
                     simple=cfg.simple_cnn() or None)


def _build_vit(cfg: ImageFinetuneConfig, num_classes: int) -> nn.Module:
    from fromzero.models.vit import ViT, ViTConfig

    if cfg.weights is None:
        vc = ViTConfig(image_size=cfg.image_size, patch_size=cfg.vit_patch_size, num_channels=cfg.channels,
                       hidden_size=cfg.vit_hidden_size, num_hidden_layers=cfg.vit_layers,
                       num_attention_heads=cfg.vit_heads, intermediate_size=4 * cfg.vit_hidden_size,
                       layer_norm_eps=1e-6, num_labels=num_classes)
        try:
            return ViT(vc)
        except ValueError as e:
            raise FromzeroError(str(e).removeprefix("model.")) from None
    from fromzero.checkpoint import load_model

    model = load_model(cfg.weights)  # a fromzero-vit checkpoint (e.g. converted from Hugging Face)
    if not isinstance(model, ViT):
        raise FromzeroError(f"weights {cfg.weights} are not a ViT checkpoint (arch=vit)")
    if model.config.num_channels != cfg.channels:
        raise FromzeroError(f"ViT weights take {model.config.num_channels} channels but channels={cfg.channels}")
    if model.image_size != (cfg.image_size, cfg.image_size):
        if cfg.method == "lora":  # an adapter checkpoint rebuilds the base as it is on disk
            raise FromzeroError(f"method=lora keeps the base's weights, position grid included: set image_size "
                                f"to the ViT's {model.image_size[0]} (or use method full to train at another size)")
        # Resize the learned position grid once (bicubic) so the model runs at the new size.
        h = w = cfg.image_size
        ph, pw = model.patch_size
        if h % ph or w % pw:
            raise FromzeroError(f"image_size {cfg.image_size} is not divisible by the ViT's patch size {ph}")
        with torch.no_grad():
            new_pos = model.position_embeddings(h, w, interpolate=True).clone()
        model.pos_embed = nn.Parameter(new_pos)
        model.config.image_size = cfg.image_size
        model.image_size = (h, w)
    D = model.config.hidden_size
    model.head = nn.Linear(D, num_classes)
    nn.init.zeros_(model.head.weight)  # a zero head starts at uniform predictions (as in ViT fine-tuning)
    nn.init.zeros_(model.head.bias)
    model.config.num_labels = num_classes
    model.config.labels = None
    return model


def head_module(model: nn.Module) -> nn.Module:
    """The last Linear layer (the one replaced for new classes): fc2 / fc / head."""
    from fromzero.models import family_facts

    head = family_facts(model).head_modules(model)
    if len(head) != 1 or not isinstance(head[0], nn.Linear):
        raise FromzeroError(f"cannot find the classification head of {type(model).__name__}")
    return head[0]


def model_config(model: nn.Module, cfg: ImageFinetuneConfig, labels: list[str]) -> dict:
    """config.json of the checkpoint: the model family's config with the class names."""
    if cfg.arch == "vit":
        vc = copy.deepcopy(model.config)
        vc.num_labels, vc.labels = len(labels), list(labels)
        return vc.to_dict()
    from fromzero.models.cnn import CNNConfig, SimpleCNN

    # the network as built (a simple CNN from a checkpoint directory has that checkpoint's shape)
    simple = None
    if isinstance(model, SimpleCNN):
        simple = cfg.simple_cnn() if cfg.weights is None else _simple_fields(model)
    return CNNConfig(arch=cfg.arch, num_classes=len(labels), in_channels=cfg.channels, labels=list(labels),
                     simple=simple or None).to_dict()


def _simple_fields(model: nn.Module) -> dict:
    """The architecture fields of a built SimpleCNN that differ from the guide's network."""
    from dataclasses import asdict

    from fromzero.models.cnn import SimpleCNNConfig

    default = asdict(SimpleCNNConfig())
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.config).items()
            if k not in ("num_classes", "in_channels") and default[k] != v}


# ---------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def predict_loader(model: nn.Module, loader: Any, device: torch.device, autocast: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, K) float32 on CPU, labels (N,)) of every batch of ``loader``."""
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        with autocast():
            out = model(x.to(device, non_blocking=True))
        logits.append(out.float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def _score(logits: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, Any]:
    from fromzero.evaluation.metrics import classification_metrics

    m = classification_metrics(labels.tolist(), logits.argmax(1).tolist(), labels=names)
    m["loss"] = float(nn.functional.cross_entropy(logits, labels))
    return m


def _mixer(cfg: ImageFinetuneConfig, num_classes: int) -> Any:
    from torchvision.transforms import v2

    mixes = []
    if cfg.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def memory_image_data(name: str) -> tuple[dict[str, Any], list[str]]:
    """({split: ImageSplit}, class names) of a built-in in-memory dataset (see MEMORY_DATASETS)."""
    if name != "mnist":
        raise FromzeroError(f"{name!r} is not a built-in in-memory dataset (known: {', '.join(MEMORY_DATASETS)})")
    from fromzero.data.mnist import CLASSES, load_mnist

    return load_mnist(), list(CLASSES)


def builtin_image_data(data_dir: str) -> Path:
    """``digits`` -> scikit-learn's digits as an ImageFolder in $FROMZERO_HOME (written once)."""
    if data_dir != "digits":
        return Path(data_dir)
    from fromzero.data.corpora import fromzero_home
    from fromzero.data.datasets import write_digits_imagefolder

    target = fromzero_home() / "datasets" / "digits"
    if not (target / "meta.json").is_file():
        write_digits_imagefolder(target, force=True)
    return target


def finetune_images(cfg: ImageFinetuneConfig, resume: bool = False) -> dict[str, Any]:
    """Run an ImageClassificationTask (train, keep the best val weights, test once); returns its summary."""
    return run_finetune_task(ImageClassificationTask, cfg, resume)


class ImageClassificationTask(FinetuneTask):
    """One image-classification fine-tune (see :class:`fromzero.finetune.engine.FinetuneTask`)."""

    name = "image-classification"
    monitor, higher_is_better = "val_f1_macro", True

    @classmethod
    def dtype_setting(cls, cfg: ImageFinetuneConfig) -> str:
        return "float32" if cfg.privacy.enabled else cfg.dtype  # DP-SGD: per-example grads in fp32

    def __init__(self, cfg: ImageFinetuneConfig, ctx: Any, device: torch.device, dtype: str) -> None:
        self.cfg, self.ctx, self.device, self.dtype = cfg, ctx, device, dtype
        # -- data (checked before the run directory is touched: bad input leaves nothing behind)
        self.in_memory = cfg.data_dir in MEMORY_DATASETS
        if self.in_memory:
            self.labels, (train_ds, val_ds, test_ds), collates = self._memory_data()
        else:
            train_ds, val_ds, test_ds = self._folder_data()
            collates = (None, None, None)
        labels = self.labels
        cfg.privacy.check_dataset(len(train_ds))
        self.sizes = len(train_ds), len(val_ds), len(test_ds)

        torch.manual_seed(cfg.seed)
        model = build_image_model(cfg, len(labels))
        self.trained_modules = freeze(model, cfg.unfreeze_top) if cfg.method == "frozen" else None
        self.config = model_config(model, cfg, labels)  # before any LoRA wrapper
        if cfg.method == "lora":
            model = apply_lora(model, self.config, cfg, modules_to_save=["head"])
        if cfg.privacy.enabled:
            from fromzero.training.privacy import make_compatible

            # No fixing (BatchNorm -> GroupNorm): config.json could not describe the fixed network.
            make_compatible(model, fix=False, why_not="a fromzero-cnn checkpoint cannot hold the GroupNorm layers "
                            "that would replace them: use method frozen (unfreeze_top 0), arch simple or arch vit")
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # CNNs run faster channels-last (NHWC) on CPU oneDNN and CUDA tensor cores alike (1.25x
        # measured for the MNIST CNN on this CPU); not under Opacus, whose per-sample hooks expect NCHW.
        cnn = cfg.arch != "vit" and not cfg.privacy.enabled
        self.memory_format = torch.channels_last if cnn else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)

        generator = torch.Generator().manual_seed(cfg.seed)
        pin = device.type == "cuda"
        loader_args = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=pin,
                           persistent_workers=cfg.num_workers > 0)
        # drop_last only when it loses little: a batch of 1 breaks BatchNorm, tiny sets need every image.
        n_train = len(train_ds)
        drop_last = n_train > 4 * cfg.batch_size or (n_train > cfg.batch_size and n_train % cfg.batch_size == 1)
        # DP: Poisson sampling has no partial batch; keeping them all makes the expected batch
        # n / ceil(n / batch_size) <= batch_size (q = 1 / number of batches).
        drop_last = drop_last and not cfg.privacy.enabled
        self.train_loader = DataLoader(train_ds, shuffle=True, drop_last=drop_last, generator=generator,
                                       collate_fn=collates[0], **loader_args)
        self.val_loader = DataLoader(val_ds, shuffle=False, collate_fn=collates[1], **loader_args)
        self.test_loader = DataLoader(test_ds, shuffle=False, collate_fn=collates[2], **loader_args)
        self.train_batches: Any = ShuffledEpochs(self.train_loader, generator)

        self.privacy_report: dict[str, Any] | None = None  # set when training ends
        if cfg.privacy.enabled:  # checked (and the noise calibrated) before the run directory is touched
            from fromzero.training.optim import build_optimizer
            from fromzero.training.privacy import make_private

            private = make_private(model, build_optimizer(model, cfg, device), self.train_loader, cfg.privacy,
                                   cfg.epochs, seed=cfg.seed)
            self.private, self.forward, self.optimizer = private, private.module, private.optimizer
            # Poisson-sampled, from Opacus' own generator
            self.train_batches = lambda epoch: iter(private.loader)  # noqa: E731
            print(private.describe())
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)  # also takes MixUp's soft targets
        self.mixer = _mixer(cfg, len(labels))

    def _folder_data(self) -> tuple[Any, Any, Any]:
        """train / val / test ImageFolders (sets self.labels from train's class folders)."""
        cfg = self.cfg
        data_dir = builtin_image_data(cfg.data_dir)
        for split in SPLITS:
            if not (data_dir / split).is_dir():
                raise FromzeroError(f"{data_dir / split} not found: data.source needs train/, val/ and test/ folders "
                                   "of class folders (examples/split_image_folder.py makes them from one folder)")
        mode = "RGB" if cfg.channels == 3 else "L"
        tf_args = dict(image_size=cfg.image_size, resize_size=cfg.resize_size or None, channels=cfg.channels,
                       normalize=cfg.normalize, mean=cfg.mean, std=cfg.std)
        train_ds = load_image_folder(data_dir / "train", build_transforms(True, augment=cfg.augment, **tf_args),
                                     mode=mode, bad_images=cfg.bad_images)
        self.labels = labels = list(train_ds.classes)
        if len(labels) < 2:
            raise FromzeroError(f"{data_dir / 'train'} has {len(labels)} class folder; a classifier needs at least 2")
        eval_tf = build_transforms(False, **tf_args)
        val_ds = load_image_folder(data_dir / "val", eval_tf, mode=mode, bad_images=cfg.bad_images, classes=labels)
        test_ds = load_image_folder(data_dir / "test", eval_tf, mode=mode, bad_images=cfg.bad_images, classes=labels)
        return train_ds, val_ds, test_ds

    def _memory_data(self) -> tuple[list[str], tuple[Any, Any, Any], tuple[Any, Any, Any]]:
        """(class names, train / val / test TensorDatasets, their collate functions) of a built-in
        in-memory dataset: batches are scaled, augmented, resized and normalised as a whole."""
        from torch.utils.data import TensorDataset

        splits, labels = memory_image_data(self.cfg.data_dir)
        mean, std = self.mean_std()
        batch = dict(image_size=self.cfg.image_size, channels=self.cfg.channels, mean=mean, std=std)
        datasets = tuple(TensorDataset(splits[s].images, splits[s].labels) for s in SPLITS)
        collates = (TensorImageBatch(True, augment=self.cfg.augment, **batch), TensorImageBatch(False, **batch),
                    TensorImageBatch(False, **batch))
        return labels, datasets, collates  # type: ignore[return-value]

    def mean_std(self) -> tuple[list[float] | None, list[float] | None]:
        """The normalisation the model's inputs get (None, None when normalize is off)."""
        cfg = self.cfg
        if not cfg.normalize:
            return None, None
        mean, std = normalization(cfg.channels)
        return list(cfg.mean or mean), list(cfg.std or std)

    def start(self, run_dir: Path) -> None:
        cfg = self.cfg
        n_train, n_val, n_test = self.sizes
        print(f"image classification ({cfg.arch}): {len(self.labels)} classes, train/val/test "
              f"{n_train}/{n_val}/{n_test} images; method {cfg.method}: trains {self.trainable:,} parameters; "
              f"device {self.device}, {self.dtype}")
        mean, std = self.mean_std()
        # in-memory images are taken whole (no crop): predicting on a file resizes it to image_size
        resize = cfg.image_size if self.in_memory else cfg.resize_size or default_resize(cfg.image_size)
        self.base_info = {"task": "image-classification", "image_size": cfg.image_size,
                          "resize_size": resize, "channels": cfg.channels, "mean": mean, "std": std}

    def batches(self) -> tuple[Any, int]:
        return self.train_batches, len(self.train_loader)

    def loss(self, net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        x = batch[0].to(self.device, memory_format=self.memory_format, non_blocking=True)
        y = batch[1].to(self.device, non_blocking=True)
        if self.mixer is not None:
            x, y = self.mixer(x, y)  # y becomes (B, K) mixed one-hot targets
        return self.criterion(net(x).float(), y), x.size(0), 0

    def _score(self, loader: Any) -> dict[str, Any]:
        return _score(*predict_loader(self.model, loader, self.device, self.autocast), self.labels)

    def evaluate(self, _: nn.Module) -> dict[str, Any]:
        val = self._score(self.val_loader)
        return {k: val[k] for k in ("loss", "accuracy", "f1_macro", "f1_weighted")}

    def write_best(self, extra: dict[str, Any]) -> None:
        """checkpoints/best from the model as it is now (config.json with the class names)."""
        self.save_model(self.best_dir, {**self.base_info, **extra},
                        Path(str(self.cfg.weights)) if self.cfg.method == "lora" else None)

    def save_best(self, info: dict[str, Any]) -> None:
        if self.private is None:  # a private run's checkpoint is written once, with its privacy guarantee
            self.write_best({"best_epoch": info["best_epoch"], "best_step": info["best_step"],
                             "val_f1_macro": info["val"]["f1_macro"]})

    def end_training(self, fit: FitResult) -> None:
        if self.private is not None:  # the guarantee covers every step taken, whichever epoch is kept
            self.privacy_report = self.private.report()
            self.private.close()  # hooks off: the model is a plain module again

    def test(self) -> dict[str, Any]:
        return self._score(self.test_loader)

    def test_row(self, fit: FitResult, test: dict[str, Any]) -> dict[str, Any]:
        return {"step": fit.steps, "epoch": fit.best_epoch, "test_loss": test["loss"],
                "test_accuracy": test["accuracy"], "test_f1_macro": test["f1_macro"]}

    def finish(self, fit: FitResult, test: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        from fromzero.evaluation.metrics import format_report, write_metrics_json
        from fromzero.evaluation.plots import plot_confusion_matrix

        best_val, privacy = fit.best_metrics, self.privacy_report
        report = {**test, "split": "test", "best_epoch": fit.best_epoch, "best_step": fit.best_step,
                  "epochs_run": fit.epochs_run, "stopped_early": fit.stopped_early,
                  "val_f1_macro": best_val["f1_macro"], "val_accuracy": best_val["accuracy"]}
        if privacy is not None:
            report["privacy"] = privacy
        write_metrics_json(report, self.run_dir / "metrics.json")
        plot_confusion_matrix(test["confusion_matrix"], self.labels, self.run_dir / "plots" / "confusion_matrix.png")
        self.write_best({"best_epoch": fit.best_epoch, "best_step": fit.best_step,
                         "val_f1_macro": best_val["f1_macro"], "test_accuracy": test["accuracy"],
                         **({"privacy": privacy} if privacy is not None else {})})
        print(f"test ({self.sizes[2]} images, best epoch {fit.best_epoch}):\n{format_report(test)}")
        if privacy is not None:
            print(f"privacy: ({privacy['epsilon']:.3f}, {privacy['delta']:g})-DP for the training split "
                  f"({privacy['steps']} steps, noise multiplier {privacy['noise_multiplier']:.4g})")
        return self.summary(fit, test, labels=self.labels, privacy=privacy, trainable_params=self.trainable)
