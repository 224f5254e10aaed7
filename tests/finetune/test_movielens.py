"""Recommenders on MovieLens-shaped data: Wide & Deep's side features, NeuMF from pretrained
towers, and ``fromzero finetune`` / ``predict --user`` / ``evaluate`` on the ``movielens-100k``
source (served here by a small generated dataset in RecBole's layout, so nothing is fetched).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fromzero.data.movielens import (MovieLens, read_recbole_interactions, read_recbole_items,
                                     read_recbole_users)
from fromzero.models.recsys import RecsysConfig, WideAndDeep

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
GENRES = ["Action", "Children's", "Comedy", "Drama", "Sci-Fi"]


def write_small_movielens(folder: Path, users: int = 40, items: int = 60, per_user: int = 10) -> MovieLens:
    """A RecBole-layout dataset: users who like one genre rate mostly movies of it."""
    rng = np.random.default_rng(0)
    genre_of = rng.integers(0, len(GENRES), size=items)
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(users):
        liked = u % len(GENRES)
        weights = np.where(genre_of == liked, 6.0, 1.0)
        picks = rng.choice(items, size=per_user, replace=False, p=weights / weights.sum())
        inter += [f"{u + 1}\t{i + 1}\t{rng.integers(1, 6)}\t{1000 + 10 * t}" for t, i in enumerate(picks)]
    item = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    item += [f"{i + 1}\tMovie {i + 1}\t{1950 + i}\t{GENRES[g]} Drama" if g != 3 else f"{i + 1}\tMovie {i + 1}\t"
             f"{1950 + i}\tDrama" for i, g in enumerate(genre_of)]
    user = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    user += [f"{u + 1}\t{18 + u}\t{'MF'[u % 2]}\t{['writer', 'artist', 'other'][u % 3]}\t0" for u in range(users)]
    paths = {}
    for suffix, lines in (("inter", inter), ("item", item), ("user", user)):
        paths[suffix] = folder / f"ml-100k.{suffix}"
        paths[suffix].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return MovieLens(read_recbole_interactions(paths["inter"]), read_recbole_items(paths["item"]),
                     read_recbole_users(paths["user"]))


def side_config(**kw) -> RecsysConfig:
    base = dict(arch="widedeep", num_users=6, num_items=9, mlp_layers=[8, 4], buckets=2, genres=3, occupations=2,
                genders=2, age_buckets=3, year_buckets=2)
    return RecsysConfig(**{**base, **kw})


def test_wide_and_deep_genre_crosses_by_hand() -> None:
    """The wide cross adds the user's occupation / age / gender weight of each of the item's genres."""
    from types import SimpleNamespace

    model = WideAndDeep(side_config())
    side = SimpleNamespace(user_occupation=np.array([0, 1, 0, 1, 0, 1]), user_age=np.array([0, 1, 2, 0, 1, 2]),
                           user_gender=np.array([1, 0, 1, 0, 1, 0]), item_year=np.zeros(9, dtype=np.int64),
                           item_genres=np.eye(3, dtype=np.float32)[np.arange(9) % 3] + np.array([0, 0, 1.0]))
    model.set_side_features(side)  # item 0: genres {0, 2}, item 1: {1, 2}, item 2: {2} (2.0: doubled)
    with torch.no_grad():  # deep part off, known wide weights
        model.deep_out.weight.zero_()
        model.deep_out.bias.zero_()
        model.wide_occupation_x_genre.weight[1] = torch.tensor([1.0, 10.0, 100.0])
        model.wide_age_x_genre.weight[2, 0] = 1000.0
        model.wide_gender_x_genre.weight[0, 1] = 5.0
        logits = model(torch.tensor([1, 5, 2]), torch.tensor([0, 1, 3]))
    # user 1: occupation 1, age 1, gender 0 on item 0 {0, 2}: 1 + 100; user 5 (occ 1, age 2, gender 0)
    # on item 1 {1, 2}: 10 + 100 + 5; user 2 (occ 0, age 2, gender 1) on item 3 {0, 2}: 1000
    assert logits.tolist() == [101.0, 115.0, 1000.0]
    with pytest.raises(Exception, match="values outside"):
        model.set_side_features(SimpleNamespace(**{**vars(side), "user_age": np.full(6, 3)}))


def test_wide_and_deep_with_side_features_learns_a_tiny_set() -> None:
    """Forward shapes, and log loss falls well below its start on 200 labelled pairs."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = WideAndDeep(side_config(num_users=20, num_items=30))
    genres = (rng.random((30, 3)) < 0.4).astype(np.float32)
    model.set_side_features(SimpleNamespace(
        user_occupation=rng.integers(0, 2, 20), user_age=rng.integers(0, 3, 20), user_gender=rng.integers(0, 2, 20),
        item_year=rng.integers(0, 2, 30), item_genres=genres))
    users, items = torch.from_numpy(rng.integers(0, 20, 200)), torch.from_numpy(rng.integers(0, 30, 200))
    labels = torch.from_numpy(genres[items.numpy(), model.user_occupation[users].numpy()])  # "likes genre = occ"
    assert model(users, items).shape == (200,)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        loss = F.binary_cross_entropy_with_logits(model(users, items), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]


def test_side_features_refuse_other_arches_and_partial_sizes() -> None:
    from fromzero.errors import FromzeroError

    with pytest.raises(FromzeroError, match="read by arch widedeep only"):
        side_config(arch="neumf").validate()
    with pytest.raises(FromzeroError, match="need all of"):
        side_config(genders=0).validate()
    plain = WideAndDeep(RecsysConfig("widedeep", 4, 5, mlp_layers=[4, 2]))  # synthetic data: no side features
    assert not hasattr(plain, "item_genres") and plain(torch.tensor([0]), torch.tensor([1])).shape == (1,)


