"""Tests that catch planted training bugs (issue 13). Each fails, for its own reason, when

1. a saved LoRA adapter does not reproduce the model as trained (alpha, rank, target modules or
   the saved head in adapter_config.json / adapter_model.safetensors differ from training), as
   read back by fromzero (``load_model``) and by ``peft`` on the exported Hugging Face base;
2. fine-tuning with gradient accumulation k differs from one batch k times larger (SFT, SGD, one
   process): the same final weights, to fp32 rounding;
3. compiled fp32 pretraining drifts from eager fp32 (same seed): the same final weights to 1e-5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fromzero.errors import FromzeroError
import torch
from safetensors.torch import load_file

from fromzero.checkpoint import load_model

from .conftest import text_config
from .test_lora import SENTENCES, padded_batch

# ---------------------------------------------------------------------------------------------
# 1. a saved LoRA adapter reproduces the model as trained

# Not the defaults (r 8, alpha 16, query/key/value/out): a save that falls back to a default
# writes a different adapter. scaling = alpha / r = 3 (the default's is 2).
RANK, ALPHA = 4, 12.0
TARGETS = ["key", "value", "out", "mlp.fc"]
HF_TARGETS = {f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in
              ("attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense")}


@pytest.fixture(scope="module")
def lora_trained(bert_base: Path, sentiment_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A LoRA fine-tune of the tiny encoder; the trained in-memory model's logits on SENTENCES
    are taken just before the adapter is saved (after the best weights are restored)."""
    from fromzero.finetune import lora as lora_mod
    from fromzero.finetune.text import finetune_text_classification

    captured: dict[str, Any] = {}
    real_save = lora_mod.save_adapter

    def spy(directory, peft_model, *args, **kwargs):
        peft_model.eval()
        ids, mask = padded_batch(SENTENCES)
        with torch.no_grad():
            captured["logits"] = lora_mod.base_model(peft_model)(ids, mask)[0].detach().clone()
        captured["config"] = peft_model.peft_config["default"]
        return real_save(directory, peft_model, *args, **kwargs)

    cfg = text_config(bert_base, sentiment_csv, tmp_path_factory.mktemp("lora-planted") / "run", method="lora",
                      lora_rank=RANK, lora_alpha=ALPHA, lora_targets=TARGETS, lr=1e-2, epochs=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lora_mod, "save_adapter", spy)
        summary = finetune_text_classification(cfg)
    assert "logits" in captured, "the LoRA run did not save its adapter through save_adapter"
    return {**summary, "trained_logits": captured["logits"], "training_config": captured["config"]}


