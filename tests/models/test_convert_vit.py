"""HF ViT directories <-> fromzero checkpoints (fromzero.models.convert_vit via fromzero.models.hf).

Tiny random ``transformers`` ViTModel / ViTForImageClassification are saved with
``save_pretrained`` (the layout the hub holds), converted with ``convert from-hf``, loaded with
``load_model`` and compared in fp32; ``to-hf`` output is loaded back with the Auto classes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fromzero.models.hf import convert_from_hf, convert_to_hf
from fromzero.models.vit import ViT
from fromzero.checkpoint import load_model

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-5, rtol=1e-4)
TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, num_labels=3)


def _randomize(model):
    with torch.no_grad():  # non-trivial LayerNorms and biases, so every tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.logging.set_verbosity(verbosity)
    transformers.utils.logging.enable_progress_bar()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny HF models: "model" (ViTModel with pooler), "cls" (ViTForImageClassification)."""
    root = tmp_path_factory.mktemp("hf-vit")
    torch.manual_seed(0)
    _randomize(transformers.ViTModel(transformers.ViTConfig(**TINY))).save_pretrained(root / "model")
    torch.manual_seed(1)
    config = transformers.ViTConfig(**TINY, id2label={0: "cat", 1: "dog", 2: "eel"},
                                    label2id={"cat": 0, "dog": 1, "eel": 2})
    _randomize(transformers.ViTForImageClassification(config)).save_pretrained(root / "cls")
    return {"model": root / "model", "cls": root / "cls"}


def images(B: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# from-hf


def test_from_hf_vit_model(hf_dirs, tmp_path) -> None:
    ref = transformers.ViTModel.from_pretrained(hf_dirs["model"]).eval()
    config = convert_from_hf(str(hf_dirs["model"]), tmp_path / "fz")
    assert config["model_type"] == "fromzero-vit" and config["pooler"] and config["num_labels"] == 0
    ours = load_model(tmp_path / "fz")
    assert isinstance(ours, ViT)
    x = images()
    with torch.no_grad():
        out = ref(pixel_values=x)
        hidden = ours.encode(x)
        torch.testing.assert_close(hidden, out.last_hidden_state, **TOL)
        torch.testing.assert_close(ours.pool(hidden), out.pooler_output, **TOL)
        torch.testing.assert_close(ours(x), out.last_hidden_state, **TOL)  # no head: hidden states


def test_from_hf_classifier_via_cli(hf_dirs, tmp_path, cli) -> None:
    result = cli("convert", "from-hf", hf_dirs["cls"], tmp_path / "fz")
    assert result.code == 0, result
    assert "fromzero-vit" in result.out
    config = json.loads((tmp_path / "fz" / "config.json").read_text())
    assert config["num_labels"] == 3 and config["labels"] == ["cat", "dog", "eel"]
    assert not config["pooler"]  # ViTForImageClassification has none
    ref = transformers.ViTForImageClassification.from_pretrained(hf_dirs["cls"]).eval()
    ours = load_model(tmp_path / "fz")
    with torch.no_grad():
        x = images()
        torch.testing.assert_close(ours(x), ref(pixel_values=x).logits, **TOL)
        torch.testing.assert_close(ours.encode(x), ref.vit(pixel_values=x).last_hidden_state, **TOL)


def test_from_hf_transformers5_layout(hf_dirs, tmp_path) -> None:
    """A state dict saved straight from a transformers 5 model (``layers.0.attention.q_proj``)."""
    ref = transformers.ViTForImageClassification.from_pretrained(hf_dirs["cls"]).eval()
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(hf_dirs["cls"] / "config.json", src / "config.json")
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(".q_proj." in k for k in state)
    save_file(state, src / "model.safetensors")
    convert_from_hf(str(src), tmp_path / "fz")
    ours = load_model(tmp_path / "fz")
    with torch.no_grad():
        torch.testing.assert_close(ours(images()), ref(pixel_values=images()).logits, **TOL)


# ----------------------------------------------------------------------------------------
# Round trip: from-hf -> to-hf -> transformers


@pytest.mark.parametrize("kind", ["model", "cls"])
def test_round_trip_to_hf(kind, hf_dirs, tmp_path, cli) -> None:
    assert cli("convert", "from-hf", hf_dirs[kind], tmp_path / "fz").code == 0
    result = cli("convert", "to-hf", tmp_path / "fz", tmp_path / "hf")
    assert result.code == 0, result
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    x = images()
    with torch.no_grad():
        if kind == "model":
            assert config["architectures"] == ["ViTModel"]
            ref = transformers.ViTModel.from_pretrained(hf_dirs["model"]).eval()
            back = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
            assert type(back).__name__ == "ViTModel"
            a, b = ref(pixel_values=x), back(pixel_values=x)
            torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, **TOL)
            torch.testing.assert_close(b.pooler_output, a.pooler_output, **TOL)
        else:
            assert config["architectures"] == ["ViTForImageClassification"]
            assert config["id2label"] == {"0": "cat", "1": "dog", "2": "eel"}
            ref = transformers.ViTForImageClassification.from_pretrained(hf_dirs["cls"]).eval()
            back = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
            torch.testing.assert_close(back(pixel_values=x).logits, ref(pixel_values=x).logits, **TOL)
            assert back.config.id2label == {0: "cat", 1: "dog", 2: "eel"}
    # Exported tensors are the original ones, bit for bit, under the same names.
    original = load_file(hf_dirs[kind] / "model.safetensors")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


