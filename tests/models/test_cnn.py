"""Tests for CNN classifiers (fromzero.models.cnn): the simple CNN, and torchvision ResNets
behind build_cnn (heads, input channels, local / cached / offline weights, checkpoints).

No test touches the network: downloads are pointed at an empty torch hub directory and
``urlopen`` fails as it does offline.
"""

from __future__ import annotations

import json
from urllib.error import URLError

import pytest
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file

from fromzero.errors import FromzeroError
from fromzero.models import build_model
from fromzero.models.cnn import CNNConfig, SimpleCNN, SimpleCNNConfig, build_cnn
from fromzero.checkpoint import load_model, save_checkpoint

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1


def images(B: int = 2, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, channels, size, size, generator=torch.Generator().manual_seed(seed))


def seeded_resnet18(num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """A torchvision ResNet-18 with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return model.eval()


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a ResNet feeds its head: the pooled (B, 512) features."""
    head, model.fc = model.fc, nn.Identity()
    try:
        with torch.no_grad():
            return model.eval()(x)
    finally:
        model.fc = head


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch hub cache, and a network that is not there."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))

    def no_network(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    return hub


# ----------------------------------------------------------------------------------------
# The simple CNN


def test_simple_cnn_layers_exactly_as_specified() -> None:
    model = SimpleCNN(SimpleCNNConfig(num_classes=7))
    layers = [(n, type(m).__name__) for n, m in model.named_children()]
    assert layers == [("conv1", "Conv2d"), ("conv2", "Conv2d"), ("fc1", "Linear"), ("fc2", "Linear")]
    for conv, cin, cout in ((model.conv1, 3, 64), (model.conv2, 64, 128)):
        assert (conv.in_channels, conv.out_channels) == (cin, cout)
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
    assert (model.fc1.in_features, model.fc1.out_features) == (128, 1024)  # not 128 * 56 * 56
    assert (model.fc2.in_features, model.fc2.out_features) == (1024, 7)
    expected = (3 * 9 * 64 + 64) + (64 * 9 * 128 + 128) + (128 * 1024 + 1024) + (1024 * 7 + 7)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_simple_cnn_forward_is_conv_relu_conv_relu_pool_fc_relu_fc() -> None:
    torch.manual_seed(0)
    model = SimpleCNN(SimpleCNNConfig(num_classes=5)).eval()
    x = images(2)
    F = torch.nn.functional
    h = F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias, padding=1))
    h = F.relu(F.conv2d(h, model.conv2.weight, model.conv2.bias, padding=1))
    h = h.mean(dim=(2, 3))  # global average pool
    expected = F.linear(F.relu(F.linear(h, model.fc1.weight, model.fc1.bias)), model.fc2.weight, model.fc2.bias)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("size", [32, 224])
def test_simple_cnn_output_shape(size) -> None:
    model = build_cnn("simple", 10)
    with torch.no_grad():
        assert model(images(1, size)).shape == (1, 10)


def test_simple_cnn_in_channels() -> None:
    model = build_cnn("simple", 4, in_channels=1)
    assert model.conv1.weight.shape == (64, 1, 3, 3)
    assert model(images(2, 16, channels=1)).shape == (2, 4)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        SimpleCNN(SimpleCNNConfig(num_classes=0))
    with pytest.raises(FromzeroError, match="arch 'vgg16' is not supported.*simple, resnet18"):
        build_cnn("vgg16", 10)
    with pytest.raises(FromzeroError, match="in_channels must be a positive integer"):
        build_cnn("resnet18", 10, in_channels=0)
    with pytest.raises(FromzeroError, match="invalid fromzero-cnn config: .*arch 'alexnet'"):
        build_model({"model_type": "fromzero-cnn", "arch": "alexnet", "num_classes": 3})


# ----------------------------------------------------------------------------------------
# ResNets: build_cnn around torchvision


def test_resnet18_is_torchvisions_model() -> None:
    ref = seeded_resnet18(num_classes=10)
    ours = build_cnn("resnet18", 10)
    assert isinstance(ours, torchvision.models.ResNet)
    ours.load_state_dict(ref.state_dict())
    x = images(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref(x), atol=0, rtol=0)


