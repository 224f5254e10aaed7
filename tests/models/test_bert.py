"""Tests for the BERT encoder (fromzero.models.bert): config, shapes, padding, heads, losses,
and ``embed_checkpoint`` on a tiny word-piece tokenizer.

Parity with Hugging Face's BertModel / BertFor* lives in test_convert_bert.py; real MiniLM
weights in tests/e2e/test_embed.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fromzero.errors import FromzeroError
from fromzero.models import build_model
from fromzero.models.bert import Bert, BertConfig, embed_checkpoint, mean_pool
from fromzero.checkpoint import load_model, save_checkpoint

V, C, L, H = 40, 32, 2, 4
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "big", "small", "red", "blue",
         "and", "is", "was", "it", "he", "she", "##s", "##ed", "##ing", "river", "mill", "wheel", "snow",
         "ice", "door", "."]


def tiny_config(**kw) -> BertConfig:
    base = dict(vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=H, intermediate_size=37,
                max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return BertConfig(**base)


def tiny_model(seed: int = 0, **kw) -> Bert:
    torch.manual_seed(seed)
    model = Bert(tiny_config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # off their init so every one takes part
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded random ids (B, T), the 1/0 mask and token types (second half of each row = 1)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(5, V, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    types = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        types[i, n // 2 : n] = 1
        ids[i, n:] = 0
    return ids, mask, types


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(hidden_size=30, num_attention_heads=4), "divisible"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(hidden_act="mish"), "hidden_act must be one of"),
        (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob"),
        (dict(head="span"), "head must be one of"),
        (dict(pooling="max"), "pooling must be one of"),
        (dict(pad_token_id=V), "pad_token_id"),
        (dict(head="classification", pooler=False), "pooler"),
        (dict(head="classification", num_labels=0), "num_labels"),
        (dict(head="classification", num_labels=3, labels=["a", "b"]), "labels"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    ],
)
def test_config_validate_errors(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        tiny_config(**kw).validate()


def test_config_round_trip_and_registry() -> None:
    cfg = tiny_config(head="classification", num_labels=3, labels=["neg", "neu", "pos"])
    d = cfg.to_dict()
    assert d["model_type"] == "fromzero-bert"
    assert json.loads(json.dumps(d)) == d  # plain JSON
    assert BertConfig.from_dict({**d, "unknown_field": 1}) == cfg
    model = build_model(d)
    assert isinstance(model, Bert) and model.classifier is not None and model.classifier.out_features == 3
    with pytest.raises(FromzeroError, match="invalid fromzero-bert config: .*divisible"):
        build_model({**d, "hidden_size": 30})


# ---------------------------------------------------------------------------------------------
# Shapes, heads, padding


@pytest.mark.parametrize("head, shape", [("none", (3, 7, C)), ("embedding", (3, C)),
                                         ("classification", (3, 2)), ("mlm", (3, 7, V))])
def test_head_output_shapes(head: str, shape: tuple[int, ...]) -> None:
    model = tiny_model(head=head, pooler=head != "mlm")
    ids, mask, types = batch([7, 5, 2])
    out, loss = model(ids, mask, types)
    assert tuple(out.shape) == shape and loss is None
    assert torch.isfinite(out).all()
    if head == "embedding":
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_parameter_names_are_the_documented_ones() -> None:
    names = set(tiny_model(head="mlm").state_dict())
    for n in ("embeddings.word.weight", "embeddings.position.weight", "embeddings.token_type.weight",
              "embeddings.norm.weight", "layers.1.attn.query.weight", "layers.1.attn.out.bias",
              "layers.1.attn_norm.weight", "layers.1.mlp.fc.weight", "layers.1.mlp.proj.weight",
              "layers.1.mlp_norm.bias", "pooler.dense.weight", "mlm_head.dense.weight", "mlm_head.norm.bias",
              "mlm_head.decoder.bias"):
        assert n in names, n


def test_mlm_decoder_is_tied_and_stored_once(tmp_path: Path) -> None:
    model = tiny_model(head="mlm", pooler=False)
    assert model.mlm_head.decoder.weight is model.embeddings.word.weight
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))
    save_checkpoint(tmp_path / "ck", model, model.config.to_dict())
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert "mlm_head.decoder.weight" not in stored and "embeddings.word.weight" in stored
    loaded = load_model(tmp_path / "ck")
    assert loaded.mlm_head.decoder.weight is loaded.embeddings.word.weight
    ids, mask, types = batch([6, 3])
    torch.testing.assert_close(loaded(ids, mask, types)[0], model(ids, mask, types)[0], atol=0, rtol=0)


def test_padding_does_not_change_real_tokens() -> None:
    """Each sequence alone (no padding) == its rows inside a padded batch."""
    model = tiny_model(head="embedding")
    ids, mask, types = batch([9, 4, 1, 6], seed=1)
    hidden = model.encode(ids, mask, types)
    emb, _ = model(ids, mask, types)
    for i, n in enumerate(mask.sum(1).tolist()):
        alone = model.encode(ids[i : i + 1, :n], None, types[i : i + 1, :n])
        torch.testing.assert_close(hidden[i : i + 1, :n], alone, atol=1e-5, rtol=1e-4)
        alone_emb, _ = model(ids[i : i + 1, :n], torch.ones(1, n, dtype=torch.long), types[i : i + 1, :n])
        torch.testing.assert_close(emb[i : i + 1], alone_emb, atol=1e-5, rtol=1e-4)


def test_skip_padding_computes_the_same_real_tokens() -> None:
    model = tiny_model(head="classification")
    ids, mask, types = batch([9, 4, 1, 6], seed=2)
    mask[2] = 0  # and one row that is all padding
    dense = model.encode(ids, mask, types)
    packed = model.encode(ids, mask, types, skip_padding=True)
    real = mask.bool()
    torch.testing.assert_close(packed[real], dense[real], atol=1e-5, rtol=1e-4)
    assert packed[~real].abs().max() == 0  # padded positions: zeros, never computed
    torch.testing.assert_close(model(ids, mask, types)[0][[0, 1, 3]], model.classifier(model.pool(dense))[[0, 1, 3]],
                               atol=1e-5, rtol=1e-4)


def test_all_ones_mask_equals_no_mask() -> None:
    model = tiny_model()
    ids, _, types = batch([8, 8])
    torch.testing.assert_close(model.encode(ids, torch.ones_like(ids), types), model.encode(ids, None, types))


def test_token_types_and_positions_matter() -> None:
    model = tiny_model()
    ids, mask, types = batch([8])
    base = model.encode(ids, mask, types)
    assert not torch.allclose(base, model.encode(ids, mask, torch.zeros_like(types)))
    assert not torch.allclose(base[:, 1:], model.encode(ids[:, 1:], mask[:, 1:], types[:, 1:]))


def test_fully_padded_row_is_finite_and_embeds_to_zero() -> None:
    model = tiny_model(head="embedding")
    ids, mask, types = batch([5, 3])
    mask[1] = 0
    hidden = model.encode(ids, mask, types)
    emb, _ = model(ids, mask, types)
    assert torch.isfinite(hidden).all() and torch.isfinite(emb).all()
    torch.testing.assert_close(emb[1], torch.zeros(C))
    torch.testing.assert_close(emb[0], model(ids[:1, :5], mask[:1, :5], types[:1, :5])[0][0], atol=1e-5, rtol=1e-4)


def test_mean_pool_and_cls_pooling() -> None:
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(mean_pool(h, m), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))
    model = tiny_model(head="embedding", pooling="cls", normalize=False)
    ids, mask, types = batch([4, 2])
    emb, _ = model(ids, mask, types)
    torch.testing.assert_close(emb, model.encode(ids, mask, types)[:, 0])


def test_sequence_longer_than_positions_is_an_error() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="longer than max_position_embeddings 24"):
        model.encode(torch.zeros(1, 25, dtype=torch.long))


def test_bf16_close_to_fp32() -> None:
    model = tiny_model(head="embedding")
    ids, mask, types = batch([7, 3])
    ref, _ = model(ids, mask, types)
    fast, _ = model.to(torch.bfloat16)(ids, mask, types)
    assert fast.dtype == torch.float32  # pooling runs in fp32
    torch.testing.assert_close(fast, ref, atol=3e-2, rtol=0)


# ---------------------------------------------------------------------------------------------
# Losses and training behaviour


def test_mlm_loss_ignores_unmasked_positions() -> None:
    model = tiny_model(head="mlm", pooler=False)
    ids, mask, types = batch([6, 4])
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 1] = 7, 9
    logits, loss = model(ids, mask, types, labels=labels)
    expected = F.cross_entropy(torch.stack([logits[0, 2], logits[1, 1]]), torch.tensor([7, 9]))
    torch.testing.assert_close(loss, expected)


def test_classification_and_regression_losses() -> None:
    model = tiny_model(head="classification", num_labels=3)
    ids, mask, types = batch([6, 4])
    y = torch.tensor([2, 0])
    logits, loss = model(ids, mask, types, labels=y)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y))
    reg = tiny_model(head="classification", num_labels=1)
    target = torch.tensor([0.5, -1.0])
    out, loss = reg(ids, mask, types, labels=target)
    torch.testing.assert_close(loss, F.mse_loss(out.squeeze(-1), target))
    with pytest.raises(ValueError, match="no loss"):
        tiny_model(head="embedding")(ids, mask, types, labels=y)


def test_backward_and_dropout() -> None:
    model = tiny_model(head="classification", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    ids, mask, types = batch([6, 4])
    model.train()
    a, loss = model(ids, mask, types, labels=torch.tensor([1, 0]))
    b, _ = model(ids, mask, types)
    assert not torch.allclose(a, b)  # dropout active
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters()), "every parameter gets a gradient"
    assert model.embeddings.word.weight.grad[0].abs().sum() == 0  # padding row stays fixed (HF)
    model.eval()
    torch.testing.assert_close(model(ids, mask, types)[0], model(ids, mask, types)[0], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# embed_checkpoint


def write_wordpiece_tokenizer(path: Path) -> dict[str, int]:
    """A tiny BERT-style tokenizer.json: lower-casing, word pieces, [CLS] ... [SEP] added."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.save(str(path))
    return vocab


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("enc")
    vocab = write_wordpiece_tokenizer(root / "tokenizer.json")
    model = tiny_model(head="embedding", vocab_size=len(vocab) + 3, max_position_embeddings=12)
    save_checkpoint(root / "ck", model, model.config.to_dict(), tokenizer_file=root / "tokenizer.json")
    return root / "ck"


