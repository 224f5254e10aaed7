"""Instruction tuning (SFT) of a decoder: through the CLI from a pretraining run, and via the API.

The issue's requirement: ``init_from: runs/<run>/checkpoints/best`` works for SFT of the GPT a
``fromzero pretrain`` run made. The module runs the whole chain once through ``fromzero.cli.main``
(data prepare -> pretrain -> finetune --task sft -> generate), on the tiny char corpus of
tests/conftest.py; the other tests use the tiny ``gpt_base`` / ``sft_jsonl`` fixtures.
"""

from __future__ import annotations

import io
import json
import math
import random
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fromzero.cli import main
from fromzero.checkpoint import load_model

# Lower-case words, ':' and newlines are all in the tiny corpus; its capitals do not cover the
# default "USER:" / "ASSISTANT:" template, so the chain's corpus adds one line that does.
USER, ASSISTANT = "USER:\n", "ASSISTANT:\n"
PAIRS = {"river": "water", "snow": "ice", "mill": "wheel", "inn": "fire", "letter": "wax", "spring": "warm"}
BLOCK = 48


def _run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse --help etc.
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _write_pairs(path: Path, n: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    keys = sorted(PAIRS)
    lines = [json.dumps({"prompt": k, "response": PAIRS[k]}) for k in (rng.choice(keys) for _ in range(n))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path, recipe_writer) -> dict:
    """data prepare -> pretrain (20 steps) -> finetune --task sft from RUN/checkpoints/best."""
    root = tmp_path_factory.mktemp("sft-chain")
    corpus = root / "corpus.txt"
    corpus.write_text(tiny_corpus.read_text(encoding="utf-8") + "\nUSER: ASSISTANT: the template's capitals\n", encoding="utf-8")
    data = root / "data"
    code, out, err = _run("data", "prepare", "--corpus", corpus, "--tokenizer", "char", "--out", data, "--quiet")
    assert code == 0, err
    run = root / "run"
    recipe = recipe_writer(root)("tiny-sft-base", out_dir=run, model={"block_size": BLOCK}, data={"dir": str(data)})
    code, out, err = _run("pretrain", "--config", recipe, "--train.max_steps", "20", "--out_dir", run, "--quiet")
    assert code == 0, err
    pairs = _write_pairs(root / "sft.jsonl")
    sft = root / "sft"
    code, out, err = _run("finetune", "--task", "sft", "--init_from", run / "checkpoints" / "best", "--data", pairs,
                          "--max_steps", "20", "--eval_every", "10", "--batch_size", "8", "--lr", "3e-3",
                          "--device", "cpu",
                          "--dtype", "float32", "--out_dir", sft, "--quiet")
    return {"root": root, "data": data, "run": run, "pairs": pairs, "sft": sft, "code": code, "out": out,
            "err": err}


def test_sft_from_a_pretraining_run_through_the_cli(chain: dict) -> None:
    assert chain["code"] == 0, chain["err"]
    sft = chain["sft"]
    metrics = json.loads((sft / "metrics.json").read_text())
    assert {"loss", "perplexity"} <= set(metrics)
    assert math.isfinite(metrics["loss"]) and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-4)
    assert metrics["split"] == "test"
    best = sft / "checkpoints" / "best"
    model = load_model(best)
    assert model.config.block_size == BLOCK
    info = json.loads((best / "info.json").read_text())
    assert info["task"] == "sft" and info["template"]["user_prefix"] == USER
    assert (best / "tokenizer.json").is_file()
    assert any("val_loss" in json.loads(x) for x in (sft / "metrics.jsonl").read_text().splitlines())


def test_generate_from_the_sft_checkpoint(chain: dict) -> None:
    assert chain["code"] == 0, chain["err"]
    code, out, err = _run("generate", "--checkpoint", chain["sft"] / "checkpoints" / "best",
                          "--prompt", f"{USER}snow\n\n{ASSISTANT}", "--max-new-tokens", "5", "--device", "cpu")
    assert code == 0, err
    assert out.startswith(f"{USER}snow")


def test_generate_chat_wraps_the_prompt_and_prints_only_the_reply(chain: dict) -> None:
    assert chain["code"] == 0, chain["err"]
    code, out, err = _run("generate", "--checkpoint", chain["sft"] / "checkpoints" / "best", "--chat",
                          "--prompt", "snow", "--max-new-tokens", "12", "--device", "cpu", "--temperature", "0")
    assert code == 0, err
    reply = out.rstrip("\n")
    assert USER not in reply and ASSISTANT not in reply and "\n\n" not in reply  # the reply alone, one turn
    code, _, err = _run("generate", "--checkpoint", chain["run"] / "checkpoints" / "best", "--chat", "--prompt", "x")
    assert code == 2 and "sft" in err


