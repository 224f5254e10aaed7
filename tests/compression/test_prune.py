"""``fromzero prune``: magnitude (unstructured) and structured pruning of tiny random models.

The key structured test zeroes some heads / MLP channels first: their contribution to the
output is then exactly zero, so cutting exactly those units out must leave the outputs
unchanged (to fp32 rounding: smaller matmuls may sum in another order). That proves the surgery
(fused q|k|v and gate|up rows, grouped-query bookkeeping, the new config) is right; a control
that removes important units instead shows the comparison would notice a wrong cut.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fromzero.compression.prune import (
    magnitude_prune,
    mask_by_magnitude,
    structured_groups,
    structured_prune,
    taylor_importance,
    weight_importance,
    weight_sparsity,
)
from fromzero.models.bert import Bert, BertConfig
from fromzero.models.gpt import GPT, LLAMA_STYLE, GPTConfig
from fromzero.checkpoint import load_model, save_checkpoint

from finetune.conftest import VOCAB, sentiment_rows, write_bert_base

LABELS = ["neg", "pos"]


def tiny_bert(**overrides) -> Bert:
    torch.manual_seed(0)
    fields = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=16, max_position_embeddings=64, head="classification", num_labels=2,
                  labels=LABELS)
    fields.update(overrides)
    return Bert(BertConfig(**fields)).eval()


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    fields = dict(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_embd=32)
    fields.update(overrides)
    return GPT(GPTConfig(**fields)).eval()


LLAMA = dict(n_kv_head=2, head_dim=8, intermediate_size=24, **LLAMA_STYLE)


def bert_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, len(VOCAB), (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding on the right, as the tokenizer pipeline makes it
    mask[2, 3:] = 0
    return ids * mask, mask


def gpt_inputs(vocab: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def zero_bert_units(model: Bert, heads: dict[int, list[int]], channels: dict[int, list[int]]) -> None:
    D = model.config.head_size
    for i, hs in heads.items():
        attn = model.layers[i].attn
        for h in hs:
            rows = slice(h * D, (h + 1) * D)
            for lin in (attn.query, attn.key, attn.value):
                lin.weight[rows] = 0
                lin.bias[rows] = 0
            attn.out.weight[:, rows] = 0
    for i, cs in channels.items():
        mlp = model.layers[i].mlp
        mlp.fc.weight[cs] = 0
        mlp.fc.bias[cs] = 0
        mlp.proj.weight[:, cs] = 0


@torch.no_grad()
def zero_gpt_units(model: GPT, query_heads: dict[int, list[int]], kv_heads: dict[int, list[int]],
                   channels: dict[int, list[int]]) -> None:
    """Zero query heads (q rows, c_proj columns), kv heads (k, v rows) and MLP channels."""
    c = model.config
    H, G, D = c.n_head, c.kv_heads, c.head_size
    I = c.intermediate_size or 4 * c.n_embd
    for i, block in enumerate(model.transformer.h):
        attn, mlp = block.attn, block.mlp
        rows = []
        for h in query_heads.get(i, []):
            rows += list(range(h * D, (h + 1) * D))
            attn.c_proj.weight[:, h * D:(h + 1) * D] = 0
        for g in kv_heads.get(i, []):
            rows += list(range(H * D + g * D, H * D + (g + 1) * D))
            rows += list(range((H + G) * D + g * D, (H + G) * D + (g + 1) * D))
        attn.c_attn.weight[rows] = 0
        if attn.c_attn.bias is not None:
            attn.c_attn.bias[rows] = 0
        cs = channels.get(i, [])
        fc_rows = cs + [I + ch for ch in cs] if c.mlp == "swiglu" else cs
        mlp.c_fc.weight[fc_rows] = 0
        if mlp.c_fc.bias is not None:
            mlp.c_fc.bias[fc_rows] = 0
        mlp.c_proj.weight[:, cs] = 0


def assert_same_outputs(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# magnitude


def test_magnitude_zeroes_the_smallest_weights_of_every_layer():
    model = tiny_gpt()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = magnitude_prune(model, 0.3)
    names = set(stats["per_layer"])
    assert "lm_head" not in names  # tied to wte: pruning it would untie them
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])
    assert len(names) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    for name in names:
        w = dict(model.named_parameters())[f"{name}.weight"].detach()
        orig = before[f"{name}.weight"]
        zeroed = w == 0
        assert int(zeroed.sum()) == round(0.3 * w.numel())
        # the zeros are where the smallest weights were, the rest are untouched
        assert orig[zeroed].abs().max() <= orig[~zeroed].abs().min()
        assert torch.equal(w[~zeroed], orig[~zeroed])
    assert stats["sparsity"] == pytest.approx(0.3, abs=1e-3)
    # permanent: plain parameters, no masks or hooks left
    assert not any(n.endswith(("_orig", "_mask")) for n in model.state_dict())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_magnitude_global_scope_reaches_the_sparsity_overall():
    model = tiny_bert()
    masks = mask_by_magnitude(model, 0.6, scope="global")
    stats = weight_sparsity(model, masks)
    assert stats["zeros"] == round(0.6 * stats["weights"])
    assert len(set(round(v, 2) for v in stats["per_layer"].values())) > 1  # one threshold, unequal layers


# ---------------------------------------------------------------------------------------------
# structured: parity with zeroed units


def test_bert_head_dim_config():
    """head_dim lets heads be removed while each keeps its width; the default changes nothing."""
    assert "head_dim" not in BertConfig().to_dict()  # config.json of unpruned models as before
    config = BertConfig(hidden_size=32, num_attention_heads=3, head_dim=8, intermediate_size=16,
                        num_hidden_layers=1, vocab_size=20)
    model = Bert(config)
    assert model.layers[0].attn.key.weight.shape == (24, 32)
    assert BertConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=32, num_attention_heads=3).validate()
    with pytest.raises(ValueError, match="head_dim"):
        BertConfig(head_dim=-1).validate()


@pytest.mark.parametrize("importance", ["weight", "taylor"])
def test_structured_bert_removing_zeroed_units_keeps_outputs(importance):
    model = tiny_bert()
    ids, mask = bert_inputs()
    heads, channels = {0: [2], 1: [0]}, {0: [1, 5, 9, 13], 1: [0, 3, 7, 15]}
    zero_bert_units(model, heads, channels)
    with torch.no_grad():
        expected, _ = model(ids, mask)
        hidden = model.encode(ids, mask)
    config = model.config.to_dict()
    scores = None
    if importance == "taylor":
        groups = structured_groups(model, config)
        labels = torch.tensor([0, 1, 1])
        scores = taylor_importance(model, groups, [(ids, mask, labels)],
                                   lambda m, b: m(b[0], b[1], labels=b[2])[1])
    pruned, new_config, summary = structured_prune(model, config, 0.25, scores)

    assert summary["removed"] == {"layer 0 heads": [2], "layer 0 channels": [1, 5, 9, 13],
                                  "layer 1 heads": [0], "layer 1 channels": [0, 3, 7, 15]}
    assert (new_config["num_attention_heads"], new_config["head_dim"], new_config["intermediate_size"]) == (3, 8, 12)
    assert pruned.layers[0].attn.query.weight.shape == (24, 32)
    assert pruned.layers[0].attn.out.weight.shape == (32, 24)
    assert pruned.layers[1].mlp.fc.weight.shape == (12, 32)
    with torch.no_grad():
        got, _ = pruned(ids, mask)
        got_hidden = pruned.encode(ids, mask)
    assert_same_outputs(got, expected)
    assert_same_outputs(got_hidden * mask[..., None], hidden * mask[..., None])


def test_structured_control_removing_important_units_changes_outputs():
    """The parity comparison is sharp: cutting units that carry signal is noticed."""
    model = tiny_bert()
    ids, mask = bert_inputs()
    zero_bert_units(model, {0: [2], 1: [0]}, {0: [1, 5, 9, 13], 1: [0, 3, 7, 15]})
    with torch.no_grad():
        expected, _ = model(ids, mask)
    config = model.config.to_dict()
    inverted = [-s for s in weight_importance(model, structured_groups(model, config))]
    pruned, _, _ = structured_prune(model, config, 0.25, inverted)
    with torch.no_grad():
        got, _ = pruned(ids, mask)
    assert not torch.allclose(got, expected, rtol=1e-3, atol=1e-4)


def _gpt_parity(model: GPT, sparsity: float, gqa: str, expect: dict) -> GPT:
    idx = gpt_inputs(model.config.vocab_size)
    with torch.no_grad():
        expected, _ = model(idx)
    start = idx[:1, :4]
    expected_tokens = model.generate(start, 6, temperature=0.0)
    pruned, new_config, _ = structured_prune(model, model.config.to_dict(), sparsity, gqa=gqa)
    for key, value in expect.items():
        assert new_config[key] == value, (key, new_config[key])
    with torch.no_grad():
        got, _ = pruned(idx)
    assert_same_outputs(got, expected)
    # cached decoding (KV cache sized by the new n_kv_head / n_head) gives the same tokens
    assert torch.equal(pruned.generate(start, 6, temperature=0.0), expected_tokens)
    return pruned


def test_structured_gpt2_style_parity():
    model = tiny_gpt()  # learned positions, GELU MLP, biases, tied head, 4 heads of 8, 128 channels
    channels = {0: list(range(0, 128, 4)), 1: list(range(3, 128, 4))}
    zero_gpt_units(model, {0: [1], 1: [3]}, {0: [1], 1: [3]}, channels)
    pruned = _gpt_parity(model, 0.25, "queries", {"n_head": 3, "head_dim": 8, "n_kv_head": 0,
                                                  "intermediate_size": 96})
    assert pruned.transformer.h[0].attn.c_attn.weight.shape == (3 * 3 * 8, 32)
    assert pruned.lm_head.weight is pruned.transformer.wte.weight  # still tied


def test_structured_llama_gqa_removes_query_heads_within_groups():
    model = tiny_gpt(**LLAMA)  # rope, swiglu, no biases, 4 query heads on 2 kv heads
    # one query head per kv group (heads 0,1 -> group 0; 2,3 -> group 1; heads 1 and 3 share
    # h % 2, so a wrong head -> group mapping would be caught), half the channels
    zero_gpt_units(model, {0: [1, 3], 1: [0, 2]}, {}, {0: list(range(0, 24, 2)), 1: list(range(12))})
    pruned = _gpt_parity(model, 0.5, "queries", {"n_head": 2, "n_kv_head": 2, "head_dim": 8,
                                                 "intermediate_size": 12})
    assert pruned.transformer.h[1].mlp.c_fc.weight.shape == (2 * 12, 32)  # gate | up, cut alike


def test_structured_llama_gqa_removes_whole_kv_groups():
    model = tiny_gpt(**LLAMA)
    zero_gpt_units(model, {0: [2, 3], 1: [0, 1]}, {0: [1], 1: [0]},
                   {0: list(range(12, 24)), 1: list(range(1, 24, 2))})
    pruned = _gpt_parity(model, 0.5, "groups", {"n_head": 2, "n_kv_head": 1, "head_dim": 8,
                                                "intermediate_size": 12})
    assert pruned.transformer.h[0].attn.c_attn.weight.shape == ((2 + 2 * 1) * 8, 32)


# ---------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/<run>/checkpoints/best of a (random) text classifier, with the run's config.yaml."""
    import csv

    root = tmp_path_factory.mktemp("clf")
    base = write_bert_base(root / "base")
    data = root / "sentiment.csv"
    with data.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(sentiment_rows(120))
    model = tiny_bert()
    best = root / "run" / "checkpoints" / "best"
    save_checkpoint(best, model, model.config.to_dict(), tokenizer_file=base / "tokenizer.json",
                    info={"task": "text-classification", "max_length": 32, "test_accuracy": 0.5})
    run_cfg = {"task": "text-classification", "data": str(data), "batch_size": 16, "lr": 1e-3, "seed": 0}
    (root / "run" / "config.yaml").write_text(yaml.safe_dump(run_cfg), encoding="utf-8")
    return best


