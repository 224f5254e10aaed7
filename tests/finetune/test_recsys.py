"""Recommendation data, protocol and task (fromzero.data.interactions, fromzero.finetune.recsys).

Hand-made interactions check reading (CSV and MovieLens ratings.dat), implicit feedback,
leave-one-out and negative sampling exactly; HR@10 / NDCG@10 are checked on hand-computed
examples. The end-to-end run trains NeuMF on a tiny built-in synthetic dataset (300 users, 150
items, ~15 interactions each; a few seconds) through ``fromzero finetune``: popularity reaches
HR@10 ~0.3 there and NeuMF ~0.6 (0.58-0.62 over seeds 0-2), so a 0.15 margin is safe.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fromzero.data.interactions import (IdMap, implicit, leave_one_out, ranking_metrics, read_interactions,
                                        sample_eval_negatives, sample_train_negatives, synthetic_interactions,
                                        training_examples, write_interactions_csv)
from fromzero.errors import FromzeroError

TINY = ["--synthetic_users", "300", "--synthetic_items", "150", "--synthetic_per_user", "15"]

HAND = """user,item,rating,timestamp
a,x,5,10
a,z,3,20
a,y,4,30
a,w,5,40
b,w,5,1
b,z,4,3
b,x,4,3
c,x,5,5
c,y,5,6
d,x,5,1
d,y,5,2
d,q,5,3
e,y,5,1
e,x,5,2
e,z,2,3
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def raw(data, pairs: np.ndarray) -> list[tuple[str, str]]:
    return sorted((data.ids.users[u], data.ids.items[i]) for u, i in pairs)


# ---------------------------------------------------------------------------------------------
# HR@10 / NDCG@10


def test_ranking_metrics_on_hand_made_examples() -> None:
    scores = np.array([
        [5.0, 1.0, 2.0, 3.0],  # positive first: rank 0
        [1.0, 5.0, 2.0, 0.5],  # two negatives above: rank 2
        [2.0, 3.0, 2.0, 1.0],  # one above, one tied: rank 1 or 2
        [1.0, 1.0, 1.0, 1.0],  # all tied: rank 0, 1, 2 or 3
    ])
    d1, d2 = 1 / math.log2(3), 1 / math.log2(4)  # discounts of ranks 1 and 2
    per_row_k2 = [(1, 1), (0, 0), (0.5, d1 / 2), (0.5, (1 + d1) / 4)]
    m = ranking_metrics(scores, k=2)
    assert m["n"] == 4
    assert m["hr@2"] == pytest.approx(sum(h for h, _ in per_row_k2) / 4, abs=1e-12)
    assert m["ndcg@2"] == pytest.approx(sum(n for _, n in per_row_k2) / 4, abs=1e-12)
    m3 = ranking_metrics(scores, k=3)
    assert m3["hr@3"] == pytest.approx((1 + 1 + 1 + 0.75) / 4, abs=1e-12)
    assert m3["ndcg@3"] == pytest.approx((1 + d2 + (d1 + d2) / 2 + (1 + d1 + d2) / 4) / 4, abs=1e-12)


def test_hr_and_ndcg_at_10_against_99_negatives() -> None:
    negatives = np.arange(99, 0, -1, dtype=float)  # 99, 98, ..., 1
    rows = []
    for rank in (0, 3, 9, 10, 50):
        row = np.concatenate([[99.5 - rank], negatives])  # exactly `rank` negatives above it
        rows.append(row)
    m = ranking_metrics(np.array(rows), k=10)
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(11)) / 5)
    # a constant scorer gets chance level, never a perfect score
    flat = ranking_metrics(np.zeros((3, 100)), k=10)
    assert flat["hr@10"] == pytest.approx(0.1)
    nan_first = ranking_metrics(np.array([[np.nan, 0.0, 1.0]]), k=1)
    assert nan_first["hr@1"] == 0.0


def test_ranking_metrics_refuses_bad_shapes() -> None:
    with pytest.raises(FromzeroError, match="shape"):
        ranking_metrics(np.zeros(5))
    with pytest.raises(FromzeroError, match="no held-out"):
        ranking_metrics(np.zeros((0, 100)))


