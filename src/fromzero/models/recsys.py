"""Recommender models for implicit feedback: NCF (GMF, MLP, NeuMF) and Wide & Deep, plus baselines.

Every model maps (user index, item index) pairs to one logit: "how likely is it that this user
interacts with this item". Training is pointwise log loss on positives and sampled negatives
(see :mod:`fromzero.data.interactions`); ranking a user's candidates by logit is the recommendation.

* **GMF** (generalised matrix factorisation, He et al. 2017): user and item embeddings multiplied
  elementwise, then a learned weighting ``h``: logit = h . (p_u * q_i) + b. With h = 1 and b = 0
  it is plain matrix factorisation; learning h lets factors matter unequally.
* **MLP**: a second pair of embeddings, concatenated and sent through a ReLU tower that halves
  its width each layer, so the user-item interaction is learned instead of fixed to a dot product.
* **NeuMF**: both towers side by side with their own embeddings; the GMF vector and the last MLP
  layer are concatenated into one output layer. The paper initialises it from separately trained
  GMF and MLP models (:func:`neumf_from_pretrained`): embeddings and tower copied, output
  weights [alpha * h_GMF, (1 - alpha) * h_MLP].
* **Wide & Deep** (Cheng et al. 2016): a wide linear model over sparse features that memorises
  (user id, item id, and two crossed features) plus a deep MLP over dense embeddings that
  generalises, summed into one logit and trained jointly. The crosses here, built from training
  counts only: user x item-popularity bucket (does this user go for blockbusters or niche
  items?) and user-activity bucket x item (which items do heavy vs light users pick?). Buckets
  are quantiles of the counts, stored as buffers so a checkpoint carries them. With side
  features (MovieLens: ``genres`` > 0 in the config, set by :meth:`WideAndDeep.set_side_features`)
  the wide part also crosses the user's occupation, age bucket and gender with each of the
  item's genres (multi-hot: one weight per (occupation, genre) pair, summed over the item's
  genres), and the deep part also reads embeddings of occupation, age bucket, gender and release
  year bucket plus the genre multi-hot itself. Without them (synthetic data, a plain CSV) the
  model is the id-and-count one above.

Try it::

    from fromzero.models.recsys import RecsysConfig, build_recsys
    model = build_recsys(RecsysConfig(arch="neumf", num_users=100, num_items=50))
    logits = model(torch.tensor([0, 1]), torch.tensor([3, 7]))    # (2,)
    save_checkpoint(out_dir, model, model.config.to_dict())        # load_model rebuilds it

Baselines for the same protocol: :class:`PopularityRanker` (training counts) and
:class:`ImplicitALS` (matrix factorisation by alternating least squares, Hu et al. 2008).
Shapes: B = batch of (user, item) pairs, F = GMF factors, L_k = width of MLP layer k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from fromzero.errors import FromzeroError
from fromzero.models import ConfigDict, FamilyFacts

ARCHES = ("gmf", "mlp", "neumf", "widedeep")


@dataclass
class RecsysConfig(ConfigDict):
    """Architecture of a recommender (what config.json stores to rebuild it)."""

    MODEL_TYPE = "fromzero-recsys"

    arch: str = "neumf"
    """gmf | mlp | neumf | widedeep."""
    num_users: int = 0
    """Users (rows of the user embeddings); set from the data."""
    num_items: int = 0
    """Items (rows of the item embeddings); set from the data."""
    factors: int = 8
    """GMF: embedding size = predictive factors F."""
    mlp_layers: list[int] = field(default_factory=lambda: [64, 32, 16])
    """MLP / Wide & Deep tower widths; the first is the concatenated [user; item] embedding (so each
    embedding is half of it), the last the tower's output ("predictive factors")."""
    dropout: float = 0.0
    """Dropout after each hidden ReLU of the towers."""
    buckets: int = 8
    """Wide & Deep: quantile buckets of item popularity and user activity for the crossed features."""
    bucket_dim: int = 4
    """Wide & Deep: embedding size of a bucket in the deep part."""
    genres: int = 0
    """Wide & Deep side features: number of item genres (0 = no side features; set from the data)."""
    occupations: int = 0
    """Wide & Deep side features: number of user occupations."""
    genders: int = 0
    """Wide & Deep side features: number of user genders."""
    age_buckets: int = 0
    """Wide & Deep side features: number of user age buckets."""
    year_buckets: int = 0
    """Wide & Deep side features: number of release-year buckets (bucket 0 = unknown year)."""
    side_dim: int = 4
    """Wide & Deep side features: embedding size of occupation, age, gender and year in the deep part."""

    @property
    def has_side_features(self) -> bool:
        return self.genres > 0

    def validate(self) -> None:
        if self.arch not in ARCHES:
            raise FromzeroError(f"arch {self.arch!r} is not supported (supported: {', '.join(ARCHES)})")
        for name in ("num_users", "num_items", "factors", "buckets", "bucket_dim", "side_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise FromzeroError(f"{name} must be a positive integer, got {v!r}")
        side = ("genres", "occupations", "genders", "age_buckets", "year_buckets")
        for name in side:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise FromzeroError(f"{name} must be a non-negative integer, got {v!r}")
        if self.has_side_features and not all(getattr(self, n) > 0 for n in side):
            raise FromzeroError(f"side features need all of {', '.join(side)} positive, got "
                                + ", ".join(f"{n} {getattr(self, n)}" for n in side))
        if self.has_side_features and self.arch != "widedeep":
            raise FromzeroError(f"side features are read by arch widedeep only, not {self.arch!r}")
        layers = self.mlp_layers
        if (not isinstance(layers, list) or len(layers) < 2
                or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in layers)):
            raise FromzeroError(f"mlp_layers must be a list of at least 2 positive integers, got {layers!r}")
        if layers[0] % 2:
            raise FromzeroError(f"mlp_layers[0] must be even (user and item embeddings of half its size), got {layers[0]}")
        if not 0.0 <= self.dropout < 1.0:
            raise FromzeroError(f"dropout must be in [0, 1), got {self.dropout}")


