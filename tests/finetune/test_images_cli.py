"""Image classification through the command line: finetune, predict, evaluate, crossval, bad input.

The data is a tiny ImageFolder of 16x16 PNGs, two classes told apart by brightness (bright vs
dark, in random colours with noise), 12 images per class and split: the simple CNN separates
them in a few CPU epochs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("bright", "dark")
SIZE = 16
COUNTS = {"train": 12, "val": 12, "test": 12}


def image(cls: str, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(170, 240) if cls == "bright" else rng.uniform(10, 70)
    img = base + rng.normal(0, 12, size=(SIZE, SIZE, 3))
    img[..., int(rng.integers(0, 3))] += rng.uniform(-10, 10)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(root: Path, counts: dict[str, int] = COUNTS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for cls in CLASSES:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(image(cls, rng), "RGB").save(d / f"{i:03d}.png")
    return root


def argv(data: Path | str, out: Path, *extra: str, command: str = "finetune") -> list:
    return [command, "--task", "image-classification", "--data_dir", data, "--arch", "simple",
            "--image_size", str(SIZE), "--resize_size", str(SIZE), "--batch_size", "8", "--lr", "3e-3",
            "--device", "cpu", "--dtype", "float32", "--out_dir", out, "--quiet", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("bright-dark") / "data")


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fromzero.cli import main

    out = tmp_path_factory.mktemp("img-run") / "R"
    code = main([str(a) for a in argv(data, out, "--epochs", "3")])
    assert code == 0
    return out


def test_finetune_writes_the_run_directory(run: Path) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == 2 * COUNTS["test"]
    assert metrics["accuracy"] >= 0.9, metrics
    assert (run / "plots" / "confusion_matrix.png").is_file()
    best = run / "checkpoints" / "best"
    for name in ("config.json", "model.safetensors", "info.json"):
        assert (best / name).is_file(), name
    assert json.loads((best / "config.json").read_text())["labels"] == list(CLASSES)


def test_predict_images(cli, run: Path, data: Path) -> None:
    a, b = data / "test" / "bright" / "000.png", data / "test" / "dark" / "000.png"
    result = cli("predict", "--checkpoint", run / "checkpoints" / "best", "--image", a, "--image", b,
                 "--device", "cpu")
    assert result.code == 0, result
    rows = [json.loads(line) for line in result.out.strip().splitlines()]
    assert len(rows) == 2
    assert [r["label"] for r in rows] == ["bright", "dark"]
    for r in rows:
        assert set(r["probabilities"]) == set(CLASSES)
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert rows[0]["input"] == str(a)


def test_predict_a_folder(cli, run: Path, data: Path) -> None:
    result = cli("predict", "--checkpoint", run / "checkpoints" / "best", "--input", data / "test" / "dark",
                 "--device", "cpu")
    assert result.code == 0, result
    rows = [json.loads(line) for line in result.out.strip().splitlines()]
    assert len(rows) == COUNTS["test"]
    assert sum(r["label"] == "dark" for r in rows) >= COUNTS["test"] - 1


def test_predict_text_on_an_image_model(cli, one_line_error, run: Path) -> None:
    one_line_error(cli("predict", "--checkpoint", run / "checkpoints" / "best", "--text", "hello",
                       "--device", "cpu"), "images")


def test_evaluate_matches_the_run(cli, run: Path, tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    result = cli("evaluate", "--checkpoint", run / "checkpoints" / "best", "--split", "test", "--out", out,
                 "--device", "cpu")
    assert result.code == 0, result
    evaluated = json.loads(out.read_text())
    recorded = json.loads((run / "metrics.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(recorded["accuracy"])
    assert evaluated["n"] == recorded["n"]
    assert evaluated["confusion_matrix"] == recorded["confusion_matrix"]


def test_crossval_two_folds(cli, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "CV"
    result = cli(*argv(data, out, "--epochs", "1", "--folds", "2", command="crossval"))
    assert result.code == 0, result
    report = json.loads((out / "crossval.json").read_text())
    assert report["task"] == "image-classification"
    assert [f["fold"] for f in report["folds"]] == [1, 2]
    assert all("test_accuracy" in f and "val_accuracy" in f for f in report["folds"])
    assert (out / "fold-1" / "checkpoints" / "best").is_dir() and (out / "fold-2" / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, no run directory left behind


SMALL = {"train": 4, "val": 2, "test": 2}


def test_empty_class_folder(cli, one_line_error, tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d", SMALL)
    (data / "val" / "extra").mkdir()
    (data / "train" / "extra").mkdir()
    for f in (data / "train" / "dark").iterdir():
        f.unlink()
    out = tmp_path / "R"
    one_line_error(cli(*argv(data, out, "--epochs", "1")), "empty class folder", "dark")
    assert not out.exists()


def _truncate(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def test_corrupt_image_fails_naming_the_file(cli, one_line_error, tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d", SMALL)
    bad = _truncate(data / "train" / "bright" / "001.png")
    out = tmp_path / "R"
    one_line_error(cli(*argv(data, out, "--epochs", "1")), str(bad), "bad_images")
    assert not out.exists()


def test_corrupt_image_skipped_with_a_warning(cli, tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d", SMALL)
    bad = _truncate(data / "train" / "bright" / "001.png")
    out = tmp_path / "R"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cli(*argv(data, out, "--epochs", "1", "--bad_images", "skip"))
    assert result.code == 0, result
    messages = [str(w.message) for w in caught] + [result.err]
    assert any("skipping 1 unreadable image" in m and str(bad) in m for m in messages), messages
    assert (out / "checkpoints" / "best").is_dir()


@pytest.mark.parametrize("channels", [3, 1])
def test_mixed_image_modes_run(cli, tmp_path: Path, channels: int) -> None:
    data = write_folder(tmp_path / "d", SMALL)
    d = data / "train" / "bright"
    Image.fromarray(np.full((SIZE, SIZE), 220, np.uint8), "L").save(d / "gray.png")
    rgba = np.full((SIZE, SIZE, 4), 230, np.uint8)
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    Image.fromarray(np.full((SIZE, SIZE), 30, np.uint8), "L").save(data / "test" / "dark" / "gray.png")
    out = tmp_path / "R"
    result = cli(*argv(data, out, "--epochs", "1", "--channels", str(channels)))
    assert result.code == 0, result
    assert json.loads((out / "metrics.json").read_text())["n"] == 2 * SMALL["test"] + 1
    info = json.loads((out / "checkpoints" / "best" / "info.json").read_text())
    assert info["channels"] == channels


def test_builtin_digits(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("FROMZERO_HOME", str(home))
    out = tmp_path / "R"
    result = cli("finetune", "--task", "image-classification", "--data_dir", "digits", "--epochs", "1",
                 "--arch", "simple", "--image_size", "8", "--resize_size", "8", "--channels", "1",
                 "--device", "cpu", "--dtype", "float32", "--out_dir", out, "--quiet")
    assert result.code == 0, result
    assert (home / "datasets" / "digits" / "meta.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 270
    assert metrics["accuracy"] > 0.12  # ten classes, one epoch at the default lr: above chance (0.1)
