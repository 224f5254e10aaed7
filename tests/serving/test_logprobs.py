"""/v1/completions ``logprobs`` and ``echo`` (OpenAI's legacy API; what lm-eval's local-completions reads).

Every number is checked against the fp32 log-softmax of our model's logits computed directly
(one forward over the whole text, no cache): the prompt's tokens (echo, also with max_tokens 0),
the generated ones, the top alternatives, for a string, a list of strings and token-id prompts,
over plain HTTP and through the official openai client; a request batched with others gives the
same numbers as alone; the limits are clear 400s.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from fromzero.data.tokenizers import TextTokenizer
from fromzero.serving import engine as engine_module
from fromzero.checkpoint import load_model

from .conftest import slow_down

TOL = dict(rtol=1e-5, atol=1e-5)  # cached decoding vs one full forward: float rounding only
PROMPTS = ["The cat sat.", "hello there", "Who is there?", "a", "Nay, answer me"]


def reference(ckpt: Path, ids: list[int]) -> torch.Tensor:
    """(T, V) fp32 log-softmax of the model's logits over ``ids``: row i predicts token i + 1."""
    model = load_model(ckpt, "cpu")
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids]))
    return logits[0].float().log_softmax(-1)


def check_against_reference(ckpt: Path, tok: TextTokenizer, ids: list[int], logprobs: dict, n_top: int,
                            echo_len: int) -> None:
    """``logprobs`` (OpenAI's object) scores ``ids`` (prompt + generated, the first ``echo_len``
    echoed) exactly as the model's own log-softmax does."""
    lp = reference(ckpt, ids)
    start = len(ids) - len(logprobs["tokens"])  # 0 with echo; the prompt length without
    assert logprobs["tokens"] == [tok.decode([t]) for t in ids[start:]]
    for k, (got, top) in enumerate(zip(logprobs["token_logprobs"], logprobs["top_logprobs"])):
        pos = start + k
        if pos == 0:
            assert got is None and top is None  # nothing before the first token
            continue
        row = lp[pos - 1]
        torch.testing.assert_close(torch.tensor(got), row[ids[pos]], **TOL)
        values, indices = row.topk(n_top)
        expected = {tok.decode([int(i)]): float(v) for i, v in zip(indices, values)}
        expected.setdefault(tok.decode([ids[pos]]), float(row[ids[pos]]))
        assert set(top) == set(expected)
        torch.testing.assert_close(torch.tensor([top[t] for t in expected]), torch.tensor(list(expected.values())),
                                   **TOL)
        assert math.isclose(max(top.values()), float(row.max()), abs_tol=1e-5)


def offsets_of(tok: TextTokenizer, ids: list[int]) -> list[int]:
    return [len(tok.decode(ids[:i])) for i in range(len(ids))]


@pytest.mark.parametrize("fixture", ["gpt_ckpt", "rope_ckpt"])
def test_echo_scores_the_prompt_as_the_model_does(serve, request, fixture: str):
    ckpt = request.getfixturevalue(fixture)
    tok = TextTokenizer.load(ckpt)
    http = serve(ckpt).client()
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        r = http.post("/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 3, "max_tokens": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        choice = body["choices"][0]
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        lp = choice["logprobs"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == prompt
        assert lp["text_offset"] == offsets_of(tok, ids)
        check_against_reference(ckpt, tok, ids, lp, 3, len(ids))


def test_generated_tokens_are_scored_with_and_without_echo(serve, gpt_ckpt: Path):
    tok = TextTokenizer.load(gpt_ckpt)
    http = serve(gpt_ckpt).client()
    prompt = "Who is there?"
    ids = tok.encode(prompt)
    for echo in (False, True):
        r = http.post("/v1/completions", json={"prompt": prompt, "echo": echo, "logprobs": 2, "max_tokens": 8,
                                               "temperature": 0})
        choice = r.json()["choices"][0]
        completion = choice["text"][len(prompt):] if echo else choice["text"]
        gen = tok.encode(completion)
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(gen) + (len(ids) if echo else 0) == len(lp["text_offset"])
        check_against_reference(gpt_ckpt, tok, ids + gen, lp, 2, len(ids))
        # Greedy: every generated token is the most likely one (lm-eval's is_greedy reads this).
        for got, top in zip(lp["token_logprobs"][-len(gen):], lp["top_logprobs"][-len(gen):]):
            assert got == max(top.values())
        expected_offsets = offsets_of(tok, ids + gen)[len(ids):]
        if not echo:
            expected_offsets = [o - len(prompt) for o in expected_offsets]
        assert lp["text_offset"][-len(gen):] == expected_offsets
    # logprobs=0: the chosen tokens' logprobs, top_logprobs holds only the chosen token.
    r = http.post("/v1/completions", json={"prompt": prompt, "logprobs": 0, "max_tokens": 4, "temperature": 0})
    lp = r.json()["choices"][0]["logprobs"]
    assert [list(t) for t in lp["top_logprobs"]] == [[t] for t in lp["tokens"]]
    # No logprobs asked for: null, as before.
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "echo": True})
    assert r.json()["choices"][0]["logprobs"] is None


