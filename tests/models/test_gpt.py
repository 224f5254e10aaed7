"""Tests for the GPT model (fromzero.models.gpt): shapes, loss, init, KV cache, generation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fromzero.models.gpt import GPT, GPTConfig, sample_next_token

V, BS = 17, 16  # tiny vocabulary and block size


def tiny_config(**kw) -> GPTConfig:
    base = dict(vocab_size=V, block_size=BS, n_layer=2, n_head=2, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


def tiny_model(seed: int = 0, sharpen: float = 1.0, **kw) -> GPT:
    """A tiny GPT in eval mode; ``sharpen`` scales the (tied) embedding to peak the logits."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**kw))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(sharpen)
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # non-zero biases so they take part in every check
                p.normal_(0.0, 0.02)
    return model.eval()


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


# ----------------------------------------------------------------------------------------
# Config


def test_config_validate_errors() -> None:
    tiny_config().validate()
    cases = [
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(n_layer=0), "n_layer must be positive"),
        (dict(n_head=0), "n_head must be positive"),
        (dict(vocab_size=0), "vocab_size must be positive"),
        (dict(block_size=-1), "block_size must be positive"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            tiny_config(**kw).validate()
    with pytest.raises(ValueError, match="divisible"):
        GPT(tiny_config(n_embd=30, n_head=4))


def test_config_dict_round_trip() -> None:
    cfg = tiny_config(dropout=0.25, bias=False)
    d = cfg.to_dict()
    assert d["model_type"] == "fromzero-gpt"
    assert d["n_embd"] == 32 and d["bias"] is False and d["dropout"] == 0.25
    assert GPTConfig.from_dict(d) == cfg
    # Unknown keys (model_type, keys written by newer versions) are ignored.
    assert GPTConfig.from_dict({**d, "something_new": 1}) == cfg
    assert GPTConfig.from_dict({"n_layer": 3}) == GPTConfig(n_layer=3)


# ----------------------------------------------------------------------------------------
# Structure and initialisation


def test_config_reads_the_old_rope_scaling_key() -> None:
    """config.json says rope_scaling_type (transformers owns "rope_scaling"); older checkpoints
    said rope_scaling and still load."""
    c = tiny_config(pos_embedding="rope", rope_scaling="linear", rope_scaling_factor=2.0)
    d = c.to_dict()
    assert d["rope_scaling_type"] == "linear" and "rope_scaling" not in d
    old = dict(d)
    old["rope_scaling"] = old.pop("rope_scaling_type")
    assert GPTConfig.from_dict(old) == GPTConfig.from_dict(d) == c


def test_output_shapes() -> None:
    model = tiny_model()
    idx = tokens(3, 11)
    logits, loss = model(idx)
    assert logits.shape == (3, 11, V) and loss is None
    logits, loss = model(idx, last_only=True)
    assert logits.shape == (3, 1, V) and loss is None
    logits, loss = model(idx, targets=tokens(3, 11, seed=1))
    assert logits.shape == (3, 11, V) and loss.shape == ()


def test_last_only_equals_last_position_of_full_logits() -> None:
    model = tiny_model()
    idx = tokens(2, 9)
    with torch.no_grad():
        full, _ = model(idx)
        last, _ = model(idx, last_only=True)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_loss_equals_manual_cross_entropy() -> None:
    model = tiny_model(sharpen=5.0)
    idx, targets = tokens(2, 10), tokens(2, 10, seed=1)
    logits, loss = model(idx, targets)
    logp = torch.log_softmax(logits.double(), dim=-1)
    manual = -logp.gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss.double(), manual, atol=1e-6, rtol=1e-6)
    # -100 targets are ignored: the mean runs over the others only.
    targets[0, :4] = -100
    targets[1, 7] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    manual = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(loss.double(), manual, atol=1e-6, rtol=1e-6)