def test_to_hf_classifier_with_pooler_keeps_both(tmp_path) -> None:
    """A fromzero ViT with a head and a pooler: the classifier and AutoModel both get their part."""
    from fromzero.models.vit import ViTConfig
    from fromzero.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = ViTConfig(**{**TINY, "num_labels": 2}, pooler=True, qkv_bias=False)
    ours = ViT(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours.eval()
    save_checkpoint(tmp_path / "fz", ours, cfg.to_dict())
    convert_to_hf(tmp_path / "fz", tmp_path / "hf")
    x = images()
    with torch.no_grad():
        clf = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(clf(pixel_values=x).logits, ours(x), **TOL)
        enc = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
        hidden = ours.encode(x)
        torch.testing.assert_close(enc(pixel_values=x).last_hidden_state, hidden, **TOL)
        torch.testing.assert_close(enc(pixel_values=x).pooler_output, ours.pool(hidden), **TOL)


# ----------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit 2, OUT untouched


def _broken_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_key(hf_dirs, tmp_path, cli, one_line_error) -> None:
    name = "vit.encoder.layer.1.attention.attention.key.weight"
    src = _broken_copy(hf_dirs["cls"], tmp_path / "src", lambda s: s.pop(name))
    result = cli("convert", "from-hf", src, tmp_path / "out")
    one_line_error(result, "missing 1", name)
    assert not (tmp_path / "out").exists()


def test_extra_key(hf_dirs, tmp_path, cli, one_line_error) -> None:
    def add(state):
        state["vit.embeddings.mask_token"] = torch.zeros(1, 1, 32)  # a ViTForMaskedImageModeling part

    src = _broken_copy(hf_dirs["cls"], tmp_path / "src", add)
    one_line_error(cli("convert", "from-hf", src, tmp_path / "out"), "unexpected 1", "vit.embeddings.mask_token")
    assert not (tmp_path / "out").exists()


def test_wrong_shape(hf_dirs, tmp_path, cli, one_line_error) -> None:
    def shrink(state):
        state["embeddings.position_embeddings"] = state["embeddings.position_embeddings"][:, :10]

    src = _broken_copy(hf_dirs["model"], tmp_path / "src", shrink)
    one_line_error(cli("convert", "from-hf", src, tmp_path / "out"),
                   "embeddings.position_embeddings", "(1, 10, 32)", "(1, 17, 32)")
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors_leaves_existing_out_untouched(hf_dirs, tmp_path, cli, one_line_error) -> None:
    src = tmp_path / "src"
    shutil.copytree(hf_dirs["model"], src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    one_line_error(cli("convert", "from-hf", src, out, "--force"), "cannot read weights", "model.safetensors")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_unsupported_config(hf_dirs, tmp_path, cli, one_line_error) -> None:
    src = tmp_path / "src"
    shutil.copytree(hf_dirs["model"], src)
    config = json.loads((src / "config.json").read_text())
    config["hidden_act"] = "mish"
    (src / "config.json").write_text(json.dumps(config))
    one_line_error(cli("convert", "from-hf", src, tmp_path / "out"), "hidden_act 'mish' is not supported")
    assert not (tmp_path / "out").exists()


def test_config_weights_disagree(hf_dirs, tmp_path, cli, one_line_error) -> None:
    """config.json says 3 layers, the weights hold 2: the missing layer's tensors are named."""
    src = tmp_path / "src"
    shutil.copytree(hf_dirs["model"], src)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(config))
    one_line_error(cli("convert", "from-hf", src, tmp_path / "out"), "missing 16", "encoder.layer.2.")
