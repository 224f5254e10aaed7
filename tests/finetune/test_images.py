"""Tests for image fine-tuning (fromzero.finetune.images) and image folders (fromzero.data.images).

The data is a tiny synthetic ImageFolder written by the tests: three classes of 16x16 PNGs
(horizontal stripes, vertical stripes, checkerboards, each in a random colour with random
period, phase, brightness and noise), small enough that the simple CNN learns it in a few CPU epochs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import fromzero.finetune.images as fi
from fromzero.data.images import build_transforms, load_image_folder, scan_image_folder
from fromzero.errors import FromzeroError
from fromzero.finetune.methods import freeze
from fromzero.training.trainer import set_train_mode
from fromzero.finetune.images import (
    ImageFinetuneConfig,
    build_image_model,
    finetune_images,
    head_module,
)
from fromzero.models.cnn import build_cnn
from fromzero.checkpoint import load_model, save_checkpoint

CLASSES = ("checker", "hstripes", "vstripes")
SIZE = 16


def shape_image(cls: str, rng: np.random.Generator) -> np.ndarray:
    """(16, 16, 3) uint8: the class's pattern in a random colour, with random phase, level and noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    period = int(rng.integers(3, 6))
    phase = int(rng.integers(0, period))
    if cls == "hstripes":
        mask = ((yy + phase) % period) < period / 2
    elif cls == "vstripes":
        mask = ((xx + phase) % period) < period / 2
    else:
        mask = (((yy + phase) // 2 + (xx + phase) // 2) % 2) == 0
    img = rng.uniform(0, 40, size=(SIZE, SIZE, 3))
    # the colour is random, not the class's: only the pattern tells the classes apart
    img[..., int(rng.integers(0, 3))] += mask * rng.uniform(150, 215)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(root: Path, counts: dict[str, int] | None = None, seed: int = 0) -> Path:
    counts = counts or {"train": 32, "val": 8, "test": 8}
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for cls in CLASSES:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(shape_image(cls, rng), "RGB").save(d / f"{i:03d}.png")
    return root


def tiny_cfg(data: Path, out: Path, **kw) -> ImageFinetuneConfig:
    base = dict(data_dir=str(data), arch="simple", image_size=SIZE, resize_size=SIZE, epochs=8,
                batch_size=16, lr=3e-3, weight_decay=0.0, seed=0, device="cpu", dtype="float32",
                out_dir=str(out), progress=False)
    base.update(kw)
    return ImageFinetuneConfig(**base)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def trained(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageFinetuneConfig, dict]:
    cfg = tiny_cfg(shapes, tmp_path_factory.mktemp("runs") / "run")
    return cfg, finetune_images(cfg)


# ---------------------------------------------------------------------------------------------
# Training end to end


def test_simple_cnn_learns_the_shapes(trained) -> None:
    _, result = trained
    assert result["labels"] == list(CLASSES)
    assert result["val"]["accuracy"] >= 0.9
    assert result["test"]["accuracy"] >= 0.9
    assert result["epochs_run"] == 8 and not result["stopped_early"]


def test_run_directory_contents(trained) -> None:
    cfg, result = trained
    run = Path(cfg.out_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["labels"] == list(CLASSES)
    assert metrics["accuracy"] == pytest.approx(result["test"]["accuracy"])
    assert np.asarray(metrics["confusion_matrix"]).sum() == 3 * 8
    for name in ("config.yaml", "metrics.jsonl", "plots/confusion_matrix.png", "plots/loss.png",
                 "checkpoints/best/config.json", "checkpoints/best/model.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "plots/confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run / "tb").iterdir())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_f1_macro" in r for r in rows) == 8
    assert all({"step", "loss", "lr", "samples_per_sec", "elapsed_s"} <= r.keys() for r in rows if "loss" in r)
    config = json.loads((run / "checkpoints/best/config.json").read_text())
    assert config["model_type"] == "fromzero-cnn" and config["labels"] == list(CLASSES)


def test_checkpoint_reloads_with_same_predictions(trained, shapes: Path) -> None:
    cfg, result = trained
    model = load_model(result["checkpoint"])
    test = load_image_folder(shapes / "test", build_transforms(False, SIZE, resize_size=SIZE))
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    pred = model(x).argmax(1)
    assert (pred == y).float().mean().item() == pytest.approx(result["test"]["accuracy"])
    cm = np.zeros((3, 3), dtype=int)
    for t, p in zip(y.tolist(), pred.tolist()):
        cm[t, p] += 1
    assert cm.tolist() == result["test"]["confusion_matrix"]


def test_existing_run_dir_is_refused_unless_force(trained) -> None:
    cfg, _ = trained
    with pytest.raises(FromzeroError, match="holds a finished run; pass --force to start over"):
        finetune_images(cfg)


# ---------------------------------------------------------------------------------------------
# Early stopping


def test_early_stopping_restores_the_best_weights(shapes: Path, tmp_path: Path, monkeypatch) -> None:
    """Scripted val macro-F1 0.3, 0.8, 0.5, 0.6 with patience 2: stop after epoch 4, keep epoch 2."""
    scripted = iter([0.3, 0.8, 0.5, 0.6])
    snapshots: list[dict[str, torch.Tensor]] = []
    real_predict, real_score = fi.predict_loader, fi._score

    def predict(model, *args):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_predict(model, *args)

    def score(*args):
        m = real_score(*args)
        m["f1_macro"] = next(scripted, m["f1_macro"])  # the final test call keeps its real value
        return m

    monkeypatch.setattr(fi, "predict_loader", predict)
    monkeypatch.setattr(fi, "_score", score)
    result = finetune_images(tiny_cfg(shapes, tmp_path / "run", epochs=10, patience=2))
    assert result["stopped_early"] and result["epochs_run"] == 4 and result["best_epoch"] == 2
    assert len(snapshots) == 5  # 4 val passes + 1 test pass
    best, last, tested = snapshots[1], snapshots[3], snapshots[4]
    assert any(not torch.equal(best[k], last[k]) for k in best)  # training went on after epoch 2
    for k in best:  # ... but the test split and the checkpoint see epoch 2's weights
        torch.testing.assert_close(tested[k], best[k], rtol=0, atol=0)
    saved = load_model(result["checkpoint"]).state_dict()
    for k in best:
        torch.testing.assert_close(saved[k], best[k], rtol=0, atol=0)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best_epoch"] == 2 and metrics["stopped_early"] is True


# ---------------------------------------------------------------------------------------------
# Frozen backbone (head only)


def test_frozen_trains_only_the_head(shapes: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    pretrained = build_cnn("simple", 5)  # "pretrained" on 5 classes: the head gets replaced
    save_checkpoint(tmp_path / "pre", pretrained, {"model_type": "fromzero-cnn", "arch": "simple",
                                                    "num_classes": 5, "in_channels": 3})
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    result = finetune_images(tiny_cfg(shapes, tmp_path / "run", method="frozen", weights=str(tmp_path / "pre"),
                                      epochs=2, lr=1e-2))
    after = load_model(result["checkpoint"]).state_dict()
    for k in before:
        if k.startswith("fc2."):
            assert after[k].shape[0] == 3
        else:
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert result["trainable_params"] == 1024 * 3 + 3


def test_freeze_flags_and_batchnorm_mode() -> None:
    model = build_cnn("resnet18", 4)
    trained = freeze(model)
    assert head_module(model) is model.fc and trained == [model.fc]
    assert all(p.requires_grad == n.startswith("fc.") for n, p in model.named_parameters())
    set_train_mode(model, trained)
    assert model.fc.training and not model.bn1.training and not model.layer1[0].bn1.training


def test_unfreeze_top_stage_of_a_resnet() -> None:
    model = build_cnn("resnet18", 4)
    trained = freeze(model, unfreeze_top=1)
    assert trained == [model.fc, model.layer4]
    assert all(p.requires_grad == n.startswith(("fc.", "layer4.")) for n, p in model.named_parameters())
    set_train_mode(model, trained)
    assert model.layer4[0].bn1.training and not model.layer3[0].bn1.training
    with pytest.raises(FromzeroError, match="more than the model's 4 layers"):
        freeze(build_cnn("resnet18", 4), unfreeze_top=5)


def test_frozen_needs_weights(shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(FromzeroError, match="needs pretrained weights"):
        finetune_images(tiny_cfg(shapes, tmp_path / "run", method="frozen"))


# ---------------------------------------------------------------------------------------------
# Other options: ViT, MixUp/CutMix, augmentation, grayscale


def test_vit_mixup_cutmix_smoothing_sgd_one_epoch(shapes: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(shapes, tmp_path / "run", arch="vit", vit_hidden_size=32, vit_layers=1, vit_heads=2,
                   epochs=1, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, optimizer="sgd",
                   augment="trivialaugment")
    result = finetune_images(cfg)
    model = load_model(result["checkpoint"])
    assert model.config.labels == list(CLASSES) and model.config.num_labels == 3
    assert model(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, 3)


@pytest.mark.parametrize("augment", ["none", "flip", "trivialaugment", "randaugment"])
def test_transform_presets_shapes(augment: str) -> None:
    img = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
    train = build_transforms(True, 16, augment=augment)
    assert train(img).shape == (3, 16, 16) and train(img).dtype == torch.float32
    x = build_transforms(False, 16, channels=1, normalize=False)(img.convert("RGBA"))
    assert x.shape == (1, 16, 16) and float(x.max()) == 0.0  # opaque black stays black
    with pytest.raises(FromzeroError, match="augment"):
        build_transforms(True, 16, augment="autoaugment")


def test_mixed_modes_become_rgb_or_l(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d", {"train": 2})
    d = root / "train" / CLASSES[0]
    Image.fromarray(np.full((16, 16), 200, np.uint8), "L").save(d / "gray.png")
    rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent: composited over white
    Image.fromarray(rgba, "RGBA").save(d / "clear.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).convert("P").save(d / "palette.png")
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(d / "deep.png")  # 16-bit grayscale
    for channels, mode in ((3, "RGB"), (1, "L")):
        ds = load_image_folder(root / "train", build_transforms(False, SIZE, resize_size=SIZE, channels=channels,
                                                                normalize=False), mode=mode)
        assert len(ds) == 3 * 2 + 4
        by_name = {Path(p).name: i for i, (p, _) in enumerate(ds.samples)}
        for i in range(len(ds)):
            assert ds[i][0].shape == (channels, SIZE, SIZE)
        assert ds[by_name["clear.png"]][0].min().item() == pytest.approx(1.0)
        assert ds[by_name["deep.png"]][0].min().item() == pytest.approx(1.0)
        assert ds[by_name["gray.png"]][0].mean().item() == pytest.approx(200 / 255, abs=1e-6)


def test_grayscale_training_run(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d", {"train": 4, "val": 2, "test": 2})
    result = finetune_images(tiny_cfg(root, tmp_path / "run", channels=1, epochs=1))
    model = load_model(result["checkpoint"])
    assert model.conv1.in_channels == 1


# ---------------------------------------------------------------------------------------------
# Bad input


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d", {"train": 2, "val": 1, "test": 1})
    (root / "train" / "zebra").mkdir()
    (root / "train" / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(FromzeroError, match=r"empty class folder.*zebra"):
        finetune_images(tiny_cfg(root, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # checked before the run directory is made


def test_val_with_other_classes_is_an_error(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d", {"train": 2, "val": 1, "test": 1})
    (root / "val" / CLASSES[0] / "000.png").rename(tmp_path / "moved.png")
    (root / "val" / CLASSES[0]).rmdir()
    with pytest.raises(FromzeroError, match=r"missing \['checker'\]"):
        finetune_images(tiny_cfg(root, tmp_path / "run"))


def _corrupt(root: Path) -> tuple[Path, Path]:
    d = root / "train" / CLASSES[1]
    garbage = d / "garbage.png"
    garbage.write_bytes(b"this is not a png at all")
    truncated = d / "truncated.png"
    big = np.random.default_rng(0).integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    return garbage, truncated


def test_corrupt_images_fail_with_the_list(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d", {"train": 2, "val": 1, "test": 1})
    garbage, truncated = _corrupt(root)
    assert set(scan_image_folder(root / "train")["bad"]) == {str(garbage), str(truncated)}
    with pytest.raises(FromzeroError, match="2 unreadable image") as e:
        finetune_images(tiny_cfg(root, tmp_path / "run"))
    assert str(garbage) in str(e.value) and str(truncated) in str(e.value) and "bad_images=skip" in str(e.value)


def test_corrupt_images_skip_warns_and_trains(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d", {"train": 2, "val": 1, "test": 1})
    garbage, truncated = _corrupt(root)
    with pytest.warns(UserWarning, match="skipping 2 unreadable") as record:
        result = finetune_images(tiny_cfg(root, tmp_path / "run", bad_images="skip", epochs=1))
    assert str(garbage) in str(record[0].message) and str(truncated) in str(record[0].message)
    assert result["epochs_run"] == 1


def test_skip_that_empties_a_class_is_an_error(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d", {"train": 1})
    only = root / "train" / CLASSES[0] / "000.png"
    only.write_bytes(b"broken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FromzeroError, match="no readable images left"):
            load_image_folder(root / "train", bad_images="skip")


@pytest.mark.parametrize("field,value,match", [
    ("arch", "resnet9", "arch 'resnet9'"),
    ("optimizer", "adam", "optimizer"),
    ("method", "lora", "method"),
    ("bad_images", "ignore", "bad_images"),
    ("channels", 2, "channels"),
    ("label_smoothing", 1.0, "label_smoothing"),
    ("data_dir", "", "data_dir is required"),
])
def test_config_validation(field: str, value, match: str, tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, tmp_path / "run", **{field: value})
    with pytest.raises(FromzeroError, match=match):
        cfg.validate()


def test_missing_split_is_an_error(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d", {"train": 1, "val": 1})
    with pytest.raises(FromzeroError, match="test not found"):
        finetune_images(tiny_cfg(root, tmp_path / "run"))


def test_build_image_model_heads() -> None:
    cfg = ImageFinetuneConfig(data_dir="x", arch="vit", image_size=16, vit_hidden_size=32, vit_layers=1, vit_heads=2)
    model = build_image_model(cfg, 7)
    assert isinstance(head_module(model), nn.Linear) and head_module(model).out_features == 7


def test_vit_checkpoint_weights_at_a_new_size_frozen(shapes: Path, tmp_path: Path) -> None:
    """A fromzero ViT checkpoint trained at 8x8 fine-tunes at 16x16: the position grid is resized
    once, the head replaced; frozen keeps every backbone weight."""
    from fromzero.models.vit import ViT, ViTConfig

    torch.manual_seed(0)
    pre = ViT(ViTConfig(image_size=8, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=5))
    save_checkpoint(tmp_path / "pre", pre, pre.config.to_dict())
    result = finetune_images(tiny_cfg(shapes, tmp_path / "run", arch="vit", weights=str(tmp_path / "pre"),
                                      method="frozen", epochs=1, mean=[0.5] * 3, std=[0.5] * 3))
    model = load_model(result["checkpoint"])
    assert model.config.image_size == SIZE and model.pos_embed.shape == (1, 1 + 16, 32)
    after, before = model.state_dict(), pre.state_dict()
    for k in before:
        if not k.startswith(("head.", "pos_embed")):
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert result["trainable_params"] == 32 * 3 + 3
    info = json.loads((Path(result["checkpoint"]) / "info.json").read_text())
    assert info["mean"] == [0.5] * 3 and info["image_size"] == SIZE


# ---------------------------------------------------------------------------------------------
# The shared fine-tuning loop: exact resume, gradient accumulation, eval_every, warmup


def test_resume_continues_bit_for_bit(shapes: Path, tmp_path: Path, monkeypatch) -> None:
    """An image run stopped inside its second epoch (random augmentation and MixUp draw from the
    RNG, a shuffled loader from its generator) and resumed = never stopped."""
    from fromzero.finetune.images import finetune_images

    from .resume import assert_resume_is_exact

    def cfg(out):
        return tiny_cfg(shapes, out, epochs=2, augment="flip", mixup_alpha=0.2, batch_size=8, eval_every=3)

    straight, resumed = assert_resume_is_exact(finetune_images, cfg, tmp_path, monkeypatch, stop_at=8)
    assert resumed["test"]["accuracy"] == straight["test"]["accuracy"]


def test_grad_accum_matches_one_batch_k_times_larger(shapes: Path, tmp_path: Path) -> None:
    """Images now train in the shared loop: 2 micro-batches of 8 per step = 1 batch of 16 (SGD,
    no augmentation; BatchNorm-free simple CNN would differ only in float rounding)."""
    from safetensors.torch import load_file

    from fromzero.finetune.images import finetune_images

    common = dict(epochs=1, optimizer="sgd", lr=0.05, max_steps=3, eval_every=3, arch="vit", vit_hidden_size=16,
                  vit_layers=1, vit_heads=2, vit_patch_size=8)
    a = finetune_images(tiny_cfg(shapes, tmp_path / "accum", batch_size=8, grad_accum=2, **common))
    b = finetune_images(tiny_cfg(shapes, tmp_path / "big", batch_size=16, **common))
    assert a["steps"] == b["steps"] == 3
    wa = load_file(str(Path(a["checkpoint"]) / "model.safetensors"))
    wb = load_file(str(Path(b["checkpoint"]) / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# LoRA for a pretrained ViT: the adapter in PEFT's format under Hugging Face's module names


def test_vit_lora_adapter_matches_peft_on_the_hf_model(shapes: Path, tmp_path: Path) -> None:
    """LoRA on a ViT converted from Hugging Face (our fused attn.qkv is HF's query / key / value):
    the saved adapter, loaded by PEFT onto transformers' ViTForImageClassification, gives the
    logits fromzero gives, and only the adapters and the new head were trained."""
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    from fromzero.finetune.images import finetune_images
    from fromzero.models.hf import convert_from_hf

    torch.manual_seed(0)
    hf_config = transformers.ViTConfig(image_size=SIZE, patch_size=8, num_channels=3, hidden_size=32,
                                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    transformers.ViTModel(hf_config).save_pretrained(tmp_path / "hf-base")
    convert_from_hf(str(tmp_path / "hf-base"), tmp_path / "base")
    result = finetune_images(tiny_cfg(shapes, tmp_path / "run", arch="vit", weights=str(tmp_path / "base"),
                                      method="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, epochs=2,
                                      lr=1e-2, normalize=False))
    adapter = Path(result["checkpoint"])
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"])[:4] == ["vit.layers.0.attention.k_proj", "vit.layers.0.attention.o_proj",
                                                     "vit.layers.0.attention.q_proj", "vit.layers.0.attention.v_proj"]
    assert config["modules_to_save"] == ["classifier"]
    total = sum(p.numel() for p in load_model(tmp_path / "base").parameters())
    assert result["trainable_params"] < 0.2 * total

    ours = load_model(adapter)  # base + adapter, merged
    base = load_model(tmp_path / "base")
    moved = (ours.blocks[0].attn.qkv.weight - base.blocks[0].attn.qkv.weight).abs().max()
    assert moved > 1e-4  # the adapters learned something (B starts at zero)
    assert torch.equal(ours.blocks[0].mlp.fc1.weight, base.blocks[0].mlp.fc1.weight)  # not a target: untouched
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf-base", num_labels=len(result["labels"]))
    theirs = PeftModel.from_pretrained(hf, str(adapter)).eval()
    pixels = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), theirs(pixel_values=pixels).logits, atol=1e-5, rtol=1e-5)


def test_vit_lora_needs_a_pretrained_vit_at_its_size(shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(FromzeroError, match="method=lora adapts a pretrained ViT"):
        tiny_cfg(shapes, tmp_path / "a", arch="simple", method="lora").validate()
    with pytest.raises(FromzeroError, match="method=lora adapts a pretrained ViT"):
        tiny_cfg(shapes, tmp_path / "b", arch="vit", method="lora").validate()
