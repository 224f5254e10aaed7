"""Chat: one prompt builder (templates, stop tokens, BOS) for `chat`, `generate --chat` and serve.

The chat model is a tiny random LLaMA built with transformers (ChatML special tokens, the
SmolLM2-style ChatML template that adds a default system message), converted with
``convert_from_hf`` -- the path a real chat model takes. Its token embedding and head are drawn
with a large std so that greedy replies are varied, and the head rows of the special tokens are
zero so that a reply never ends early by chance (the end-of-turn test sets one on purpose).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from fromzero.cli import main
from fromzero.data.chat_template import JinjaChatTemplate
from fromzero.errors import FromzeroError
from fromzero.inference.chat import (
    ChatSession,
    DecodeState,
    StreamDetokenizer,
    end_of_turn_ids,
    load_chat_format,
    run_repl,
    stream_tokens,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|end|>"]
IM_END = 2
BLOCK = 160
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# SmolLM2-Instruct's template: ChatML with a default system message.
SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Jinja features real templates use: bos_token, namespace, loop controls, {% generation %}, tojson.
FEATURES = ("{{ bos_token }}{% set ns = namespace(turns=0) %}{% for m in messages %}"
            "{% if m['role'] == 'system' and not loop.first %}{% continue %}{% endif %}"
            "{% set ns.turns = ns.turns + 1 %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
            "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|im_end|>{% endgeneration %}"
            "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
            "{% if ns.turns >= 3 %}{% break %}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
            "{{ '' if add_generation_prompt else ({'turns': ns.turns, 'note': '<b> & \"q\"'} | tojson) }}")
CORPUS = ("The river ran slowly past the old mill, and the miller's daughter watched the water turn the wheel. "
          "Hello there! How are you today? I am fine, thank you. Tell me about the mill. "
          "Café, naïve, façade, 日本語. You are a helpful AI assistant named SmolLM, trained by Hugging Face. ") * 20
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": " I am fine. "}, {"role": "user", "content": "Tell me about the mill."}],
    [{"role": "user", "content": "Café?"}, {"role": "assistant", "content": "日本語"},
     {"role": "user", "content": "naïve"}, {"role": "assistant", "content": "façade"}],
]


def _ids(out) -> list[int]:
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LlamaForCausalLM + ChatML tokenizer with the SmolLM2 template, saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("chat-hf")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([CORPUS], trainer)
    assert backend.token_to_id("<|im_end|>") == IM_END
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>")
    tokenizer.chat_template = SMOL
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(vocab_size=backend.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=BLOCK, bos_token_id=1, eos_token_id=IM_END, pad_token_id=IM_END,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 3.0)
        model.lm_head.weight[: len(SPECIALS)] = 0.0  # never chosen by chance (see module docstring)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ckpt(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fromzero.models.hf import convert_from_hf

    out = tmp_path_factory.mktemp("chat-fz") / "smol"
    convert_from_hf(str(hf_dir), out)
    assert (out / "chat_template.jinja").is_file()  # carried over by convert
    return out


@pytest.fixture(scope="module")
def model(ckpt: Path):
    from fromzero.checkpoint import load_model

    return load_model(ckpt, "cpu")


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


def _copy(ckpt: Path, tmp_path: Path, name: str = "copy") -> Path:
    out = tmp_path / name
    shutil.copytree(ckpt, out)
    return out


def _greedy_session(model, ckpt: Path, max_new_tokens: int = 24, **kw) -> ChatSession:
    return ChatSession(model, load_chat_format(ckpt), max_new_tokens=max_new_tokens, temperature=0.0,
                       notice=lambda m: None, **kw)


def _reply(session: ChatSession, text: str) -> str:
    return "".join(session.ask(text))


# ---------------------------------------------------------------------------------------------
# Templates


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_prompts_render_and_tokenize_like_transformers_apply_chat_template(ckpt, hf_tokenizer, conversation):
    messages = CONVERSATIONS[conversation]
    chat = load_chat_format(ckpt)
    assert chat.source == "chat_template.jinja"
    for add in (True, False):
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert chat.template.format(messages, add_generation_prompt=add) == expected
    if messages[-1]["role"] == "user":
        expected_ids = _ids(hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
        assert chat.prompt_ids(messages) == expected_ids
    for source in (CHATML, FEATURES):
        ours = JinjaChatTemplate(source, bos_token="<|im_start|>", eos_token="<|im_end|>")
        for add in (True, False):
            theirs = hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                      add_generation_prompt=add)
            assert ours.format(messages, add_generation_prompt=add) == theirs


def test_render_segments_mark_exactly_the_assistant_replies(ckpt):
    template = load_chat_format(ckpt).template
    messages = CONVERSATIONS[3]
    segments = template.render(messages)
    assert "".join(text for text, _ in segments) == template.text(messages)
    assert [text for text, target in segments if target] == ["日本語<|im_end|>\n", "façade<|im_end|>\n"]
    # A default system message injected by the template is context, not a target.
    assert segments[0][1] is False and "named SmolLM" in segments[0][0]


def test_the_sandbox_refuses_python_internals(tmp_path, ckpt, capsys):
    for source, fragment in [("{{ ''.__class__.__mro__ }}", "__class__"),
                             ("{{ messages.append({'role': 'user', 'content': 'x'}) }}", "append"),
                             ("{% set ns = namespace(_secret=1) %}", "_secret")]:
        with pytest.raises(FromzeroError, match="unsafe|cannot store") as info:
            JinjaChatTemplate(source).text([{"role": "user", "content": "hi"}])
        assert fragment in str(info.value)
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ cycler.__init__.__globals__ }}")
    assert main(["generate", "--checkpoint", str(ckpt), "--chat", "--chat-template", str(evil), "--prompt", "hi",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: chat template failed to render") and err.count("\n") == 1


def test_bos_is_added_once_when_the_tokenizer_asks_for_it(ckpt, tmp_path):
    copy = _copy(ckpt, tmp_path)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    messages = [{"role": "user", "content": "Hi"}]
    chat = load_chat_format(copy)
    plain = chat.prompt_ids(messages)
    assert plain == chat.tokenizer.encode(chat.prompt_text(messages)) and plain[0] == 1  # no BOS added
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    # The ChatML text already starts with bos_token (<|im_start|>): no second one.
    assert load_chat_format(copy).prompt_ids(messages) == plain
    # A template that does not start with it gets one in front.
    (copy / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                              "{% endfor %}assistant:")
    with_bos = load_chat_format(copy).prompt_ids(messages)
    assert with_bos[0] == 1 and with_bos[1:] == load_chat_format(copy).tokenizer.encode("user: Hi\nassistant:")
    # And a template that writes bos_token itself gets exactly one.
    (copy / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert load_chat_format(copy).prompt_ids(messages)[:2] == [1, load_chat_format(copy).tokenizer.encode("Hi")[0]]


def test_stop_tokens_are_eos_and_the_templates_end_of_turn(ckpt):
    chat = load_chat_format(ckpt)
    assert set(chat.stop_ids) == {0, IM_END} and chat.stop_strings == ()
    tok = chat.tokenizer
    eot, end = tok.encode("<|eot_id|>")[0], tok.encode("<|end|>")[0]
    cases = {
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|eot_id|>' }}{% endfor %}": [eot],
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|end|>\n{% endfor %}": [end],
        CHATML: [IM_END],
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}": [],
        # Refuses the probe conversation (no system message): the known names in its source count.
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}": [eot],
    }
    for source, expected in cases.items():
        assert end_of_turn_ids(JinjaChatTemplate(source), tok) == expected, source


def test_fromzeros_sft_template_from_info_json(tmp_path):
    from fromzero.data.tokenizers import char_tokenizer_from_chars

    char_tokenizer_from_chars("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:\n ").save(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "fromzero-gpt"}))
    template = {"system_prefix": "", "user_prefix": "USER:\n", "assistant_prefix": "ASSISTANT:\n", "turn_end": "\n\n"}
    (tmp_path / "info.json").write_text(json.dumps({"task": "sft", "template": template}))
    chat = load_chat_format(tmp_path)
    assert chat.stop_strings == ("\n\n",) and chat.stop_ids == ()
    assert chat.tokenizer.decode(chat.prompt_ids([{"role": "user", "content": "hi"}])) == "USER:\nhi\n\nASSISTANT:\n"
    assert chat.reply_text(chat.tokenizer.encode("fine\n\nUSER:\nx")) == "fine"


def test_bad_messages_are_one_clear_error(ckpt):
    chat = load_chat_format(ckpt)
    with pytest.raises(FromzeroError, match="at least one message"):
        chat.prompt_ids([])
    with pytest.raises(FromzeroError, match="unknown role 'robot'"):
        chat.prompt_ids([{"role": "robot", "content": "beep"}])
    with pytest.raises(FromzeroError, match="content must be a string"):
        chat.prompt_ids([{"role": "user", "content": 3}])


# ---------------------------------------------------------------------------------------------
# Streaming


def test_streamed_tokens_equal_generate(model, ckpt):
    chat = load_chat_format(ckpt)
    ids = chat.prompt_ids(CONVERSATIONS[2])
    x = torch.tensor([ids])
    greedy = model.generate(x, 20, temperature=0)[0, len(ids):].tolist()
    assert list(stream_tokens(model, ids, 20, temperature=0)) == greedy
    sampled = model.generate(x, 20, temperature=1.0, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert list(stream_tokens(model, ids, 20, temperature=1.0, top_k=50, top_p=0.9,
                              generator=torch.Generator().manual_seed(7))) == sampled[0, len(ids):].tolist()
    # A stop token ends the stream right after it, as it ends generate.
    stop = greedy[5]
    upto = greedy[: greedy.index(stop) + 1]
    assert list(stream_tokens(model, ids, 20, temperature=0, stop_ids=[stop])) == upto
    assert model.generate(x, 20, temperature=0, eos_id=stop)[0, len(ids):].tolist() == upto
    # A kept state reuses the cached prefix of the next, longer prompt: same tokens as from scratch.
    state = DecodeState()
    first = list(stream_tokens(model, ids, 6, temperature=0, state=state))
    longer = ids + first + chat.tokenizer.encode("<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n")
    again = list(stream_tokens(model, longer, 6, temperature=0, state=state))
    assert again == model.generate(torch.tensor([longer]), 6, temperature=0)[0, len(longer):].tolist()
    assert state.ids[: len(ids)] == ids
    # Past the context the window slides exactly as in generate.
    long_ids = (ids * 8)[: BLOCK - 4]
    slid = model.generate(torch.tensor([long_ids]), 12, temperature=0)[0, len(long_ids):].tolist()
    assert list(stream_tokens(model, long_ids, 12, temperature=0)) == slid


def test_stream_detokenizer_never_prints_a_broken_character(ckpt):
    tok = load_chat_format(ckpt).tokenizer
    # Byte-level BPE: "é" is two byte tokens (0xC3 0xA9); after the first, decode gives U+FFFD.
    first, second = tok.backend.token_to_id("Ã"), tok.backend.token_to_id("©")
    assert tok.decode([first]) == "\ufffd" and tok.decode([first, second]) == "é"
    detok = StreamDetokenizer(tok)
    out = [detok.push(t) for t in tok.encode("ab")] + [detok.push(first), detok.push(second)]
    assert out[-2] == "" and "".join(out) == "abé" and "\ufffd" not in "".join(out)
    # Text that may begin a stop string is held back until it is known not to.
    detok = StreamDetokenizer(tok, stop_strings=("\n\n",))
    pieces = [detok.push(t) for t in tok.encode("one\ntwo\n\nthree")]
    assert "".join(pieces) + detok.finish() == "one\ntwo" and detok.stopped


# ---------------------------------------------------------------------------------------------
# End of turn


@pytest.fixture(scope="module")
def eot_ckpt(ckpt: Path, model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """The chat model with its <|im_end|> head row set so that a greedy reply to 'Hello there!'
    ends with <|im_end|> after a few tokens. Returns (checkpoint, the reply's tokens)."""
    from safetensors.torch import load_file, save_file

    chat = load_chat_format(ckpt)
    ids = chat.prompt_ids(CONVERSATIONS[0])
    free = model.generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
    out = tmp_path_factory.mktemp("chat-eot") / "smol-eot"
    shutil.copytree(ckpt, out)
    weights = load_file(ckpt / "model.safetensors")
    from fromzero.checkpoint import load_model

    for k in (3, 4, 2, 5, 6):
        head = weights["lm_head.weight"].clone()
        head[IM_END] = 1.05 * head[free[k]]  # wins where free[k] did, with a margin
        save_file({**weights, "lm_head.weight": head}, str(out / "model.safetensors"))
        tokens = load_model(out, "cpu").generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
        if IM_END in tokens and tokens.index(IM_END) >= 2:
            return out, tokens[: tokens.index(IM_END)]
    raise AssertionError("could not make the tiny model end its turn")


def test_generation_stops_at_the_end_of_turn_token(eot_ckpt, capsys):
    directory, reply_tokens = eot_ckpt
    from fromzero.checkpoint import load_model

    session = _greedy_session(load_model(directory, "cpu"), directory)
    chat = session.chat
    reply = _reply(session, "Hello there!")
    assert reply == chat.tokenizer.decode(reply_tokens) and "<|im_end|>" not in reply
    assert session.stats.new_tokens == len(reply_tokens) + 1  # the end-of-turn token, then no more
    assert session.history[-1] == {"role": "assistant", "content": reply}
    # generate --chat renders the message the same way and prints the reply only.
    assert main(["generate", "--checkpoint", str(directory), "--chat", "--prompt", "Hello there!", "--temperature", "0",
                 "--max-new-tokens", "24", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == reply + "\n"


# ---------------------------------------------------------------------------------------------
# The REPL


def test_chat_repl_through_a_pipe_matches_the_library(ckpt, model):
    lines = "Hello there!\nTell me about the mill.\n/reset\nHello there!\n/exit\nnever answered\n"
    args = ["--max-new-tokens", "72", "--temperature", "0", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "fromzero", "chat", "--checkpoint", str(ckpt), *args],
                          input=lines.encode(), capture_output=True, timeout=300)
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()  # bytes: no newline translation
    assert proc.returncode == 0, stderr
    # The same conversation in-process.
    notes: list[str] = []
    session = _greedy_session(model, ckpt, max_new_tokens=72)
    session.notice = notes.append
    out, err = io.StringIO(), io.StringIO()
    assert run_repl(session, io.StringIO(lines), out, err) == 0
    assert stdout == out.getvalue()
    first = _reply(_greedy_session(model, ckpt, max_new_tokens=72), "Hello there!")
    assert stdout.startswith(first + "\n") and stdout.endswith("\n" + first + "\n")  # after /reset: the same
    assert len(stdout) > 2 * len(first) + 3 and "never answered" not in stdout
    # The second turn (160 - 72 = 88 tokens of context) did not fit with the first: the oldest pair went.
    assert notes == ["(dropped the 2 oldest messages to fit the 88-token context)"]
    assert stderr.splitlines() == ["(dropped the 2 oldest messages to fit the 88-token context)",
                                   "(history cleared)"]


def test_repl_survives_a_too_long_message_and_ctrl_c(ckpt, model):
    class Interrupting:
        """The model, but the third forward pass is Ctrl-C."""

        def __init__(self, model, at: int) -> None:
            self.model, self.at, self.calls = model, at, 0

        def __getattr__(self, name):
            return getattr(self.model, name)

        def __call__(self, *args, **kw):
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
            return self.model(*args, **kw)

    session = _greedy_session(Interrupting(model, at=3), ckpt)
    out, err = io.StringIO(), io.StringIO()
    lines = "Hello there!\n" + "word " * 200 + "\nHow are you?\n"
    assert run_repl(session, io.StringIO(lines), out, err) == 0  # end of input: exit 0
    first, rest = out.getvalue().split("\n", 1)
    assert len(session.chat.tokenizer.encode(first)) <= 3  # two tokens made it before Ctrl-C
    assert err.getvalue().splitlines()[0] == "(reply interrupted)"
    assert err.getvalue().splitlines()[1].startswith("error: this message needs")
    assert len(err.getvalue().splitlines()) == 2
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first  # the partial reply is kept
    assert rest.endswith("\n") and rest.strip()

    class CtrlC(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    assert run_repl(_greedy_session(model, ckpt), CtrlC(), io.StringIO(), io.StringIO()) == 0


def test_no_chat_template_is_one_line_and_exit_2(ckpt, model, tmp_path, capsys, monkeypatch):
    bare = _copy(ckpt, tmp_path, "bare")
    (bare / "chat_template.jinja").unlink()
    for argv in (["chat", "--checkpoint", str(bare)],
                 ["generate", "--checkpoint", str(bare), "--chat", "--prompt", "hi"]):
        assert main([*argv, "--device", "cpu"]) == 2
        assert capsys.readouterr().err == (f"error: {bare} has no chat template; pass --chat-template FILE "
                                           "(a Jinja template)\n")
    # With --chat-template it chats (the same reply as the checkpoint's own ChatML template).
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--checkpoint", str(bare), "--chat-template", str(template), "--temperature", "0",
                 "--max-new-tokens", "8", "--device", "cpu"]) == 0
    session = ChatSession(model, load_chat_format(bare, template), max_new_tokens=8, temperature=0.0)
    assert capsys.readouterr().out == _reply(session, "Hi") + "\n"
    assert main(["chat", "--checkpoint", str(bare), "--max-new-tokens", "200", "--device", "cpu",
                 "--chat-template", str(template)]) == 2
    assert "leaves no room" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# serve


def test_serve_chat_uses_the_same_prompt_and_stops(eot_ckpt, model, ckpt):
    from fastapi.testclient import TestClient

    from fromzero.serving import ServeConfig, create_app

    directory, reply_tokens = eot_ckpt
    tok = load_chat_format(directory).tokenizer
    with TestClient(create_app(ServeConfig(checkpoint=str(directory), device="cpu"))) as client:
        r = client.post("/v1/chat/completions", json={"messages": CONVERSATIONS[0], "max_tokens": 24,
                                                      "temperature": 0})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == tok.decode(reply_tokens) and choice["finish_reason"] == "stop"
        assert r.json()["usage"]["prompt_tokens"] == len(load_chat_format(directory).prompt_ids(CONVERSATIONS[0]))
        for body, fragment in [
            ({"messages": []}, "messages is empty"),
            ({"messages": [{"role": "robot", "content": "beep"}]}, "unknown role 'robot'"),
            ({"messages": [{"role": "user", "content": "word " * 200}]}, "longer than the model's context"),
        ]:
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, r.text
            assert fragment in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"


def test_serve_chat_template_option_lets_a_model_without_one_chat(ckpt, tmp_path):
    from fastapi.testclient import TestClient

    from fromzero.serving import ServeConfig, create_app

    bare = _copy(ckpt, tmp_path, "bare")
    (bare / "chat_template.jinja").unlink()
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    with TestClient(create_app(ServeConfig(checkpoint=str(bare), device="cpu"))) as client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "--chat-template FILE" in r.json()["error"]["message"]
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    with TestClient(create_app(ServeConfig(checkpoint=str(bare), device="cpu", chat_template=str(template)))) as client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        expected = load_chat_format(bare, template).prompt_ids(body["messages"])
        assert r.json()["usage"]["prompt_tokens"] == len(expected)


def test_chat_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--system", "--chat-template", "--max-new-tokens", "--temperature", "--top-k",
                   "--top-p", "--seed", "--device", "/reset", "/exit", "Ctrl-C"):
        assert option in text, option
    assert text.count("default") >= 8 and "(default: None)" not in text
