"""The diffusion family (fromzero.models.diffusion): U-Net shapes, the schedule against its
closed forms, DDIM vs DDPM, classifier-free guidance, EMA, learning on real MNIST, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fromzero.models.diffusion import (
    EMA, DiffusionConfig, Schedule, UNet, ddim_step, ddpm_step, guided, sample, timestep_sequence)


def tiny(**kw: object) -> DiffusionConfig:
    base = dict(base_channels=8, channel_mults=[1, 2, 2], heads=2, groups=4, timesteps=50, text_dim=6)
    base.update(kw)
    return DiffusionConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [{}, {"num_classes": 0}, {"text_dim": 0}, {"num_classes": 0, "text_dim": 0},
                                {"attention_levels": [1, 2], "layers_per_level": 2, "prediction": "v"}])
def test_unet_keeps_the_image_shape_through_28_14_7(kw: dict) -> None:
    torch.manual_seed(0)
    model = UNet(tiny(**kw))
    x = torch.randn(3, 1, 28, 28)
    t = torch.tensor([0, 10, 49])
    labels = torch.tensor([1, -1, 9]) if model.config.num_classes else None
    text = torch.randn(3, 6) if model.config.text_dim else None
    out = model(x, t, labels, text, torch.tensor([True, False, True]) if text is not None else None)
    assert out.shape == x.shape
    # zero-initialised output conv: an untrained model predicts 0; a nudged one depends on the condition
    assert torch.count_nonzero(out) == 0
    if labels is not None:
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
        a, b = model(x, t, labels), model(x, t, torch.tensor([2, 3, 4]))
        assert not torch.allclose(a, b)


def test_invalid_architectures_are_refused() -> None:
    with pytest.raises(ValueError, match="divisible"):
        tiny(image_size=30, channel_mults=[1, 2, 2]).validate()
    with pytest.raises(ValueError, match="attention_levels"):
        tiny(attention_levels=[3]).validate()
    with pytest.raises(ValueError, match="schedule"):
        tiny(schedule="quadratic").validate()


def test_linear_schedule_matches_its_closed_form() -> None:
    s = Schedule(1000, "linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(s.alpha_bar, torch.cumprod(1 - betas, 0))
    assert float(s.abar(torch.tensor(-1))) == 1.0  # "step -1" is the clean image


def test_cosine_schedule_matches_its_closed_form() -> None:
    T, off = 1000, 0.008
    s = Schedule(T, "cosine")
    f = lambda t: math.cos((t / T + off) / (1 + off) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):  # abar at step index t is f(t + 1) / f(0) (before the 0.999 clip matters)
        assert float(s.abar(torch.tensor(t))) == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert float(s.betas.max()) <= 0.999


def test_q_sample_has_the_closed_form_mean_and_variance() -> None:
    s = Schedule(100, "cosine")
    x0 = torch.full((20000, 1), 0.7)
    t = torch.full((20000,), 40)
    gen = torch.Generator().manual_seed(0)
    x_t = s.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
    ab = float(s.abar(torch.tensor(40)))
    assert float(x_t.mean()) == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
    assert float(x_t.var()) == pytest.approx(1 - ab, rel=0.05)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_split_recovers_x0_and_eps(prediction: str) -> None:
    s = Schedule(100, "linear")
    x0, eps = torch.rand(4, 1, 5, 5) * 2 - 1, torch.randn(4, 1, 5, 5)
    t = torch.full((4,), 30)
    x_t = s.q_sample(x0, t, eps)
    out = eps if prediction == "eps" else s.v_target(x0, t, eps)
    got_x0, got_eps = s.split(x_t, out, 30, prediction, clip=False)
    torch.testing.assert_close(got_x0, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_eps, eps, atol=1e-5, rtol=1e-5)


def test_ddim_with_eta_1_is_the_ddpm_step() -> None:
    s = Schedule(1000, "cosine")
    gen = torch.Generator().manual_seed(1)
    x0, eps, z = (torch.randn(2, 1, 4, 4, generator=gen) for _ in range(3))
    for t, t_prev in ((999, 949), (500, 499), (20, 0), (5, -1)):
        x_t = s.q_sample(x0, torch.full((2,), t), eps)
        a = ddim_step(s, x_t, x0, eps, t, t_prev, eta=1.0, noise=z)
        b = ddpm_step(s, x_t, x0, t, t_prev, noise=z)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # eta 0 is deterministic, and a step to -1 lands on x0
    x_t = s.q_sample(x0, torch.full((2,), 10), eps)
    torch.testing.assert_close(ddim_step(s, x_t, x0, eps, 10, -1, 0.0, None), x0)


def test_timestep_sequence() -> None:
    assert timestep_sequence(1000, 5) == [999, 749, 500, 250, 0]
    assert timestep_sequence(10, 50) == list(range(9, -1, -1))


def test_cfg_combines_as_the_formula_says() -> None:
    c, u = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(guided(c, u, 3.0), u + 3.0 * (c - u))
    torch.testing.assert_close(guided(c, u, 1.0), c)
    torch.testing.assert_close(guided(c, u, 0.0), u)


def test_sampling_is_seeded_and_guidance_0_is_the_unconditional_model() -> None:
    torch.manual_seed(0)
    model = UNet(tiny(timesteps=20)).eval()
    for p in model.parameters():  # a model whose output depends on the condition
        torch.nn.init.normal_(p, std=0.05)
    labels = torch.tensor([3, 7])
    def draw(**kw: object) -> torch.Tensor:
        gen = torch.Generator().manual_seed(5)
        return sample(model, 2, steps=4, generator=gen, **kw)  # type: ignore[arg-type]

    a = draw(labels=labels, guidance=2.0)
    assert a.shape == (2, 1, 28, 28) and float(a.abs().max()) <= 1.0
    torch.testing.assert_close(a, draw(labels=labels, guidance=2.0))  # same seed, same images
    torch.testing.assert_close(draw(labels=labels, guidance=0.0), draw(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a, draw(labels=torch.tensor([1, 2]), guidance=2.0))
    ddpm = draw(labels=labels, guidance=2.0, sampler="ddpm")
    assert ddpm.shape == a.shape and not torch.allclose(ddpm, a)


def test_ema_update_follows_the_formula() -> None:
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.fill_(0.0)
    ema = EMA(lin, decay=0.9)
    assert {n for n, _ in ema.named_buffers()} == {"weight", "bias", "updates"}
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update(lin)  # n = 0: d = min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.state_for()["weight"], torch.full((1, 2), 0.1 * 1 + 0.9 * 3))
    for _ in range(20):
        ema.update(lin)
    assert int(ema.updates) == 21
    d = 0.9  # (1 + n) / (10 + n) > 0.9 from n = 81 on; before, the warm-up rate applies
    expected = 2.8
    for n in range(1, 21):
        dn = min(d, (1 + n) / (10 + n))
        expected = dn * expected + (1 - dn) * 3.0
    torch.testing.assert_close(ema.state_for()["weight"], torch.full((1, 2), expected))
    other = torch.nn.Linear(2, 1)
    ema.copy_to(other)
    torch.testing.assert_close(other.weight.detach(), torch.full((1, 2), expected))


def test_loss_goes_down_on_real_mnist(mnist_slice: dict) -> None:
    train = mnist_slice["train"]
    x0 = train.images[:256].float() / 127.5 - 1
    labels = train.labels[:256]
    torch.manual_seed(0)
    model = UNet(tiny(timesteps=100, text_dim=0))
    fixed = torch.Generator().manual_seed(0)

    def held_loss() -> float:
        with torch.no_grad():
            return float(model.loss(x0[:128], labels[:128], generator=torch.Generator().manual_seed(1)))

    before = held_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(20):
        idx = torch.randint(0, 256, (32,), generator=fixed)
        loss = model.loss(x0[idx], labels[idx], generator=fixed)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_loss()
    assert after < 0.6 * before, (before, after)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    from fromzero.checkpoint import load_model, save_checkpoint

    torch.manual_seed(0)
    model = UNet(tiny(labels=[str(i) for i in range(10)]))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_checkpoint(tmp_path / "ckpt", model, model.config.to_dict(), info={"task": "image-generation"})
    loaded = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, UNet) and loaded.config == model.config
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 30])
    with torch.no_grad():
        labels = torch.tensor([1, 2])
        torch.testing.assert_close(loaded(x, t, labels), model.eval()(x, t, labels))
