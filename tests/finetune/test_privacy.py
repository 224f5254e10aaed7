"""Differential privacy (DP-SGD through Opacus) for image fine-tuning and the privacy helpers.

The data is a tiny slice of scikit-learn's 8x8 digits (20 training images per class): a private
run of the simple CNN takes a few CPU seconds. What is checked:

* a run with ``privacy.target_epsilon`` logs the epsilon spent at every evaluation (rising), ends
  at or just under the target, and writes a normal checkpoint that ``predict`` / ``evaluate`` read;
* with ``privacy.noise_multiplier`` the reported epsilon is exactly what Opacus' accountant gives
  for the run's steps and sample rate (recomputed here);
* per-example clipping really happens (a two-example batch against a hand computation);
* a BatchNorm model is fixed (GroupNorm) with a note, or refused where the checkpoint could not
  describe the fix;
* bad settings are one-line errors, exit 2, and leave no run directory.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

pytest.importorskip("opacus")

from fromzero.errors import FromzeroError  # noqa: E402
from fromzero.training.privacy import PrivacyConfig, epsilon_for, make_compatible, make_private  # noqa: E402

PER_CLASS = {"train": 20, "val": 6, "test": 6}
TARGET = 3.0


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits as an ImageFolder, cut down to PER_CLASS images per class and split."""
    from fromzero.data.datasets import write_digits_imagefolder

    full = tmp_path_factory.mktemp("digits-full") / "digits"
    write_digits_imagefolder(full)
    small = tmp_path_factory.mktemp("digits-small") / "digits"
    for split, n in PER_CLASS.items():
        for cls in sorted((full / split).iterdir()):
            target = small / split / cls.name
            target.mkdir(parents=True)
            for f in sorted(cls.glob("*.png"))[:n]:
                shutil.copy(f, target / f.name)
    return small


def argv(data: Path, out: Path, *extra: str) -> list:
    return ["finetune", "--task", "image-classification", "--data_dir", data, "--arch", "simple",
            "--channels", "1", "--image_size", "8", "--resize_size", "8", "--batch_size", "16", "--lr", "3e-3",
            "--device", "cpu", "--out_dir", out, "--quiet", *extra]


def val_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" in r]


@pytest.fixture(scope="module")
def target_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fromzero.cli import main

    out = tmp_path_factory.mktemp("dp") / "eps"
    assert main([str(a) for a in argv(digits, out, "--epochs", "3", "--privacy.target_epsilon", str(TARGET))]) == 0
    return out


@pytest.fixture(scope="module")
def sigma_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fromzero.cli import main

    out = tmp_path_factory.mktemp("dp") / "sigma"
    code = main([str(a) for a in argv(digits, out, "--epochs", "2", "--privacy.noise_multiplier", "1.3",
                                      "--privacy.max_grad_norm", "0.5", "--privacy.delta", "1e-4")])
    assert code == 0
    return out