def _init_embedding(embedding: nn.Embedding) -> None:
    # NCF initialises embeddings from N(0, 0.01): small, so early logits sit near 0 (p = 0.5).
    nn.init.normal_(embedding.weight, std=0.01)


def _init_linear(linear: nn.Linear) -> None:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)


class GMFTower(nn.Module):
    """User and item embeddings of size F, combined by an elementwise product."""

    def __init__(self, num_users: int, num_items: int, factors: int) -> None:
        super().__init__()
        self.user_embed = nn.Embedding(num_users, factors)
        self.item_embed = nn.Embedding(num_items, factors)
        _init_embedding(self.user_embed)
        _init_embedding(self.item_embed)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.user_embed(users) * self.item_embed(items)  # (B, F)


def relu_tower(widths: list[int], dropout: float) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) for each consecutive pair of ``widths``."""
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:]):
        linear = nn.Linear(width_in, width_out)
        _init_linear(linear)
        layers += [linear, nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLPTower(nn.Module):
    """User and item embeddings of size L_0 / 2, concatenated and sent through the ReLU tower."""

    def __init__(self, num_users: int, num_items: int, layers: list[int], dropout: float) -> None:
        super().__init__()
        self.user_embed = nn.Embedding(num_users, layers[0] // 2)
        self.item_embed = nn.Embedding(num_items, layers[0] // 2)
        _init_embedding(self.user_embed)
        _init_embedding(self.item_embed)
        self.layers = relu_tower(layers, dropout)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.user_embed(users), self.item_embed(items)], dim=-1)  # (B, L_0)
        return self.layers(x)  # (B, L_last)


class GMF(nn.Module):
    """logit = h . (p_u * q_i) + b."""

    def __init__(self, config: RecsysConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.gmf = GMFTower(config.num_users, config.num_items, config.factors)
        self.predict = nn.Linear(config.factors, 1)
        _init_linear(self.predict)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.predict(self.gmf(users, items)).squeeze(-1)  # (B,) logits


class MLP(nn.Module):
    """logit = h . tower([p_u; q_i]) + b."""

    def __init__(self, config: RecsysConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.mlp = MLPTower(config.num_users, config.num_items, config.mlp_layers, config.dropout)
        self.predict = nn.Linear(config.mlp_layers[-1], 1)
        _init_linear(self.predict)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.predict(self.mlp(users, items)).squeeze(-1)  # (B,) logits


class NeuMF(nn.Module):
    """logit = h . [GMF(u, i); MLP(u, i)] + b: the two towers share nothing but the output layer."""

    def __init__(self, config: RecsysConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.gmf = GMFTower(config.num_users, config.num_items, config.factors)
        self.mlp = MLPTower(config.num_users, config.num_items, config.mlp_layers, config.dropout)
        self.predict = nn.Linear(config.factors + config.mlp_layers[-1], 1)
        _init_linear(self.predict)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.gmf(users, items), self.mlp(users, items)], dim=-1)  # (B, F + L_last)
        return self.predict(x).squeeze(-1)  # (B,) logits


class WideAndDeep(nn.Module):
    """logit = wide(u, i) + deep(u, i) + b, trained jointly.

    wide: one learned weight per active sparse feature (a linear model over one-hot vectors, so an
    embedding of size 1 is exactly its weight row): user, item, user x item-popularity bucket,
    user-activity bucket x item, and with side features occupation x genre, age x genre and
    gender x genre (an (n, G) table: the user's row dotted with the item's genre multi-hot).
    deep: ReLU tower over [user; item; user bucket; item bucket] embeddings, with side features
    also [occupation; age; gender; year bucket] embeddings and the genre multi-hot.
    """

    def __init__(self, config: RecsysConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        U, I, K = config.num_users, config.num_items, config.buckets
        d = config.mlp_layers[0] // 2
        # Buckets come from training counts (set_buckets); until then every id is in bucket 0.
        self.register_buffer("user_bucket", torch.zeros(U, dtype=torch.long))  # (U,) activity bucket
        self.register_buffer("item_bucket", torch.zeros(I, dtype=torch.long))  # (I,) popularity bucket
        # wide: linear weights over one-hot features
        self.wide_user = nn.Embedding(U, 1)
        self.wide_item = nn.Embedding(I, 1)
        self.wide_user_x_popularity = nn.Embedding(U * K, 1)  # index u * K + item_bucket[i]
        self.wide_activity_x_item = nn.Embedding(K * I, 1)  # index user_bucket[u] * I + i
        wide_tables = [self.wide_user, self.wide_item, self.wide_user_x_popularity, self.wide_activity_x_item]
        self.bias = nn.Parameter(torch.zeros(()))
        # deep: dense embeddings -> tower -> one number
        self.user_embed = nn.Embedding(U, d)
        self.item_embed = nn.Embedding(I, d)
        self.user_bucket_embed = nn.Embedding(K, config.bucket_dim)
        self.item_bucket_embed = nn.Embedding(K, config.bucket_dim)
        deep_tables = [self.user_embed, self.item_embed, self.user_bucket_embed, self.item_bucket_embed]
        deep_in = 2 * d + 2 * config.bucket_dim
        if config.has_side_features:
            G, S = config.genres, config.side_dim
            # Set from the data by set_side_features (zeros until then: every user in category 0).
            self.register_buffer("user_occupation", torch.zeros(U, dtype=torch.long))  # (U,)
            self.register_buffer("user_age", torch.zeros(U, dtype=torch.long))  # (U,)
            self.register_buffer("user_gender", torch.zeros(U, dtype=torch.long))  # (U,)
            self.register_buffer("item_genres", torch.zeros(I, G))  # (I, G) multi-hot
            self.register_buffer("item_year", torch.zeros(I, dtype=torch.long))  # (I,)
            self.wide_occupation_x_genre = nn.Embedding(config.occupations, G)  # row o: weight per genre
            self.wide_age_x_genre = nn.Embedding(config.age_buckets, G)
            self.wide_gender_x_genre = nn.Embedding(config.genders, G)
            wide_tables += [self.wide_occupation_x_genre, self.wide_age_x_genre, self.wide_gender_x_genre]
            self.occupation_embed = nn.Embedding(config.occupations, S)
            self.age_embed = nn.Embedding(config.age_buckets, S)
            self.gender_embed = nn.Embedding(config.genders, S)
            self.year_embed = nn.Embedding(config.year_buckets, S)
            deep_tables += [self.occupation_embed, self.age_embed, self.gender_embed, self.year_embed]
            deep_in += 4 * S + G
        for table in wide_tables:
            nn.init.zeros_(table.weight)  # a linear model starts at 0, like a fresh logistic regression
        for table in deep_tables:
            _init_embedding(table)
        self.deep = relu_tower([deep_in, *config.mlp_layers[1:]], config.dropout)
        self.deep_out = nn.Linear(config.mlp_layers[-1], 1)
        _init_linear(self.deep_out)

    @torch.no_grad()
    def set_buckets(self, user_counts: np.ndarray, item_counts: np.ndarray) -> None:
        """Quantile buckets of training interactions per user (activity) and per item (popularity)."""
        K = self.config.buckets
        for counts, buffer in ((user_counts, self.user_bucket), (item_counts, self.item_bucket)):
            counts = np.asarray(counts, dtype=np.float64)
            edges = np.quantile(counts, np.arange(1, K) / K)
            buckets = np.searchsorted(edges, counts, side="right").clip(0, K - 1)
            buffer.copy_(torch.from_numpy(buckets))

    @torch.no_grad()
    def set_side_features(self, side: Any) -> None:
        """Copy a :class:`fromzero.data.movielens.SideFeatures` (aligned with this model's ids) into
        the buffers; shapes and category ranges must match the config."""
        c = self.config
        if not c.has_side_features:
            raise FromzeroError("this Wide & Deep model was built without side features (genres 0)")
        arrays = {"user_occupation": (side.user_occupation, c.occupations),
                  "user_age": (side.user_age, c.age_buckets),
                  "user_gender": (side.user_gender, c.genders), "item_year": (side.item_year, c.year_buckets)}
        for name, (values, n) in arrays.items():
            values = torch.as_tensor(np.asarray(values), dtype=torch.long)
            buffer = getattr(self, name)
            in_range = not len(values) or 0 <= int(values.min()) <= int(values.max()) < n
            if values.shape != buffer.shape or not in_range:
                raise FromzeroError(f"side feature {name}: shape {tuple(values.shape)} with values outside "
                                    f"0..{n - 1} or not the model's {tuple(buffer.shape)}")
            buffer.copy_(values)
        genres = torch.as_tensor(np.asarray(side.item_genres), dtype=torch.float32)
        if genres.shape != self.item_genres.shape:
            raise FromzeroError(f"side feature item_genres: shape {tuple(genres.shape)}, the model's is "
                                f"{tuple(self.item_genres.shape)}")
        self.item_genres.copy_(genres)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        K, I = self.config.buckets, self.config.num_items
        ub, ib = self.user_bucket[users], self.item_bucket[items]  # (B,), (B,)
        wide = (self.wide_user(users) + self.wide_item(items) + self.wide_user_x_popularity(users * K + ib)
                + self.wide_activity_x_item(ub * I + items)).squeeze(-1)  # (B,)
        parts = [self.user_embed(users), self.item_embed(items), self.user_bucket_embed(ub),
                 self.item_bucket_embed(ib)]
        if self.config.has_side_features:
            occupation, age = self.user_occupation[users], self.user_age[users]
            gender = self.user_gender[users]
            genres = self.item_genres[items]  # (B, G) multi-hot
            crosses = (self.wide_occupation_x_genre(occupation) + self.wide_age_x_genre(age)
                       + self.wide_gender_x_genre(gender))  # (B, G): each user feature's weight per genre
            wide = wide + (crosses * genres).sum(-1)  # only the item's genres count
            parts += [self.occupation_embed(occupation), self.age_embed(age), self.gender_embed(gender),
                      self.year_embed(self.item_year[items]), genres]
        x = torch.cat(parts, dim=-1)  # (B, 2d + 2 bucket_dim [+ 4 side_dim + G])
        deep = self.deep_out(self.deep(x)).squeeze(-1)  # (B,)
        return wide + deep + self.bias  # (B,) logits


MODELS: dict[str, type[nn.Module]] = {"gmf": GMF, "mlp": MLP, "neumf": NeuMF, "widedeep": WideAndDeep}


def build_recsys(config: RecsysConfig) -> nn.Module:
    """A freshly initialised model for ``config.arch``."""
    config.validate()
    return MODELS[config.arch](config)


def build_from_config(config: dict) -> nn.Module:
    """Rebuild a model from a checkpoint's config.json (see :mod:`fromzero.models`)."""
    return build_recsys(RecsysConfig.from_dict(config))


@torch.no_grad()
def neumf_from_pretrained(gmf: GMF, mlp: MLP, alpha: float = 0.5, dropout: float | None = None) -> NeuMF:
    """NeuMF initialised from trained GMF and MLP models (He et al. 2017, section 3.4.1).

    Embeddings and tower weights are copied; the output layer concatenates the two output
    layers weighted by alpha (the trade-off between the two pretrained models):
    h = [alpha * h_GMF; (1 - alpha) * h_MLP], b = alpha * b_GMF + (1 - alpha) * b_MLP.
    """
    if not isinstance(gmf, GMF) or not isinstance(mlp, MLP):
        raise FromzeroError("NeuMF pretraining needs a GMF and an MLP model")
    g, m = gmf.config, mlp.config
    if (g.num_users, g.num_items) != (m.num_users, m.num_items):
        raise FromzeroError(f"the GMF ({g.num_users} users, {g.num_items} items) and MLP ({m.num_users} users, "
                            f"{m.num_items} items) models were trained on different data")
    if not 0.0 <= alpha <= 1.0:
        raise FromzeroError(f"pretrained_alpha must be in [0, 1], got {alpha}")
    config = RecsysConfig(arch="neumf", num_users=g.num_users, num_items=g.num_items, factors=g.factors,
                          mlp_layers=list(m.mlp_layers), dropout=m.dropout if dropout is None else dropout)
    model = NeuMF(config)
    model.gmf.load_state_dict(gmf.gmf.state_dict())
    model.mlp.load_state_dict(mlp.mlp.state_dict())
    model.predict.weight.copy_(torch.cat([alpha * gmf.predict.weight, (1 - alpha) * mlp.predict.weight], dim=1))
    model.predict.bias.copy_(alpha * gmf.predict.bias + (1 - alpha) * mlp.predict.bias)
    return model


# ---------------------------------------------------------------------------------------------
# Baselines: not neural, evaluated with the same protocol


class PopularityRanker:
    """Scores an item by how many training interactions it has: the same list for every user."""

    def __init__(self, train: np.ndarray, num_items: int) -> None:
        self.counts = np.bincount(train[:, 1], minlength=num_items).astype(np.float64)

    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.counts[items]


class ImplicitALS:
    """Matrix factorisation for implicit feedback by alternating least squares (Hu, Koren &
    Volinsky, 2008).

    Minimises sum over ALL (u, i) of c_ui (p_ui - x_u . y_i)^2 + reg (|x_u|^2 + |y_i|^2) with
    preference p_ui = 1 for an interaction, 0 otherwise, and confidence c_ui = 1 + alpha for an
    interaction, 1 otherwise. With the items fixed each user's factors are a ridge regression in
    closed form, and vice versa; the sum over all items is cheap because Y^T C_u Y =
    Y^T Y + alpha * Y_u^T Y_u, where Y_u are the rows of the user's items only.
    """

    def __init__(self, factors: int = 32, reg: float = 0.1, alpha: float = 10.0, iterations: int = 15,
                 seed: int = 0) -> None:
        self.factors, self.reg, self.alpha, self.iterations, self.seed = factors, reg, alpha, iterations, seed
        self.user_factors = np.zeros((0, factors))
        self.item_factors = np.zeros((0, factors))

    def fit(self, train: np.ndarray, num_users: int, num_items: int,
            after: Callable[[int, "ImplicitALS"], None] | None = None) -> "ImplicitALS":
        """Alternate ``iterations`` times; ``after(k, self)`` runs after pass k (1-based) with the
        factors so far (how a tuner scores several iteration counts from one fit)."""
        rng = np.random.default_rng(self.seed)
        X = rng.normal(0.0, 0.01, size=(num_users, self.factors))
        Y = rng.normal(0.0, 0.01, size=(num_items, self.factors))
        for k in range(1, self.iterations + 1):
            X = self._solve(Y, train[:, 0], train[:, 1], num_users)
            Y = self._solve(X, train[:, 1], train[:, 0], num_items)
            self.user_factors, self.item_factors = X, Y
            if after is not None:
                after(k, self)
        return self

    def _solve(self, fixed: np.ndarray, rows: np.ndarray, cols: np.ndarray, n_rows: int) -> np.ndarray:
        """For each row r with interactions at columns c: (F^T F + alpha F_c^T F_c + reg I) x_r =
        (1 + alpha) F_c^T 1, with F = ``fixed``; a row without interactions gets x_r = 0.

        Rows are solved in batches of similar length: each batch gathers its rows' F_c into one
        zero-padded (rows, longest, f) tensor (a zero row adds nothing to F_c^T F_c), so the Gram
        matrices are one batched matmul and the systems one batched solve.
        """
        f = self.factors
        gram = fixed.T @ fixed + self.reg * np.eye(f)  # (f, f), shared by every row
        padded = np.vstack([fixed, np.zeros((1, f))])  # index len(fixed) is the zero row
        order = np.argsort(rows, kind="stable")
        rows, cols = rows[order], cols[order]
        bounds = np.searchsorted(rows, np.arange(n_rows + 1))  # row r's interactions: bounds[r]:bounds[r+1]
        counts = np.diff(bounds)
        out = np.zeros((n_rows, f))
        by_length = np.argsort(counts, kind="stable")
        by_length = by_length[counts[by_length] > 0]
        for start in range(0, len(by_length), 256):
            batch = by_length[start:start + 256]  # (n,) row ids
            longest = int(counts[batch].max())
            offsets = np.arange(longest)  # (L,)
            idx = bounds[batch][:, None] + offsets  # (n, L) positions in cols
            valid = offsets < counts[batch][:, None]
            gathered = np.where(valid, cols[np.minimum(idx, len(cols) - 1)], len(fixed))  # (n, L)
            F = padded[gathered]  # (n, L, f)
            A = gram + self.alpha * np.matmul(F.transpose(0, 2, 1), F)  # (n, f, f)
            rhs = (1.0 + self.alpha) * F.sum(axis=1)  # (n, f)
            out[batch] = np.linalg.solve(A, rhs[:, :, None])[:, :, 0]
        return out

    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.einsum("nf,nf->n", self.user_factors[users], self.item_factors[items])


FACTS = FamilyFacts()  # recommenders train from scratch, every weight: nothing to freeze or adapt
