"""The BERT span head (``head: qa``) against Hugging Face's ``BertForQuestionAnswering``.

A tiny random reference (hidden 32, 2 layers) is saved with ``save_pretrained``, converted with
``convert_from_hf`` and compared in fp32 on a padded batch with token types: start / end logits
within 1e-5 at every position, and the loss for given start / end positions. ``to_hf`` maps
``qa_outputs.weight/bias`` back (transformers loads it with no missing or unexpected keys).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from fromzero.models.bert import Bert, BertConfig  # noqa: E402
from fromzero.models.hf import convert_from_hf, convert_to_hf  # noqa: E402

from .test_convert_bert import TOL, fz_inputs, hf_model, padded_batch, save_and_convert  # noqa: E402


def test_question_answering_parity(tmp_path: Path) -> None:
    ref = hf_model("BertForQuestionAnswering")
    _, fz_dir, model = save_and_convert(ref, tmp_path)
    config = json.loads((fz_dir / "config.json").read_text())
    assert config["head"] == "qa" and config["pooler"] is False
    assert set(load_file(str(fz_dir / "model.safetensors"))) >= {"qa_outputs.weight", "qa_outputs.bias"}
    b = padded_batch(6)
    # start / end positions, one of them past the sequence (HF clamps it to T and ignores it)
    start, end = torch.tensor([2, 0, 1, 30]), torch.tensor([4, 0, 2, 0])
    with torch.no_grad():
        out = ref(**b, start_positions=start, end_positions=end)
        logits, loss = model(*fz_inputs(b), labels=torch.stack([start, end], dim=1))
    assert logits.shape == (4, 11, 2)
    torch.testing.assert_close(logits[..., 0], out.start_logits, **TOL)  # every position, padding too
    torch.testing.assert_close(logits[..., 1], out.end_logits, **TOL)
    torch.testing.assert_close(loss, out.loss, **TOL)


def test_question_answering_round_trip(tmp_path: Path) -> None:
    ref = hf_model("BertForQuestionAnswering", seed=7)
    _, fz_dir, _ = save_and_convert(ref, tmp_path)
    back = tmp_path / "back"
    hf_config = convert_to_hf(fz_dir, back)
    assert hf_config["architectures"] == ["BertForQuestionAnswering"] and hf_config["num_labels"] == 2
    again, info = transformers.AutoModelForQuestionAnswering.from_pretrained(back, output_loading_info=True)
    assert type(again).__name__ == "BertForQuestionAnswering"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    b = padded_batch(7)
    with torch.no_grad():
        want, got = ref(**b), again.eval()(**b)
    torch.testing.assert_close(got.start_logits, want.start_logits, atol=0, rtol=0)
    torch.testing.assert_close(got.end_logits, want.end_logits, atol=0, rtol=0)
    convert_from_hf(str(back), tmp_path / "again")
    a, c = load_file(str(fz_dir / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_a_stored_pooler_beside_the_span_head_is_dropped() -> None:
    """Some TF-era QA exports keep the pretraining pooler; HF ignores it, and so do we."""
    from fromzero.models.convert_bert import from_hf

    ref = hf_model("BertForQuestionAnswering", seed=8)
    state = dict(ref.state_dict())
    state["bert.pooler.dense.weight"] = torch.zeros(32, 32)
    state["bert.pooler.dense.bias"] = torch.zeros(32)
    config, fz_state = from_hf(ref.config.to_dict(), state)
    assert config["head"] == "qa" and not config["pooler"] and not any(k.startswith("pooler.") for k in fz_state)


def test_qa_head_refuses_a_pooler() -> None:
    with pytest.raises(ValueError, match="pooler"):
        Bert(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=8, head="qa", pooler=True))