def test_evaluate_the_sft_checkpoint_on_its_test_split(chain: dict, cli) -> None:
    assert chain["code"] == 0, chain["err"]
    result = cli("evaluate", "--checkpoint", chain["sft"] / "checkpoints" / "best", "--split", "test",
                 "--device", "cpu")
    assert result.code == 0, result
    metrics = json.loads(result.out.strip().splitlines()[-1])
    assert {"loss", "perplexity"} <= set(metrics) and metrics["split"] == "test"
    run_metrics = json.loads((chain["sft"] / "metrics.json").read_text())
    assert metrics["loss"] == pytest.approx(run_metrics["loss"], rel=0.05)  # same data, split, template (evaluate autocasts: dtype auto)


def test_evaluate_a_pretrained_gpt_on_a_prepared_split(chain: dict, cli) -> None:
    result = cli("evaluate", "--checkpoint", chain["run"] / "checkpoints" / "best", "--data", chain["data"],
                 "--split", "val", "--device", "cpu")
    assert result.code == 0, result
    metrics = json.loads(result.out.strip().splitlines()[-1])
    assert metrics["split"] == "val" and metrics["tokens"] > 0
    assert 0 < metrics["loss"] < math.log(200)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Python API, on the tiny gpt_base fixture


def _sft_cfg(gpt_base: Path, data: Path, out: Path, **kw):
    from fromzero.finetune.sft import SFTConfig

    fields = dict(init_from=str(gpt_base), data=str(data), out_dir=str(out), epochs=6, batch_size=8, lr=3e-3,
                  seed=0, device="cpu", dtype="float32", progress=False, log_interval=5)
    fields.update(kw)
    return SFTConfig(**fields)


