"""A real server on 127.0.0.1, spoken to with httpx and with the official openai client.

Covers the OpenAI shapes (completions, chat, streaming, embeddings), fromzero's classify, models,
health and metrics; batching of concurrent requests (and that it does not change greedy output);
the limits (503 + Retry-After, 504, 413, 401, 404, 400/422 that name the field); a checkpoint of
the wrong kind; and that a bad request never stops the server answering the next one.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from fromzero.data.tokenizers import TextTokenizer
from fromzero.inference.predict import Classifier
from fromzero.models.bert import embed_checkpoint
from fromzero.checkpoint import load_model

from .conftest import TEMPLATE, metric, slow_down, sse_events

PROMPTS = ["hello", "a", "The cat sat.", "Who is there?", "xy", "Nay, answer", "It was", "Be"]


def greedy_alone(ckpt: Path, prompt: str, n: int) -> str:
    model, tok = load_model(ckpt, "cpu"), TextTokenizer.load(ckpt)
    ids = tok.encode(prompt)
    return tok.decode(model.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist())


def client_for(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


def good_completion(http: httpx.Client) -> None:
    """The server still answers a valid request."""
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


# ---------------------------------------------------------------------------------------------
# Generation


def test_completions_models_health_and_streaming(serve, gpt_ckpt: Path):
    server = serve(gpt_ckpt)
    http = server.client()
    models = http.get("/v1/models").json()
    name = models["data"][0]["id"]
    assert models["object"] == "list" and name == str(gpt_ckpt) and models["data"][0]["max_model_len"] == 32
    assert http.get("/health").json()["status"] == "ok"

    expected = greedy_alone(gpt_ckpt, "hello", 10)
    r = http.post("/v1/completions", json={"model": name, "prompt": "hello", "max_tokens": 10, "temperature": 0})
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": expected, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}

    # Streaming over plain HTTP: data: chunks, the text in order, then data: [DONE].
    r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 10, "temperature": 0, "stream": True,
                                           "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 10 and events[-2]["choices"] == []
    chunks = events[:-2]
    assert len(chunks) > 1 and "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    # The official client, plain and streaming, a list of prompts, token ids, echo, stop.
    client = client_for(server)
    done = client.completions.create(model=name, prompt="hello", max_tokens=10, temperature=0)
    assert done.choices[0].text == expected
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=name, prompt="hello", max_tokens=10, temperature=0, stream=True))
    assert streamed == expected
    both = client.completions.create(model=name, prompt=["hello", "Who is there?"], max_tokens=6, temperature=0)
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == [
        expected[:6], greedy_alone(gpt_ckpt, "Who is there?", 6)]
    tok = TextTokenizer.load(gpt_ckpt)
    by_ids = client.completions.create(model=name, prompt=tok.encode("hello"), max_tokens=10, temperature=0, echo=True)
    assert by_ids.choices[0].text == "hello" + expected
    stop = expected[3:5]
    cut = client.completions.create(model=name, prompt="hello", max_tokens=10, temperature=0, stop=[stop])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (expected[: expected.index(stop)], "stop")

    # Seeded sampling: same seed, same text; n choices differ from each other.
    a = client.completions.create(model=name, prompt="hello", max_tokens=12, temperature=1.0, seed=3, n=3)
    b = client.completions.create(model=name, prompt="hello", max_tokens=12, temperature=1.0, seed=3, n=3)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) == 3


def test_chat_with_the_sft_template(serve, sft_ckpt: Path):
    server = serve(sft_ckpt, model_name="tiny-sft")
    client = client_for(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is there?"}]
    # The template renders a system message as its content + turn_end (system_prefix is empty).
    prompt = "Be brief.\n\n" + TEMPLATE["user_prefix"] + "Who is there?\n\n" + TEMPLATE["assistant_prefix"]
    full = greedy_alone(sft_ckpt, prompt, 20)
    reply = full.split("\n\n")[0]  # the turn ends at the template's turn_end
    out = client.chat.completions.create(model="tiny-sft", messages=messages, max_tokens=20, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reply
    assert out.choices[0].finish_reason == ("stop" if "\n\n" in full else "length")
    assert out.usage.prompt_tokens == len(prompt)

    stream = client.chat.completions.create(model="tiny-sft", messages=messages, max_tokens=20, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason

    # Plain completions work on an SFT checkpoint too; an unknown model name is a 404.
    assert client.completions.create(model="tiny-sft", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=messages)


def test_concurrent_requests_are_batched_and_give_the_same_greedy_text(serve, gpt_ckpt: Path):
    server = serve(gpt_ckpt, max_batch_size=8)
    slow_down(server, 0.01)  # requests arrive while the first ones are still being decoded
    http = server.client()

    def complete(prompt: str) -> str:
        r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(complete, PROMPTS))
    text = http.get("/metrics").text
    one_row_steps = metric(text, "fromzero_batch_size_bucket", 'le="1.0"')
    assert metric(text, "fromzero_batch_size_count") > one_row_steps  # some steps decoded > 1 sequence
    assert server.app.state.engine.stats.max_batch >= 4
    sequential = [complete(p) for p in PROMPTS]  # one at a time through the same server
    assert batched == sequential == [greedy_alone(gpt_ckpt, p, 12) for p in PROMPTS]
    assert metric(text, "fromzero_generated_tokens_total") == 8 * 12
    assert metric(text, "fromzero_requests_total", 'route="/v1/completions",status="200"') == 8


# ---------------------------------------------------------------------------------------------
# Encoders


def test_embeddings_and_wrong_kinds(serve, bert_ckpt: Path, gpt_ckpt: Path):
    server = serve(bert_ckpt, model_name="enc")
    client = client_for(server)
    texts = ["the film was good", "a bad day", "it"]
    expected = np.array(embed_checkpoint(bert_ckpt, texts))
    out = client.embeddings.create(model="enc", input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in sorted(out.data, key=lambda d: d.index)])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    r = server.client().post("/v1/embeddings", json={"input": "a bad day", "encoding_format": "float"}).json()
    np.testing.assert_allclose(r["data"][0]["embedding"], expected[1], atol=1e-6)
    assert r["usage"]["prompt_tokens"] == 5  # [CLS] a bad day [SEP]

    http = server.client()
    assert_error(http.post("/v1/completions", json={"prompt": "hi"}), 400, "needs a GPT language model",
                 "an encoder (BERT) checkpoint")
    assert_error(http.post("/v1/classify", json={"input": "hi"}), 400, "text-classification checkpoint")
    assert_error(http.post("/v1/embeddings", json={"input": ""}), 400, "input is empty")
    assert_error(http.post("/v1/embeddings", json={"input": [[1, 2]]}), 400, "token ids are not supported")
    assert_error(http.post("/v1/embeddings", json={"input": "x", "dimensions": 7}), 400, "32 dimensions")

    gpt = serve(gpt_ckpt).client()
    assert_error(gpt.post("/v1/embeddings", json={"input": "hi"}), 400, "needs a BERT encoder",
                 "a pretrained GPT language model")
    assert_error(gpt.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}), 400,
                 "chat needs an instruction-tuned (sft) checkpoint", "use /v1/completions")
    good_completion(gpt)


def test_classify(serve, classifier_ckpt: Path):
    http = serve(classifier_ckpt).client()
    texts = ["the film was good", "a bad day"]
    classifier = Classifier(classifier_ckpt, "cpu")
    expected = classifier.label(classifier.text_logits(texts))
    r = http.post("/v1/classify", json={"input": texts})
    assert r.status_code == 200, r.text
    assert r.json()["data"] == [{"index": i, **e} for i, e in enumerate(expected)]
    assert set(r.json()["data"][0]["probabilities"]) == {"neg", "pos"}
    assert_error(http.post("/v1/embeddings", json={"input": "hi"}), 400, "text-classification (BERT classifier)")
    assert_error(http.post("/v1/classify", json={"input": []}), 400, "input is empty")


# ---------------------------------------------------------------------------------------------
# Bad input and limits


BAD_COMPLETIONS = [
    ({"prompt": ""}, 400, "prompt is empty"),
    ({"prompt": []}, 400, "prompt is empty"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be at least 1, got 0"),
    ({"prompt": "hi", "max_tokens": -5}, 400, "max_tokens must be at least 1"),
    ({"prompt": "hi", "max_tokens": 10**9}, 400, "above this server's cap of 32"),
    ({"prompt": "hi", "max_tokens": 31}, 400, "lower max_tokens to at most 30"),
    ({"prompt": "x" * 40}, 400, "40 tokens, longer than the model's context of 32"),
    ({"prompt": "x" * 32}, 400, "no room to generate"),
    ({"prompt": "hi \u00e9"}, 400, "not in the tokenizer's vocabulary"),
    ({"prompt": [1, 2, 999]}, 400, "token id 999, outside the vocabulary"),
    ({"prompt": "hi", "max_tokens": "5"}, 422, "max_tokens: Input should be a valid integer"),
    ({"prompt": "hi", "max_token": 5}, 422, "max_token: Extra inputs are not permitted"),
    ({"prompt": "hi", "temperature": 3}, 422, "temperature: Input should be less than or equal to 2"),
    ({"prompt": "hi", "n": 0}, 422, "n: Input should be greater than or equal to 1"),
    ({"prompt": 5}, 422, "prompt"),
    ({}, 422, "prompt: Field required"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 strings"),
    ({"prompt": "hi", "logprobs": 21}, 400, "at most 20"),
    ({"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty is not supported"),
    ({"prompt": "hi", "model": "other"}, 404, "model 'other' does not exist"),
]


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(serve, gpt_ckpt: Path):
    http = serve(gpt_ckpt, max_prompt_tokens=0).client()
    for body, status, fragment in BAD_COMPLETIONS:
        error = assert_error(http.post("/v1/completions", json=body), status, fragment)
        if status == 422:
            assert error["param"] is not None
        good_completion(http)
    assert_error(http.post("/v1/completions", content=b'{"prompt": "hi",', headers={"Content-Type": "application/json"}),
                 400, "malformed JSON body")
    assert_error(http.post("/v1/completions", content=b"[1, 2]", headers={"Content-Type": "application/json"}), 422)
    assert_error(http.get("/v1/nothing"), 404, "unknown route: GET /v1/nothing")
    assert_error(http.get("/v1/completions"), 405, "not allowed")
    good_completion(http)
    text = http.get("/metrics").text
    assert metric(text, "fromzero_requests_total", 'route="other",status="404"') == 1
    assert metric(text, "fromzero_requests_total", 'route="/v1/completions",status="422"') >= 5


def test_prompt_cap_body_limit_and_api_key(serve, gpt_ckpt: Path, monkeypatch: pytest.MonkeyPatch):
    server = serve(gpt_ckpt, api_key="s3cret", max_body_bytes=2000, max_prompt_tokens=8, max_tokens_cap=4)
    http = server.client()
    assert_error(http.post("/v1/completions", json={"prompt": "hi"}), 401, "no API key given")
    assert_error(http.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"}),
                 401, "invalid API key")
    assert http.get("/health").status_code == 200  # health and metrics stay open
    auth = server.client(headers={"Authorization": "Bearer s3cret"})
    assert_error(auth.post("/v1/completions", json={"prompt": "hi", "user": "x" * 5000}), 413, "limit of 2000 bytes")
    assert_error(auth.post("/v1/completions", json={"prompt": "a long prompt"}), 400, "at most 8 (--max-prompt-tokens)")
    assert_error(auth.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5}), 400, "cap of 4")
    with pytest.raises(openai.AuthenticationError):
        client_for(server, api_key="wrong").completions.create(model=str(gpt_ckpt), prompt="hi", max_tokens=2)
    ok = client_for(server, api_key="s3cret").completions.create(model=str(gpt_ckpt), prompt="hi", max_tokens=4)
    assert ok.usage.completion_tokens == 4  # default max_tokens 16, capped at 4


def test_full_queue_is_503_with_retry_after(serve, gpt_ckpt: Path):
    server = serve(gpt_ckpt, max_batch_size=1, max_queue=1)
    slow_down(server, 0.02)
    http = server.client()

    def complete(_: int) -> httpx.Response:
        return http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 20, "temperature": 0})

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(complete, range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) == {200, 503}
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["Retry-After"] == "1"
    assert_error(busy, 503, "queue is full")
    assert metric(http.get("/metrics").text, "fromzero_rejected_requests_total", 'reason="queue_full"') == codes.count(503)
    good_completion(http)


def test_timeout_is_504_and_frees_the_slot(serve, gpt_ckpt: Path):
    server = serve(gpt_ckpt, request_timeout=0.5, max_tokens_cap=100000, sliding_window=True)
    slow_down(server, 0.02)
    http = server.client()
    assert_error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 100000}), 504, "0.5 s")
    deadline = time.monotonic() + 5
    while server.app.state.engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.app.state.engine.running == 0
    # A stream that times out before its first token is a 504 as well.
    slow_down(server, 0.6)
    assert_error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True}), 504)
    server.app.state.engine.model = server.app.state.engine.model.model.model  # full speed again
    good_completion(http)


def test_client_disconnect_during_streaming_frees_the_slot(serve, gpt_ckpt: Path):
    server = serve(gpt_ckpt, max_tokens_cap=100000, sliding_window=True)
    slow_down(server, 0.005)
    engine = server.app.state.engine
    with server.client() as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 100000, "stream": True}) as r:
            assert r.status_code == 200
            first = next(r.iter_lines())
            assert first.startswith("data: ")
            assert engine.running == 1
    deadline = time.monotonic() + 5
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0
    good_completion(server.client())


def test_client_gone_before_a_plain_response_frees_the_slot(serve, gpt_ckpt: Path):
    server = serve(gpt_ckpt, max_tokens_cap=100000, sliding_window=True)
    slow_down(server, 0.005)
    engine = server.app.state.engine
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        server.client().post("/v1/completions", json={"prompt": "hi", "max_tokens": 100000}, timeout=0.5)
    deadline = time.monotonic() + 5
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0


class _FailOnce:
    """The engine's model, failing on its n-th forward pass (a decoding step, not the prefill)."""

    def __init__(self, model, n: int) -> None:
        self.model, self.calls, self.n = model, 0, n

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("simulated failure")
        return self.model(*args, **kw)


def test_a_failing_step_is_a_500_for_its_batch_and_the_server_recovers(serve, gpt_ckpt: Path):
    server = serve(gpt_ckpt)
    engine = server.app.state.engine
    engine.model = _FailOnce(engine.model, n=2)
    http = server.client()
    assert_error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5}), 500,
                 "generation failed: RuntimeError: simulated failure")
    assert engine.running == 0 and engine.cache.rows == 0
    good_completion(http)
    expected = greedy_alone(gpt_ckpt, "hello", 8)
    r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 8, "temperature": 0})
    assert r.json()["choices"][0]["text"] == expected