def test_resnet50_shapes() -> None:
    model = build_cnn("resnet50", 5).eval()
    assert model.fc.in_features == 2048 and model.fc.out_features == 5
    with torch.no_grad():
        assert model(images(1, 64)).shape == (1, 5)


def test_in_channels_without_weights() -> None:
    model = build_cnn("resnet18", 3, in_channels=2).eval()
    assert model.conv1.weight.shape == (64, 2, 7, 7)
    with torch.no_grad():
        assert model(images(2, 32, channels=2)).shape == (2, 3)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_new_head_keeps_features(suffix, tmp_path) -> None:
    ref = seeded_resnet18()  # an "ImageNet" model: 1000 classes
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(ref.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    ours = build_cnn("resnet18", 10, weights=str(path)).eval()
    assert ours.fc.weight.shape == (10, 512)
    for name, tensor in ref.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(ours.state_dict()[name], tensor), name
    x = images(2, 64)
    torch.testing.assert_close(features(ours, x), features(ref, x), atol=0, rtol=0)
    with torch.no_grad():
        assert ours(x).shape == (2, 10)


def test_local_weights_with_matching_head_give_identical_outputs(tmp_path) -> None:
    ref = seeded_resnet18(num_classes=10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "ddp.pth")
    ours = build_cnn("resnet18", 10, weights=tmp_path / "ddp.pth").eval()  # unwrapped + unprefixed
    x = images(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)


def test_pretrained_weights_for_grayscale(tmp_path) -> None:
    ref = seeded_resnet18()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    gray = build_cnn("resnet18", 10, weights=tmp_path / "w.pth", in_channels=1).eval()
    assert gray.conv1.weight.shape == (64, 1, 7, 7)
    x = images(2, 64, channels=1)
    # A gray image gives the features the RGB network gives to it repeated in 3 channels.
    torch.testing.assert_close(features(gray, x), features(ref, x.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4)
    four = build_cnn("resnet18", 10, weights=tmp_path / "w.pth", in_channels=4)
    w = ref.conv1.weight
    torch.testing.assert_close(four.conv1.weight, torch.cat([w, w[:, :1]], dim=1) * 0.75)


def test_simple_cnn_local_weights(tmp_path) -> None:
    torch.manual_seed(0)
    src = build_cnn("simple", 10).eval()
    save_file(dict(src.state_dict()), tmp_path / "simple.safetensors")
    same = build_cnn("simple", 10, weights=tmp_path / "simple.safetensors").eval()
    x = images(2)
    torch.testing.assert_close(same(x), src(x), atol=0, rtol=0)
    other = build_cnn("simple", 3, weights=tmp_path / "simple.safetensors")
    assert other.fc2.weight.shape == (3, 1024) and other.config.num_classes == 3
    assert torch.equal(other.conv2.weight, src.conv2.weight)
    with pytest.raises(FromzeroError, match="no pretrained weights named 'DEFAULT'.*weights=PATH"):
        build_cnn("simple", 10, weights="DEFAULT")


def test_bad_weights_files(tmp_path) -> None:
    with pytest.raises(FromzeroError, match="weights file not found: .*nope.pth"):
        build_cnn("resnet18", 10, weights=tmp_path / "nope.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a zip file at all")
    with pytest.raises(FromzeroError, match="cannot read weights .*corrupt.pth"):
        build_cnn("resnet18", 10, weights=tmp_path / "corrupt.pth")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module, not plain tensors
    with pytest.raises(FromzeroError, match="weights_only=True"):
        build_cnn("resnet18", 10, weights=tmp_path / "module.pth")
    # Weights of another network: the missing and unexpected tensors are named.
    save_file(dict(build_cnn("simple", 10).state_dict()), tmp_path / "simple.safetensors")
    with pytest.raises(FromzeroError, match="no tensor fc.weight: not resnet18 weights"):
        build_cnn("resnet18", 10, weights=tmp_path / "simple.safetensors")
    state = dict(seeded_resnet18().state_dict())
    del state["layer4.1.bn2.running_var"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "broken.safetensors")
    with pytest.raises(FromzeroError, match="missing 1: layer4.1.bn2.running_var; unexpected 1: layer5.0.conv1.weight"):
        build_cnn("resnet18", 10, weights=tmp_path / "broken.safetensors")


# ----------------------------------------------------------------------------------------
# torchvision names: cache and offline


def test_weights_name_offline_says_how_to_supply_a_file(offline) -> None:
    with pytest.raises(FromzeroError) as info:
        build_cnn("resnet18", 10, weights="DEFAULT")
    message = str(info.value)
    assert "\n" not in message
    assert "cannot download resnet18 weights ResNet18_Weights.IMAGENET1K_V1" in message
    assert "Temporary failure in name resolution" in message
    assert f"https://download.pytorch.org/models/{RESNET18_FILE}" in message
    assert f"weights=/path/to/{RESNET18_FILE}" in message
    assert str(offline / "checkpoints") in message
    assert not any((offline / "checkpoints").glob("*"))  # no partial download left behind


def test_weights_name_uses_torchvisions_cache(offline) -> None:
    ref = seeded_resnet18()
    (offline / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), offline / "checkpoints" / RESNET18_FILE)
    for name in ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"):
        ours = build_cnn("resnet18", 10, weights=name)
        x = images(1, 64)
        torch.testing.assert_close(features(ours, x), features(ref, x), atol=0, rtol=0)


def test_unknown_weights_name(offline) -> None:
    listed = "unknown weights 'IMAGENET22K' for resnet50 .*IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"
    with pytest.raises(FromzeroError, match=listed):
        build_cnn("resnet50", 10, weights="IMAGENET22K")
    with pytest.raises(FromzeroError, match="unknown weights 'ResNet50_Weights.IMAGENET1K_V2' for resnet18"):
        build_cnn("resnet18", 10, weights="ResNet50_Weights.IMAGENET1K_V2")


# ----------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("arch", ["simple", "resnet18"])
def test_checkpoint_round_trip(arch, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_cnn(arch, 6, in_channels=1 if arch == "simple" else 3)
    channels = 1 if arch == "simple" else 3
    model.train()
    with torch.no_grad():
        model(images(4, 32, channels=channels))  # moves BatchNorm statistics away from init
    model.eval()
    config = CNNConfig(arch=arch, num_classes=6, in_channels=channels).to_dict()
    assert config["model_type"] == "fromzero-cnn"
    save_checkpoint(tmp_path / "ckpt", model, config)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == config
    loaded = load_model(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    x = images(2, 32, channels=channels, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    # A checkpoint directory also serves as build_cnn weights (fine-tune a fine-tuned model).
    again = build_cnn(arch, 6, weights=tmp_path / "ckpt", in_channels=channels).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)


def test_cnn_export_to_hf_is_refused(tmp_path, cli, one_line_error) -> None:
    model = build_cnn("simple", 3)
    save_checkpoint(tmp_path / "ckpt", model, CNNConfig("simple", 3).to_dict())
    one_line_error(cli("convert", "to-hf", tmp_path / "ckpt", tmp_path / "hf"), "fromzero-cnn")
    assert not (tmp_path / "hf").exists()


def test_cnn_config_labels_and_empty_weights() -> None:
    cfg = CNNConfig("simple", 2, labels=["cat", "dog"])
    assert CNNConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(FromzeroError, match="invalid fromzero-cnn config: .*labels has 1 names"):
        build_model(CNNConfig("simple", 2, labels=["cat"]).to_dict())
    with pytest.raises(FromzeroError, match="weights is empty"):
        build_cnn("resnet18", 10, weights="")


def test_corrupt_cached_download(offline) -> None:
    (offline / "checkpoints").mkdir(parents=True)
    (offline / "checkpoints" / RESNET18_FILE).write_bytes(b"half a download")
    with pytest.raises(FromzeroError, match=f"torchvision's cache .*{RESNET18_FILE}: .*delete that file"):
        build_cnn("resnet18", 10, weights="DEFAULT")