def test_a_stop_string_cuts_the_tokens_with_the_text(serve, gpt_ckpt: Path):
    tok = TextTokenizer.load(gpt_ckpt)
    http = serve(gpt_ckpt).client()
    full = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 10, "temperature": 0,
                                              "logprobs": 1}).json()["choices"][0]
    stop = full["text"][4:6]
    cut = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 10, "temperature": 0, "logprobs": 1,
                                             "stop": [stop]}).json()["choices"][0]
    text = cut["text"]
    assert cut["finish_reason"] == "stop" and full["text"].startswith(text) and len(text) < len(full["text"])
    lp = cut["logprobs"]
    assert "".join(lp["tokens"]).startswith(text) and all(o < len(text) for o in lp["text_offset"])
    assert lp["token_logprobs"] == full["logprobs"]["token_logprobs"][: len(lp["tokens"])]
    assert len(tok.encode(text)) <= len(lp["tokens"])


def test_lists_of_prompts_and_token_ids_score_each_prompt(serve, rope_ckpt: Path):
    tok = TextTokenizer.load(rope_ckpt)
    http = serve(rope_ckpt).client()
    alone = [http.post("/v1/completions", json={"prompt": p, "echo": True, "logprobs": 2, "max_tokens": 0})
             .json()["choices"][0] for p in PROMPTS]
    as_list = http.post("/v1/completions", json={"prompt": PROMPTS, "echo": True, "logprobs": 2, "max_tokens": 0})
    as_ids = http.post("/v1/completions", json={"prompt": [tok.encode(p) for p in PROMPTS], "echo": True,
                                                "logprobs": 2, "max_tokens": 0})
    one_ids = http.post("/v1/completions", json={"prompt": tok.encode(PROMPTS[0]), "echo": True, "logprobs": 2,
                                                 "max_tokens": 0})
    for r in (as_list, as_ids, one_ids):
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        for got, want in zip(choices, alone):
            assert got["text"] == want["text"]
            assert got["logprobs"] == want["logprobs"]  # each prompt is prefilled on its own: identical


def test_batched_requests_give_the_same_numbers_as_alone(serve, gpt_ckpt: Path):
    server = serve(gpt_ckpt, max_batch_size=8)
    http = server.client()

    def ask(prompt: str) -> dict:
        r = http.post("/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 4, "max_tokens": 6,
                                               "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    alone = [ask(p) for p in PROMPTS]
    slow_down(server, 0.02)  # requests overlap: they are decoded together
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(ask, PROMPTS))
    assert server.app.state.engine.stats.max_batch > 1
    for a, b in zip(alone, together):
        assert a["text"] == b["text"] and a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        assert a["logprobs"]["text_offset"] == b["logprobs"]["text_offset"]
        # The prompt is prefilled on its own: identical numbers. Generated tokens come from batched
        # decoding steps, where only the float rounding of the batched matmuls differs: the chosen
        # tokens' logprobs within 1e-5; far-tail alternatives (logprob ~ -20 with this model's
        # exaggerated logits, where a float32 ulp is 2e-6) within 1e-5 relative.
        n = len(a["logprobs"]["tokens"]) - 6
        assert a["logprobs"]["token_logprobs"][:n] == b["logprobs"]["token_logprobs"][:n]
        assert a["logprobs"]["top_logprobs"][:n] == b["logprobs"]["top_logprobs"][:n]
        for x, y in zip(a["logprobs"]["token_logprobs"][n:], b["logprobs"]["token_logprobs"][n:]):
            assert abs(x - y) <= 1e-5
        for x, y in zip(a["logprobs"]["top_logprobs"][n:], b["logprobs"]["top_logprobs"][n:]):
            assert set(x) == set(y) and all(math.isclose(x[k], y[k], rel_tol=1e-5, abs_tol=1e-5) for k in x)


