"""Parity of fromzero's BERT with Hugging Face ``transformers``, and conversion in both directions.

Tiny random reference models (hidden 32, 2 layers, 4 heads, intermediate 37, vocab 99) are
built with ``transformers`` inside the test, saved with ``save_pretrained``, converted with
``fromzero.models.hf`` and compared in fp32 on padded batches with token types. Bad input goes
through ``fromzero convert`` (exit 2, one ``error:`` line, OUT untouched).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from fromzero.cli import main  # noqa: E402
from fromzero.errors import FromzeroError  # noqa: E402
from fromzero.models.bert import Bert  # noqa: E402
from fromzero.models.hf import convert_from_hf, convert_to_hf  # noqa: E402
from fromzero.checkpoint import load_model  # noqa: E402

transformers.utils.logging.disable_progress_bar()

TOL = dict(atol=1e-5, rtol=1e-4)
HF_KW = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=64)


def hf_model(cls_name: str, seed: int = 0, **kw):
    """A tiny random transformers BERT in eval mode, biases and norms moved off their init."""
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(transformers.BertConfig(**{**HF_KW, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch of 4 rows (lengths 11, 7, 3, 1) with a second segment in each."""
    g = torch.Generator().manual_seed(seed)
    lengths = [11, 7, 3, 1]
    ids = torch.randint(1, 99, (4, 11), generator=g)
    mask = torch.zeros(4, 11, dtype=torch.long)
    types = torch.zeros(4, 11, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        types[i, n // 2 : n] = 1
        ids[i, n:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def fz_inputs(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return b["input_ids"], b["attention_mask"], b["token_type_ids"]


def save_and_convert(model, tmp_path: Path, name: str = "m") -> tuple[Path, Path, Bert]:
    hf_dir, fz_dir = tmp_path / f"{name}-hf", tmp_path / f"{name}-fz"
    model.save_pretrained(hf_dir)
    convert_from_hf(str(hf_dir), fz_dir)
    return hf_dir, fz_dir, load_model(fz_dir)


def real_rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return t[mask.bool()]  # the hidden states of real (non-padding) tokens, (N, C)


# ---------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_bert_model_parity(tmp_path: Path, act: str) -> None:
    ref = hf_model("BertModel", hidden_act=act)
    _, fz_dir, model = save_and_convert(ref, tmp_path)
    config = json.loads((fz_dir / "config.json").read_text())
    assert config["head"] == "embedding" and config["pooling"] == "mean" and config["normalize"] is True
    assert config["hidden_act"] == act and config["pooler"] is True
    b = padded_batch()
    with torch.no_grad():
        out = ref(**b)
        hidden = model.encode(*fz_inputs(b))
        torch.testing.assert_close(hidden, out.last_hidden_state, **TOL)  # padded positions too
        torch.testing.assert_close(model.pool(hidden), out.pooler_output, **TOL)
        emb, _ = model(*fz_inputs(b))
    m = b["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((out.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(emb, expected, **TOL)


def test_sequence_classification_parity(tmp_path: Path) -> None:
    ref = hf_model("BertForSequenceClassification", num_labels=3,
                   id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    _, fz_dir, model = save_and_convert(ref, tmp_path)
    config = json.loads((fz_dir / "config.json").read_text())
    assert config["head"] == "classification" and config["num_labels"] == 3
    assert config["labels"] == ["neg", "neu", "pos"]
    b = padded_batch(1)
    labels = torch.tensor([0, 2, 1, 1])
    with torch.no_grad():
        out = ref(**b, labels=labels)
        logits, loss = model(*fz_inputs(b), labels=labels)
    torch.testing.assert_close(logits, out.logits, **TOL)
    torch.testing.assert_close(loss, out.loss, **TOL)


def test_masked_lm_parity(tmp_path: Path) -> None:
    ref = hf_model("BertForMaskedLM", hidden_act="gelu_new")
    _, fz_dir, model = save_and_convert(ref, tmp_path)
    config = json.loads((fz_dir / "config.json").read_text())
    assert config["head"] == "mlm" and config["pooler"] is False
    assert model.mlm_head.decoder.weight is model.embeddings.word.weight
    b = padded_batch(2)
    labels = torch.full_like(b["input_ids"], -100)
    labels[0, 3], labels[1, 0], labels[2, 2] = 5, 17, 98
    with torch.no_grad():
        out = ref(**b, labels=labels)
        logits, loss = model(*fz_inputs(b), labels=labels)
    m = b["attention_mask"]
    torch.testing.assert_close(real_rows(logits, m), real_rows(out.logits, m), **TOL)
    torch.testing.assert_close(logits, out.logits, **TOL)
    torch.testing.assert_close(loss, out.loss, **TOL)


def test_pretraining_checkpoint_reads_as_mlm(tmp_path: Path) -> None:
    """BertForPreTraining (bert-base-uncased's layout): MLM + pooler kept, NSP head dropped."""
    ref = hf_model("BertForPreTraining")
    _, fz_dir, model = save_and_convert(ref, tmp_path)
    config = json.loads((fz_dir / "config.json").read_text())
    assert config["head"] == "mlm" and config["pooler"] is True
    b = padded_batch(3)
    with torch.no_grad():
        out = ref(**b)
        logits, _ = model(*fz_inputs(b))
    torch.testing.assert_close(logits, out.prediction_logits, **TOL)


def test_legacy_key_names_and_no_architectures(tmp_path: Path) -> None:
    """TF-era names (LayerNorm gamma/beta, stored position_ids, decoder copies), no architectures."""
    ref = hf_model("BertForMaskedLM", seed=4)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    legacy = {}
    for k, v in state.items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[k] = v
    legacy["bert.embeddings.position_ids"] = torch.arange(64)[None]
    legacy["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    legacy["cls.predictions.decoder.bias"] = legacy.pop("cls.predictions.bias")
    src = tmp_path / "legacy"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in legacy.items()}, str(src / "model.safetensors"))
    cfg = ref.config.to_dict()
    cfg.pop("architectures", None)
    (src / "config.json").write_text(json.dumps(cfg))
    convert_from_hf(str(src), tmp_path / "out")
    model = load_model(tmp_path / "out")
    assert model.config.head == "mlm"
    b = padded_batch(4)
    with torch.no_grad():
        torch.testing.assert_close(model(*fz_inputs(b))[0], ref(**b).logits, **TOL)


# ---------------------------------------------------------------------------------------------
# Round trip: HF -> fromzero -> HF


@pytest.mark.parametrize("cls_name, auto", [("BertModel", "AutoModel"),
                                            ("BertForSequenceClassification", "AutoModelForSequenceClassification"),
                                            ("BertForMaskedLM", "AutoModelForMaskedLM")])
def test_round_trip_through_transformers(tmp_path: Path, cls_name: str, auto: str) -> None:
    ref = hf_model(cls_name, seed=5)
    _, fz_dir, _ = save_and_convert(ref, tmp_path)
    back = tmp_path / "back"
    hf_config = convert_to_hf(fz_dir, back)
    assert hf_config["architectures"] == [cls_name]
    again, info = getattr(transformers, auto).from_pretrained(back, output_loading_info=True)
    assert type(again).__name__ == cls_name
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    b = padded_batch(5)
    with torch.no_grad():
        want, got = ref(**b), again.eval()(**b)
    key = "last_hidden_state" if cls_name == "BertModel" else "logits"
    torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    # and back into fromzero once more: the same weights
    convert_from_hf(str(back), tmp_path / "again")
    a, c = load_file(str(fz_dir / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_bare_encoder_of_a_bert_for_model_reads_with_head_none() -> None:
    from fromzero.models.convert_bert import from_hf, to_hf

    ref = hf_model("BertForSequenceClassification")
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("classifier.")}
    cfg = ref.config.to_dict()
    cfg.pop("architectures", None)
    config, fz_state = from_hf(cfg, state)
    assert config["head"] == "none" and config["pooler"] is True
    hf_config, hf_state = to_hf(config, fz_state)
    assert hf_config["architectures"] == ["BertModel"] and "pooler.dense.weight" in hf_state


# ---------------------------------------------------------------------------------------------
# Bad input through the CLI: exit 2, one error line, OUT untouched


def run_convert(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()  # drop whatever earlier steps printed
    code = main(["convert", *args])
    err = capsys.readouterr().err
    return code, err


def assert_one_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bert") / "hf"
    hf_model("BertModel", seed=6).save_pretrained(d)
    return d


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def assert_untouched(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_cli_convert_round_trip(saved_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "from-hf", str(saved_bert), str(tmp_path / "fz")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["convert", "to-hf", str(tmp_path / "fz"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


def test_no_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").mkdir()
    code, err = run_convert(capsys, "from-hf", str(tmp_path / "src"), str(tmp_path / "out"))
    assert_one_error(code, err, "no config.json")
    assert_untouched(tmp_path / "out")


def test_unsupported_model_type_lists_supported(saved_bert: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_dir(saved_bert, tmp_path / "roberta")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    code, err = run_convert(capsys, "from-hf", str(src), str(tmp_path / "out"))
    assert_one_error(code, err, "unsupported Hugging Face model_type 'roberta'", "supported:", "bert")
    assert_untouched(tmp_path / "out")


@pytest.mark.parametrize("change, fragments", [
    ({"architectures": ["BertForTokenClassification"]}, ["BertForTokenClassification is not supported"]),
    ({"position_embedding_type": "relative_key"}, ["position_embedding_type 'relative_key'"]),
    ({"hidden_act": "mish"}, ["hidden_act 'mish'"]),
    ({"hidden_size": 30}, ["divisible"]),
    ({"vocab_size": 100}, ["embeddings.word.weight", "(99, 32)", "(100, 32)"]),
])
def test_config_problems(saved_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         change: dict, fragments: list[str]) -> None:
    src = copy_dir(saved_bert, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    code, err = run_convert(capsys, "from-hf", str(src), str(tmp_path / "out"))
    assert_one_error(code, err, *fragments)
    assert_untouched(tmp_path / "out")


def test_missing_and_extra_keys_are_named(saved_bert: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    state = load_file(str(saved_bert / "model.safetensors"))
    src = copy_dir(saved_bert, tmp_path / "missing")
    save_file({k: v for k, v in state.items() if k != "encoder.layer.1.output.dense.weight"},
              str(src / "model.safetensors"))
    code, err = run_convert(capsys, "from-hf", str(src), str(tmp_path / "out"))
    assert_one_error(code, err, "missing 1: encoder.layer.1.output.dense.weight")
    assert_untouched(tmp_path / "out")

    src = copy_dir(saved_bert, tmp_path / "extra")
    save_file({**state, "encoder.layer.9.mystery.weight": torch.zeros(2)}, str(src / "model.safetensors"))
    code, err = run_convert(capsys, "from-hf", str(src), str(tmp_path / "out"))
    assert_one_error(code, err, "unexpected 1: encoder.layer.9.mystery.weight")
    assert_untouched(tmp_path / "out")

    # a classifier checkpoint whose classifier is missing: named with its full name
    cls_dir = tmp_path / "cls"
    hf_model("BertForSequenceClassification").save_pretrained(cls_dir)
    cls_state = load_file(str(cls_dir / "model.safetensors"))
    save_file({k: v for k, v in cls_state.items() if not k.startswith("classifier.")},
              str(cls_dir / "model.safetensors"))
    code, err = run_convert(capsys, "from-hf", str(cls_dir), str(tmp_path / "out"))
    assert_one_error(code, err, "missing 2: classifier.bias, classifier.weight")


def test_untied_mlm_decoder_is_refused(tmp_path: Path) -> None:
    from fromzero.models.convert_bert import from_hf

    ref = hf_model("BertForMaskedLM")
    state = dict(ref.state_dict())
    state["cls.predictions.decoder.weight"] = torch.randn(99, 32)
    with pytest.raises(FromzeroError, match="untied MLM decoder"):
        from_hf(ref.config.to_dict(), state)


def test_corrupt_safetensors_and_existing_out_kept(saved_bert: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_dir(saved_bert, tmp_path / "corrupt")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code, err = run_convert(capsys, "from-hf", str(src), str(out))
    assert_one_error(code, err, "cannot read weights")
    assert_untouched(out)
    # an existing OUT replaced with --force survives a failed conversion unchanged
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_convert(capsys, "from-hf", str(src), str(out), "--force")
    assert_one_error(code, err, "cannot read weights")
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
