"""``movielens-100k``: 100,000 ratings of 1,682 movies by 943 users (GroupLens, 1998), built in.

The files are RecBole's copy of MovieLens-100K, shipped in the PyPI wheel ``recbole==1.2.1``
(fetched once, wheel and files sha256-checked, by
:func:`fromzero.data.packages.fetch_package_files`; recbole itself is never imported). They are
RecBole *atomic files*: tab-separated, with a typed header ``name:type`` (``token``,
``token_seq`` (space-separated tokens), ``float``, ``float_seq``)::

    ml-100k.inter  user_id:token  item_id:token  rating:float  timestamp:float      100,000 rows
    ml-100k.item   item_id:token  movie_title:token_seq  release_year:token  class:token_seq   1,682
    ml-100k.user   user_id:token  age:token  gender:token  occupation:token  zip_code:token   943

``class`` holds the movie's genres (19, ``Children's`` and ``Sci-Fi`` are single tokens; two
movies are ``unknown``); a release year that is not four digits (``unkonwn`` for item 267, ``V``
for item 1412) is read as unknown. Every user has at least 20 ratings.

:func:`read_atomic_file` reads any such file (a missing column or a row with the wrong number of
fields is a one-line :class:`FromzeroError` naming the file and line); :func:`load_movielens_100k`
returns the interactions (for :mod:`fromzero.data.interactions`), the item catalog (titles, years,
genres) and the user profiles (age, gender, occupation); :func:`side_features` turns the latter two
into the index arrays Wide & Deep reads, aligned with a model's :class:`IdMap`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fromzero.data.interactions import IdMap, Interactions
from fromzero.data.packages import PackageFile, fetch_package_files
from fromzero.errors import FromzeroError

NAME = "movielens-100k"
_WHEEL = dict(dist="recbole", version="1.2.1", env="FROMZERO_RECBOLE_WHEEL",
              archive_sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
              offline_hint="give an interactions CSV or ratings.dat instead")
ML100K_INTER = PackageFile(member="recbole/dataset_example/ml-100k/ml-100k.inter", size=1979230,
                           sha256="4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
                           what="MovieLens-100K's ratings (ml-100k.inter)", **_WHEEL)
ML100K_ITEM = PackageFile(member="recbole/dataset_example/ml-100k/ml-100k.item", size=66632,
                          sha256="51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
                          what="MovieLens-100K's movies (ml-100k.item)", **_WHEEL)
ML100K_USER = PackageFile(member="recbole/dataset_example/ml-100k/ml-100k.user", size=22697,
                          sha256="4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
                          what="MovieLens-100K's users (ml-100k.user)", **_WHEEL)
FILES = (ML100K_INTER, ML100K_ITEM, ML100K_USER)
TYPES = ("token", "token_seq", "float", "float_seq")

# MovieLens-1M's age groups (its README), used here for 100K's exact ages:
# under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+.
AGE_EDGES = (18, 25, 35, 45, 50, 56)
# Release-year buckets: 0 = unknown, then before 1940, the 1940s ... 1980s, 1990-94, 1995 on
# (half the movies are from 1995-98: the last decade is split).
YEAR_EDGES = (1940, 1950, 1960, 1970, 1980, 1990, 1995)
_YEAR = re.compile(r"^\d{4}$")


@dataclass
class ItemCatalog:
    """What the item file says about each movie, in file order."""

    ids: list[str]
    titles: list[str]
    years: list[int | None]  # None: not a four-digit year in the file
    genres: list[list[str]]

    def describe(self) -> dict[str, dict]:
        """raw item id -> {"title": "Star Wars (1977)", "genres": [...]} (what predict prints)."""
        return {i: {"title": f"{t} ({y})" if y else t, "genres": g}
                for i, t, y, g in zip(self.ids, self.titles, self.years, self.genres)}


@dataclass
class UserProfiles:
    """What the user file says about each user, in file order."""

    ids: list[str]
    ages: list[int]
    genders: list[str]
    occupations: list[str]


@dataclass
class MovieLens:
    interactions: Interactions
    items: ItemCatalog
    users: UserProfiles


@dataclass
class SideFeatures:
    """User and item features as indices aligned with an :class:`IdMap` (row k = user / item k)."""

    genres: list[str]  # names of the multi-hot columns
    occupations: list[str]
    genders: list[str]
    user_occupation: np.ndarray  # (U,) int64 index into occupations
    user_age: np.ndarray  # (U,) int64 age bucket 0 .. len(AGE_EDGES)
    user_gender: np.ndarray  # (U,) int64 index into genders
    item_genres: np.ndarray  # (I, G) float32 multi-hot
    item_year: np.ndarray  # (I,) int64 year bucket 0 (unknown) .. len(YEAR_EDGES) + 1

    @property
    def sizes(self) -> dict[str, int]:
        """The cardinalities a model config needs (RecsysConfig's side-feature fields)."""
        return {"genres": len(self.genres), "occupations": len(self.occupations),
                "genders": len(self.genders), "age_buckets": len(AGE_EDGES) + 1,
                "year_buckets": len(YEAR_EDGES) + 2}


# ---------------------------------------------------------------------------------------------
# RecBole atomic files


def read_atomic_file(path: str | Path,
                     required: tuple[str, ...]) -> tuple[list[str], list[list[str]], list[int]]:
    """(column names, rows of fields, 1-based line numbers) of a RecBole atomic file.

    The header must type every column (``name:token`` ...) and name every ``required`` column;
    each row must have as many tab-separated fields as the header. Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FromzeroError(f"file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise FromzeroError(f"{path} is not UTF-8 text") from None
    if not lines or not lines[0].strip():
        raise FromzeroError(f"{path} is empty (expected a RecBole header like "
                            "user_id:token<TAB>item_id:token)")
    names = []
    for field in lines[0].rstrip("\r").split("\t"):
        name, colon, kind = field.strip().rpartition(":")
        if not colon or not name or kind not in TYPES:
            raise FromzeroError(f"{path} line 1: header field {field!r} is not name:type with type one of "
                                f"{', '.join(TYPES)} (a RecBole atomic file)")
        names.append(name)
    missing = [c for c in required if c not in names]
    if missing:
        raise FromzeroError(f"{path} is missing column(s) {', '.join(missing)} (found: {', '.join(names)})")
    rows, numbers = [], []
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(names):
            raise FromzeroError(f"{path} line {number}: {len(fields)} tab-separated field(s), "
                                f"expected {len(names)}")
        rows.append(fields)
        numbers.append(number)
    if not rows:
        raise FromzeroError(f"{path} has a header but no rows")
    return names, rows, numbers


def _column(names: list[str], rows: list[list[str]], name: str) -> list[str]:
    k = names.index(name)
    return [r[k].strip() for r in rows]


def read_recbole_interactions(path: str | Path) -> Interactions:
    """``user_id``, ``item_id``, ``timestamp`` (+ optional ``rating``) of a ``.inter`` file."""
    from fromzero.data.interactions import _build, _row

    names, rows, numbers = read_atomic_file(path, ("user_id", "item_id", "timestamp"))
    columns = [_column(names, rows, c) for c in ("user_id", "item_id")]
    ratings = _column(names, rows, "rating") if "rating" in names else [None] * len(rows)
    stamps = _column(names, rows, "timestamp")
    out = [_row(f"{path} line {n}", n, u, i, r, t)
           for n, u, i, r, t in zip(numbers, columns[0], columns[1], ratings, stamps)]
    return _build(out, str(path))


def read_recbole_items(path: str | Path) -> ItemCatalog:
    """Titles, release years and genres (``class``) of a MovieLens ``.item`` file."""
    names, rows, numbers = read_atomic_file(path, ("item_id", "movie_title", "release_year", "class"))
    ids = _column(names, rows, "item_id")
    _unique(ids, numbers, path, "item")
    years = [int(y) if _YEAR.match(y) else None for y in _column(names, rows, "release_year")]
    return ItemCatalog(ids, _column(names, rows, "movie_title"), years,
                       [g.split() for g in _column(names, rows, "class")])


def read_recbole_users(path: str | Path) -> UserProfiles:
    """Age, gender and occupation of a MovieLens ``.user`` file."""
    names, rows, numbers = read_atomic_file(path, ("user_id", "age", "gender", "occupation"))
    ids = _column(names, rows, "user_id")
    _unique(ids, numbers, path, "user")
    ages = []
    for n, age in zip(numbers, _column(names, rows, "age")):
        if not age.isdigit() or not 0 < int(age) < 130:
            raise FromzeroError(f"{path} line {n}: age {age!r} is not a whole number of years")
        ages.append(int(age))
    genders, occupations = _column(names, rows, "gender"), _column(names, rows, "occupation")
    for n, g, o in zip(numbers, genders, occupations):
        if not g or not o:
            raise FromzeroError(f"{path} line {n}: empty gender or occupation")
    return UserProfiles(ids, ages, genders, occupations)


def _unique(ids: list[str], numbers: list[int], path: str | Path, what: str) -> None:
    seen: set[str] = set()
    for n, i in zip(numbers, ids):
        if not i:
            raise FromzeroError(f"{path} line {n}: empty {what} id")
        if i in seen:
            raise FromzeroError(f"{path} line {n}: {what} {i!r} is listed twice")
        seen.add(i)


@lru_cache(maxsize=1)
def load_movielens_100k() -> MovieLens:
    """The built-in MovieLens-100K (fetched on first use, then read from $FROMZERO_HOME)."""
    inter, item, user = fetch_package_files(list(FILES))
    return MovieLens(read_recbole_interactions(inter), read_recbole_items(item), read_recbole_users(user))


# ---------------------------------------------------------------------------------------------
# Side features for Wide & Deep


def age_bucket(age: int) -> int:
    return int(np.searchsorted(AGE_EDGES, age, side="right"))


def year_bucket(year: int | None) -> int:
    return 0 if year is None else 1 + int(np.searchsorted(YEAR_EDGES, year, side="right"))


def side_features(ids: IdMap, items: ItemCatalog, users: UserProfiles) -> SideFeatures:
    """The features of every user and item of ``ids``; one missing from the files is an error."""
    item_row = {i: k for k, i in enumerate(items.ids)}
    user_row = {u: k for k, u in enumerate(users.ids)}
    for what, wanted, known in (("item", ids.items, item_row), ("user", ids.users, user_row)):
        absent = [x for x in wanted if x not in known]
        if absent:
            raise FromzeroError(f"{what} {absent[0]!r} has interactions but no row in the {what} file "
                                f"({len(absent)} such {what}s)")
    genres = sorted({g for gs in items.genres for g in gs})
    occupations, genders = sorted(set(users.occupations)), sorted(set(users.genders))
    g_col, o_idx, s_idx = ({n: k for k, n in enumerate(v)} for v in (genres, occupations, genders))
    multi_hot = np.zeros((ids.num_items, len(genres)), dtype=np.float32)
    year = np.zeros(ids.num_items, dtype=np.int64)
    for k, raw in enumerate(ids.items):
        r = item_row[raw]
        multi_hot[k, [g_col[g] for g in items.genres[r]]] = 1.0
        year[k] = year_bucket(items.years[r])
    rows = [user_row[u] for u in ids.users]
    return SideFeatures(
        genres, occupations, genders,
        np.array([o_idx[users.occupations[r]] for r in rows], dtype=np.int64),
        np.array([age_bucket(users.ages[r]) for r in rows], dtype=np.int64),
        np.array([s_idx[users.genders[r]] for r in rows], dtype=np.int64),
        multi_hot, year)