TEXTS = ["The cat sat on the mat.", "Dogs ran", "a big red wheel and a small blue door", "ice", "",
         "She walked to the river and the mill was slow."]


def test_embed_checkpoint_matches_the_model_in_input_order(encoder_ckpt: Path) -> None:
    from tokenizers import Tokenizer

    vectors = embed_checkpoint(encoder_ckpt, TEXTS, batch_size=4)
    assert len(vectors) == len(TEXTS) and all(len(v) == C for v in vectors)
    model = load_model(encoder_ckpt)
    tok = Tokenizer.from_file(str(encoder_ckpt / "tokenizer.json"))
    tok.enable_truncation(12)
    for text, vec in zip(TEXTS, vectors):
        ids = tok.encode(text).ids
        assert ids[0] == 2 and ids[-1] == 3 and len(ids) <= 12  # [CLS] ... [SEP], truncated
        ref, _ = model(torch.tensor([ids]))
        torch.testing.assert_close(torch.tensor(vec), ref[0], atol=1e-5, rtol=1e-4)
    one_by_one = embed_checkpoint(encoder_ckpt, TEXTS, batch_size=1)
    torch.testing.assert_close(torch.tensor(vectors), torch.tensor(one_by_one), atol=1e-5, rtol=1e-4)
    raw = torch.tensor(embed_checkpoint(encoder_ckpt, TEXTS[:2], normalize=False))
    torch.testing.assert_close(F.normalize(raw, dim=-1), torch.tensor(vectors[:2]), atol=1e-6, rtol=1e-5)
    assert raw.norm(dim=-1).sub(1).abs().max() > 1e-3