def test_epsilon_rises_every_evaluation_and_meets_the_target(target_run: Path) -> None:
    rows = val_rows(target_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    eps = [r["epsilon"] for r in rows]
    assert all(0 < a < b for a, b in zip(eps, eps[1:])), eps
    # Calibrated for exactly the steps taken: the budget is used, never exceeded.
    assert TARGET - 0.05 <= eps[-1] <= TARGET + 1e-6, eps
    report = json.loads((target_run / "metrics.json").read_text())["privacy"]
    assert report["epsilon"] == pytest.approx(eps[-1], rel=1e-5)
    assert report["target_epsilon"] == TARGET and report["delta"] == 1e-5 and report["max_grad_norm"] == 1.0
    assert report["steps"] == rows[-1]["step"] and report["accountant"] == "rdp"
    info = json.loads((target_run / "checkpoints" / "best" / "info.json").read_text())
    assert info["privacy"]["epsilon"] == pytest.approx(eps[-1], rel=1e-5)


def test_checkpoint_is_a_plain_fromzero_checkpoint(cli, target_run: Path, digits: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from fromzero.models.cnn import SimpleCNN
    from fromzero.checkpoint import load_model

    best = target_run / "checkpoints" / "best"
    with safe_open(str(best / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    # Opacus' wrapper (GradSampleModule) left no "_module." prefix behind
    assert names == {f"{layer}.{kind}" for layer in ("conv1", "conv2", "fc1", "fc2") for kind in ("weight", "bias")}
    assert isinstance(load_model(best), SimpleCNN)
    image = sorted((digits / "test" / "3").glob("*.png"))[0]
    result = cli("predict", "--checkpoint", best, "--image", image, "--device", "cpu")
    assert result.code == 0, result
    assert json.loads(result.out.strip().splitlines()[0])["label"] in [str(c) for c in range(10)]
    out = tmp_path / "e.json"
    result = cli("evaluate", "--checkpoint", best, "--data", digits, "--split", "test", "--out", out, "--device", "cpu")
    assert result.code == 0, result
    recorded = json.loads((target_run / "metrics.json").read_text())
    assert json.loads(out.read_text())["n"] == recorded["n"] == 10 * PER_CLASS["test"]
    # The saved weights are the ones the run tested: its test loss, recomputed in float32 (evaluate
    # may use bf16 autocast, and a barely trained model's near-tied logits make accuracy fragile).
    from fromzero.data.images import load_image_folder
    from fromzero.finetune.images import predict_loader
    from fromzero.inference.predict import Classifier

    classifier = Classifier(best, "cpu")
    test_set = load_image_folder(digits / "test", classifier.image_transform(), mode="L", classes=classifier.labels)
    logits, labels = predict_loader(load_model(best), torch.utils.data.DataLoader(test_set, batch_size=16),
                                    torch.device("cpu"), contextlib.nullcontext)
    assert float(nn.functional.cross_entropy(logits, labels)) == pytest.approx(recorded["loss"], rel=1e-6)


def test_reported_epsilon_matches_opacus_accountant(sigma_run: Path) -> None:
    from opacus.accountants import RDPAccountant

    report = json.loads((sigma_run / "metrics.json").read_text())["privacy"]
    n_train, batch = 10 * PER_CLASS["train"], 16
    n_batches = -(-n_train // batch)  # 13 (a private run keeps the partial batch: q = 1 / 13)
    assert report["sample_rate"] == pytest.approx(1 / n_batches)
    assert report["steps"] == 2 * n_batches
    assert report["noise_multiplier"] == 1.3 and report["target_epsilon"] is None
    for row in val_rows(sigma_run):  # every logged epsilon, recomputed for the steps taken by then
        accountant = RDPAccountant()
        accountant.history = [(1.3, 1 / n_batches, row["step"])]
        assert row["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-4), abs=1e-6)  # 6 decimals
    assert report["epsilon"] == pytest.approx(epsilon_for(1.3, 1 / n_batches, 2 * n_batches, 1e-4), rel=1e-9)


def test_empty_poisson_batches_still_take_their_step(cli, digits: Path, tmp_path: Path) -> None:
    """Expected batch 1 of 200 images: about a third of the Poisson batches are empty."""
    out = tmp_path / "R"
    result = cli(*argv(digits, out, "--epochs", "1", "--batch_size", "1", "--privacy.noise_multiplier", "2",
                       "--privacy.reproducible", "true"))
    assert result.code == 0, result
    report = json.loads((out / "metrics.json").read_text())["privacy"]
    assert report["steps"] == 200 and report["sample_rate"] == pytest.approx(1 / 200)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]  # a row per non-empty batch
    assert 100 < len(trained) < 190 and val_rows(out)[-1]["step"] == 200


def test_frozen_resnet_trains_its_head_privately(digits: Path, tmp_path: Path) -> None:
    """A ResNet's BatchNorm layers are fine when frozen (eval mode: a fixed per-example map)."""
    from fromzero.finetune.images import ImageFinetuneConfig, finetune_images
    from fromzero.models.cnn import build_cnn
    from fromzero.checkpoint import load_model, save_checkpoint

    torch.manual_seed(0)
    pretrained = build_cnn("resnet18", 4, in_channels=1)
    save_checkpoint(tmp_path / "pre", pretrained, {"model_type": "fromzero-cnn", "arch": "resnet18",
                                                    "num_classes": 4, "in_channels": 1})
    cfg = ImageFinetuneConfig(data_dir=str(digits), arch="resnet18", weights=str(tmp_path / "pre"), method="frozen",
                              channels=1, image_size=8, resize_size=8, epochs=1, batch_size=32, lr=1e-2,
                              device="cpu", progress=False, out_dir=str(tmp_path / "run"),
                              privacy=PrivacyConfig(target_epsilon=8.0))
    result = finetune_images(cfg)
    assert 0 < result["privacy"]["epsilon"] <= 8.0
    after = load_model(result["checkpoint"]).state_dict()
    for name, tensor in pretrained.state_dict().items():  # weights and BatchNorm statistics untouched
        if not name.startswith("fc."):
            torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)
    assert after["fc.weight"].shape == (10, 512)


# ---------------------------------------------------------------------------------------------
# The mechanism itself


def _two_example_setup(max_grad_norm: float, noise: float = 1.0, reproducible: bool = False):
    """A linear model, SGD at lr 1, one batch of exactly two examples (q = 1: both always drawn)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.tensor([[1.0, 2.0, -1.0], [-3.0, 0.5, 4.0]])
    y = torch.tensor([0, 1])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    cfg = PrivacyConfig(noise_multiplier=noise, max_grad_norm=max_grad_norm, reproducible=reproducible)
    private = make_private(model, opt, loader, cfg, epochs=1, seed=0)
    return model, x, y, private


def _per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append(torch.cat([model.weight.grad.flatten(), model.bias.grad.flatten()]).clone())
    return grads


@pytest.mark.parametrize("max_grad_norm", [0.05, 100.0])
def test_each_example_gradient_is_clipped(max_grad_norm: float) -> None:
    model, x, y, private = _two_example_setup(max_grad_norm)
    private.optimizer.noise_multiplier = 0.0  # the noise off, to see the clipping alone
    plain = nn.Linear(3, 2)
    plain.load_state_dict(model.state_dict())
    grads = _per_example_grads(plain, x, y)
    assert all(g.norm() > 0.1 for g in grads)  # the small bound clips both, the large one neither
    clipped = [g * min(1.0, max_grad_norm / (g.norm() + 1e-6)) for g in grads]
    expected_update = -(clipped[0] + clipped[1]) / 2  # sum of clipped, / expected batch size 2, lr 1

    before = torch.cat([model.weight.flatten(), model.bias.flatten()]).detach().clone()
    (xb, yb), = list(private.loader)
    assert len(xb) == 2
    private.optimizer.zero_grad()
    nn.functional.cross_entropy(private.module(xb), yb).backward()
    private.optimizer.step()
    update = torch.cat([model.weight.flatten(), model.bias.flatten()]).detach() - before
    torch.testing.assert_close(update, expected_update, rtol=1e-5, atol=1e-7)
    if max_grad_norm < 1:
        assert update.norm() <= max_grad_norm + 1e-6
        assert not torch.allclose(update, -(grads[0] + grads[1]) / 2)  # not the plain mean gradient
    assert private.steps == 1


def test_empty_batch_is_a_counted_noise_only_step() -> None:
    model, _, _, private = _two_example_setup(max_grad_norm=1.0, noise=2.0)
    before = model.weight.detach().clone()
    private.empty_step()
    change = model.weight.detach() - before
    assert private.steps == 1 and change.abs().sum() > 0  # noise moved the weights, the step counted
    assert private.epsilon() == pytest.approx(epsilon_for(2.0, 1.0, 1, 1e-5), rel=1e-9)


def test_noise_follows_the_seed_only_when_asked() -> None:
    def noise(reproducible: bool) -> torch.Tensor:
        model, _, _, private = _two_example_setup(max_grad_norm=1.0, reproducible=reproducible)
        before = model.weight.detach().clone()
        private.empty_step()
        return model.weight.detach() - before

    torch.testing.assert_close(noise(True), noise(True), rtol=0, atol=0)
    assert not torch.equal(noise(False), noise(False))  # fresh entropy: the recipe's seed reveals nothing


def test_batchnorm_is_replaced_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    fixed = make_compatible(model)
    assert "BatchNorm2d -> GroupNorm" in capsys.readouterr().out
    assert isinstance(fixed[1], nn.GroupNorm) and isinstance(model[1], nn.BatchNorm2d)  # a fixed copy
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))), batch_size=4)
    opt = torch.optim.SGD(fixed.parameters(), lr=0.1)
    private = make_private(fixed, opt, loader, PrivacyConfig(target_epsilon=5.0), epochs=1, seed=0)
    for xb, yb in private.loader:
        if len(xb) == 0:
            private.empty_step()
            continue
        private.optimizer.zero_grad()
        nn.functional.cross_entropy(private.module(xb), yb).backward()
        private.optimizer.step()
    assert private.steps == 2 and 0 < private.epsilon() <= 5.0
    with pytest.raises(FromzeroError, match="BatchNorm2d layers cannot be trained with DP-SGD"):
        make_compatible(model, fix=False)
    # A frozen BatchNorm (not trained) needs no fixing.
    for p in model[:2].parameters():
        p.requires_grad_(False)
    assert make_compatible(model) is model


# ---------------------------------------------------------------------------------------------
# Config and bad input


def test_recipe_section_and_command_line_keys(tmp_path: Path) -> None:
    from fromzero.finetune.recipe import load_finetune_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: image-classification\ndata_dir: digits\n"
                      "privacy: {target_epsilon: 3, delta: 1.0e-5, max_grad_norm: 1.0}\n")
    _, cfg = load_finetune_config(recipe, ["--privacy.max_grad_norm", "0.5", "--privacy.accountant", "prv"])
    assert cfg.privacy == PrivacyConfig(target_epsilon=3.0, delta=1e-5, max_grad_norm=0.5, accountant="prv")
    assert cfg.privacy.enabled
    with pytest.raises(FromzeroError, match="did you mean '--privacy.target_epsilon'"):
        load_finetune_config(recipe, ["--privacy.target_epsilom", "1"])


def test_help_lists_the_privacy_options(cli) -> None:
    result = cli("finetune", "--help")
    assert "--privacy.target_epsilon" in result.out and "--privacy.noise_multiplier" in result.out


@pytest.mark.parametrize("fields, match", [
    ({"target_epsilon": 3.0, "noise_multiplier": 1.0}, "not both"),
    ({"target_epsilon": -1.0}, "target_epsilon must be > 0"),
    ({"noise_multiplier": float("nan")}, "noise_multiplier must be a finite number"),
    ({"target_epsilon": 3.0, "max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
    ({"target_epsilon": 3.0, "delta": 1.0}, r"delta must be in \(0, 1\)"),
    ({"target_epsilon": 3.0, "accountant": "gdp"}, "accountant 'gdp' is not supported"),
])
def test_config_validation(fields: dict, match: str) -> None:
    with pytest.raises(FromzeroError, match=match):
        PrivacyConfig(**fields).validate()
    assert not PrivacyConfig().enabled and not PrivacyConfig(target_epsilon=0, noise_multiplier=None).enabled


@pytest.mark.parametrize("extra, fragments", [
    (["--privacy.target_epsilon", "1e-9"], ["target_epsilon 1e-09", "cannot be met", "raise target_epsilon"]),
    (["--privacy.target_epsilon", "3", "--privacy.noise_multiplier", "1"], ["not both"]),
    (["--privacy.target_epsilon", "-3"], ["privacy.target_epsilon must be > 0"]),
    (["--privacy.noise_multiplier", "1", "--privacy.max_grad_norm", "-1"], ["privacy.max_grad_norm must be > 0"]),
    (["--privacy.target_epsilon", "3", "--privacy.delta", "0.01"], ["not below 1/n for n = 200"]),
    (["--privacy.target_epsilon", "3", "--mixup_alpha", "0.2"], ["MixUp"]),
    (["--privacy.target_epsilon", "3", "--dtype", "bfloat16"], ["dtype bfloat16"]),
    (["--privacy.target_epsilon", "3", "--arch", "resnet18"], ["BatchNorm2d", "method frozen"]),
])
def test_bad_input_is_one_line_and_leaves_no_run(cli, one_line_error, digits: Path, tmp_path: Path,
                                                 extra: list[str], fragments: list[str]) -> None:
    out = tmp_path / "R"
    one_line_error(cli(*argv(digits, out, "--epochs", "2", *extra)), *fragments)
    assert not out.exists()