def test_target_logits_only_gives_same_loss_and_gradients() -> None:
    """The reply-only head (chat SFT) returns the logits of the target positions and the same
    loss and gradients as the full head; with no target at all the loss is a zero in the graph."""
    idx, targets = tokens(3, 12), tokens(3, 12, seed=2)
    targets[:, :9] = -100  # a prompt of 9 tokens, a reply of 3
    targets[2, 10] = -100
    full, sparse = tiny_model(sharpen=3.0).train(), tiny_model(sharpen=3.0).train()
    logits, loss = full(idx, targets)
    part, loss_part = sparse(idx, targets, target_logits_only=True)
    keep = targets != -100
    assert part.shape == (int(keep.sum()), V)
    torch.testing.assert_close(part, logits[keep], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss_part, loss, atol=1e-6, rtol=1e-6)
    loss.backward()
    loss_part.backward()
    for (name, a), (_, b) in zip(full.named_parameters(), sparse.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)
    none, zero = sparse(idx, torch.full_like(targets, -100), target_logits_only=True)
    assert none.shape == (0, V) and float(zero.detach()) == 0.0 and zero.requires_grad


def test_sequence_longer_than_block_size_raises() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(1, BS + 1))


def test_gpt2_parameter_names_and_shapes() -> None:
    model = tiny_model()
    state = model.state_dict()
    expected = {
        "transformer.wte.weight": (V, 32),
        "transformer.wpe.weight": (BS, 32),
        "transformer.h.0.ln_1.weight": (32,),
        "transformer.h.0.attn.c_attn.weight": (96, 32),
        "transformer.h.0.attn.c_attn.bias": (96,),
        "transformer.h.0.attn.c_proj.weight": (32, 32),
        "transformer.h.0.ln_2.bias": (32,),
        "transformer.h.0.mlp.c_fc.weight": (128, 32),
        "transformer.h.0.mlp.c_proj.weight": (32, 128),
        "transformer.h.1.mlp.c_proj.bias": (32,),
        "transformer.ln_f.weight": (32,),
        "transformer.ln_f.bias": (32,),
        "lm_head.weight": (V, 32),
    }
    for name, shape in expected.items():
        assert name in state, name
        assert tuple(state[name].shape) == shape, name
    assert "transformer.h.2.ln_1.weight" not in state
    assert model.lm_head.bias is None


def test_lm_head_is_tied_to_token_embedding() -> None:
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # counted once
    with torch.no_grad():
        model.transformer.wte.weight[3].fill_(0.5)
    assert torch.all(model.lm_head.weight[3] == 0.5)


def test_init_statistics() -> None:
    torch.manual_seed(0)
    n_layer = 4
    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=n_layer, n_head=4, n_embd=256))
    proj_std = 0.02 / math.sqrt(2 * n_layer)
    seen_proj = 0
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            seen_proj += 1
            assert abs(p.std().item() - proj_std) < 0.1 * proj_std, name
        elif name.endswith("weight") and p.dim() == 2:
            assert abs(p.std().item() - 0.02) < 0.002, name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # LayerNorm gains
            assert torch.all(p == 1), name
        if p.dim() == 2:
            assert abs(p.mean().item()) < 0.002, name
    assert seen_proj == 2 * n_layer


def _expected_params(V: int, BS: int, L: int, C: int, bias: bool) -> tuple[int, int]:
    b = 1 if bias else 0
    ln = C + b * C
    per_block = 2 * ln + (3 * C * C + b * 3 * C) + (C * C + b * C) + (4 * C * C + b * 4 * C) + (
        4 * C * C + b * C
    )
    total = V * C + BS * C + L * per_block + ln
    return total, total - BS * C


@pytest.mark.parametrize("bias", [True, False])
def test_num_params(bias: bool) -> None:
    model = tiny_model(bias=bias)
    total, non_emb = _expected_params(V, BS, 2, 32, bias)
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == non_emb
    assert sum(p.numel() for p in model.parameters()) == total


def test_no_bias_variant_has_no_biases() -> None:
    model = tiny_model(bias=False)
    names = [n for n, _ in model.named_parameters()]
    assert not any("bias" in n for n in names), names
    assert model.transformer.ln_f.bias is None
    assert model.transformer.h[0].attn.c_attn.bias is None
    logits, loss = model(tokens(2, 5), tokens(2, 5, seed=1))
    assert logits.shape == (2, 5, V) and torch.isfinite(loss)


def test_causality() -> None:
    model = tiny_model(sharpen=5.0)
    idx = tokens(2, 12)
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % V
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)
    for t in range(7, 12):  # every later position sees the change
        assert not torch.allclose(a[:, t], b[:, t], atol=1e-4)