def _test_set(cfg, block_size: int):
    from fromzero.data.sft import ChatTemplate, load_sft_examples, tokenize_sft
    from fromzero.data.tokenizers import TextTokenizer

    tokenizer = TextTokenizer.load(Path(cfg.init_from) / "tokenizer.json")
    examples = load_sft_examples(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    template = ChatTemplate(user_prefix=cfg.user_prefix, assistant_prefix=cfg.assistant_prefix,
                            system_prefix=cfg.system_prefix, turn_end=cfg.turn_end)
    return tokenize_sft(examples["test"], tokenizer, template, cfg.max_length or block_size)


@pytest.fixture(scope="module")
def full_run(gpt_base: Path, sft_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from fromzero.finetune.sft import finetune_sft

    cfg = _sft_cfg(gpt_base, sft_jsonl, tmp_path_factory.mktemp("sft-full") / "run")
    return cfg, finetune_sft(cfg)


def test_response_loss_goes_down(full_run) -> None:
    _, summary = full_run
    assert summary["test"]["loss"] < 0.7 * summary["test_before"]["loss"], summary
    assert summary["trainable_params"] == summary["total_params"]


def test_loss_is_only_on_response_tokens(full_run) -> None:
    """The reported test loss is the mean CE over response tokens only, not over the prompt."""
    cfg, summary = full_run
    model = load_model(summary["checkpoint"]).eval()
    test_set = _test_set(cfg, model.config.block_size)
    resp_total, resp_n, all_total, all_n = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for i in range(len(test_set)):
            x, y = test_set[i]
            logits, _ = model(x[None])
            ce = F.cross_entropy(logits[0], y.clamp(min=0), reduction="none")
            mask = y != -100
            assert 0 < int(mask.sum()) < len(y)  # the prompt is there, but not a target
            resp_total += float(ce[mask].sum())
            resp_n += int(mask.sum())
            # the same sequence with every next token a target: the prompt included
            full_y = torch.cat([x[1:], y[-1:]])
            all_total += float(F.cross_entropy(logits[0], full_y, reduction="sum"))
            all_n += len(full_y)
    assert summary["test"]["loss"] == pytest.approx(resp_total / resp_n, rel=1e-4)
    assert abs(summary["test"]["loss"] - all_total / all_n) > 0.05


def test_packing_fills_rows_and_learns(gpt_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    from fromzero.data.sft import pack_sft
    from fromzero.finetune.sft import finetune_sft

    cfg = _sft_cfg(gpt_base, sft_jsonl, tmp_path / "run", packing=True, epochs=8)
    packed = pack_sft(_test_set(cfg, 32), 32, 0)
    assert len(packed) >= 2
    assert all(len(packed[i][0]) == 32 and len(packed[i][1]) == 32 for i in range(len(packed)))
    for i in range(len(packed) - 1):  # only the last row has padding
        assert int((packed[i][1] == -100).sum()) < 32
    summary = finetune_sft(cfg)
    assert summary["test"]["loss"] < 0.8 * summary["test_before"]["loss"], summary
    assert (tmp_path / "run" / "checkpoints" / "best" / "model.safetensors").is_file()


def test_frozen_unfreeze_top_trains_only_the_top_block(gpt_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    from fromzero.finetune.sft import finetune_sft

    summary = finetune_sft(_sft_cfg(gpt_base, sft_jsonl, tmp_path / "run", method="frozen", unfreeze_top=1,
                                    epochs=2))
    base = load_file(str(gpt_base / "model.safetensors"))
    tuned = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    last = max(int(k.split(".")[2]) for k in base if k.startswith("transformer.h."))
    assert last == 1
    h0 = [k for k in base if k.startswith("transformer.h.0.")]
    top = [k for k in base if k.startswith(f"transformer.h.{last}.") and k.endswith(".weight")]
    assert h0 and top
    for k in h0:
        torch.testing.assert_close(tuned[k], base[k], rtol=0, atol=0, msg=k)
    assert all(not torch.equal(tuned[k], base[k]) for k in top), [k for k in top if torch.equal(tuned[k], base[k])]
    assert not torch.equal(tuned["transformer.ln_f.weight"], base["transformer.ln_f.weight"])
    assert not torch.equal(tuned["transformer.wte.weight"], base["transformer.wte.weight"])  # tied lm_head
    assert summary["trainable_params"] < summary["total_params"]


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, no run directory left behind


def _sft_argv(init_from: Path, data: Path, out: Path, *extra: str) -> list:
    return ["finetune", "--task", "sft", "--init_from", init_from, "--data", data, "--out_dir", out,
            "--device", "cpu", "--dtype", "float32", "--max_steps", "2", "--quiet", *extra]


def test_init_from_an_encoder_is_refused(cli, one_line_error, bert_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    one_line_error(cli(*_sft_argv(bert_base, sft_jsonl, out)), "decoder")
    assert not out.exists()


def test_unknown_character_is_named(cli, one_line_error, gpt_base: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps({"prompt": "cat", "response": "dog"}) + "\n" for _ in range(20))
                    + json.dumps({"prompt": "caf\u00e9", "response": "tea"}) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    one_line_error(cli(*_sft_argv(gpt_base, data, out)), "\u00e9")
    assert not out.exists()


def test_max_length_above_block_size_is_refused(cli, one_line_error, gpt_base: Path, sft_jsonl: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "run"
    one_line_error(cli(*_sft_argv(gpt_base, sft_jsonl, out, "--max_length", "64")), "block_size", "64")
    assert not out.exists()


def test_line_without_an_assistant_message(cli, one_line_error, gpt_base: Path, tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    one_line_error(cli(*_sft_argv(gpt_base, data, out)), f"{data}:2", "assistant")
    assert not out.exists()


def test_template_overrides_on_the_command_line_keep_their_text(gpt_base: Path, sft_jsonl: Path) -> None:
    from fromzero.finetune.recipe import load_finetune_config

    _, cfg = load_finetune_config(None, ["--init_from", str(gpt_base), "--data", str(sft_jsonl),
                                         "--user_prefix", "USER:\n", "--assistant_prefix", "ASSISTANT:\n",
                                         "--turn_end", "\n\n"], task="sft")
    assert (cfg.user_prefix, cfg.assistant_prefix, cfg.turn_end) == ("USER:\n", "ASSISTANT:\n", "\n\n")


def test_resume_continues_bit_for_bit(gpt_base: Path, sft_jsonl: Path, tmp_path: Path, monkeypatch) -> None:
    """SFT stopped mid-epoch (LoRA with dropout, so the RNG matters; accumulation weighted by
    reply tokens) and resumed = never stopped: weights, best checkpoint, logged losses."""
    from fromzero.finetune.sft import finetune_sft

    from .resume import assert_resume_is_exact

    def cfg(out):
        return _sft_cfg(gpt_base, sft_jsonl, out, epochs=2, method="lora", lora_dropout=0.1, grad_accum=2,
                        batch_size=4, eval_every=3, log_interval=1)

    assert_resume_is_exact(finetune_sft, cfg, tmp_path, monkeypatch, stop_at=5)
