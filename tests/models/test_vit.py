"""Tests for the Vision Transformer (fromzero.models.vit): config, shapes, HF parity, checkpoints.

Parity: a tiny random ``transformers`` ViT, its in-memory state dict (transformers 5 layout)
converted with fromzero.models.convert_vit.from_hf, outputs compared in fp32 on CPU. Directory
round trips through ``convert from-hf`` / ``to-hf`` are in test_convert_vit.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from fromzero.errors import FromzeroError
from fromzero.models import build_model
from fromzero.models.vit import ViT, ViTConfig
from fromzero.checkpoint import load_model, save_checkpoint

TOL = dict(atol=1e-5, rtol=1e-4)


def tiny_config(**kw) -> ViTConfig:
    base = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=37)
    base.update(kw)
    return ViTConfig(**base)


def tiny_model(seed: int = 0, **kw) -> ViT:
    torch.manual_seed(seed)
    model = ViT(tiny_config(**kw))
    with torch.no_grad():  # non-trivial LayerNorms and biases, so every parameter matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def images(B: int = 2, size: int | tuple[int, int] = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(B, channels, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# Config


def test_config_validate_errors() -> None:
    tiny_config().validate()
    cases = [
        (dict(image_size=30), "image_size \\(30\\) must be divisible by model.patch_size \\(8\\)"),
        (dict(image_size=[32, 20]), "must be divisible"),
        (dict(hidden_size=30), "hidden_size \\(30\\) must be divisible by model.num_attention_heads \\(4\\)"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be positive"),
        (dict(patch_size=0), "must be positive"),
        (dict(image_size="32"), "image_size"),
        (dict(patch_size=[8, 8, 8]), "image_size"),
        (dict(hidden_act="mish"), "hidden_act 'mish' is not supported"),
        (dict(pooler_act="nope"), "pooler_act"),
        (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob"),
        (dict(attention_probs_dropout_prob=-0.1), "attention_probs_dropout_prob"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
        (dict(num_labels=-1), "num_labels"),
        (dict(num_labels=2, labels=["cat"]), "labels has 1 names"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            tiny_config(**kw).validate()
    with pytest.raises(ValueError, match="divisible"):
        ViT(tiny_config(image_size=33))
    # Through the registry (what load_model uses): one clear FromzeroError.
    with pytest.raises(FromzeroError, match="invalid fromzero-vit config: .*divisible"):
        build_model(tiny_config(hidden_size=30).to_dict())


def test_config_dict_round_trip() -> None:
    cfg = tiny_config(num_labels=3, labels=["a", "b", "c"], image_size=[32, 16], pooler=True)
    d = json.loads(json.dumps(cfg.to_dict()))  # what config.json holds
    assert d["model_type"] == "fromzero-vit"
    assert ViTConfig.from_dict(d) == cfg
    assert ViTConfig.from_dict({**d, "unknown_field": 1}) == cfg
    assert cfg.grid == (4, 2) and cfg.num_patches == 8


# ----------------------------------------------------------------------------------------
# Shapes and behaviour


def test_shapes() -> None:
    enc = tiny_model()  # no head: the model returns its hidden states
    x = images(2)
    h = enc(x)
    assert h.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(h, enc.encode(x))
    assert enc.head is None and enc.pooler is None
    with pytest.raises(ValueError, match="no pooler"):
        enc.pool(h)

    clf = tiny_model(num_labels=5, pooler=True, pooler_output_size=24)
    assert clf(x).shape == (2, 5)
    assert clf.pool(clf.encode(x)).shape == (2, 24)
    assert clf.patch_embed.weight.shape == (32, 3, 8, 8)
    assert clf.pos_embed.shape == (1, 17, 32)
    assert clf.blocks[0].attn.qkv.weight.shape == (96, 32)
    assert clf.blocks[0].mlp.fc1.weight.shape == (37, 32)


def test_head_reads_the_final_class_token() -> None:
    model = tiny_model(num_labels=3)
    x = images(2)
    h = model.encode(x)
    torch.testing.assert_close(model(x), model.head(h[:, 0]))
    # Changing one patch changes the class token's state: it attends to every patch.
    x2 = x.clone()
    x2[:, :, :8, :8] += 1.0
    assert not torch.allclose(model(x2), model(x))


def test_non_square_images_and_channels() -> None:
    model = tiny_model(image_size=[32, 16], num_channels=1, num_labels=2)
    assert model.encode(images(3, (32, 16), channels=1)).shape == (3, 1 + 8, 32)
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 1, height, width\)"):
        model(images(3, (32, 16), channels=3))


def test_image_size_mismatch_and_interpolation() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"input image size \(48x48\) doesn't match the model \(32x32\).*interpolate"):
        model(images(1, 48))
    # Same size with interpolation: the stored embeddings, unchanged.
    torch.testing.assert_close(model(images(1), interpolate_pos_encoding=True), model(images(1)))
    assert model.encode(images(2, 48), interpolate_pos_encoding=True).shape == (2, 1 + 36, 32)
    assert model.encode(images(2, (48, 16)), interpolate_pos_encoding=True).shape == (2, 1 + 12, 32)


def test_dropout_only_in_training() -> None:
    model = tiny_model(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3, num_labels=3)
    x = images(2)
    torch.testing.assert_close(model(x), model(x))  # eval: deterministic
    model.train()
    torch.manual_seed(0)
    a = model(x)
    b = model(x)
    assert not torch.allclose(a, b)


def test_every_parameter_gets_a_gradient() -> None:
    # Default config: no pooler, so a classifier has no unused parameters (DDP-friendly).
    model = tiny_model(num_labels=3).train()
    loss = torch.nn.functional.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_runs() -> None:
    model = tiny_model(num_labels=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(2))
    assert out.shape == (2, 3) and torch.isfinite(out.float()).all()


def test_checkpoint_round_trip(tmp_path) -> None:
    model = tiny_model(num_labels=3, pooler=True, labels=["cat", "dog", "eel"])
    save_checkpoint(tmp_path / "ckpt", model, model.config.to_dict())
    loaded = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, ViT) and loaded.config == model.config
    x = images(2)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    torch.testing.assert_close(loaded.pool(loaded.encode(x)), model.pool(model.encode(x)), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------
# Parity with Hugging Face transformers


def _hf_vit(seed: int = 0, classify: bool = False, **kw):
    transformers = pytest.importorskip("transformers")
    cfg = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=37, num_labels=3)
    cfg.update(kw)
    torch.manual_seed(seed)
    config = transformers.ViTConfig(**cfg)
    model = (transformers.ViTForImageClassification(config) if classify else transformers.ViTModel(config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _ours_from(hf_model) -> ViT:
    from fromzero.models.convert_vit import from_hf

    config, state = from_hf(hf_model.config.to_dict(), hf_model.state_dict())
    model = build_model(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"qkv_bias": False, "hidden_act": "gelu_new", "layer_norm_eps": 1e-6},
        {"pooler_output_size": 24, "image_size": [32, 16], "num_channels": 1},
    ],
    ids=["default", "no-qkv-bias-gelu-new", "pooler-24-nonsquare-gray"],
)
def test_parity_with_hf_vit_model(kw) -> None:
    ref = _hf_vit(**kw)
    ours = _ours_from(ref)
    assert ours.config.pooler and ours.head is None
    h, w = (32, 32) if "image_size" not in kw else tuple(kw["image_size"])
    x = images(2, (h, w), channels=kw.get("num_channels", 3))
    with torch.no_grad():
        out = ref(pixel_values=x)
        hidden = ours.encode(x)
        torch.testing.assert_close(hidden, out.last_hidden_state, **TOL)
        torch.testing.assert_close(ours.pool(hidden), out.pooler_output, **TOL)


def test_parity_with_hf_classifier_and_interpolation() -> None:
    ref = _hf_vit(classify=True)
    ours = _ours_from(ref)
    assert ours.config.num_labels == 3 and not ours.config.pooler
    with torch.no_grad():
        x = images(2)
        torch.testing.assert_close(ours(x), ref(pixel_values=x).logits, **TOL)
        x = images(2, 48)  # another resolution, position embeddings resized bicubically
        torch.testing.assert_close(
            ours(x, interpolate_pos_encoding=True), ref(pixel_values=x, interpolate_pos_encoding=True).logits, **TOL
        )
