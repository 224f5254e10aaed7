"""The image-generation task (fromzero.finetune.diffusion), its prompts and `fromzero generate-image`."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

import fromzero.finetune.diffusion as fd
from fromzero.cli import main
from fromzero.data.digit_prompts import (
    HELD_OUT_TEMPLATES, TEMPLATES, ink_counts, measure_styles, prompt_table, prompts_for, render)
from fromzero.errors import FromzeroError
from fromzero.finetune.diffusion import ImageGenerationConfig, finetune_image_generation

from .resume import assert_resume_is_exact


def fake_embed(texts: list[str], encoder: str = "", cache: bool = True) -> torch.Tensor:
    """A stand-in for MiniLM: a fixed unit vector per text (the tests do not need its meaning)."""
    rows = []
    for text in texts:
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        v = torch.randn(384, generator=torch.Generator().manual_seed(seed))
        rows.append(v / v.norm())
    return torch.stack(rows)


@pytest.fixture
def tiny_task(monkeypatch: pytest.MonkeyPatch, mnist_slice: dict) -> None:
    monkeypatch.setattr("fromzero.data.mnist.load_mnist", lambda: mnist_slice)
    monkeypatch.setattr(fd, "embed_prompts", fake_embed)


def tiny_cfg(out: Path, **kw: Any) -> ImageGenerationConfig:
    base: dict[str, Any] = dict(out_dir=str(out), base_channels=8, channel_mults=[1, 2, 2], heads=2, groups=4,
                                timesteps=50, train_images=64, batch_size=16, epochs=2, eval_images=16,
                                grid_columns=1, sample_steps=2, eval_every=3, log_interval=1, progress=False,
                                dtype="float32")
    base.update(kw)
    return ImageGenerationConfig(**base)


def test_prompts_fill_in_digits_and_hold_phrasings_out() -> None:
    assert render("a handwritten {w}", 7) == "a handwritten seven"
    assert render("{a} {w}", 8) == "an eight"
    assert render("the digit {n} written thickly", 3) == "the digit 3 written thickly"
    prompts, candidates, counts = prompt_table()
    held = {render(t, d) for d in range(10) for ts in HELD_OUT_TEMPLATES.values() for t in ts}
    assert not held & set(prompts)  # held-out phrasings never reach training
    n_plain = len(TEMPLATES["plain"])
    for d in range(10):
        for s, style in enumerate(("plain", "thick", "thin")):
            got = [prompts[i] for i in candidates[d * 3 + s, : counts[d * 3 + s]].tolist()]
            want = prompts_for(d) + (prompts_for(d, style) if s else [])
            assert got == want and len(got) == n_plain + (len(TEMPLATES[style]) if s else 0)
    assert (candidates[counts.unsqueeze(1) <= torch.arange(candidates.shape[1])] == -1).all()


def test_thickness_is_measured_on_the_images(mnist_slice: dict) -> None:
    train = mnist_slice["train"]
    styles = measure_styles(train.images, train.labels)
    ink = ink_counts(train.images).float()
    for d in range(10):
        rows = train.labels == d
        thick, thin = ink[rows & (styles == 1)], ink[rows & (styles == 2)]
        assert len(thick) and len(thin) and thick.min() > thin.max()
    assert 0.25 < float((styles == 1).float().mean()) < 0.4  # about a third each


def test_bad_settings_are_refused() -> None:
    with pytest.raises(FromzeroError, match="conditioning 'words'"):
        tiny_cfg(Path("x"), conditioning="words").validate()
    with pytest.raises(FromzeroError, match="data_dir 'cifar'"):
        tiny_cfg(Path("x"), data_dir="cifar").validate()
    with pytest.raises(FromzeroError, match="model: .*divisible"):
        tiny_cfg(Path("x"), base_channels=6).model_config()
    with pytest.raises(FromzeroError, match="cond_drop"):
        tiny_cfg(Path("x"), cond_drop=1.5).validate()


def test_training_writes_grids_and_resumes_exactly(tiny_task: None, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    straight, resumed = assert_resume_is_exact(finetune_image_generation, lambda out: tiny_cfg(out), tmp_path,
                                               monkeypatch, stop_at=4)
    run = Path(straight["run_dir"])
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert "final.png" in grids and "step-000003.png" in grids
    from PIL import Image

    with Image.open(run / "samples" / "final.png") as grid:  # 20 rows (10 by label, 10 by text), 1 column
        assert grid.mode == "L" and grid.size == (28 + 4, 20 * 30 + 2)
    # the EMA (buffers of the trained module) is part of the state that resumes
    from tests.finetune.resume import training_state

    assert any(k.startswith("current/ema.") for k in training_state(run))
    info = (Path(straight["checkpoint"]) / "info.json").read_text()
    assert '"task": "image-generation"' in info and '"conditioning": "text+class"' in info


@pytest.fixture(scope="module")
def generator_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained checkpoints as training writes them: text+class and class-only."""
    from fromzero.checkpoint import save_checkpoint
    from fromzero.models.diffusion import UNet

    root = tmp_path_factory.mktemp("generators")
    out = {}
    for name, kw in (("both", {}), ("class", {"conditioning": "class"}), ("text", {"conditioning": "text"})):
        cfg = tiny_cfg(root / "unused", **kw)
        torch.manual_seed(0)
        model = UNet(cfg.model_config())
        save_checkpoint(root / name, model, model.config.to_dict(), info={"task": "image-generation"})
        out[name] = root / name
    return out


