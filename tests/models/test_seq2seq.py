"""The encoder-decoder Transformer against Hugging Face's MarianMTModel (random weights, several
configurations): logits within 1e-5 in fp32, greedy and beam-search outputs identical to
``transformers.generate``, weights converted both ways, and training that learns a toy
translation (reversing a sequence) on CPU."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fromzero.errors import FromzeroError  # noqa: E402
from fromzero.models import build_model  # noqa: E402
from fromzero.models import convert_seq2seq as conv  # noqa: E402
from fromzero.models.seq2seq import Seq2Seq, Seq2SeqConfig, sinusoidal_positions  # noqa: E402

CONFIGS = {
    "shared-swish": dict(vocab_size=61, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                         activation_function="swish", scale_embedding=True, share_encoder_decoder_embeddings=True),
    "separate-gelu": dict(vocab_size=53, decoder_vocab_size=47, d_model=24, encoder_layers=1, decoder_layers=3,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=40,
                          decoder_ffn_dim=40, activation_function="gelu", scale_embedding=False,
                          share_encoder_decoder_embeddings=False),
    "odd-width-relu": dict(vocab_size=40, d_model=30, encoder_layers=2, decoder_layers=1, encoder_attention_heads=3,
                           decoder_attention_heads=3, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           activation_function="relu", scale_embedding=True, share_encoder_decoder_embeddings=True),
}
PAD, EOS = 2, 1


def hf_marian(name: str, seed: int = 0) -> "transformers.MarianMTModel":
    torch.manual_seed(seed)
    cfg = transformers.MarianConfig(**CONFIGS[name], max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS,
                                    decoder_start_token_id=PAD, forced_eos_token_id=EOS, dropout=0.0)
    model = transformers.MarianMTModel(cfg).eval()
    with torch.no_grad():  # random, not zero: the bias must be carried over
        model.final_logits_bias.normal_(0, 0.5)
    return model


def ours_from(hf_model: "transformers.MarianMTModel") -> Seq2Seq:
    config, state = conv.from_hf(hf_model.config.to_dict(), dict(hf_model.state_dict()))
    model = build_model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"tgt_embed.weight"}
    return model.eval()


def sources(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three sources of different lengths (5, 9, 3 tokens + eos), right-padded."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() + [EOS] for n in (5, 9, 3)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    return ids, (ids != PAD).long()


def test_sinusoids_match_marian() -> None:
    for dim in (8, 30, 31):
        hf = transformers.models.marian.modeling_marian.MarianSinusoidalPositionalEmbedding(20, dim)
        assert torch.allclose(sinusoidal_positions(20, dim), hf.create_weight(), atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_marian(name: str) -> None:
    hf = hf_marian(name)
    ours = ours_from(hf)
    src, mask = sources(hf.config.vocab_size)
    g = torch.Generator().manual_seed(2)
    tgt_in = torch.randint(3, hf.config.decoder_vocab_size, (3, 7), generator=g)
    tgt_in[:, 0] = PAD
    with torch.no_grad():
        theirs = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in).logits
        mine = ours(src, tgt_in, mask)
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max().item() < 1e-5


def reversal_batch(n: int, g: torch.Generator, vocab: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy translation: sources of 3-6 tokens (ids 3..vocab-1) + eos; targets reversed + eos."""
    lengths = torch.randint(3, 7, (n,), generator=g)
    src = torch.full((n, 7), PAD, dtype=torch.long)
    tgt = torch.full((n, 7), PAD, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        seq = torch.randint(3, vocab, (length,), generator=g)
        src[i, :length], src[i, length] = seq, EOS
        tgt[i, :length], tgt[i, length] = seq.flip(0), EOS
    return src, tgt


def train_reverser(steps: int, seed: int = 0, **overrides: object) -> Seq2Seq:
    torch.manual_seed(seed)
    fields = dict(src_vocab_size=13, d_model=48, n_head=4, encoder_layers=2, decoder_layers=2, ffn_dim=96,
                  dropout=0.0, pad_id=PAD, eos_id=EOS, decoder_start_id=PAD, max_positions=16)
    model = Seq2Seq(Seq2SeqConfig(**{**fields, **overrides}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        loss, _ = model.loss(*reversal_batch(64, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def as_marian(model: Seq2Seq) -> "transformers.MarianMTModel":
    hf_config, hf_state = conv.to_hf(model.config.to_dict(), dict(model.state_dict()))
    hf = transformers.MarianMTModel(transformers.MarianConfig(**hf_config)).eval()
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and all("embed_positions" in m or "embed_tokens" in m or m == "lm_head.weight"
                                  for m in missing)
    hf.tie_weights()
    return hf


@pytest.fixture(scope="module")
def half_trained() -> dict[str, Seq2Seq]:
    """Models that decode to varied, uncertain outputs (random weights only repeat one token,
    which would not test beam search): 40 steps of the reversal task, one vocabulary or two."""
    return {"shared": train_reverser(40), "separate": train_reverser(40, seed=1, share_embeddings=False,
                                                                      tgt_vocab_size=17, activation="gelu")}


@pytest.mark.parametrize("name", ["shared", "separate"])
@pytest.mark.parametrize("beams,length_penalty,early_stopping",
                         [(1, 1.0, False), (3, 1.0, False), (4, 0.6, True), (4, -0.5, False), (2, 2.0, "never")])
def test_decoding_matches_transformers_generate(half_trained: dict, name: str, beams: int, length_penalty: float,
                                                early_stopping: bool | str) -> None:
    ours = half_trained[name]
    hf = as_marian(ours)
    src, _ = reversal_batch(24, torch.Generator().manual_seed(7))
    mask = (src != PAD).long()
    with torch.no_grad():
        theirs = hf.generate(input_ids=src, attention_mask=mask, num_beams=beams, do_sample=False,
                             max_new_tokens=9, length_penalty=length_penalty, early_stopping=early_stopping,
                             bad_words_ids=[[PAD]])
    expected = []
    for row in theirs[:, 1:].tolist():  # drop the start id; cut at the first eos, as ours returns
        expected.append(row[:row.index(EOS) + 1] if EOS in row else [t for t in row if t != PAD])
    mine = ours.generate(src, mask, max_new_tokens=9, num_beams=beams, length_penalty=length_penalty,
                         early_stopping=early_stopping)
    assert mine == expected
    if length_penalty <= 1.0:  # (a strong length penalty rightly runs every hypothesis to the limit)
        assert len({len(m) for m in mine}) >= 3  # varied lengths: eos is decided, not forced


def test_beam_search_finds_better_hypotheses_than_greedy(half_trained: dict) -> None:
    """On a half-trained model, beam search changes some outputs and never lowers the
    sequence log-probability below greedy's (length_penalty 0: plain sums)."""
    model = half_trained["shared"]
    src, _ = reversal_batch(24, torch.Generator().manual_seed(7))

    def log_prob(row: int, out: list[int]) -> float:
        tgt = torch.tensor([out])
        with torch.no_grad():
            logits = model(src[row:row + 1], model.shift_right(tgt))
        return logits.log_softmax(-1)[0, torch.arange(len(out)), tgt[0]].sum().item()

    greedy = model.generate(src, max_new_tokens=9)
    beam = model.generate(src, max_new_tokens=9, num_beams=5, length_penalty=0.0)
    assert sum(g != b for g, b in zip(greedy, beam)) >= 2
    for row, (g, b) in enumerate(zip(greedy, beam)):
        if g[-1] == EOS and b[-1] == EOS:
            assert log_prob(row, b) >= log_prob(row, g) - 1e-4


def test_generation_ends_with_eos_at_the_limit_and_never_emits_pad() -> None:
    ours = ours_from(hf_marian("shared-swish", seed=5))
    src, mask = sources(61)
    for beams in (1, 3):
        for out in ours.generate(src, mask, max_new_tokens=4, num_beams=beams):
            assert len(out) <= 4 and out[-1] == EOS and PAD not in out


def test_weights_round_trip_to_marian_and_back() -> None:
    for name in sorted(CONFIGS):
        ours = ours_from(hf_marian(name, seed=6))
        hf_config, hf_state = conv.to_hf(ours.config.to_dict(), dict(ours.state_dict()))
        reloaded = transformers.MarianMTModel(transformers.MarianConfig(**hf_config)).eval()
        missing, unexpected = reloaded.load_state_dict(hf_state, strict=False)
        assert not unexpected
        assert all("embed_positions" in m or "embed_tokens" in m or m == "lm_head.weight" for m in missing)
        reloaded.tie_weights()
        src, mask = sources(ours.config.src_vocab_size)
        tgt_in = torch.full((3, 1), PAD)
        with torch.no_grad():
            diff = (reloaded(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in).logits
                    - ours(src, tgt_in, mask)).abs().max()
        assert diff < 1e-5, name


def test_untied_or_incomplete_marian_checkpoints_are_refused() -> None:
    hf = hf_marian("shared-swish")
    state = dict(hf.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(FromzeroError, match="untied"):
        conv.from_hf(hf.config.to_dict(), state)
    state = {k: v for k, v in hf.state_dict().items() if "layers.0.fc1" not in k}
    with pytest.raises(FromzeroError, match="missing 4 weights"):
        conv.from_hf(hf.config.to_dict(), state)


def test_bad_shapes_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="divisible"):
        Seq2SeqConfig(d_model=30, n_head=4).validate()
    with pytest.raises(ValueError, match="one vocabulary"):
        Seq2SeqConfig(src_vocab_size=10, tgt_vocab_size=12).validate()
    model = Seq2Seq(Seq2SeqConfig(src_vocab_size=10, d_model=8, n_head=2, encoder_layers=1, decoder_layers=1,
                                  ffn_dim=16, max_positions=6))
    with pytest.raises(ValueError, match="longer than model.max_positions"):
        model(torch.ones(1, 7, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))


def test_learns_to_reverse_sequences() -> None:
    """The loss falls tenfold and greedy decoding of unseen sequences is mostly exact after a
    short CPU training."""
    g = torch.Generator().manual_seed(5)
    untrained = train_reverser(0)
    first = untrained.loss(*reversal_batch(256, g))[0].item()
    model = train_reverser(300)
    src, tgt = reversal_batch(256, g)
    loss, tokens = model.loss(src, tgt)
    assert tokens == int((tgt != PAD).sum()) and loss.item() < first / 10
    outputs = model.generate(src[:50], max_new_tokens=8, num_beams=2)
    expected = [[t for t in row if t != PAD] for row in tgt[:50].tolist()]
    assert sum(o == e for o, e in zip(outputs, expected)) >= 45


def test_convert_commands_round_trip_a_marian_directory(tmp_path) -> None:
    """`fromzero convert from-hf` on a saved MarianMTModel folder, then `to-hf` back: transformers
    loads the result and gives the same logits; the checkpoint holds the shared table once."""
    from safetensors import safe_open

    from fromzero.checkpoint import load_model, save_checkpoint
    from fromzero.models.hf import convert_from_hf, convert_to_hf

    hf = hf_marian("separate-gelu", seed=8)
    hf.save_pretrained(tmp_path / "marian")
    convert_from_hf(str(tmp_path / "marian"), tmp_path / "ours")
    ours = load_model(tmp_path / "ours")
    assert isinstance(ours, Seq2Seq) and not ours.config.share_embeddings
    convert_to_hf(tmp_path / "ours", tmp_path / "back")
    back = transformers.MarianMTModel.from_pretrained(tmp_path / "back").eval()
    src, mask = sources(hf.config.vocab_size)
    tgt_in = torch.full((3, 2), PAD)
    with torch.no_grad():
        reference = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in).logits
        back_logits = back(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in).logits
        for logits in (ours(src, tgt_in, mask), back_logits):
            assert (logits - reference).abs().max() < 1e-5
    shared = train_reverser(5)  # one vocabulary: the checkpoint writer stores the shared table once
    save_checkpoint(tmp_path / "shared", shared, shared.config.to_dict())
    with safe_open(tmp_path / "shared" / "model.safetensors", "pt") as f:
        assert "src_embed.weight" in f.keys() and "tgt_embed.weight" not in f.keys()
    reloaded = load_model(tmp_path / "shared")
    src, _ = reversal_batch(4, torch.Generator().manual_seed(3))
    assert reloaded.generate(src, max_new_tokens=6) == shared.generate(src, max_new_tokens=6)


def _marian_folder(folder, seed: int = 4) -> "transformers.MarianMTModel":
    """A saved MarianMTModel (random weights) with a real SentencePiece tokenizer, laid out as
    Helsinki-NLP's opus-mt folders are: source.spm, target.spm and vocab.json (</s> 0, <unk> 1,
    <pad> last)."""
    import io
    import json

    spm = pytest.importorskip("sentencepiece")
    text = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof",
            "we read books at night", "the sun is warm today"] * 20
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model_bytes, vocab_size=40,
                                   character_coverage=1.0, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_proto=model_bytes.getvalue())
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())
              if processor.id_to_piece(i) not in ("<unk>", "<s>", "</s>")]
    vocab = {"</s>": 0, "<unk>": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    vocab["<pad>"] = len(vocab)
    folder.mkdir()
    for name in ("source.spm", "target.spm"):
        (folder / name).write_bytes(model_bytes.getvalue())
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = transformers.MarianTokenizer(str(folder / "source.spm"), str(folder / "target.spm"),
                                             str(folder / "vocab.json"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = transformers.MarianConfig(**{**CONFIGS["shared-swish"], "vocab_size": len(vocab)},
                                    max_position_embeddings=64, pad_token_id=len(vocab) - 1, eos_token_id=0,
                                    decoder_start_token_id=len(vocab) - 1, forced_eos_token_id=0, dropout=0.0,
                                    init_std=0.3)  # large random weights: the output depends on the source
    hf = transformers.MarianMTModel(cfg).eval()
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("beams", [1, 3])
def test_a_converted_marian_model_translates_with_its_own_sentencepiece_tokenizer(tmp_path, beams: int) -> None:
    """opus-mt users' path: `convert from-hf` carries source.spm / target.spm / vocab.json over, and
    `translate` tokenizes, decodes and detokenizes exactly as transformers does (batched sources of
    different lengths: padding uses Marian's pad id, not fromzero's 0, which is Marian's </s>)."""
    from fromzero.finetune.translation import MarianVocab, load_translator, translate_batch
    from fromzero.models.hf import convert_from_hf

    hf = _marian_folder(tmp_path / "opus-mt")
    convert_from_hf(str(tmp_path / "opus-mt"), tmp_path / "ours")
    assert {"source.spm", "target.spm", "vocab.json"} <= {p.name for p in (tmp_path / "ours").iterdir()}
    model, vocab, _ = load_translator(tmp_path / "ours")
    assert isinstance(vocab, MarianVocab)
    texts = ["the cat sat", "birds sing at dawn on the warm roof", "we read"]
    tokenizer = transformers.MarianTokenizer.from_pretrained(tmp_path / "opus-mt")
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = hf.generate(**batch, num_beams=beams, do_sample=False, max_new_tokens=12,
                                bad_words_ids=[[hf.config.pad_token_id]])
    expected = tokenizer.batch_decode(generated, skip_special_tokens=True)
    mine = translate_batch(model, vocab, texts, torch.device("cpu"), num_beams=beams, max_new_tokens=12, strict=True)
    assert mine == expected and len(set(mine)) > 1
    assert vocab.unknown_source("the cat") == []
    with pytest.raises(FromzeroError, match="not in the model's source vocabulary"):
        translate_batch(model, vocab, ["the cat ate a zebra"], torch.device("cpu"), strict=True)
