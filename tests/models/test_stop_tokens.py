"""Generation stops at any of several end tokens (LLaMA 3 declares a list of eos ids)."""

from __future__ import annotations

import json

import torch

from types import SimpleNamespace

from fromzero.inference.chat import eos_ids
from fromzero.models.gpt import GPT, GPTConfig


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=17, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()


def test_generation_stops_at_any_listed_eos_and_pads_with_the_first():
    model = _model()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = model.generate(idx, 10, temperature=0)
    produced = free[:, 3:]
    stop = int(produced[0, 2])  # a token row 0 emits at its third step
    other = 16 if stop != 16 else 15
    out = model.generate(idx, 10, temperature=0, eos_id=[other, stop])
    row0 = out[0, 3:].tolist()
    first = row0.index(stop)
    assert first <= 2 and row0[: first + 1] == produced[0, : first + 1].tolist()
    assert all(t == other for t in row0[first + 1 :])  # padded with the first listed id
    single = model.generate(idx, 10, temperature=0, eos_id=stop)
    assert single[0, 3 : 3 + first + 1].tolist() == row0[: first + 1]


def test_stop_ids_are_the_tokenizers_endoftext_and_the_converted_models_eos(tmp_path):
    def stop_ids(eos: int | None) -> list[int]:
        return eos_ids(tmp_path, SimpleNamespace(eos_id=eos))

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "fromzero-gpt"}))
    assert stop_ids(7) == [7]
    assert stop_ids(None) == []
    (tmp_path / "config.json").write_text(json.dumps({"hf_special_tokens": {"eos_token_id": [128001, 128009]}}))
    assert stop_ids(None) == [128001, 128009]
    # SmolLM2: <|endoftext|> (0) ends documents, <|im_end|> (2) is the declared eos: both stop.
    (tmp_path / "config.json").write_text(json.dumps({"hf_special_tokens": {"eos_token_id": 2}}))
    assert stop_ids(0) == [0, 2]
    assert stop_ids(2) == [2]