@pytest.fixture(scope="module")
def gpt_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Path:
    """A random LLaMA-style GPT over the tiny char data's vocabulary (no run config)."""
    vocab = json.loads((tiny_data_dir / "meta.json").read_text())["vocab_size"]
    model = tiny_gpt(vocab_size=vocab, **LLAMA)
    directory = tmp_path_factory.mktemp("gpt") / "best"
    save_checkpoint(directory, model, model.config.to_dict(), tokenizer_file=tiny_data_dir / "tokenizer.json",
                    info={"step": 0, "val_loss": 4.0})
    return directory


def test_cli_structured_classifier_with_recovery_and_eval(cli, classifier_run, tmp_path):
    out = tmp_path / "pruned"
    result = cli("prune", "--checkpoint", classifier_run, "--method", "structured", "--sparsity", "0.5",
                 "--out", out, "--recover-steps", "3", "--eval", "--quiet", "--device", "cpu")
    assert result.code == 0, result
    report = json.loads((out / "pruning.json").read_text())
    assert report["importance"] == "taylor"  # the run's data was found through its config.yaml
    assert report["head_units"] == {"kind": "attention heads", "before": 4, "after": 2, "removed_fraction": 0.5}
    assert report["channels"]["after"] == 8
    assert report["params"]["after"] < report["params"]["before"]
    assert report["size_bytes"]["after"] < report["size_bytes"]["before"]
    assert report["recovery"]["steps"] == 3
    assert set(report["quality"]["after"]) >= {"accuracy", "f1_macro"} and report["quality"]["after"]["n"] == 12
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["head_dim"], config["intermediate_size"]) == (2, 8, 8)
    info = json.loads((out / "info.json").read_text())
    assert info["task"] == "text-classification" and "test_accuracy" not in info  # stale metric moved aside
    assert (out / "tokenizer.json").is_file()
    # the normal tools read it unchanged
    predicted = cli("predict", "--checkpoint", out, "--text", "the film was great", "--device", "cpu")
    assert predicted.code == 0, predicted
    assert json.loads(predicted.out)["label"] in LABELS
    # Hugging Face's BERT has no head_dim: converting would write a model that cannot load.
    converted = cli("convert", "to-hf", out, tmp_path / "hf")
    assert converted.code == 2 and "structurally pruned" in converted.err and not (tmp_path / "hf").exists()