def test_embed_checkpoint_errors(encoder_ckpt: Path, tmp_path: Path) -> None:
    from fromzero.models.gpt import GPT, GPTConfig

    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8))
    save_checkpoint(tmp_path / "gpt", gpt, gpt.config.to_dict())
    with pytest.raises(FromzeroError, match="'fromzero-gpt' model, not an encoder"):
        embed_checkpoint(tmp_path / "gpt", ["hi"])
    model = load_model(encoder_ckpt)
    save_checkpoint(tmp_path / "notok", model, model.config.to_dict())
    with pytest.raises(FromzeroError, match="no tokenizer.json"):
        embed_checkpoint(tmp_path / "notok", ["hi"])
    small = tiny_model(head="embedding", vocab_size=10)  # the tokenizer has ids up to 34
    save_checkpoint(tmp_path / "small", small, small.config.to_dict(), tokenizer_file=encoder_ckpt / "tokenizer.json")
    with pytest.raises(FromzeroError, match="do not belong together"):
        embed_checkpoint(tmp_path / "small", ["the river mill"])
    with pytest.raises(FromzeroError, match="not found"):
        embed_checkpoint(tmp_path / "missing", ["hi"])


def test_classifier_last_layer_computes_only_the_cls_state_with_the_same_logits() -> None:
    """The classification head runs the last layer on [CLS] only (and packs padding away in the
    layers before): logits equal the plain computation, with and without padding."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, head="classification", num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = Bert(config).eval()
    ids = torch.randint(1, 50, (4, 12))
    for mask in (torch.ones_like(ids), (torch.arange(12)[None] < torch.tensor([[12], [5], [9], [2]])).long()):
        logits, _ = model(ids, mask)
        hidden = model.encode(ids, mask)  # every token, no packing
        expected = model.classifier(model.pool(hidden))
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