def test_the_openai_client_reads_logprobs(serve, gpt_ckpt: Path):
    tok = TextTokenizer.load(gpt_ckpt)
    server = serve(gpt_ckpt)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    name = str(gpt_ckpt)
    prompt = "The cat sat."
    ids = tok.encode(prompt)
    out = client.completions.create(model=name, prompt=prompt, echo=True, logprobs=3, max_tokens=0)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == prompt and lp.tokens == [tok.decode([t]) for t in ids]
    check_against_reference(gpt_ckpt, tok, ids, lp.model_dump(), 3, len(ids))
    out = client.completions.create(model=name, prompt=[ids, tok.encode("hello")], echo=True, logprobs=1,
                                    max_tokens=2, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    first = out.choices[0]
    gen = tok.encode(first.text[len(prompt):])
    check_against_reference(gpt_ckpt, tok, ids + gen, first.logprobs.model_dump(), 1, len(ids))


def test_limits_are_clear_errors(serve, gpt_ckpt: Path):
    http = serve(gpt_ckpt).client()

    def error(body: dict, status: int, *fragments: str) -> None:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == status, r.text
        for fragment in fragments:
            assert fragment in r.json()["error"]["message"], r.json()

    error({"prompt": "hi", "logprobs": 21}, 400, "logprobs is 21", "at most 20")
    error({"prompt": "hi", "logprobs": -1}, 422, "logprobs")
    error({"prompt": "hi", "logprobs": True}, 422, "logprobs")
    error({"prompt": "hi", "logprobs": 1, "stream": True}, 400, "logprobs with stream")
    error({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be at least 1, got 0", "echo")
    error({"prompt": "x" * 33, "echo": True, "logprobs": 1, "max_tokens": 0}, 400,
          "33 tokens, longer than the model's context of 32", "echo scores every prompt token")
    error({"prompt": "x" * 32, "echo": True, "logprobs": 1, "max_tokens": 1}, 400, "lower max_tokens to at most 0")
    # A prompt that fills the context exactly can still be scored.
    r = http.post("/v1/completions", json={"prompt": "x" * 32, "echo": True, "logprobs": 20, "max_tokens": 0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == 32
    assert all(len(t) >= 20 for t in r.json()["choices"][0]["logprobs"]["top_logprobs"][1:])


def test_long_prompts_are_scored_in_chunks_with_the_same_numbers(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(11, 7) * 3
    ids = torch.randint(0, 7, (11,))
    whole = engine_module.prompt_logprobs(logits, ids, 3)
    monkeypatch.setattr(engine_module, "LOGPROB_CHUNK", 4)
    chunked = engine_module.prompt_logprobs(logits, ids, 3)
    assert chunked == whole and len(whole) == 11 and whole[0].logprob is None
    lp = logits.log_softmax(-1)
    assert [e.logprob for e in whole[1:]] == pytest.approx([float(lp[i, ids[i + 1]]) for i in range(10)], abs=1e-6)
    # More alternatives than the vocabulary: all of them.
    assert len(engine_module.prompt_logprobs(logits, ids, 20)[1].top) == 7


def test_bad_request_after_logprobs_keeps_serving(serve, gpt_ckpt: Path):
    http = serve(gpt_ckpt).client()
    assert http.post("/v1/completions", json={"prompt": "hi", "logprobs": 99}).status_code == 400
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0, "logprobs": 2})
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == 3
    assert http.get("/health").json()["status"] == "ok"