def test_generate_image_cli(generator_checkpoints: dict[str, Path], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    monkeypatch.setattr(fd, "embed_prompts", fake_embed)
    both = str(generator_checkpoints["both"])
    out = tmp_path / "grid.png"
    assert main(["generate-image", "--checkpoint", both, "--prompt", "a thick seven", "--num", "6",
                 "--steps", "2", "--columns", "3", "--out", str(out)]) == 0
    with Image.open(out) as grid:
        assert grid.size == (3 * 30 + 2, 2 * 30 + 2)
    before = out.read_bytes()
    cases = [
        (["--label", "3"], "exists: use --force"),
        (["--label", "12", "--force"], "--label 12 is not one of the model's classes"),
        (["--force"], "say what to draw: --prompt TEXT or --label N"),
        (["--label", "3", "--prompt", "a three", "--force"], "not both"),
        (["--label", "3", "--steps", "0", "--force"], "--steps must be positive"),
        (["--prompt", "  ", "--force"], "--prompt is empty"),
    ]
    for extra, message in cases:
        assert main(["generate-image", "--checkpoint", both, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (extra, err)
    assert out.read_bytes() == before  # refused runs leave the file alone
    for name, extra, message in (("class", ["--prompt", "a seven"], "class labels only: give --label"),
                                 ("text", ["--label", "7"], "text only: give --prompt")):
        assert main(["generate-image", "--checkpoint", str(generator_checkpoints[name]), "--out",
                     str(tmp_path / "x.png"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["generate-image", "--checkpoint", str(generator_checkpoints["class"]), "--label", "7",
                 "--sampler", "ddpm", "--steps", "2", "--num", "2", "--out", str(tmp_path / "x.png")]) == 0
    # not an image generator: one line saying what it is
    from fromzero.checkpoint import save_checkpoint
    from fromzero.models.cnn import CNNConfig, build_cnn

    save_checkpoint(tmp_path / "cls", build_cnn("simple", 10, in_channels=1),
                    CNNConfig(arch="simple", num_classes=10, in_channels=1).to_dict(),
                    info={"task": "image-classification"})
    assert main(["generate-image", "--checkpoint", str(tmp_path / "cls"), "--label", "1", "--out",
                 str(tmp_path / "y.png")]) == 2
    assert "'fromzero-cnn' model, not an image generator" in capsys.readouterr().err
    assert not (tmp_path / "y.png").exists()