# ---------------------------------------------------------------------------------------------
# Reading


def test_csv_and_ratings_dat_read_the_same(tmp_path: Path) -> None:
    csv_file = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp,tag\n1,10,4.5,100,x\n2,10,3,90,y\n\n1,7,5,120,z\n")
    dat_file = write(tmp_path / "ratings.dat", "1::10::4.5::100\n2::10::3::90\n1::7::5::120\n")
    a, b = read_interactions(csv_file), read_interactions(dat_file)
    for inter in (a, b):
        assert inter.users.tolist() == ["1", "2", "1"] and inter.items.tolist() == ["10", "10", "7"]
        assert inter.ratings.tolist() == [4.5, 3.0, 5.0] and inter.timestamps.tolist() == [100.0, 90.0, 120.0]
    assert a.lines.tolist() == [2, 3, 5] and b.lines.tolist() == [1, 2, 3]
    # without a rating column every row is a positive of rating 1
    plain = read_interactions(write(tmp_path / "plain.csv", "item,user,timestamp\nx,u1,5\n"))
    assert (plain.users[0], plain.items[0], plain.ratings[0]) == ("u1", "x", 1.0)


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    inter = synthetic_interactions(20, 15, clusters=3, per_user=5, seed=1)
    write_interactions_csv(inter, tmp_path / "s.csv")
    back = read_interactions(tmp_path / "s.csv")
    assert back.users.tolist() == inter.users.tolist() and back.items.tolist() == inter.items.tolist()
    np.testing.assert_array_equal(back.ratings, inter.ratings)
    np.testing.assert_array_equal(back.timestamps, inter.timestamps)


@pytest.mark.parametrize("name, text, message", [
    ("cols.csv", "user,item,rating\n1,2,3\n", "missing column(s) timestamp"),
    ("nohead.csv", "1,2,3,4\n5,6,7,8\n", "no header row"),
    ("rating.csv", "user,item,rating,timestamp\n1,2,5,10\n1,3,five,11\n", "line 3: rating 'five' is not a number"),
    ("time.csv", "user,item,rating,timestamp\n1,2,5,yesterday\n", "line 2: timestamp 'yesterday' is not a number"),
    ("short.csv", "user,item,rating,timestamp\n1,2\n", "line 2: 2 field(s)"),
    ("empty.csv", "", "is empty"),
    ("bad.dat", "1::2::5::10\n1::2::5\n", "line 2: expected UserID::MovieID::Rating::Timestamp"),
    ("nan.dat", "1::2::nan::10\n", "not a finite number"),
])
def test_bad_files_are_one_line_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(FromzeroError) as e:
        read_interactions(write(tmp_path / name, text))
    assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Implicit feedback and leave-one-out


def test_implicit_keeps_rated_positives_once(tmp_path: Path) -> None:
    inter = read_interactions(write(tmp_path / "r.csv", "user,item,rating,timestamp\n"
                                    "a,x,5,10\na,x,4,5\na,y,2,7\nb,x,3,1\n"))
    notes: list[str] = []
    pos = implicit(inter, min_rating=3, notes=notes)
    assert list(zip(pos.users, pos.items, pos.timestamps)) == [("a", "x", 5.0), ("b", "x", 1.0)]  # earliest a,x
    assert notes == ["1 interaction(s) rated below min_rating 3 left out",
                     "1 repeated (user, item) interaction(s) merged into the earliest"]
    with pytest.raises(FromzeroError, match="no interaction has rating >= 6"):
        implicit(inter, min_rating=6)