@pytest.fixture(scope="module")
def movielens_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """GMF, MLP and Wide & Deep runs of the recipes on the small dataset (``movielens-100k``
    patched to it while the module's tests run)."""
    from fromzero.cli import main
    import fromzero.data.movielens as movielens

    root = tmp_path_factory.mktemp("movielens")
    data = write_small_movielens(root)
    patch = pytest.MonkeyPatch()
    patch.setattr(movielens, "load_movielens_100k", lambda: data)
    runs = {}
    small = ["--epochs", "1", "--eval_negatives", "20", "--batch_size", "64", "--device", "cpu", "--quiet",
             "--baselines", "false"]
    for name, recipe, extra in (
            ("gmf", "movielens-neumf.yaml", ["--arch", "gmf"]),
            ("mlp", "movielens-neumf.yaml", ["--arch", "mlp"]),
            ("widedeep", "movielens-widedeep.yaml", [])):
        runs[name] = root / name
        assert main(["finetune", "--config", str(RECIPES / recipe), *small, *extra, "--out_dir", str(runs[name])]) == 0
    runs["data"] = data
    yield runs
    patch.undo()


def test_pretrained_neumf_starts_from_the_gmf_and_mlp_weights(movielens_runs: dict) -> None:
    """NeuMF built from the two runs (as --pretrained_gmf / --pretrained_mlp do) holds exactly their
    towers, and the alpha-weighted output layers."""
    from fromzero.finetune.recsys import (RecommendationConfig, build_recommender, load_recommendation_data,
                                          load_recommender)

    cfg = RecommendationConfig(data="movielens-100k", arch="neumf", pretrained_gmf=str(movielens_runs["gmf"]),
                               pretrained_mlp=str(movielens_runs["mlp"]), pretrained_alpha=0.5)
    neumf = build_recommender(cfg, load_recommendation_data(cfg))
    gmf, _, _ = load_recommender(movielens_runs["gmf"])
    mlp, _, _ = load_recommender(movielens_runs["mlp"])
    for name, tensor in gmf.gmf.state_dict().items():
        torch.testing.assert_close(neumf.gmf.state_dict()[name], tensor, rtol=0, atol=0)
    for name, tensor in mlp.mlp.state_dict().items():
        torch.testing.assert_close(neumf.mlp.state_dict()[name], tensor, rtol=0, atol=0)
    torch.testing.assert_close(neumf.predict.weight, torch.cat([0.5 * gmf.predict.weight, 0.5 * mlp.predict.weight], 1))
    torch.testing.assert_close(neumf.predict.bias, 0.5 * gmf.predict.bias + 0.5 * mlp.predict.bias)


def test_wide_and_deep_run_carries_the_side_features(movielens_runs: dict[str, Path]) -> None:
    from fromzero.finetune.recsys import load_recommender

    model, ids, _ = load_recommender(movielens_runs["widedeep"])
    assert model.config.has_side_features and model.config.genres == len(GENRES)
    assert model.config.occupations == 3 and model.config.genders == 2
    row = ids.item_index("1")
    assert model.item_genres[row].sum() >= 1 and model.item_genres[:, GENRES.index("Drama")].all()


def test_predict_lists_top_k_unrated_items_with_titles(movielens_runs: dict[str, Path], cli, one_line_error,
                                                       tmp_path: Path) -> None:
    from fromzero.finetune.recsys import Recommender

    run = movielens_runs["widedeep"]
    result = cli("predict", "--checkpoint", run, "--user", "7", "--k", "5")
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in result.out.splitlines()]
    rated = set(Recommender(run).rated("7"))
    assert len(rated) == 10 and [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["user"] == "7" and r["item"] not in rated for r in rows)
    assert all(r["title"] == f"Movie {r['item']} ({1949 + int(r['item'])})" and "Drama" in r["genres"] for r in rows)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    # --rated leaves out more: the first recommendation is gone from the next list
    more = tmp_path / "rated.csv"
    more.write_text(f"user,item,rating\n7,{rows[0]['item']},5\n8,{rows[1]['item']},1\n", encoding="utf-8")
    again = cli("predict", "--checkpoint", run, "--user", "7", "--k", "5", "--rated", more)
    items = [json.loads(line)["item"] for line in again.out.splitlines()]
    assert items == [r["item"] for r in rows[1:]] + items[4:] and rows[0]["item"] not in items
    one_line_error(cli("predict", "--checkpoint", run, "--user", "999"), "unknown user '999'")
    more.write_text("user,film\n7,3\n", encoding="utf-8")
    one_line_error(cli("predict", "--checkpoint", run, "--user", "7", "--rated", more), "missing column item")
    more.write_text("item\n4242\n", encoding="utf-8")
    one_line_error(cli("predict", "--checkpoint", run, "--user", "7", "--rated", more), "unknown item '4242'")


def test_evaluate_reproduces_the_runs_test_metrics(movielens_runs: dict[str, Path], cli) -> None:
    run = movielens_runs["widedeep"]
    result = cli("evaluate", "--checkpoint", run)
    assert result.code == 0, result.err
    got = json.loads(result.out)
    want = json.loads((run / "metrics.json").read_text())
    assert got["split"] == "test" and got["n"] == want["n"] == 40 and got["eval_negatives"] == 20
    assert got["hr@10"] == pytest.approx(want["hr@10"]) and got["ndcg@10"] == pytest.approx(want["ndcg@10"])
