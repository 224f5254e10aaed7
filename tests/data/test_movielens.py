"""MovieLens in RecBole's layout (fromzero.data.movielens) and the NCF protocol on it.

Tiny fixture files in the recbole layout (typed headers ``name:type``) check the parser, the
side features, leave-one-out with tied timestamps and the evaluation negatives by hand. The real
MovieLens-100K is read only when the pinned wheel's files are already in $FROMZERO_HOME (no
download in the tests); it must have 100,000 ratings, 943 users and 1,682 movies.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from fromzero.data.interactions import IdMap, implicit, leave_one_out
from fromzero.data.movielens import (MovieLens, age_bucket, read_atomic_file, read_recbole_interactions,
                                     read_recbole_items, read_recbole_users, side_features, year_bucket)
from fromzero.errors import FromzeroError

# u1 rates 5 movies; its last two share timestamp 50, so file order decides: item 4 (later row)
# is the test item, item 5 validation. u2 rates 3 (val 3, test 1). u3 rates 2: too few, dropped.
# u4 rates 6, 7, 1 (val 7, test 1).
INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
1\t1\t5\t10
1\t2\t3\t20
1\t3\t4\t30
1\t5\t2\t50
1\t4\t1\t50
2\t2\t4\t5
2\t3\t4\t6
2\t1\t4\t7
3\t1\t5\t1
3\t2\t5\t2
4\t6\t3\t1
4\t7\t3\t2
4\t1\t3\t3
"""
ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
1\tToy Story\t1995\tAnimation Children's Comedy
2\tUsual Suspects, The\t1995\tCrime Thriller
3\tBlade Runner\t1982\tFilm-Noir Sci-Fi
4\tunkonwn\tunkonwn\tunknown
5\tCasablanca\t1942\tDrama Romance War
6\tPsycho\t1960\tHorror Romance Thriller
7\tFargo\t1996\tCrime Drama Thriller
"""
USER = """user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token
1\t24\tM\ttechnician\t85711
2\t53\tF\tother\t94043
3\t17\tM\tstudent\t32067
4\t60\tF\tother\t10000
"""


def movielens_files(folder: Path) -> tuple[Path, Path, Path]:
    """The fixture as ml-100k.{inter,item,user} in ``folder``."""
    paths = []
    for suffix, text in (("inter", INTER), ("item", ITEM), ("user", USER)):
        path = folder / f"ml-100k.{suffix}"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1], paths[2]


def tiny_movielens(folder: Path) -> MovieLens:
    inter, item, user = movielens_files(folder)
    return MovieLens(read_recbole_interactions(inter), read_recbole_items(item), read_recbole_users(user))


def test_parser_reads_typed_headers_titles_years_genres_and_users(tmp_path: Path) -> None:
    ml = tiny_movielens(tmp_path)
    inter = ml.interactions
    assert len(inter) == 13 and inter.users[:2].tolist() == ["1", "1"] and inter.items[4] == "4"
    assert inter.ratings[:3].tolist() == [5.0, 3.0, 4.0] and inter.timestamps[3:5].tolist() == [50.0, 50.0]
    assert inter.where(4).endswith("ml-100k.inter line 6")
    items = ml.items
    assert items.titles[1] == "Usual Suspects, The" and items.years[:3] == [1995, 1995, 1982]
    assert items.years[3] is None  # "unkonwn" in the real file
    assert items.genres[0] == ["Animation", "Children's", "Comedy"] and items.genres[2] == ["Film-Noir", "Sci-Fi"]
    described = items.describe()
    assert described["1"] == {"title": "Toy Story (1995)", "genres": ["Animation", "Children's", "Comedy"]}
    assert described["4"]["title"] == "unkonwn"
    assert ml.users.ages == [24, 53, 17, 60] and ml.users.genders == ["M", "F", "M", "F"]
    assert ml.users.occupations == ["technician", "other", "student", "other"]


@pytest.mark.parametrize("text, message", [
    ("user_id:token\titem_id:token\trating:float\n1\t2\t3\n", "missing column(s) timestamp"),
    ("user_id\titem_id:token\ttimestamp:float\n1\t2\t3\n", "is not name:type"),
    ("user_id:token\titem_id:int\ttimestamp:float\n1\t2\t3\n", "is not name:type"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\n", "line 2: 2 tab-separated field(s), expected 3"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\tsoon\n", "timestamp 'soon' is not a number"),
    ("user_id:token\titem_id:token\ttimestamp:float\n", "has a header but no rows"),
    ("", "is empty"),
])
def test_bad_atomic_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "x.inter"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(FromzeroError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_recbole_interactions(path)


def test_bad_item_and_user_files(tmp_path: Path) -> None:
    _, item, user = movielens_files(tmp_path)
    item.write_text(ITEM + "3\tAgain\t1999\tDrama\n", encoding="utf-8")
    with pytest.raises(FromzeroError, match="item '3' is listed twice"):
        read_recbole_items(item)
    user.write_text(USER.replace("\t53\t", "\tfifty\t"), encoding="utf-8")
    with pytest.raises(FromzeroError, match="age 'fifty'"):
        read_recbole_users(user)
    user.write_text("user_id:token\tage:token\tgender:token\n1\t2\tM\n", encoding="utf-8")
    with pytest.raises(FromzeroError, match="missing column.s. occupation"):
        read_atomic_file(user, ("user_id", "age", "gender", "occupation"))


def test_leave_one_out_with_tied_timestamps_and_fixed_unseen_negatives(tmp_path: Path) -> None:
    ml = tiny_movielens(tmp_path)
    notes: list[str] = []
    data = leave_one_out(implicit(ml.interactions, 0, notes), None, notes, keep_cold=True)
    raw = lambda pairs: sorted((data.ids.users[u], data.ids.items[i]) for u, i in pairs)  # noqa: E731
    assert raw(data.test) == [("1", "4"), ("2", "1"), ("4", "1")]  # tie at 50: the later row of the file
    assert raw(data.val) == [("1", "5"), ("2", "3"), ("4", "7")]
    assert raw(data.train) == [("1", "1"), ("1", "2"), ("1", "3"), ("2", "2"), ("4", "6")]
    assert any("1 user(s) with fewer than 3" in n for n in notes)  # user 3
    # keep_cold: items 4, 5 and 7 (only held out) still get rows, so every user is evaluated
    assert data.ids.items == [str(i) for i in range(1, 8)] and data.ids.users == ["1", "2", "4"]
    es = data.eval_set("test", negatives=2, seed=7)
    assert es.items.shape == (3, 3)
    rated = {"1": {"1", "2", "3", "4", "5"}, "2": {"1", "2", "3"}, "4": {"6", "7", "1"}}
    for u, row in zip(es.users, es.items):
        user = data.ids.users[u]
        negatives = {data.ids.items[i] for i in row[1:]}
        assert len(negatives) == 2 and not negatives & rated[user]
        if user == "1":
            assert negatives == {"6", "7"}  # the only movies user 1 never rated
    # user 1 has two unrated movies: three negatives are impossible -> one clear line
    with pytest.raises(FromzeroError, match="user '1' has only 2 of the 7 items left"):
        data.eval_set("test", negatives=3, seed=7)
    # without keep_cold the held-out-only items are dropped from evaluation, with a note
    dropped: list[str] = []
    plain = leave_one_out(implicit(ml.interactions), None, dropped)
    assert plain.ids.items == ["1", "2", "3", "6"] and len(plain.test) == 2
    assert any("never seen in training" in n for n in dropped)


def test_evaluation_negatives_are_fixed_by_seed_and_never_rated(tmp_path: Path) -> None:
    inter = tmp_path / "x.inter"
    rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    rng = np.random.default_rng(0)
    for u in range(1, 21):
        for t, i in enumerate(rng.choice(60, size=8, replace=False)):
            rows.append(f"{u}\t{i + 1}\t{t}")
    inter.write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = leave_one_out(implicit(read_recbole_interactions(inter)), keep_cold=True)
    a, b = data.eval_set("test", 20, seed=3), data.eval_set("test", 20, seed=3)
    np.testing.assert_array_equal(a.items, b.items)
    assert not np.array_equal(a.items[:, 1:], data.eval_set("val", 20, seed=3).items[:, 1:])
    known = set(data.known.tolist())
    for u, row in zip(a.users, a.items):
        assert len(set(row[1:].tolist())) == 20
        assert all(u * data.ids.num_items + i not in known for i in row[1:])


def test_implicit_never_merges_distinct_pairs() -> None:
    """User '1' x item '23' and user '12' x item '3' are different ratings (they collided once)."""
    from fromzero.data.interactions import Interactions

    inter = Interactions(np.array(["1", "12", "1"], dtype=object), np.array(["23", "3", "23"], dtype=object),
                         np.ones(3), np.array([1.0, 2.0, 3.0]))
    notes: list[str] = []
    kept = implicit(inter, 0, notes)
    assert sorted(zip(kept.users, kept.items)) == [("1", "23"), ("12", "3")]
    assert notes == ["1 repeated (user, item) interaction(s) merged into the earliest"]


def test_side_features_align_with_the_id_map(tmp_path: Path) -> None:
    ml = tiny_movielens(tmp_path)
    ids = IdMap(["2", "1"], ["3", "4", "1"])
    side = side_features(ids, ml.items, ml.users)
    assert side.sizes == {"genres": len(side.genres), "occupations": 3, "genders": 2, "age_buckets": 7,
                          "year_buckets": 9}
    assert side.occupations == ["other", "student", "technician"]
    assert side.user_occupation.tolist() == [0, 2] and side.user_gender.tolist() == [0, 1]
    assert side.user_age.tolist() == [age_bucket(53), age_bucket(24)] == [5, 1]
    assert side.item_year.tolist() == [year_bucket(1982), 0, year_bucket(1995)] == [6, 0, 8]
    col = {g: k for k, g in enumerate(side.genres)}
    assert side.item_genres[0].sum() == 2 and side.item_genres[0, col["Sci-Fi"]] == 1
    assert side.item_genres[1].tolist() == [1.0 if g == "unknown" else 0.0 for g in side.genres]
    with pytest.raises(FromzeroError, match="user '9' has interactions but no row in the user file"):
        side_features(IdMap(["9"], ["1"]), ml.items, ml.users)


def test_the_wheel_itself_is_checked_before_anything_is_cached(tmp_path: Path, monkeypatch) -> None:
    """A wheel with the right member but other bytes than the pinned recbole-1.2.1 is refused."""
    from fromzero.data.movielens import FILES
    from fromzero.data.packages import fetch_package_files

    inter, item, user = movielens_files(tmp_path)
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for spec, path in zip(FILES, (inter, item, user)):
            z.write(path, spec.member)
    monkeypatch.setenv("FROMZERO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FROMZERO_RECBOLE_WHEEL", str(wheel))
    with pytest.raises(FromzeroError, match="expected 9c9948202011f37e.*nothing was cached"):
        fetch_package_files(list(FILES))
    assert not any(p.is_file() and not p.name.startswith(".") for p in (tmp_path / "home").rglob("*"))


def _cached() -> bool:
    from fromzero.data.movielens import FILES
    from fromzero.data.packages import _quick_verify

    return all(_quick_verify(spec) for spec in FILES)


@pytest.mark.skipif(not _cached(), reason="MovieLens-100K is not in $FROMZERO_HOME (fetched on first use)")
def test_real_movielens_100k_counts_and_protocol() -> None:
    from fromzero.data.movielens import load_movielens_100k

    ml = load_movielens_100k()
    assert len(ml.interactions) == 100_000 and len(ml.items.ids) == 1682 and len(ml.users.ids) == 943
    notes: list[str] = []
    data = leave_one_out(implicit(ml.interactions, 0, notes), None, notes, keep_cold=True)
    assert notes == []  # no duplicate ratings, every user has >= 20
    assert (data.ids.num_users, data.ids.num_items) == (943, 1682)
    assert len(data.train) == 100_000 - 2 * 943 and len(data.val) == len(data.test) == 943
    side = side_features(data.ids, ml.items, ml.users)
    assert side.sizes == {"genres": 19, "occupations": 21, "genders": 2, "age_buckets": 7, "year_buckets": 9}
    assert ml.items.describe()["50"]["title"] == "Star Wars (1977)"