def test_leave_one_out_on_a_hand_made_log(tmp_path: Path) -> None:
    notes: list[str] = []
    data = leave_one_out(implicit(read_interactions(write(tmp_path / "h.csv", HAND))), notes=notes)
    assert data.ids.users == ["a", "b", "d", "e"] and data.ids.items == ["w", "x", "y", "z"]  # c dropped, q cold
    assert raw(data, data.train) == [("a", "x"), ("a", "z"), ("b", "w"), ("d", "x"), ("e", "y")]
    assert raw(data, data.val) == [("a", "y"), ("b", "z"), ("d", "y"), ("e", "x")]
    # b's x and z share timestamp 3: the later row of the file counts as later
    assert raw(data, data.test) == [("a", "w"), ("b", "x"), ("e", "z")]
    assert notes == ["1 user(s) with fewer than 3 interactions dropped (leave-one-out needs one to train on "
                     "besides the held-out ones)",
                     "1 test interaction(s) with an item never seen in training dropped from evaluation"]
    # every positive of every split is "known": never an evaluation negative
    keys = {(u, i) for u, i in zip(data.known // 4, data.known % 4)}
    assert {tuple(p) for p in np.concatenate([data.train, data.val, data.test])} <= keys


def test_separate_test_file_and_unknown_users(tmp_path: Path) -> None:
    train = implicit(read_interactions(write(tmp_path / "h.csv", HAND)))
    good = implicit(read_interactions(write(tmp_path / "t.csv", "user,item,rating,timestamp\nc,w,5,99\na,y,5,99\n")))
    data = leave_one_out(train, good)  # with a test file, 2 interactions are enough (c stays)
    assert "c" in data.ids.users and raw(data, data.test) == [("a", "y"), ("c", "w")]
    for text, what in (("zed,x,5,9\nzed,y,5,9\n", "user 'zed' is unknown at training (2 evaluation"),
                       ("a,x,5,9\na,nope,5,9\n", "line 3: item 'nope' is unknown at training (1 evaluation")):
        test = implicit(read_interactions(write(tmp_path / "bad.csv", "user,item,rating,timestamp\n" + text)))
        with pytest.raises(FromzeroError) as e:
            leave_one_out(train, test)
        assert what in str(e.value)


def test_users_too_short_for_leave_one_out(tmp_path: Path) -> None:
    inter = implicit(read_interactions(write(tmp_path / "s.csv", "user,item,rating,timestamp\na,x,5,1\na,y,5,2\n")))
    with pytest.raises(FromzeroError, match="no user has 3 or more interactions"):
        leave_one_out(inter)


def test_id_map_round_trip_and_unknown_ids() -> None:
    ids = IdMap(["1", "2", "10"], ["5"])
    back = IdMap.from_json(json.loads(json.dumps(ids.to_json())))
    assert back.user_index(10) == 2 and back.item_index("5") == 0
    with pytest.raises(FromzeroError, match="unknown user '3'"):
        back.user_index("3")


# ---------------------------------------------------------------------------------------------
# Negative sampling


@pytest.fixture(scope="module")
def small() -> object:
    return leave_one_out(implicit(synthetic_interactions(40, 60, clusters=3, per_user=8, seed=0)))


def test_training_negatives_avoid_positives_and_follow_the_seed(small) -> None:
    keys = small.train_keys()
    positives = set(keys.tolist())
    n = small.ids.num_items
    neg = sample_train_negatives(small.train[:, 0], n, keys, 6, np.random.default_rng(5))
    assert neg.shape == (len(small.train), 6) and neg.min() >= 0 and neg.max() < n
    assert not any(int(u) * n + int(i) in positives for u, row in zip(small.train[:, 0], neg) for i in row)
    again = sample_train_negatives(small.train[:, 0], n, keys, 6, np.random.default_rng(5))
    other = sample_train_negatives(small.train[:, 0], n, keys, 6, np.random.default_rng(6))
    np.testing.assert_array_equal(neg, again)
    assert (neg != other).any()
    # an epoch: every positive once (label 1) plus k negatives each (label 0), shuffled
    users, items, labels = training_examples(small.train, n, keys, 3, np.random.default_rng(1))
    assert len(users) == 4 * len(small.train) and labels.sum() == len(small.train)
    got = sorted(zip(users[labels == 1].tolist(), items[labels == 1].tolist()))
    assert got == sorted(map(tuple, small.train.tolist()))
    assert not any(u * n + i in positives for u, i in zip(users[labels == 0].tolist(), items[labels == 0].tolist()))


def test_a_user_with_every_item_has_no_negatives() -> None:
    keys = np.array([0, 1, 2])  # user 0 has items 0, 1, 2 of 3
    with pytest.raises(FromzeroError, match="interacted with every item"):
        sample_train_negatives(np.array([0]), 3, keys, 1, np.random.default_rng(0))


def test_evaluation_candidates_are_distinct_unseen_and_fixed(small) -> None:
    n = small.ids.num_items
    val = small.eval_set("val", negatives=8, seed=3)
    assert val.items.shape == (len(small.val), 9)
    np.testing.assert_array_equal(val.items[:, 0], small.val[:, 1])  # the positive first
    known = set(small.known.tolist())
    for u, row in zip(val.users, val.items[:, 1:]):
        assert len(set(row.tolist())) == 8
        assert not any(int(u) * n + int(i) in known for i in row)
    np.testing.assert_array_equal(val.items, small.eval_set("val", negatives=8, seed=3).items)
    assert (small.eval_set("test", negatives=8, seed=3).items[:, 1:] != val.items[:, 1:]).any()
    with pytest.raises(FromzeroError, match="lower eval_negatives"):
        sample_eval_negatives(np.array([0]), 4, np.array([0, 1]), 3, np.random.default_rng(0))


def test_synthetic_data_is_seeded_and_structured() -> None:
    a, b = (synthetic_interactions(50, 40, clusters=4, per_user=8, seed=s) for s in (7, 7))
    assert a.users.tolist() == b.users.tolist() and a.items.tolist() == b.items.tolist()
    c = synthetic_interactions(50, 40, clusters=4, per_user=8, seed=8)
    assert a.items.tolist() != c.items.tolist()
    per_user = np.unique(a.users, return_counts=True)[1]
    assert len(per_user) == 50 and per_user.min() >= 3
    # popularity skew: the most-picked tenth of the items takes far more than a tenth of the picks
    counts = np.sort(np.unique(a.items, return_counts=True)[1])[::-1]
    assert counts[:4].sum() > 0.2 * counts.sum()
    with pytest.raises(FromzeroError, match="clusters need at least"):
        synthetic_interactions(5, 3, clusters=4, per_user=1)


def test_synthetic_structure_is_learnable_beyond_popularity() -> None:
    """Ranking by the generator's true preferences (cluster x popularity) beats ranking by
    training counts by a wide margin: there is something for a model to learn."""
    from fromzero.data.interactions import synthetic_preferences
    from fromzero.models.recsys import PopularityRanker

    data = leave_one_out(implicit(synthetic_interactions(300, 150, per_user=15, seed=0)))
    test = data.eval_set("test", 99, 0)
    users = np.repeat([data.ids.users[u] for u in test.users], 100).reshape(test.items.shape)
    items = np.array(data.ids.items, dtype=object)[test.items]
    oracle = ranking_metrics(synthetic_preferences(users, items, 300, 150), 10)
    popularity = ranking_metrics(PopularityRanker(data.train, data.ids.num_items).counts[test.items], 10)
    assert oracle["hr@10"] > popularity["hr@10"] + 0.3, (oracle, popularity)


# ---------------------------------------------------------------------------------------------
# The task, end to end through the command line


@pytest.fixture(scope="module")
def neumf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fromzero.cli import main

    out = tmp_path_factory.mktemp("recsys") / "neumf"
    code = main(["finetune", "--config", str(Path(__file__).resolve().parents[2] / "recipes" / "recsys-neumf.yaml"),
                 *TINY, "--epochs", "8", "--lr", "3e-3", "--patience", "0", "--device", "cpu",
                 "--out_dir", str(out), "--quiet"])
    assert code == 0
    return out


def test_neumf_beats_popularity_clearly(neumf_run: Path) -> None:
    m = json.loads((neumf_run / "metrics.json").read_text())
    pop = m["baselines"]["popularity"]
    assert m["split"] == "test" and m["arch"] == "neumf" and 290 <= m["n"] <= 300 and m["eval_negatives"] == 99
    assert m["hr@10"] >= pop["hr@10"] + 0.15, m
    assert m["ndcg@10"] >= pop["ndcg@10"] + 0.1, m
    assert m["val_hr@10"] >= pop["val_hr@10"] + 0.15, m
    als = m["baselines"]["mf_als"]
    assert als["hr@10"] > pop["hr@10"] and als["params"]["factors"] == 16
    for value in (m["hr@10"], m["ndcg@10"], pop["hr@10"], als["ndcg@10"]):
        assert 0.0 <= value <= 1.0


def test_run_directory_and_checkpoint(neumf_run: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "plots/loss.png", "plots/lr.png",
                 "plots/ranking.png", "checkpoints/best/config.json", "checkpoints/best/model.safetensors",
                 "checkpoints/best/info.json", "checkpoints/best/ids.json"):
        assert (neumf_run / name).is_file(), name
    rows = [json.loads(line) for line in (neumf_run / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_ndcg@10" in r for r in rows) == 8 and any("loss" in r for r in rows)
    best = neumf_run / "checkpoints" / "best"
    info = json.loads((best / "info.json").read_text())
    metrics = json.loads((neumf_run / "metrics.json").read_text())
    assert info["task"] == "recommendation" and info["test_hr@10"] == pytest.approx(metrics["hr@10"])
    ids = json.loads((best / "ids.json").read_text())
    assert len(ids["users"]) == 300 and ids["users"][:3] == ["1", "2", "3"]


def test_recommender_speaks_raw_ids_and_matches_the_reported_score(neumf_run: Path) -> None:
    from fromzero.data.interactions import ranking_metrics as rank
    from fromzero.finetune.recsys import (RecommendationConfig, Recommender, load_recommendation_data,
                                          score_eval_set)

    rec = Recommender(neumf_run / "checkpoints" / "best")
    top = rec.recommend("1", k=5)
    assert len(top) == 5 and all(t["item"] in rec.ids.items for t in top)
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert rec.score("1", [top[0]["item"]])[0] == pytest.approx(top[0]["score"], abs=1e-6)
    assert top[0]["item"] not in [t["item"] for t in rec.recommend(1, k=5, exclude=[top[0]["item"]])]
    with pytest.raises(FromzeroError, match="unknown user '9999'"):
        rec.recommend("9999")
    # the saved model reproduces the test score of metrics.json from the same candidates
    cfg = RecommendationConfig(synthetic_users=300, synthetic_items=150, synthetic_per_user=15)
    data = load_recommendation_data(cfg)
    assert data.ids.users == rec.ids.users and data.ids.items == rec.ids.items
    test = data.eval_set("test", 99, 0)
    import torch

    def score(u: np.ndarray, i: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return rec.model(torch.from_numpy(u), torch.from_numpy(i)).numpy()

    reported = json.loads((neumf_run / "metrics.json").read_text())
    assert rank(score_eval_set(score, test), 10)["ndcg@10"] == pytest.approx(reported["ndcg@10"], abs=1e-9)


def test_pretrained_neumf_and_other_arches(tmp_path: Path, cli) -> None:
    common = ["finetune", "--task", "recommendation", *TINY, "--epochs", "2", "--lr", "3e-3", "--baselines", "false",
              "--device", "cpu", "--quiet"]
    for arch in ("gmf", "mlp", "widedeep"):
        result = cli(*common, "--arch", arch, "--factors", "8", "--mlp_layers", "[32, 16, 8]", "--out_dir", tmp_path / arch)
        assert result.code == 0, result
        assert json.loads((tmp_path / arch / "checkpoints/best/config.json").read_text())["arch"] == arch
    result = cli(*common, "--arch", "neumf", "--pretrained_gmf", tmp_path / "gmf/checkpoints/best",
                 "--pretrained_mlp", tmp_path / "mlp/checkpoints/best", "--optimizer", "sgd", "--lr", "0.01",
                 "--epochs", "1", "--out_dir", tmp_path / "neumf")
    assert result.code == 0, result
    assert "note: factors 8 and mlp_layers [32, 16, 8] come from the pretrained models" in result.out
    config = json.loads((tmp_path / "neumf/checkpoints/best/config.json").read_text())
    assert (config["arch"], config["factors"], config["mlp_layers"]) == ("neumf", 8, [32, 16, 8])
    assert "val_ndcg@10" in json.loads((tmp_path / "neumf/metrics.json").read_text())
    # towers trained on other users cannot initialise this data's NeuMF
    other = [a if a != "300" else "250" for a in common]
    result = cli(*other, "--pretrained_gmf", tmp_path / "gmf/checkpoints/best",
                 "--pretrained_mlp", tmp_path / "mlp/checkpoints/best", "--out_dir", tmp_path / "x")
    assert result.code == 2 and "trained on other users or items" in result.err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Bad input through the command line: one line, exit 2, no run directory


@pytest.mark.parametrize("extra, files, message", [
    (["--data", "{d}/cols.csv"], {"cols.csv": "user,item,rating\n1,2,5\n"}, "missing column(s) timestamp"),
    (["--data", "{d}/r.csv"], {"r.csv": "user,item,rating,timestamp\n1,2,x,3\n"}, "rating 'x' is not a number"),
    (["--data", "{d}/t.csv"], {"t.csv": "user,item,rating,timestamp\n1,2,5,noon\n"}, "timestamp 'noon' is not a number"),
    (["--data", "{d}/missing.csv"], {}, "interactions file not found"),
    (["--test_data", "{d}/t.csv"], {"t.csv": "user,item,rating,timestamp\n12345,1,5,9\n"},
     "user '12345' is unknown at training"),
    (["--arch", "svd"], {}, "arch 'svd' is not supported"),
    (["--method", "lora"], {}, "method 'lora' is not supported for recommendation"),
    (["--pretrained_gmf", "somewhere"], {}, "needs both pretrained_gmf and pretrained_mlp"),
    (["--monitor", "val_hr@5"], {}, "monitor 'val_hr@5' is not supported (with top_k 10"),
    (["--mlp_layers", "[9, 4]"], {}, "mlp_layers[0] must be even"),
    (["--init_from", "runs/x"], {}, "init_from is not used by recommendation"),
    (["--eval_negatives", "200"], {}, "lower eval_negatives"),
])
def test_bad_input_is_one_line_error(tmp_path: Path, cli, one_line_error, extra, files, message) -> None:
    for name, text in files.items():
        write(tmp_path / name, text)
    out = tmp_path / "run"
    args = [a.format(d=tmp_path) for a in extra]
    result = cli("finetune", "--task", "recommendation", *TINY, "--device", "cpu", "--out_dir", out, "--quiet", *args)
    one_line_error(result, message)
    assert not out.exists()


def test_help_lists_no_option_the_recommendation_task_refuses(capsys) -> None:
    """finetune --help shows per-task options; recommenders refuse method/LoRA/init_from, so
    those are not offered under "task recommendation" (other tasks still list them)."""
    from fromzero.cli import main

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    rec = text.split("task recommendation:")[1].split("\ntask ")[0].split("examples:")[0]
    for key in ("--method.", "--method.lora_rank", "--method.unfreeze_top", "--model.init_from"):
        assert key not in rec, key
    assert "--model.arch" in rec and "--method.lora_rank" in text.split("task recommendation:")[0]


def test_resume_continues_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recommender stopped inside its second epoch (fresh negatives per epoch) and resumed =
    never stopped: weights, best checkpoint, logged losses."""
    from fromzero.finetune.recsys import RecommendationConfig, finetune_recommendation

    from .resume import assert_resume_is_exact

    def cfg(out):
        return RecommendationConfig(arch="neumf", synthetic_users=60, synthetic_items=40, synthetic_per_user=6, eval_negatives=20,
                                    epochs=2, batch_size=64, lr=3e-3, log_interval=1, device="cpu",
                                    dtype="float32", progress=False, baselines=False, out_dir=str(out))

    straight, _ = assert_resume_is_exact(finetune_recommendation, cfg, tmp_path, monkeypatch, stop_at=30)
    assert straight["steps"] > 30 and straight["epochs_run"] == 2