def test_dropout_only_changes_training_mode_outputs() -> None:
    model = tiny_model(dropout=0.3)
    idx = tokens(2, 10)
    with torch.no_grad():
        model.train()
        a, _ = model(idx)
        b, _ = model(idx)
        assert not torch.allclose(a, b)
        model.eval()
        c, _ = model(idx)
        d, _ = model(idx)
        torch.testing.assert_close(c, d, atol=0, rtol=0)
        # In eval mode the model equals the same weights without dropout.
        plain = GPT(dataclasses.replace(model.config, dropout=0.0)).eval()
        plain.load_state_dict(model.state_dict())
        e, _ = plain(idx)
        torch.testing.assert_close(c, e)


def test_bf16_autocast_forward_on_cpu() -> None:
    model = tiny_model(sharpen=5.0)
    idx, targets = tokens(2, 12), tokens(2, 12, seed=1)
    ref, ref_loss = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), ref, atol=0.15, rtol=0.05)
    assert abs(loss.item() - ref_loss.item()) < 0.05


def test_bf16_training_gradients_close_to_fp32() -> None:
    model = tiny_model(sharpen=5.0).train()
    idx, targets = tokens(4, 16), tokens(4, 16, seed=1)

    def grads(enabled: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            _, loss = model(idx, targets)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g32, g16 = grads(False), grads(True)
    for name in g32:
        rel = (g16[name] - g32[name]).norm() / (g32[name].norm() + 1e-12)
        assert rel < 0.1, f"{name}: relative gradient error {rel:.3f}"


# ----------------------------------------------------------------------------------------
# KV cache


def test_new_kv_cache_geometry() -> None:
    model = tiny_model()
    cache = model.new_kv_cache(3)
    assert cache.length == 0 and cache.max_len == BS
    assert len(cache.keys) == 2 and len(cache.values) == 2
    assert cache.keys[0].shape == (3, 2, BS, 16)
    assert cache.keys[0].dtype == model.transformer.wte.weight.dtype


@pytest.mark.parametrize("prefill", [1, 5])
def test_cached_forward_matches_full_forward(prefill: int) -> None:
    model = tiny_model(sharpen=5.0)
    idx = tokens(3, BS)
    cache = model.new_kv_cache(3)
    with torch.no_grad():
        logits, _ = model(idx[:, :prefill], kv_cache=cache, last_only=True)
        assert cache.length == prefill
        full, _ = model(idx[:, :prefill])
        torch.testing.assert_close(logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
        for t in range(prefill, BS):
            logits, _ = model(idx[:, t : t + 1], kv_cache=cache, last_only=True)
            assert logits.shape == (3, 1, V)
            full, _ = model(idx[:, : t + 1])
            torch.testing.assert_close(logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
        assert cache.length == BS


def test_cached_forward_in_chunks_matches_full_forward() -> None:
    model = tiny_model(sharpen=5.0)
    idx = tokens(2, 14)
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        full, _ = model(idx)
        parts = [model(idx[:, lo:hi], kv_cache=cache)[0] for lo, hi in [(0, 6), (6, 10), (10, 14)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cached_forward_past_block_size_raises() -> None:
    model = tiny_model()
    cache = model.new_kv_cache(1)
    with torch.no_grad():
        model(tokens(1, BS - 1), kv_cache=cache)
        model(tokens(1, 1), kv_cache=cache)
        with pytest.raises(ValueError, match="block_size"):
            model(tokens(1, 1), kv_cache=cache)


# ----------------------------------------------------------------------------------------
# Generation


def _generate(model: GPT, idx: torch.Tensor, use_cache: bool, seed: int | None = None, **kw):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return model.generate(idx, generator=g, use_cache=use_cache, **kw)


@pytest.mark.parametrize(
    "B,T,new",
    [
        (1, 4, 8),  # stays within block_size
        (3, 10, 20),  # prompt + new tokens exceed block_size: crop path
        (2, BS, 3),  # prompt exactly block_size
        (2, BS + 7, 6),  # prompt longer than block_size
    ],
)
def test_generate_greedy_cache_equals_no_cache(B: int, T: int, new: int) -> None:
    model = tiny_model(seed=1, sharpen=5.0)
    idx = tokens(B, T, seed=2)
    a = _generate(model, idx, True, max_new_tokens=new, temperature=0.0)
    b = _generate(model, idx, False, max_new_tokens=new, temperature=0.0)
    assert a.shape == (B, T + new)
    assert torch.equal(a[:, :T], idx)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "B,T,new", [(1, 4, 8), (3, 10, 20), (2, BS + 7, 6)]
)
@pytest.mark.parametrize("top_k,top_p", [(None, None), (8, None), (None, 0.9), (8, 0.8)])
def test_generate_sampling_cache_equals_no_cache(B, T, new, top_k, top_p) -> None:
    model = tiny_model(seed=1, sharpen=3.0)
    idx = tokens(B, T, seed=2)
    kw = dict(max_new_tokens=new, temperature=0.9, top_k=top_k, top_p=top_p)
    a = _generate(model, idx, True, seed=123, **kw)
    b = _generate(model, idx, False, seed=123, **kw)
    assert torch.equal(a, b)
    if new >= 8:  # a sampled continuation is not one repeated token
        assert len(set(a[:, T:].flatten().tolist())) >= 3


def test_ngram_index_drafts_what_followed_the_latest_earlier_match() -> None:
    from fromzero.models.gpt import NgramIndex

    seq = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    index = NgramIndex(seq)
    # The tail (2, 3) [and (5, 2, 3)] occurred before; the latest earlier "2 3" is followed by 7 8.
    assert index.draft(seq, 3) == [7, 8, 5]
    seq.append(4)  # a token never seen: no draft, not even from its own occurrence
    index.add(seq)
    assert index.draft(seq, 3) == []
    seq += [1, 2, 3]  # the longest match wins: (1, 2, 3) last seen at 4..6 -> 7, 8
    index.add(seq)
    assert index.draft(seq, 2) == [7, 8] and index.draft(seq, 0) == []


@pytest.mark.parametrize("T,new,lookup", [(6, 40, 8), (6, 9, 3), (BS - 12, 12, 4), (1, 30, 1)])
def test_generate_with_prompt_lookup_gives_the_greedy_tokens(T: int, new: int, lookup: int) -> None:
    """Prompt-lookup drafts change how many positions a pass computes, never the tokens; a
    tiny greedy model falls into a loop, so drafts get accepted and passes are saved."""
    model = tiny_model(seed=4, sharpen=6.0, block_size=64)
    idx = tokens(1, T, seed=5)
    plain = model.generate(idx, new, temperature=0.0, lookup_tokens=0)
    passes = [0]
    forward = model.forward

    def counted(*args, **kwargs):
        passes[0] += 1
        return forward(*args, **kwargs)

    model.forward = counted
    fast = model.generate(idx, new, temperature=0.0, lookup_tokens=lookup)
    assert torch.equal(fast, plain) and fast.shape == (1, T + new)
    if new >= 30:
        assert passes[0] < new  # some drafts were accepted
    # An eos inside an accepted draft ends the sequence there, as plain decoding does.
    eos = int(plain[0, T + new // 2])
    first = T + plain[0, T:].tolist().index(eos)
    stopped = model.generate(idx, new, temperature=0.0, eos_id=eos, lookup_tokens=lookup)
    assert torch.equal(stopped, plain[:, : first + 1])


def test_generate_seed_reproducibility() -> None:
    model = tiny_model(seed=1, sharpen=3.0)
    idx = tokens(2, 3)
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=10)
    a = _generate(model, idx, True, seed=7, **kw)
    b = _generate(model, idx, True, seed=7, **kw)
    c = _generate(model, idx, True, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_greedy_ignores_generator() -> None:
    model = tiny_model(seed=1, sharpen=3.0)
    idx = tokens(2, 3)
    a = _generate(model, idx, True, seed=7, max_new_tokens=6, temperature=0.0)
    b = _generate(model, idx, True, seed=8, max_new_tokens=6, temperature=0.0)
    assert torch.equal(a, b)
    with torch.no_grad():  # and the first new token is the argmax of the next-token logits
        logits, _ = model(idx)
    assert torch.equal(a[:, 3], logits[:, -1].argmax(-1))


def test_generate_restores_training_mode_and_validates_input() -> None:
    model = tiny_model(dropout=0.2).train()
    out = model.generate(tokens(1, 3), max_new_tokens=2)
    assert model.training and out.shape == (1, 5)
    model.eval()
    model.generate(tokens(1, 3), max_new_tokens=2)
    assert not model.training
    with pytest.raises(ValueError):
        model.generate(tokens(1, 3)[0], max_new_tokens=2)
    with pytest.raises(ValueError):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    idx = tokens(2, 4)
    assert torch.equal(model.generate(idx, max_new_tokens=0), idx)


EOS = 0


def _scripted(model: GPT, script: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ``model`` emit ``script[row][step]`` as the argmax at each call; count calls."""
    calls = [0]

    def fake_forward(idx, targets=None, kv_cache=None, last_only=False):
        step = calls[0]
        calls[0] += 1
        logits = torch.zeros(idx.size(0), 1, V)
        for r, row in enumerate(script):
            logits[r, 0, row[step]] = 10.0
        return logits, None

    monkeypatch.setattr(model, "forward", fake_forward)
    return calls


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_eos_pads_rows_and_stops_when_all_finished(
    use_cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model()
    script = [
        [3, EOS, 5, 6, 7, 8, 9, 10],  # finishes at step 1, then would continue: padded
        [4, 4, 4, EOS, 11, 12, 13, 14],
        [1, 2, 3, 4, 5, EOS, 6, 7],  # the last to finish
    ]
    calls = _scripted(model, script, monkeypatch)
    idx = tokens(3, 2)
    out = model.generate(idx, max_new_tokens=8, temperature=0.0, eos_id=EOS, use_cache=use_cache)
    assert out[:, 2:].tolist() == [
        [3, EOS, EOS, EOS, EOS, EOS],
        [4, 4, 4, EOS, EOS, EOS],
        [1, 2, 3, 4, 5, EOS],
    ]
    assert calls[0] == 6  # stopped as soon as every row had finished


def test_generate_without_eos_id_runs_to_max_new_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    script = [[3, EOS, 5, 6], [EOS, 4, 4, 4]]
    calls = _scripted(model, script, monkeypatch)
    out = model.generate(tokens(2, 2), max_new_tokens=4, temperature=0.0)
    assert out[:, 2:].tolist() == script and calls[0] == 4


def test_generate_eos_with_real_model() -> None:
    model = tiny_model(seed=3)
    eos = 5
    with torch.no_grad():
        # Final LayerNorm outputs a constant vector pointing at wte[eos]: eos is the argmax.
        w = model.transformer.wte.weight
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(w[eos] / w[eos].norm() ** 2 * 50.0)
        logits, _ = model(tokens(2, 4))
    assert torch.all(logits.argmax(-1) == eos)
    idx = tokens(2, 4)
    out = model.generate(idx, max_new_tokens=10, temperature=0.0, eos_id=eos)
    assert out.shape == (2, 5) and torch.all(out[:, -1] == eos)
    out = model.generate(idx, max_new_tokens=10, temperature=0.0)
    assert out.shape == (2, 14) and torch.all(out[:, 4:] == eos)


# ----------------------------------------------------------------------------------------
# sample_next_token


def test_sample_temperature_zero_is_argmax() -> None:
    logits = torch.randn(5, V)
    assert torch.equal(sample_next_token(logits, temperature=0.0), logits.argmax(-1))
    # top_k / top_p do not matter for greedy decoding.
    assert torch.equal(sample_next_token(logits, 0.0, top_k=3, top_p=0.5), logits.argmax(-1))


def test_sample_top_k_one_is_argmax() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, V, generator=g)
    out = sample_next_token(logits, temperature=1.5, top_k=1, generator=g)
    assert out.dtype == torch.int64 and out.shape == (200,)
    assert torch.equal(out, logits.argmax(-1))


def test_sample_top_k_keeps_only_k_most_likely() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0, 2.9]]).repeat(4000, 1)
    out = sample_next_token(logits, 1.0, top_k=3, generator=g)
    assert set(out.tolist()) == {1, 3, 5}


def test_sample_tiny_top_p_keeps_only_top_token() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, V, generator=g)
    out = sample_next_token(logits, 1.0, top_p=1e-6, generator=g)
    assert torch.equal(out, logits.argmax(-1))


def test_sample_top_p_keeps_minimal_set_reaching_p() -> None:
    g = torch.Generator().manual_seed(0)
    n = 6000
    # Probabilities 0.10, 0.50, 0.15, 0.25 in a shuffled order (checks the un-sorting).
    probs = torch.tensor([0.10, 0.50, 0.15, 0.25])
    logits = probs.log()[None].repeat(n, 1)
    # 0.5 < 0.7 <= 0.5 + 0.25: the top two tokens (1 and 3) form the nucleus.
    out = sample_next_token(logits, 1.0, top_p=0.7, generator=g)
    counts = torch.bincount(out, minlength=4)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1].item() / n - 2 / 3) < 0.03  # renormalised: 0.5 / 0.75
    # 0.75 < 0.85 <= 0.9: the three most likely tokens; the least likely never appears.
    out = sample_next_token(logits, 1.0, top_p=0.85, generator=g)
    assert set(out.tolist()) == {1, 2, 3}
    # p = 1 (or None) keeps everything.
    out = sample_next_token(logits, 1.0, top_p=1.0, generator=g)
    assert set(out.tolist()) == {0, 1, 2, 3}


def test_sample_top_p_per_row() -> None:
    g = torch.Generator().manual_seed(1)
    row_a = torch.tensor([0.6, 0.3, 0.1]).log()  # p=0.5 -> only token 0
    row_b = torch.tensor([0.2, 0.2, 0.6]).log()  # p=0.5 -> only token 2
    logits = torch.stack([row_a, row_b]).repeat(1000, 1)
    out = sample_next_token(logits, 1.0, top_p=0.5, generator=g).view(1000, 2)
    assert torch.all(out[:, 0] == 0) and torch.all(out[:, 1] == 2)


def test_sample_distribution_follows_temperature() -> None:
    g = torch.Generator().manual_seed(2)
    n = 20000
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(n, 1)  # p = 0.25, 0.75
    freq = sample_next_token(logits, 1.0, generator=g).float().mean().item()
    assert abs(freq - 0.75) < 0.02
    # temperature 2 -> p proportional to sqrt(1), sqrt(3): 0.634 for token 1
    freq = sample_next_token(logits, 2.0, generator=g).float().mean().item()
    assert abs(freq - math.sqrt(3) / (1 + math.sqrt(3))) < 0.02


def test_sample_negative_temperature_raises() -> None:
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(torch.randn(1, V), temperature=-0.5)
    model = tiny_model()
    with pytest.raises(ValueError, match="temperature"):
        model.generate(tokens(1, 2), max_new_tokens=1, temperature=-1.0)


def test_sample_seeded_generator_is_reproducible() -> None:
    logits = torch.randn(8, V)
    a = sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(4))
    b = sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < V


def test_generate_cache_holds_only_the_positions_it_can_fill(monkeypatch: pytest.MonkeyPatch) -> None:
    """Zeroing a block_size cache of a big model costs more than many decoding steps."""
    model = tiny_model(seed=1, sharpen=5.0)
    sizes: list[int | None] = []
    real = model.new_kv_cache

    def spy(batch_size: int, max_len: int | None = None):
        sizes.append(max_len)
        return real(batch_size, max_len)

    monkeypatch.setattr(model, "new_kv_cache", spy)
    idx = tokens(2, 3)
    a = model.generate(idx, max_new_tokens=5, temperature=0.0)
    b = model.generate(tokens(2, 10), max_new_tokens=20, temperature=0.0)  # crosses block_size
    model.generate(idx, max_new_tokens=0)
    assert sizes == [8, BS]
    assert torch.equal(a, model.generate(idx, max_new_tokens=5, temperature=0.0, use_cache=False))
    assert torch.equal(b, model.generate(tokens(2, 10), max_new_tokens=20, temperature=0.0, use_cache=False))


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(style: str) -> None:
    """Recomputing blocks in backward (with dropout on: the RNG state is replayed) changes memory, not maths."""
    extra = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False) if style == "llama" else {}
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=0.1, **extra)
    idx = torch.randint(0, 50, (4, 16))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(config).train()
        model.activation_checkpointing = checkpointing
        torch.manual_seed(1)
        _, loss = model(idx, idx)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-6, atol=1e-7, msg=name)
