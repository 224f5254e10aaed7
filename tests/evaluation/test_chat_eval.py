"""Chat evaluation: the reply-parsing rule, its metrics against scikit-learn, batched greedy decoding
and first-token scores against direct computations on a tiny model."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fromzero.errors import FromzeroError
from fromzero.inference.chat_eval import (
    answer_token_ids,
    first_token_scores,
    generate_replies,
    parse_reply,
    reply_metrics,
)

REPLIES = [
    ("positive", "positive"),
    ("Negative", "negative"),
    ("  NEGATIVE.", "negative"),
    ("Positive! The film is great", "positive"),
    ("The review is positive.", "positive"),      # not the first word, but the only label word
    ("It is not negative", "negative"),           # contains exactly one label word
    ("positive or negative?", "positive"),        # the first word decides
    ("Both positive and negative", None),         # both, not first: unparseable
    ("I think it's mixed", None),                 # neither
    ("", None),
    ("positively great", None),                   # 'positively' is not the word 'positive'
    ("**negative**", "negative"),                 # markdown around it
]


@pytest.mark.parametrize("reply, expected", REPLIES)
def test_parse_rule(reply: str, expected: str | None) -> None:
    assert parse_reply(reply) == expected


def test_reply_metrics_match_sklearn() -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    truth = ["positive", "negative", "negative", "positive", "negative", "negative", "positive", "positive",
             "negative", "positive", "positive", "negative"]
    predicted = [parse_reply(r) for r, _ in REPLIES]
    m = reply_metrics(truth, predicted)
    as_str = [p if p is not None else "unparseable" for p in predicted]
    assert m["n"] == 12 and m["unparseable"] == 4
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, as_str))  # unparseable = wrong
    # macro-F1 over the two real classes; an unparseable reply is a miss for its true class
    assert m["f1_macro"] == pytest.approx(f1_score(truth, as_str, labels=["negative", "positive"], average="macro"))
    assert m["per_class"]["positive"]["support"] == 6
    assert m["confusion_matrix"] == confusion_matrix(
        truth, as_str, labels=["negative", "positive", "unparseable"])[:2].tolist()


def test_reply_metrics_refuse_bad_input() -> None:
    with pytest.raises(FromzeroError):
        reply_metrics(["positive"], [])
    with pytest.raises(FromzeroError, match="neutral"):
        reply_metrics(["neutral"], ["positive"])


class _Tok:
    def __init__(self, table: dict[str, list[int]]) -> None:
        self.table = table

    def encode(self, text: str) -> list[int]:
        return self.table[text]


def test_answer_token_ids_dedupe_and_refuse_shared_first_tokens() -> None:
    tok = _Tok({"positive": [5, 1], "Positive": [6], "negative": [7], "Negative": [7, 2]})
    assert answer_token_ids(tok) == {"negative": [7], "positive": [5, 6]}
    clash = _Tok({"positive": [5], "Positive": [6], "negative": [5, 3], "Negative": [8]})
    with pytest.raises(FromzeroError, match="same token"):
        answer_token_ids(clash)


def test_first_token_scores_are_logsumexp_per_label() -> None:
    logits = torch.randn(4, 10)
    ids = {"negative": [1], "positive": [3, 7]}
    scores = first_token_scores(logits, ids)
    expected = torch.stack([logits[:, 1], torch.log(torch.exp(logits[:, 3]) + torch.exp(logits[:, 7]))], dim=-1)
    torch.testing.assert_close(scores, expected)


def _tiny_gpt():
    from fromzero.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, bias=False,
                          norm="rmsnorm", pos_embedding="rope", mlp="swiglu", tie_embeddings=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def test_batched_greedy_and_first_token_logits_equal_one_prompt_at_a_time() -> None:
    model = _tiny_gpt()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 50, (n,), generator=gen).tolist() for n in (5, 9, 5, 7, 9, 9, 5, 12)]
    stops, cand = [0, 1], [10, 11, 12]
    replies, scores = generate_replies(model, prompts, 6, stops, batch_size=2, score_ids=cand,
                                       autocast=contextlib.nullcontext)
    for prompt, reply, score in zip(prompts, replies, scores):
        idx = torch.tensor([prompt])
        with torch.no_grad():
            direct = model(idx)[0][0, -1, cand]  # no cache, no batch
            torch.testing.assert_close(score, direct, rtol=1e-4, atol=1e-4)
            out = model.generate(idx, 6, temperature=0.0, eos_id=stops)[0, len(prompt):].tolist()
        cut = next((i for i, t in enumerate(out) if t in stops), len(out))
        assert reply == out[:cut]


def test_too_long_prompt_is_a_clear_error() -> None:
    with pytest.raises(FromzeroError, match="block_size"):
        generate_replies(_tiny_gpt(), [[3] * 60], 8, [0], 4, [1], contextlib.nullcontext)