@pytest.fixture(scope="module")
def hf_bert(bert_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fromzero.models.hf import convert_to_hf

    out = tmp_path_factory.mktemp("hf-planted") / "bert"
    convert_to_hf(bert_base, out)
    return out


def fromzero_logits(ckpt: Path) -> torch.Tensor:
    ids, mask = padded_batch(SENTENCES)
    with torch.no_grad():
        return load_model(ckpt).eval()(ids, mask)[0]


def peft_logits(ckpt: Path, hf_base: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    ids, mask = padded_batch(SENTENCES)
    hf = AutoModelForSequenceClassification.from_pretrained(str(hf_base), num_labels=2)
    model = PeftModel.from_pretrained(hf, str(ckpt)).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_same_logits(got: torch.Tensor, trained: torch.Tensor) -> None:
    torch.testing.assert_close(got, trained, atol=1e-5, rtol=1e-5)


def test_saved_adapter_config_is_the_training_config(lora_trained: dict) -> None:
    ckpt = Path(lora_trained["checkpoint"])
    saved = json.loads((ckpt / "adapter_config.json").read_text())
    trained = lora_trained["training_config"]
    assert (trained.r, trained.lora_alpha) == (RANK, ALPHA)  # what training used
    assert saved["r"] == trained.r and saved["lora_alpha"] == trained.lora_alpha
    assert set(saved["target_modules"]) == HF_TARGETS
    assert len(saved["target_modules"]) == len(trained.target_modules)
    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    lora_a = {k: v for k, v in tensors.items() if ".lora_A." in k}
    assert len(lora_a) == len(HF_TARGETS) and all(v.shape[0] == RANK for v in lora_a.values())


def test_fromzero_reload_of_the_adapter_gives_the_trained_logits(lora_trained: dict) -> None:
    trained = lora_trained["trained_logits"]
    assert lora_trained["val"]["accuracy"] >= 0.8  # it learned: the adapter carries real information
    assert float((trained[:, 1] - trained[:, 0]).std()) > 0.05  # the sentences get different logits
    assert_same_logits(fromzero_logits(Path(lora_trained["checkpoint"])), trained)


def test_peft_load_of_the_adapter_on_the_exported_base_gives_the_trained_logits(lora_trained: dict,
                                                                                 hf_bert: Path) -> None:
    assert_same_logits(peft_logits(Path(lora_trained["checkpoint"]), hf_bert), lora_trained["trained_logits"])


def test_reloaded_adapter_reproduces_the_recorded_test_loss(lora_trained: dict, sentiment_csv: Path) -> None:
    """metrics.json's test loss was computed by the trained in-memory model: the reloaded
    adapter must score the same test split (rebuilt here, same seed and fractions) the same."""
    from fromzero.data.classification import load_text_classification

    run_dir = Path(lora_trained["run_dir"])
    recorded = json.loads((run_dir / "metrics.json").read_text())
    test = load_text_classification(str(sentiment_csv), "text", "label", 0.1, 0.1, 0)["test"]
    labels = lora_trained["labels"]
    assert recorded["n"] == len(test)
    ids, mask = padded_batch([t for t, _ in test])
    with torch.no_grad():
        logits = load_model(Path(lora_trained["checkpoint"])).eval()(ids, mask)[0]
    loss = float(torch.nn.functional.cross_entropy(logits, torch.tensor([labels.index(y) for _, y in test])))
    assert loss == pytest.approx(recorded["loss"], abs=1e-5)


def _set(key: str, value: Any):
    def corrupt(config: dict, tensors: dict) -> None:
        config[key] = value(config) if callable(value) else value
    return corrupt


def _rename(a: str, b: str):
    """Swap the adapters of two modules (a name-mapping bug in the exporter)."""
    def corrupt(config: dict, tensors: dict) -> None:
        for key in [k for k in tensors if a in k]:
            other = key.replace(a, b)
            tensors[key], tensors[other] = tensors[other], tensors[key]
    return corrupt


def _drop(*parts: str):
    """The trained head (modules_to_save) left out of adapter_model.safetensors."""
    def corrupt(config: dict, tensors: dict) -> None:
        for key in [k for k in tensors if any(p in k for p in parts)]:
            del tensors[key]
    return corrupt


PLANTED = {
    "alpha": _set("lora_alpha", 2 * ALPHA),
    "alpha-default": _set("lora_alpha", 16.0),
    "rank": _set("r", 2 * RANK),
    "target-dropped": _set("target_modules", lambda c: sorted(t for t in c["target_modules"] if "value" not in t)),
    "targets-default": _set("target_modules", sorted(f"bert.encoder.layer.{i}.attention.{m}" for i in range(2) for m in
                                                   ("self.query", "self.key", "self.value", "output.dense"))),
    "head-tensors-missing": _drop("classifier", "pooler"),
    "key-value-swapped": _rename(".attention.self.key.", ".attention.self.value."),
}


@pytest.mark.parametrize("planted", sorted(PLANTED))
def test_the_comparison_catches_a_planted_adapter_bug(planted: str, lora_trained: dict, hf_bert: Path,
                                                      tmp_path: Path) -> None:
    """The checks above have power: an adapter whose config (alpha, r, targets), tensor names or
    saved head differ from training is caught by fromzero's reload and by peft's, each (a loader
    that refuses the adapter with an error catches it too)."""
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(lora_trained["checkpoint"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    PLANTED[planted](config, tensors)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(bad / "adapter_model.safetensors"))

    trained = lora_trained["trained_logits"]
    for name, load in (("fromzero", lambda: fromzero_logits(bad)), ("peft", lambda: peft_logits(bad, hf_bert))):
        try:
            logits = load()
        except FromzeroError:  # fromzero refuses a bad adapter in one line: that catches the bug too
            continue
        except Exception:  # noqa: BLE001 - so does peft, with its own exceptions
            if name == "fromzero":
                raise  # a traceback is not how fromzero refuses input
            continue
        assert not torch.allclose(logits, trained, atol=1e-5, rtol=1e-5), f"{name} did not notice {planted}"


# ---------------------------------------------------------------------------------------------
# 3. compiled fp32 == eager fp32


COMPILE_STEPS = 4


def _pretrain(make_recipe, name: str, compile: bool):
    from fromzero.config import load_pretrain_config
    from fromzero.training.pretrain import PretrainRun

    recipe = make_recipe(name, train={"max_steps": COMPILE_STEPS, "log_interval": 1,
                                      "eval_every": COMPILE_STEPS, "dtype": "float32", "compile": compile})
    pre = PretrainRun(load_pretrain_config(recipe))
    pre.fit(progress=False)
    rows = [json.loads(line) for line in (pre.run_dir / "metrics.jsonl").read_text().splitlines()]
    return pre, [r["loss"] for r in rows if "loss" in r]


def test_compiled_fp32_training_matches_eager_fp32(make_recipe) -> None:
    """Compiling must not change the maths: in fp32 the losses of every step and the final
    weights agree to float rounding (1e-5), not only to the bf16 tolerance of test_compile."""
    from fromzero import devices as trainer_mod

    if not trainer_mod._cpp_compiler_available():
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    eager, eager_losses = _pretrain(make_recipe, "eager32", compile=False)
    compiled, compiled_losses = _pretrain(make_recipe, "compiled32", compile=True)
    assert compiled.trainer.net is not compiled.model, "the model was not compiled (or fell back to eager)"
    assert eager.trainer.net is eager.model
    assert len(eager_losses) == len(compiled_losses) == COMPILE_STEPS
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), atol=1e-5, rtol=0)
    assert eager_losses[-1] < eager_losses[0] - 0.05  # it trained: the weights below moved
    ours, theirs = compiled.model.state_dict(), eager.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # what was saved is what was trained
    saved = load_file(str(compiled.run_dir / "checkpoints" / "last" / "model.safetensors"))
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, theirs[name], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# 2. gradient accumulation k x batch b == one batch of k*b (SFT, SGD, one process)

# Prompts of varied length (right padding must not matter); the response decides the number of
# target tokens of an example: with EQUAL-length responses every micro-batch of b examples has
# the same number of target tokens, so a mean of micro-batch means equals the big batch's mean.
PROMPTS = ["hi", "yes", "up", "cat", "sun", "red", "a", "go"]
EQUAL_RESPONSES = ["down", "moon", "blue", "dogs", "rain", "snow", "cold", "wind"]
UNEQUAL_RESPONSES = ["hello there", "no", "down", "a dog", "moon", "sky blue", "x", "the wind"]


def _write_sft_dir(directory: Path, responses: list[str], n_train: int) -> Path:
    """train.jsonl (n_train pairs), val.jsonl and test.jsonl (4 each): explicit splits."""
    directory.mkdir(parents=True)

    def pairs(n: int, offset: int) -> str:
        rows = [{"prompt": PROMPTS[(i + offset) % len(PROMPTS)],
                 "response": responses[(3 * i + offset) % len(responses)]} for i in range(n)]
        return "".join(json.dumps(r) + "\n" for r in rows)

    (directory / "train.jsonl").write_text(pairs(n_train, 0), encoding="utf-8")
    (directory / "val.jsonl").write_text(pairs(4, 1), encoding="utf-8")
    (directory / "test.jsonl").write_text(pairs(4, 2), encoding="utf-8")
    return directory


def _sft_weights(gpt_base: Path, data: Path, out_dir: Path, batch_size: int, grad_accum: int) -> tuple[dict, dict]:
    """Full SFT for one epoch (one evaluation, at its end: the best weights are the final ones)
    with plain SGD at a high lr, no clipping (it would hide a wrongly scaled gradient), no dropout."""
    from fromzero.finetune.sft import SFTConfig, finetune_sft

    cfg = SFTConfig(init_from=str(gpt_base), data=str(data), method="full", optimizer="sgd", lr=0.05,
                    weight_decay=0.0, grad_clip=0.0, warmup_ratio=0.0, epochs=1, batch_size=batch_size,
                    grad_accum=grad_accum, seed=0, device="cpu", dtype="float32", progress=False,
                    log_interval=1, out_dir=str(out_dir))
    result = finetune_sft(cfg)
    return load_file(str(Path(result["checkpoint"]) / "model.safetensors")), result


def _step_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


ACCUM_CASES = [
    # (responses, train examples, b, k): 48 = 4 steps of 3 x 4 or of 12 (every micro-batch equal)
    pytest.param(EQUAL_RESPONSES, 48, 4, 3, id="equal-micro-batches"),
    # the classic bug, averaging micro-batch averages: the loss of a step is the mean over its
    # target tokens, so micro-batches with more tokens must weigh more
    pytest.param(UNEQUAL_RESPONSES, 48, 4, 3, id="unequal-token-counts"),
    # 48 = 4 x (5 + 5) + (5 + 3): the last micro-batch of the epoch is short
    pytest.param(EQUAL_RESPONSES, 48, 5, 2, id="short-last-micro-batch"),
]


@pytest.mark.parametrize("responses, n_train, b, k", ACCUM_CASES)
def test_grad_accumulation_equals_one_batch_k_times_larger(gpt_base: Path, tmp_path: Path, responses: list[str],
                                                           n_train: int, b: int, k: int) -> None:
    data = _write_sft_dir(tmp_path / "data", responses, n_train)
    accumulated, acc_run = _sft_weights(gpt_base, data, tmp_path / "accum", batch_size=b, grad_accum=k)
    one_batch, big_run = _sft_weights(gpt_base, data, tmp_path / "big", batch_size=k * b, grad_accum=1)
    base = load_file(str(gpt_base / "model.safetensors"))

    steps = -(-n_train // (k * b))
    assert acc_run["steps"] == big_run["steps"] == steps
    assert accumulated.keys() == one_batch.keys()
    # the comparison has power: SGD moved the weights far more than the tolerance (a gradient
    # k times too large, or steps taken per micro-batch, would show up many times over)
    moved = max(float((one_batch[n] - base[n]).abs().max()) for n in one_batch if n in base)
    assert moved > 1e-2
    for name in one_batch:
        torch.testing.assert_close(accumulated[name], one_batch[name], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # the logged loss of each step is the loss of the step's whole batch
    torch.testing.assert_close(torch.tensor(_step_losses(Path(acc_run["run_dir"]))),
                               torch.tensor(_step_losses(Path(big_run["run_dir"]))), atol=1e-5, rtol=0)
