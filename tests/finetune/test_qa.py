"""Question-answering fine-tuning (fromzero.finetune.qa) and its commands: finetune, predict, evaluate.

The base model is a random 2-layer, 32-wide fromzero-bert with a WordPiece tokenizer over a few
words and BERT's pair template; the data are SQuAD-format JSON lines written here: contexts of
15 filler words and one colour, the question "which colour ?", the answer the colour (a task a
tiny model learns in a few dozen steps). Windows of 20 tokens split every context in two (stride
4), so training and post-processing go through several windows per question, most of them
without the answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from fromzero.cli import main
from fromzero.finetune.qa import QuestionAnsweringConfig, finetune_question_answering

from .resume import assert_resume_is_exact

FILLER = ["the", "a", "cat", "dog", "saw", "hat", "big", "old", "sat", "on"]
COLOURS = ["red", "blue", "green", "black", "white", "pink"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *FILLER, *COLOURS, "which", "colour", "?"]


def qa_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(15)]
        colour, k = rng.choice(COLOURS), rng.randrange(16)
        words.insert(k, colour)
        context = " ".join(words)
        start = len(" ".join(words[:k])) + (1 if k else 0)
        rows.append({"id": f"{seed}-{i}", "context": context, "question": "which colour ?",
                     "answers": {"text": [colour], "answer_start": [start]}})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def qa_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny fromzero-bert (head embedding, as a converted sentence-transformer) with a
    WordPiece tokenizer.json and BERT's pair template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from fromzero.checkpoint import save_checkpoint
    from fromzero.models.bert import Bert, BertConfig

    root = tmp_path_factory.mktemp("qa-base")
    tokenizer = Tokenizer(models.WordPiece({tok: i for i, tok in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = VOCAB.index("[CLS]"), VOCAB.index("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer.save(str(root / "tokenizer.json"))
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, head="embedding", max_position_embeddings=64))
    save_checkpoint(root / "base", model, model.config.to_dict(), tokenizer_file=root / "tokenizer.json")
    return root / "base"


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qa-data")
    for split, (n, seed) in {"train": (160, 0), "val": (40, 1), "test": (40, 2)}.items():
        write_jsonl(folder / f"{split}.jsonl", qa_rows(n, seed))
    return folder


def qa_config(base: Path, data: Path, out_dir: Path, **overrides) -> QuestionAnsweringConfig:
    fields = dict(init_from=str(base), data=str(data), out_dir=str(out_dir), max_length=20, doc_stride=4,
                  max_question_tokens=8, epochs=4, batch_size=16, lr=3e-3, warmup_ratio=0.05, seed=0,
                  device="cpu", dtype="float32", progress=False, log_interval=5)
    fields.update(overrides)
    return QuestionAnsweringConfig(**fields)


@pytest.fixture(scope="module")
def trained(qa_base: Path, qa_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return finetune_question_answering(qa_config(qa_base, qa_data, tmp_path_factory.mktemp("qa-run") / "run"))


def test_finetune_learns_to_answer_across_windows(trained: dict) -> None:
    assert trained["windows"] == {"train": 320, "val": 80, "test": 80}  # two windows per question
    rows = [json.loads(x) for x in (Path(trained["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.3 * losses[0], losses
    # a chance answer (one of 16 words) scores ~6
    assert trained["test"]["exact_match"] >= 80 and trained["test"]["f1"] >= 80, trained["test"]
    assert trained["val"]["f1"] >= 80


def test_run_directory_and_checkpoint(trained: dict) -> None:
    run = Path(trained["run_dir"])
    for name in ("config.yaml", "metrics.json", "test_predictions.jsonl", "plots/loss.png",
                 "checkpoints/best/model.safetensors", "checkpoints/best/tokenizer.json"):
        assert (run / name).is_file(), name
    info = json.loads((run / "checkpoints/best/info.json").read_text())
    assert info["task"] == "question-answering" and info["doc_stride"] == 4 and info["max_length"] == 20
    config = json.loads((run / "checkpoints/best/config.json").read_text())
    assert config["head"] == "qa" and config["pooler"] is False
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["task"] == "question-answering" and saved["data"]["doc_stride"] == 4
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["exact_match"] == pytest.approx(trained["test"]["exact_match"]) and metrics["questions"] == 40
    first = json.loads((run / "test_predictions.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "question", "prediction", "answers", "probability"}


def test_predict_and_evaluate_commands(trained: dict, qa_data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = trained["checkpoint"]
    context = "the big dog sat on the old hat and the cat saw a green hat on the dog"
    assert main(["predict", "--checkpoint", ckpt, "--context", context, "--question", "which colour ?",
                 "--question", "which ?", "--device", "cpu"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["question"] for o in out] == ["which colour ?", "which ?"]
    for o in out:
        assert context[o["start"]:o["end"]] == o["answer"] and 0 < o["probability"] <= 1
    assert out[0]["answer"] == "green"
    (tmp_path / "scene.txt").write_text(context)
    questions = write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "context": context, "question": "which colour ?"}])
    assert main(["predict", "--checkpoint", ckpt, "--input", str(questions), "--device", "cpu"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["id"] == "a" and context[row["start"]:row["end"]] == row["answer"]
    # evaluate: a file is scored whole; without --data the run's test split
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(qa_data / "val.jsonl"), "--device", "cpu",
                 "--out", str(tmp_path / "eval.json")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["split"] == "all" and scored["questions"] == 40
    assert scored["f1"] == pytest.approx(trained["val"]["f1"], abs=1e-6)
    assert json.loads((tmp_path / "eval.json").read_text())["exact_match"] == scored["exact_match"]
    assert main(["evaluate", "--checkpoint", ckpt, "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["exact_match"] == pytest.approx(trained["test"]["exact_match"])
    # bad input: one error line, exit 2
    for argv, message in [
        (["predict", "--checkpoint", ckpt, "--text", "hello"], "answers questions"),
        (["predict", "--checkpoint", ckpt, "--question", "what ?"], "--context TEXT or --context-file"),
        (["predict", "--checkpoint", ckpt, "--question", "what ?", "--context-file", str(tmp_path / "no.txt")],
         "context file not found"),
        (["predict", "--checkpoint", ckpt, "--question", "what ?", "--context", "  "], "context is empty"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err


def test_bad_offsets_stop_the_run_before_it_starts(qa_base: Path, qa_data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rows = qa_rows(5, 3)
    rows[3]["answers"]["answer_start"] = [0]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    recipe = tmp_path / "qa.yaml"
    recipe.write_text(yaml.safe_dump({"task": "question-answering", "model": {"init_from": str(qa_base)},
                                      "data": {"source": str(bad), "max_length": 20, "doc_stride": 4,
                                               "max_question_tokens": 8}}))
    out = tmp_path / "run"
    assert main(["finetune", "--config", str(recipe), "--out_dir", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "bad.jsonl:4: answer 0" in err and "does not match the context" in err
    assert not out.exists()
    assert main(["finetune", "--config", str(recipe), "--data.doc_stride", "12", "--out_dir", str(out)]) == 2
    assert "doc_stride (12) must be smaller" in capsys.readouterr().err


def test_frozen_trains_the_span_head_only(qa_base: Path, qa_data: Path, tmp_path: Path) -> None:
    summary = finetune_question_answering(qa_config(qa_base, qa_data, tmp_path / "frozen", method="frozen",
                                                    epochs=1, max_train_questions=32))
    assert summary["trainable_params"] == 32 * 2 + 2  # qa_outputs: Linear(32, 2)


def test_resume_is_exact(qa_base: Path, qa_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_resume_is_exact(finetune_question_answering,
                           lambda out: qa_config(qa_base, qa_data, out, epochs=2, eval_every=4,
                                                 max_train_questions=48),
                           tmp_path, monkeypatch, stop_at=7)
