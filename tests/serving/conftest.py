"""Fixtures for the serving tests: tiny checkpoints of every servable kind and real servers.

Checkpoints (session-scoped, read-only), all random and tiny:

* ``gpt_ckpt``: a GPT-2-style char-level GPT (block 32, 2 layers, 32 wide). Its token embedding
  and untied head are drawn with a large std so that greedy decoding produces varied text with
  clear margins between the top logits (GPT-2's init gives near-ties everywhere).
* ``rope_ckpt``: the same with a LLaMA-style block (RMSNorm, RoPE, SwiGLU, 2 query heads sharing
  1 key/value head).
* ``sft_ckpt``: the same GPT with block 64 and an info.json of an SFT run (task sft + chat template).
* ``bert_ckpt``: a BERT encoder (embedding head) with a WordPiece tokenizer.
* ``classifier_ckpt``: a BERT classifier (labels neg / pos) with info.json task text-classification.

``serve(checkpoint, **options)`` starts a real uvicorn server on 127.0.0.1 (a free port, in a
thread) and returns a :class:`LiveServer` (``url``, ``app``, ``client()``); it is stopped at the end
of the test. ``slow_down(server, seconds)`` makes every forward pass of its model take that much
longer, so that tests of batching, queueing and timeouts do not depend on the machine's speed.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:?!.,' \n"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
WORDS = ["a", "bad", "day", "film", "good", "great", "it", "the", "was", "very"]
VOCAB = SPECIALS + WORDS
TEMPLATE = {"system_prefix": "", "user_prefix": "USER:\n", "assistant_prefix": "ASSISTANT:\n", "turn_end": "\n\n"}


def write_gpt(directory: Path, rope: bool = False, info: dict | None = None, block_size: int = 32) -> Path:
    """A random tiny char-level GPT checkpoint with varied greedy output (see module docstring)."""
    import torch

    from fromzero.data.tokenizers import char_tokenizer_from_chars
    from fromzero.models.gpt import GPT, LLAMA_STYLE, GPTConfig
    from fromzero.checkpoint import save_checkpoint

    tokenizer = char_tokenizer_from_chars(CHARS)
    style = dict(LLAMA_STYLE, n_kv_head=1) if rope else {}
    style["tie_embeddings"] = False
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **style)
    model = GPT(config)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 3.0)
    tokenizer_file = directory.parent / f"{directory.name}-tokenizer.json"
    tokenizer.save(tokenizer_file)
    save_checkpoint(directory, model, config.to_dict(), tokenizer_file=tokenizer_file, info=info)
    return directory


def write_bert(directory: Path, classifier: bool = False) -> Path:
    """A random tiny BERT encoder (or neg/pos classifier) + WordPiece tokenizer.json."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from fromzero.models.bert import Bert, BertConfig
    from fromzero.checkpoint import save_checkpoint

    torch.manual_seed(0)
    head = dict(head="classification", num_labels=2, labels=["neg", "pos"]) if classifier else dict(head="embedding")
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, **head)
    model = Bert(config)
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", VOCAB.index("[CLS]")), ("[SEP]", VOCAB.index("[SEP]"))])
    tokenizer_file = directory.parent / f"{directory.name}-tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    info = {"task": "text-classification", "max_length": 16} if classifier else None
    save_checkpoint(directory, model, config.to_dict(), tokenizer_file=tokenizer_file, info=info)
    return directory


@pytest.fixture(scope="session")
def gpt_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gpt(tmp_path_factory.mktemp("serve-gpt") / "gpt")


@pytest.fixture(scope="session")
def rope_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gpt(tmp_path_factory.mktemp("serve-rope") / "rope", rope=True)


@pytest.fixture(scope="session")
def sft_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gpt(tmp_path_factory.mktemp("serve-sft") / "sft", info={"task": "sft", "template": TEMPLATE},
                     block_size=64)


@pytest.fixture(scope="session")
def bert_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bert(tmp_path_factory.mktemp("serve-bert") / "bert")


@pytest.fixture(scope="session")
def classifier_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bert(tmp_path_factory.mktemp("serve-clf") / "clf", classifier=True)


# ---------------------------------------------------------------------------------------------
# Live servers


class LiveServer:
    """A uvicorn server running ``app`` in a thread on 127.0.0.1 (free port)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def serve() -> Iterator[Callable[..., LiveServer]]:
    """``serve(checkpoint, **ServeConfig options)`` -> a running LiveServer (stopped after the test)."""
    from fromzero.serving import ServeConfig, create_app

    started: list[LiveServer] = []

    def start(checkpoint: Path, **options: Any) -> LiveServer:
        options.setdefault("device", "cpu")
        server = LiveServer(create_app(ServeConfig(checkpoint=str(checkpoint), **options)))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class _Slow:
    """Wraps the engine's model: every forward pass sleeps ``delay`` seconds first."""

    def __init__(self, model: Any, delay: float) -> None:
        self.model, self.delay = model, delay

    def __call__(self, *args: Any, **kw: Any) -> Any:
        time.sleep(self.delay)
        return self.model(*args, **kw)


def slow_down(server: LiveServer, delay: float) -> None:
    engine = server.app.state.engine
    engine.model = _Slow(engine.model, delay)


def metric(text: str, name: str, labels: str = "") -> float:
    """Value of one sample of Prometheus text (``labels`` as written, e.g. 'route="/health"')."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def sse_events(text: str) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream (JSON decoded; '[DONE]' as is)."""
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
