"""User-item interactions for recommenders: reading, implicit feedback, leave-one-out, sampling.

The evaluation protocol is the one of Neural Collaborative Filtering (He et al., 2017):

1. **Implicit feedback.** Every interaction is a positive ("the user watched it"); with
   ``min_rating`` only those rated at least that much are. Everything else is unobserved, not
   negative: a user who never saw an item may still like it.
2. **Leave-one-out.** Each user's latest interaction (by timestamp) is held out as the test
   positive, the one before it as the validation positive; the rest is training data. Equal
   timestamps are common (MovieLens-100K: 415 of 943 users have two or more ratings at their
   latest second): among them the later row of the file counts as later, so the split is a
   function of the file alone.
3. **Negative sampling for training.** Each training positive comes with ``k`` items the user has
   not interacted with in training, drawn uniformly and drawn again every epoch (seeded), so the
   model learns a classifier "interacted or not" from log loss.
4. **Sampled ranking evaluation.** Each held-out positive is ranked among 99 items the user never
   interacted with (drawn once, with a fixed seed, so every model and epoch sees the same
   candidates); HR@10 is the share of positives ranked in the top 10, NDCG@10 rewards a higher
   place: 1 / log2(rank + 2) for a 0-based rank below 10.

In code: :func:`read_interactions` (or :func:`synthetic_interactions`) -> :func:`implicit` ->
:func:`leave_one_out` -> ``RecData.eval_set`` -> a model's scores -> :func:`ranking_metrics`.

Raw ids are kept as strings ("1" for MovieLens' integer ids); :class:`IdMap` maps them to the
contiguous indices the embeddings use and is saved with a checkpoint, so predictions name raw ids.

Bad input (a missing column, a non-numeric rating or timestamp, a user unknown at training in a
separate test file, ...) raises :class:`FromzeroError` with a one-line message naming the file and
line.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fromzero.errors import FromzeroError

# Header names accepted for each column: the plain ones first, then MovieLens' ratings.csv names.
COLUMNS: dict[str, tuple[str, ...]] = {
    "user": ("user", "user_id", "userid"),
    "item": ("item", "item_id", "itemid", "movieid", "movie_id", "movie"),
    "rating": ("rating",),
    "timestamp": ("timestamp", "time", "ts"),
}


@dataclass
class Interactions:
    """Raw interactions as parallel arrays, one entry per row of the source."""

    users: np.ndarray  # (N,) raw user ids (str, numpy object array)
    items: np.ndarray  # (N,) raw item ids (str)
    ratings: np.ndarray  # (N,) float64 ratings (1.0 everywhere for a file without a rating column)
    timestamps: np.ndarray  # (N,) float64 timestamps (any numeric unit; only their order matters)
    source: str = ""  # where they came from (a file path or "synthetic"), for messages
    lines: np.ndarray | None = None  # (N,) 1-based line numbers in the source (None for generated data)

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, mask: np.ndarray) -> "Interactions":
        """The rows where ``mask`` is true (or the rows at the given indices)."""
        lines = None if self.lines is None else self.lines[mask]
        return Interactions(self.users[mask], self.items[mask], self.ratings[mask], self.timestamps[mask],
                            self.source, lines)

    def where(self, i: int) -> str:
        """'file line N' for row i (or 'file row i' for generated data)."""
        return f"{self.source} line {self.lines[i]}" if self.lines is not None else f"{self.source} row {i + 1}"


# ---------------------------------------------------------------------------------------------
# Reading


def read_interactions(path: str | Path) -> Interactions:
    """An interactions CSV (header required) or a MovieLens ``ratings.dat`` (``::``, no header)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FromzeroError(f"interactions file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            first = f.readline()
    except UnicodeDecodeError:
        raise FromzeroError(f"{path} is not UTF-8 text") from None
    if path.suffix == ".dat" or "::" in first:
        return read_ratings_dat(path)
    return read_interactions_csv(path)


def _number(text: str, what: str, where: str) -> float:
    """float(text), or a one-line error naming the column and the line."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise FromzeroError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise FromzeroError(f"{where}: {what} {text!r} is not a finite number")
    return value


def _raw_id(text: str | None, what: str, where: str) -> str:
    value = (text or "").strip()
    if not value:
        raise FromzeroError(f"{where}: empty {what} id")
    return value


def _row(where: str, line: int, user: str, item: str, rating: str | None, stamp: str) -> tuple:
    """(user, item, rating, timestamp, line) of one row, checked; no rating counts as 1."""
    return (_raw_id(user, "user", where), _raw_id(item, "item", where),
            1.0 if rating is None else _number(rating.strip(), "rating", where),
            _number(stamp.strip(), "timestamp", where), line)


def read_interactions_csv(path: str | Path) -> Interactions:
    """CSV with a header naming ``user``, ``item``, ``timestamp`` and (optionally) ``rating``.

    MovieLens' ``ratings.csv`` header (``userId,movieId,rating,timestamp``) is accepted as is;
    other columns are ignored. Without a rating column every row counts as rating 1.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise FromzeroError(f"{path} is empty (expected a header user,item,rating,timestamp)")
            names = [h.strip().lower() for h in header]
            index: dict[str, int] = {}
            for column, aliases in COLUMNS.items():
                found = [names.index(a) for a in aliases if a in names]
                if found:
                    index[column] = found[0]
            missing = [c for c in ("user", "item", "timestamp") if c not in index]
            if missing:
                if all(_looks_numeric(h) for h in header if h.strip()):
                    raise FromzeroError(f"{path} has no header row: the first line must name the columns "
                                        "user,item,rating,timestamp")
                raise FromzeroError(f"{path} is missing column(s) {', '.join(missing)} (found: {', '.join(header)}; "
                                    "expected user,item,rating,timestamp)")
            rows = []
            width = max(index.values()) + 1
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue  # blank line
                where = f"{path} line {line}"
                if len(row) < width:
                    raise FromzeroError(f"{where}: {len(row)} field(s), expected at least {width}")
                rating = row[index["rating"]] if "rating" in index else None
                rows.append(_row(where, line, row[index["user"]], row[index["item"]], rating,
                                 row[index["timestamp"]]))
    except UnicodeDecodeError:
        raise FromzeroError(f"{path} is not UTF-8 text") from None
    except csv.Error as e:
        raise FromzeroError(f"{path}: malformed CSV: {e}") from None
    return _build(rows, str(path))


def read_user_items(path: str | Path, user: str) -> list[str]:
    """The items ``user`` has in a CSV with an ``item`` column (+ ``user``: then only that user's
    rows count; other columns are ignored): what ``fromzero predict --user`` leaves out."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FromzeroError(f"interactions file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            index = {c: next((header.index(a) for a in COLUMNS[c] if a in header), None)
                     for c in ("user", "item")}
            if index["item"] is None:
                found = ", ".join(header) or "no header"
                raise FromzeroError(f"{path} is missing column item (found: {found}; expected item, "
                                    "and optionally user)")
            items = []
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                where = f"{path} line {reader.line_num}"
                if len(row) <= max(i for i in index.values() if i is not None):
                    raise FromzeroError(f"{where}: {len(row)} field(s), too few for the header")
                if index["user"] is not None and row[index["user"]].strip() != str(user):
                    continue
                items.append(_raw_id(row[index["item"]], "item", where))
    except UnicodeDecodeError:
        raise FromzeroError(f"{path} is not UTF-8 text") from None
    except csv.Error as e:
        raise FromzeroError(f"{path}: malformed CSV: {e}") from None
    return items


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_ratings_dat(path: str | Path) -> Interactions:
    """MovieLens 1M/10M ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, no header."""
    path = Path(path)
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line, text in enumerate(f, start=1):
                text = text.strip()
                if not text:
                    continue
                where = f"{path} line {line}"
                parts = text.split("::")
                if len(parts) != 4:
                    raise FromzeroError(f"{where}: expected UserID::MovieID::Rating::Timestamp, got {text[:60]!r}")
                rows.append(_row(where, line, *parts))
    except UnicodeDecodeError:
        raise FromzeroError(f"{path} is not UTF-8 text") from None
    return _build(rows, str(path))


def _build(rows: list[tuple], source: str) -> Interactions:
    if not rows:
        raise FromzeroError(f"{source} has no interactions")
    users, items, ratings, stamps, lines = zip(*rows)
    return Interactions(np.array(users, dtype=object), np.array(items, dtype=object),
                        np.asarray(ratings, dtype=np.float64), np.asarray(stamps, dtype=np.float64), source,
                        np.asarray(lines, dtype=np.int64))


def write_interactions_csv(inter: Interactions, path: str | Path) -> None:
    """Write ``user,item,rating,timestamp`` (the layout :func:`read_interactions_csv` reads)."""
    from fromzero.checkpoint import atomic_write_text

    rows = ["user,item,rating,timestamp"]
    for u, i, r, t in zip(inter.users, inter.items, inter.ratings, inter.timestamps):
        rows.append(f"{u},{i},{r:g},{int(t) if float(t).is_integer() else t}")
    atomic_write_text(Path(path), "\n".join(rows) + "\n")


# ---------------------------------------------------------------------------------------------
# A synthetic dataset with latent structure


def synthetic_interactions(users: int = 1000, items: int = 500, clusters: int = 8, per_user: int = 20,
                           affinity: float = 0.75, seed: int = 0) -> Interactions:
    """Interactions with structure a model can learn and popularity alone cannot.

    Every user and item belongs to one of ``clusters`` latent tastes; items have a skewed
    (log-normal) popularity. A user picks ``~per_user`` distinct items with probability
    proportional to popularity x affinity, the affinity chosen so that about ``affinity`` of a
    user's picks fall in their own cluster. Picks happen in random order (timestamps increase), so
    the held-out latest item is a typical pick. Ratings are high (4-5) inside the user's cluster
    and low (1-3) outside, so ``min_rating`` 4 keeps mostly the in-taste picks.

    Ranking by popularity finds the popular items of every cluster; a model that also learns each
    user's cluster ranks the held-out item far higher (see benchmarks/recsys.py).
    """
    if min(users, items, clusters, per_user) <= 0:
        raise FromzeroError("synthetic data needs positive users, items, clusters and per_user")
    if clusters > items:
        raise FromzeroError(f"synthetic data: {clusters} clusters need at least as many items, got {items}")
    if per_user + 2 > items:
        raise FromzeroError(f"synthetic data: per_user {per_user} needs at least {per_user + 2} items, got {items}")
    if not 0.0 < affinity < 1.0:
        raise FromzeroError(f"synthetic affinity must be in (0, 1), got {affinity}")
    rng = np.random.default_rng(seed)
    item_cluster, popularity, user_cluster = _latent(rng, users, items, clusters)
    boost = _boost(clusters, affinity)
    probs = []
    for c in range(clusters):
        w = popularity * np.where(item_cluster == c, boost, 1.0)
        probs.append(w / w.sum())
    counts = np.clip(np.round(rng.lognormal(math.log(per_user), 0.4, size=users)), 3, items - 2).astype(int)
    out_u, out_i, out_r, out_t = [], [], [], []
    t0 = 978_300_000  # MovieLens-1M era Unix time, for realism only
    for u in range(users):
        picks = rng.choice(items, size=counts[u], replace=False, p=probs[user_cluster[u]])
        picks = rng.permutation(picks)  # choice() favours popular items first: make the order random
        inside = item_cluster[picks] == user_cluster[u]
        mean = np.where(inside, 4.4, 2.2)
        ratings = np.clip(np.round(rng.normal(mean, 0.7)), 1, 5)
        stamps = t0 + np.cumsum(rng.integers(60, 86_400, size=len(picks)))
        out_u += [str(u + 1)] * len(picks)
        out_i += [str(i + 1) for i in picks]
        out_r.append(ratings)
        out_t.append(stamps)
    return Interactions(np.array(out_u, dtype=object), np.array(out_i, dtype=object),
                        np.concatenate(out_r).astype(np.float64), np.concatenate(out_t).astype(np.float64),
                        "synthetic", None)


def _latent(rng: np.random.Generator, users: int, items: int, clusters: int) -> tuple[np.ndarray, ...]:
    """The generator's first draws: item clusters, item popularity, user clusters."""
    item_cluster = rng.permutation(np.arange(items) % clusters)  # every cluster gets items
    popularity = rng.lognormal(0.0, 1.0, size=items)
    user_cluster = rng.integers(0, clusters, size=users)
    return item_cluster, popularity, user_cluster


def _boost(clusters: int, affinity: float) -> float:
    """Weight of an in-cluster item relative to an out-of-cluster one, so that with equal cluster
    sizes the in-cluster share of the probability mass is ``affinity``."""
    return affinity * (clusters - 1) / (1.0 - affinity) if clusters > 1 else 1.0


def synthetic_preferences(users: np.ndarray, items: np.ndarray, n_users: int = 1000, n_items: int = 500,
                          clusters: int = 8, affinity: float = 0.75, seed: int = 0) -> np.ndarray:
    """The generator's true (unnormalised) preference of raw user ids for raw item ids:
    popularity x affinity boost, as :func:`synthetic_interactions` with the same arguments drew
    them. Ranking by it is the best any model can do: the ceiling in benchmarks/recsys.py."""
    item_cluster, popularity, user_cluster = _latent(np.random.default_rng(seed), n_users, n_items, clusters)
    u = np.vectorize(int)(np.asarray(users, dtype=object)) - 1
    i = np.vectorize(int)(np.asarray(items, dtype=object)) - 1
    return popularity[i] * np.where(item_cluster[i] == user_cluster[u], _boost(clusters, affinity), 1.0)


# ---------------------------------------------------------------------------------------------
# Implicit feedback, id mapping, leave-one-out


def implicit(inter: Interactions, min_rating: float = 0.0, notes: list[str] | None = None) -> Interactions:
    """Positives only: rows rated >= ``min_rating``, one per (user, item) (the earliest is kept:
    a re-watch is not a new item to recommend)."""
    keep = inter.ratings >= min_rating
    dropped = int((~keep).sum())
    inter = inter.subset(keep)
    if not len(inter):
        raise FromzeroError(f"{inter.source}: no interaction has rating >= {min_rating:g}")
    if dropped and notes is not None:
        notes.append(f"{dropped} interaction(s) rated below min_rating {min_rating:g} left out")
    order = np.lexsort((np.arange(len(inter)), inter.timestamps))  # by time, then file order
    # One integer per (user, item) pair. (Joining the two strings with a separator is not safe:
    # numpy drops a trailing "\x00", so user "1" + item "23" and user "12" + item "3" collided.)
    _, user_code = np.unique(inter.users[order].astype(str), return_inverse=True)
    item_names, item_code = np.unique(inter.items[order].astype(str), return_inverse=True)
    pairs = user_code.reshape(-1).astype(np.int64) * len(item_names) + item_code.reshape(-1)
    _, first = np.unique(pairs, return_index=True)
    duplicates = len(inter) - len(first)
    if duplicates and notes is not None:
        notes.append(f"{duplicates} repeated (user, item) interaction(s) merged into the earliest")
    return inter.subset(np.sort(order[first]))


def _sorted_ids(raw: np.ndarray) -> list[str]:
    """Distinct raw ids, in numeric order when all are integers (MovieLens), else text order."""
    distinct = sorted(set(raw.tolist()))
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return distinct


@dataclass
class IdMap:
    """Raw user / item ids <-> contiguous indices 0..n-1 (the rows of the embedding tables)."""

    users: list[str]
    items: list[str]
    _user_index: dict[str, int] = field(default_factory=dict, repr=False)
    _item_index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._user_index = {u: k for k, u in enumerate(self.users)}
        self._item_index = {i: k for k, i in enumerate(self.items)}

    @classmethod
    def build(cls, inter: Interactions) -> "IdMap":
        return cls(_sorted_ids(inter.users), _sorted_ids(inter.items))

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        return len(self.items)

    def user_index(self, raw: str | int) -> int:
        try:
            return self._user_index[str(raw)]
        except KeyError:
            raise FromzeroError(f"unknown user {str(raw)!r}: not among the {self.num_users} users seen in training") from None

    def item_index(self, raw: str | int) -> int:
        try:
            return self._item_index[str(raw)]
        except KeyError:
            raise FromzeroError(f"unknown item {str(raw)!r}: not among the {self.num_items} items seen in training") from None

    def encode(self, inter: Interactions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user indices, item indices, known mask): -1 and False where an id is unknown."""
        u = np.fromiter((self._user_index.get(x, -1) for x in inter.users), dtype=np.int64, count=len(inter))
        i = np.fromiter((self._item_index.get(x, -1) for x in inter.items), dtype=np.int64, count=len(inter))
        return u, i, (u >= 0) & (i >= 0)

    def to_json(self) -> dict[str, list[str]]:
        return {"users": list(self.users), "items": list(self.items)}

    @classmethod
    def from_json(cls, data: dict, where: str = "ids.json") -> "IdMap":
        users, items = data.get("users"), data.get("items")
        if not (isinstance(users, list) and isinstance(items, list)):
            raise FromzeroError(f"{where} must hold lists 'users' and 'items'")
        return cls([str(u) for u in users], [str(i) for i in items])


@dataclass
class EvalSet:
    """Held-out positives with their sampled negatives: row r ranks ``items[r, 0]`` (the positive)
    against ``items[r, 1:]`` for user ``users[r]``."""

    users: np.ndarray  # (n,) user indices
    items: np.ndarray  # (n, 1 + negatives) item indices; column 0 is the held-out positive

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class RecData:
    """Interactions split for training and leave-one-out evaluation, as indices of ``ids``."""

    ids: IdMap
    train: np.ndarray  # (N, 2) int64 [user, item] training positives
    val: np.ndarray  # (n_val, 2) validation positives (each user's second-latest interaction)
    test: np.ndarray  # (n_test, 2) test positives (each user's latest interaction, or the rows of test_data)
    # Sorted int64 keys user * num_items + item of every positive of train, val and test: what an
    # evaluation negative must not be.
    known: np.ndarray
    notes: list[str] = field(default_factory=list)  # what was dropped or merged on the way, for the console
    # Optional facts about users and items from the source (MovieLens): a data.movielens.SideFeatures
    # aligned with ``ids`` (what Wide & Deep reads) and {raw item id: {"title", "genres"}}.
    side: Any = None
    catalog: dict[str, dict] | None = None

    def history(self) -> tuple[np.ndarray, np.ndarray]:
        """Every positive (train, val and test) per user as CSR arrays: user u's items are
        ``items[indptr[u]:indptr[u + 1]]`` (what a recommendation for u leaves out)."""
        users, items = np.divmod(self.known, self.ids.num_items)
        indptr = np.searchsorted(users, np.arange(self.ids.num_users + 1))
        return indptr.astype(np.int64), items.astype(np.int64)

    def train_keys(self) -> np.ndarray:
        """Sorted keys of the training positives: what a training negative must not be."""
        return np.unique(self.train[:, 0] * self.ids.num_items + self.train[:, 1])

    def eval_set(self, split: str, negatives: int = 99, seed: int = 0) -> EvalSet:
        """The val or test positives with ``negatives`` sampled items each (fixed by ``seed``)."""
        pairs = {"val": self.val, "test": self.test}[split]
        stream = {"val": 0, "test": 1}[split]  # different candidates for val and test, same for every model
        rng = np.random.default_rng([seed, stream])
        items = sample_eval_negatives(pairs[:, 0], self.ids.num_items, self.known, negatives, rng, self.ids.users)
        return EvalSet(pairs[:, 0].copy(), np.concatenate([pairs[:, 1:2], items], axis=1))


def leave_one_out(inter: Interactions, test: Interactions | None = None,
                  notes: list[str] | None = None, keep_cold: bool = False) -> RecData:
    """Split positives by user: latest -> test, the one before -> val, the rest -> train.

    With ``test`` (a separate file of held-out interactions) the latest of ``inter`` is val and
    the rest train; a test user or item unknown at training is an error. Users with too few
    interactions to hold any out (fewer than 3, or 2 with ``test``) are dropped with a note; a
    held-out item that never occurs in training (it has no trained embedding) is dropped from
    evaluation with a note, unless ``keep_cold``: then the items of every kept user's
    interactions get an index (as in NCF's code, where the item count covers the whole dataset),
    so every user is evaluated; a model learns such an item only as a sampled negative. Among
    equal timestamps the later row of the file counts as later (deterministic for a given file).
    """
    notes = [] if notes is None else notes
    need = 2 if test is not None else 3
    order = np.lexsort((np.arange(len(inter)), inter.timestamps, inter.users.astype(str)))
    users_sorted = inter.users[order].astype(str)
    starts = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1]])
    ends = np.r_[starts[1:], len(order)]
    sizes = ends - starts
    few = sizes < need
    if few.all():
        raise FromzeroError(f"{inter.source}: no user has {need} or more interactions; leave-one-out needs "
                            f"{'train + val' if test is not None else 'train + val + test'} for each user")
    if few.any():
        notes.append(f"{int(few.sum())} user(s) with fewer than {need} interactions dropped "
                     "(leave-one-out needs one to train on besides the held-out ones)")
    role = np.zeros(len(inter), dtype=np.int8)  # 0 train, 1 val, 2 test, -1 dropped
    for s, e, small in zip(starts, ends, few):
        if small:
            role[order[s:e]] = -1
        elif test is None:
            role[order[e - 1]], role[order[e - 2]] = 2, 1
        else:
            role[order[e - 1]] = 1
    train_rows = inter.subset(role == 0)
    ids = IdMap.build(train_rows)
    if keep_cold:
        ids = IdMap(ids.users, _sorted_ids(inter.items[role >= 0]))
    tu, ti, _ = ids.encode(train_rows)
    train = np.stack([tu, ti], axis=1)

    def held_out(rows: Interactions, split: str) -> np.ndarray:
        u, i, ok = ids.encode(rows)
        cold = int((~ok).sum())
        if cold:
            notes.append(f"{cold} {split} interaction(s) with an item never seen in training dropped from evaluation")
        pairs = np.stack([u[ok], i[ok]], axis=1)
        if not len(pairs):
            raise FromzeroError(f"{inter.source}: no {split} interaction left to evaluate on")
        return pairs

    val = held_out(inter.subset(role == 1), "validation")
    if test is None:
        test_pairs = held_out(inter.subset(role == 2), "test")
    else:
        test_pairs = encode_known(ids, test)
    keys = [train[:, 0] * ids.num_items + train[:, 1]]
    all_u, all_i, ok = ids.encode(inter)
    keys.append(all_u[ok] * ids.num_items + all_i[ok])
    keys.append(test_pairs[:, 0] * ids.num_items + test_pairs[:, 1])
    return RecData(ids, train, val, test_pairs, np.unique(np.concatenate(keys)), notes)


def encode_known(ids: IdMap, inter: Interactions) -> np.ndarray:
    """(n, 2) indices of evaluation interactions; any user or item unknown at training is an
    error (a model has nothing learned for it), naming how many and the first."""
    u, i, _ = ids.encode(inter)
    for what, idx, raw in (("user", u, inter.users), ("item", i, inter.items)):
        bad = np.flatnonzero(idx < 0)
        if len(bad):
            first = bad[0]
            raise FromzeroError(f"{inter.where(first)}: {what} {raw[first]!r} is unknown at training "
                                f"({len(bad)} evaluation interaction(s) name {what}s the model was not trained on)")
    return np.stack([u, i], axis=1)


# ---------------------------------------------------------------------------------------------
# Negative sampling


def _is_member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """keys in sorted_keys, elementwise (binary search)."""
    if not len(sorted_keys):
        return np.zeros(keys.shape, dtype=bool)
    pos = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def sample_train_negatives(users: np.ndarray, num_items: int, positive_keys: np.ndarray, k: int,
                           rng: np.random.Generator) -> np.ndarray:
    """(len(users), k) items drawn uniformly among those the user has no positive with.

    ``positive_keys``: sorted user * num_items + item of the training positives. Draws are
    independent (an item may come twice for one positive, as in NCF's sampler); a draw that
    hits a positive is drawn again until none does.
    """
    users = np.asarray(users, dtype=np.int64)
    per_user = np.bincount(positive_keys // num_items, minlength=int(users.max(initial=0)) + 1)
    full = np.flatnonzero(per_user[users] >= num_items) if len(users) else []
    if len(full):
        raise FromzeroError(f"user index {users[full[0]]} has interacted with every item: no negative to sample")
    items = rng.integers(0, num_items, size=(len(users), k))
    base = users[:, None] * num_items
    bad = _is_member(base + items, positive_keys)
    while bad.any():
        items[bad] = rng.integers(0, num_items, size=int(bad.sum()))
        bad[bad] = _is_member(base[np.nonzero(bad)[0], 0] + items[bad], positive_keys)
    return items


def sample_eval_negatives(users: np.ndarray, num_items: int, known_keys: np.ndarray, k: int,
                          rng: np.random.Generator, user_names: list[str] | None = None) -> np.ndarray:
    """(len(users), k) distinct items per row, none of which the user ever interacted with
    (``known_keys``: sorted user * num_items + item of every positive). ``user_names``: raw ids
    for the message when a user has fewer than k items left."""
    counts = np.bincount(known_keys // num_items, minlength=int(np.max(users, initial=0)) + 1)
    out = np.empty((len(users), k), dtype=np.int64)
    for r, u in enumerate(users):
        free = num_items - counts[u]
        if free < k:
            who = f"user {user_names[u]!r}" if user_names is not None else f"user index {u}"
            raise FromzeroError(f"evaluation needs {k} items each user has not interacted with; {who} has only "
                                f"{free} of the {num_items} items left (lower eval_negatives)")
        # k + (the user's positives) distinct draws hold at least k non-positives; taking the
        # first k in draw order keeps them a uniform sample.
        draw = rng.choice(num_items, size=min(num_items, k + int(counts[u])), replace=False)
        draw = draw[~_is_member(u * num_items + draw, known_keys)]
        out[r] = draw[:k]
    return out


def training_examples(train: np.ndarray, num_items: int, positive_keys: np.ndarray, k: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch of pointwise examples, shuffled: every positive (label 1) and ``k`` fresh
    negatives for it (label 0). Returns (users, items, labels) of length N * (1 + k)."""
    negatives = sample_train_negatives(train[:, 0], num_items, positive_keys, k, rng)
    users = np.concatenate([train[:, 0], np.repeat(train[:, 0], k)])
    items = np.concatenate([train[:, 1], negatives.reshape(-1)])
    labels = np.concatenate([np.ones(len(train), dtype=np.float32), np.zeros(len(train) * k, dtype=np.float32)])
    perm = rng.permutation(len(users))
    return users[perm], items[perm], labels[perm]


# ---------------------------------------------------------------------------------------------
# Metrics


def ranking_metrics(scores: np.ndarray, k: int = 10) -> dict[str, float]:
    """HR@k and NDCG@k of ``scores`` (n, 1 + negatives), column 0 the held-out positive.

    A positive's 0-based rank is the number of negatives scored above it; HR@k counts ranks
    < k, NDCG@k adds 1 / log2(rank + 2) for them (one relevant item: the ideal DCG is 1).
    Ties are broken uniformly at random in expectation: with g negatives above and t tied, the
    rank is equally likely any of g .. g + t, and each metric is averaged over those ranks. So a
    model that scores everything the same gets the chance level k / (1 + negatives), not 1.0.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise FromzeroError(f"ranking scores must be (n, 1 + negatives), got shape {scores.shape}")
    if not len(scores):
        raise FromzeroError("no held-out interactions to evaluate")
    scores = np.where(np.isnan(scores), -np.inf, scores)  # a NaN score ranks last, never first
    positive = scores[:, :1]
    above = (scores[:, 1:] > positive).sum(axis=1)
    tied = (scores[:, 1:] == positive).sum(axis=1)
    # dcg[r] = sum of the discounts of ranks 0 .. r-1 (capped at k): a range sum is a difference.
    dcg = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))])
    lo, hi = np.minimum(above, k), np.minimum(above + tied + 1, k)
    hr = (hi - lo) / (tied + 1)
    ndcg = (dcg[hi] - dcg[lo]) / (tied + 1)
    return {f"hr@{k}": float(hr.mean()), f"ndcg@{k}": float(ndcg.mean()), "n": int(len(scores))}