def test_cli_magnitude_gpt_recovery_keeps_the_zeros(cli, gpt_checkpoint, tiny_data_dir, tmp_path):
    out = tmp_path / "sparse"
    result = cli("prune", "--checkpoint", gpt_checkpoint, "--sparsity", "0.5", "--out", out, "--data",
                 tiny_data_dir, "--recover-steps", "3", "--batch-size", "4", "--eval", "--quiet", "--device", "cpu")
    assert result.code == 0, result
    report = json.loads((out / "pruning.json").read_text())
    assert report["sparsity_achieved"] == pytest.approx(0.5, abs=1e-3)
    assert report["recovery"]["steps"] == 3
    assert report["quality"]["before"]["split"] == "val" and "loss" in report["quality"]["after"]
    assert report["size_bytes"]["sparse_format_estimate"] < report["size_bytes"]["after"]
    state = load_file(str(out / "model.safetensors"))
    w = state["transformer.h.0.attn.c_attn.weight"]
    assert int((w == 0).sum()) == w.numel() // 2  # recovery trained, yet the zeros stayed zero
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    generated = cli("generate", "--checkpoint", out, "--prompt", "The", "--max-new-tokens", "5", "--device", "cpu")
    assert generated.code == 0, generated


def test_cli_magnitude_classifier_recovery_trains_but_keeps_the_zeros(cli, classifier_run, tmp_path):
    """BERT reads q/k/v weights directly (one fused matmul): the zeros must survive that too."""
    out = tmp_path / "sparse"
    result = cli("prune", "--checkpoint", classifier_run, "--sparsity", "0.5", "--out", out, "--recover-steps", "2",
                 "--quiet", "--device", "cpu")
    assert result.code == 0, result
    pruned_only = load_model(classifier_run)
    magnitude_prune(pruned_only, 0.5)
    expected = pruned_only.state_dict()
    state = load_file(str(out / "model.safetensors"))
    for name in ("layers.0.attn.query.weight", "layers.1.attn.value.weight", "layers.0.mlp.fc.weight", "classifier.weight"):
        zeros = state[name] == 0
        assert torch.equal(zeros, expected[name] == 0), name  # same zeros as without recovery
        assert not torch.equal(state[name][~zeros], expected[name][~zeros]), name  # and the rest was trained


def test_cli_structured_gpt_reloads_smaller(cli, gpt_checkpoint, tmp_path):
    out = tmp_path / "small"
    result = cli("prune", "--checkpoint", gpt_checkpoint, "--method", "structured", "--sparsity", "0.5",
                 "--gqa", "groups", "--out", out, "--quiet")
    assert result.code == 0, result
    report = json.loads((out / "pruning.json").read_text())
    assert report["importance"] == "weight"  # no data for taylor: weight norms, as "auto" allows
    model = load_model(out)
    assert (model.config.n_head, model.config.n_kv_head, model.config.intermediate_size) == (2, 1, 12)


@pytest.mark.parametrize("method", ["magnitude", "structured"])
def test_sparsity_zero_is_a_no_op(cli, gpt_checkpoint, tmp_path, method):
    out = tmp_path / "same"
    result = cli("prune", "--checkpoint", gpt_checkpoint, "--method", method, "--sparsity", "0", "--out", out,
                 "--quiet")
    assert result.code == 0, result
    assert json.loads((out / "config.json").read_text()) == json.loads((gpt_checkpoint / "config.json").read_text())
    before, after = load_file(str(gpt_checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_bad_input(cli, one_line_error, gpt_checkpoint, classifier_run, tmp_path):
    from fromzero.models.cnn import CNNConfig, build_from_config

    out = tmp_path / "out"
    common = ["prune", "--checkpoint", gpt_checkpoint, "--out", out]
    one_line_error(cli(*common, "--sparsity", "1"), "sparsity must be in [0, 1)")
    one_line_error(cli(*common, "--sparsity", "-0.1"), "sparsity must be in [0, 1)")
    one_line_error(cli(*common, "--sparsity", "nan"), "sparsity must be in [0, 1)")
    one_line_error(cli(*common, "--sparsity", "0.5", "--method", "lottery"), "unknown method 'lottery'")
    one_line_error(cli(*common, "--sparsity", "0.8", "--method", "structured"),
                   "would remove all 2 query heads of each key/value group")
    one_line_error(cli("prune", "--checkpoint", classifier_run, "--out", out, "--sparsity", "0.9",
                       "--method", "structured", "--importance", "weight"), "would remove all 4 attention heads")
    one_line_error(cli(*common, "--sparsity", "0.5", "--eval"), "--eval needs data: pass --data DIR")
    one_line_error(cli("prune", "--checkpoint", classifier_run, "--out", out, "--sparsity", "0.5", "--recover-steps",
                       "2", "--data", tmp_path / "missing.csv"), "not found")
    one_line_error(cli("prune", "--checkpoint", tmp_path / "nope", "--out", out, "--sparsity", "0.5"),
                   "checkpoint directory not found")
    cnn = tmp_path / "cnn"
    config = CNNConfig(num_classes=3, in_channels=1).to_dict()
    save_checkpoint(cnn, build_from_config(config), config, info={"task": "image-classification"})
    one_line_error(cli("prune", "--checkpoint", cnn, "--out", out, "--sparsity", "0.5", "--method", "structured"),
                   "structured pruning supports fromzero-bert and fromzero-gpt checkpoints, not 'fromzero-cnn'")
    one_line_error(cli("prune", "--checkpoint", cnn, "--out", out, "--sparsity", "0.5", "--eval"),
                   "--eval works on text classifiers and GPT language models")
    assert not out.exists()  # nothing was written by any of them
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(cli(*common, "--sparsity", "0.5"), "already exists; pass --force")
    assert (out / "keep.txt").read_text() == "mine"
    # magnitude works on a CNN (its Conv and Linear layers), and --force replaces the directory
    assert cli("prune", "--checkpoint", cnn, "--out", out, "--sparsity", "0.5", "--force", "--quiet").code == 0
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "pruning.json").read_text())["pruned_layers"] == 4
