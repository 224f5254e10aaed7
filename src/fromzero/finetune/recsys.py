"""Train a recommender on implicit feedback: NCF (GMF / MLP / NeuMF) or Wide & Deep, with baselines.

Task ``recommendation`` of ``fromzero finetune``. Data (:mod:`fromzero.data.interactions`):
``synthetic``, ``movielens-100k`` (built in, :mod:`fromzero.data.movielens`: with titles and the
user / movie side features Wide & Deep reads), an interactions CSV or MovieLens ``ratings.dat``;
every interaction rated at least
``min_rating`` is a positive, each user's latest one the test item and the one before the val item
(leave-one-out), unless ``test_data`` names a file of test interactions. NeuMF can start from
pretrained GMF and MLP runs (He et al. 2017: ``pretrained_gmf`` / ``pretrained_mlp``).

Each epoch pairs every training positive with ``negatives`` freshly sampled items (seeded by seed
and epoch), pointwise log loss, in the shared Trainer. Each held-out positive is ranked against
``eval_negatives`` items the user never touched, the same candidates for every model
(``eval_seed``): HR@K and NDCG@K, also for the baselines (popularity, ALS matrix factorisation).
checkpoints/best also holds ids.json, the raw user and item ids of the embedding rows, so
:class:`Recommender` speaks raw ids, history.safetensors (every user's known items, left out of
their recommendations) and, for MovieLens, items.json (titles and genres).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fromzero.data.interactions import EvalSet, IdMap, RecData, training_examples
from fromzero.errors import FromzeroError
from fromzero.evaluation.metrics import write_metrics_json
from fromzero.finetune.engine import FinetuneConfig, FinetuneTask, run_finetune_task
from fromzero.finetune.methods import count_parameters
from fromzero.models.recsys import ARCHES
from fromzero.training.trainer import FitResult

IDS_FILE = "ids.json"
HISTORY_FILE = "history.safetensors"
ITEMS_FILE = "items.json"
MOVIELENS = "movielens-100k"
BUILT_IN = ("synthetic", MOVIELENS)
ALS_REGS = (0.1, 1.0, 10.0)
ALS_ALPHAS = (1.0, 5.0, 20.0)


@dataclass
class RecommendationConfig(FinetuneConfig):
    """Training a recommender on implicit feedback (user-item interactions)."""

    RECIPE_KEYS: ClassVar[dict[str, str]] = {
        "data": "data.source", "test_data": "data.test_data", "min_rating": "data.min_rating",
        "synthetic_users": "data.synthetic_users", "synthetic_items": "data.synthetic_items",
        "synthetic_clusters": "data.synthetic_clusters", "synthetic_per_user": "data.synthetic_per_user",
        "synthetic_seed": "data.synthetic_seed", "arch": "model.arch", "factors": "model.factors",
        "mlp_layers": "model.mlp_layers", "dropout": "model.dropout", "buckets": "model.buckets",
        "pretrained_gmf": "model.pretrained_gmf", "pretrained_mlp": "model.pretrained_mlp",
        "pretrained_alpha": "model.pretrained_alpha"}

    # Inherited options that recommenders refuse (they train from scratch, every weight): left
    # out of --help (validate() still names them when a recipe sets them).
    UNUSED_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"method", "unfreeze_top", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "init_from"})

    data: str = "synthetic"
    """synthetic | movielens-100k (built in) | a .csv with user,item,rating,timestamp | a ratings.dat."""
    test_data: str = ""
    """Optional file of test interactions (same formats); then data's latest per user is validation. Users and items must occur in data."""
    min_rating: float = 0.0
    """Implicit feedback: interactions rated at least this are positives (0 = every interaction)."""
    arch: str = "neumf"
    """gmf | mlp | neumf | widedeep."""
    factors: int = 16
    """GMF / NeuMF: predictive factors (embedding size of the GMF tower)."""
    mlp_layers: list[int] = field(default_factory=lambda: [64, 32, 16])
    """MLP / NeuMF / Wide & Deep tower widths; the first is [user; item] embeddings concatenated."""
    dropout: float = 0.0
    """Dropout after each hidden layer of the towers."""
    buckets: int = 8
    """Wide & Deep: quantile buckets of user activity and item popularity (crossed features)."""
    negatives: int = 4
    """Sampled negatives per training positive, drawn again every epoch."""
    eval_negatives: int = 99
    """Sampled negatives each held-out positive is ranked against."""
    eval_seed: int = 0
    """Seed of the evaluation negatives (fixed so every model and epoch sees the same candidates)."""
    top_k: int = 10
    """K of HR@K and NDCG@K."""
    eval_batch_size: int = 65536
    """(user, item) pairs scored per forward pass when evaluating."""
    monitor: str = "val_ndcg@10"
    """Metric that picks the best weights and drives early stopping: val_ndcg@K | val_hr@K | val_loss."""
    pretrained_gmf: str = ""
    """arch neumf: a GMF checkpoint (checkpoints/best of a gmf run on the same data) to initialise from."""
    pretrained_mlp: str = ""
    """arch neumf: an MLP checkpoint (an mlp run on the same data) to initialise from (both or neither)."""
    pretrained_alpha: float = 0.5
    """Weight of the GMF output layer in the pretrained NeuMF's (1 - alpha for the MLP's)."""
    baselines: bool = True
    """Also evaluate popularity and matrix factorisation (ALS) with the same protocol."""
    als_factors: int = 16
    """ALS baseline: latent factors (its reg and alpha are chosen on validation)."""
    als_iterations: int = 15
    """ALS baseline: alternating passes."""
    synthetic_users: int = 1000
    """data synthetic: number of users."""
    synthetic_items: int = 500
    """data synthetic: number of items."""
    synthetic_clusters: int = 8
    """data synthetic: latent taste clusters."""
    synthetic_per_user: int = 20
    """data synthetic: typical interactions per user."""
    synthetic_seed: int = 0
    """data synthetic: seed of the generator."""
    epochs: int = 20
    """Maximum passes over the training positives (each with fresh negatives)."""
    batch_size: int = 256
    """(user, item) examples per micro-batch, positives and negatives mixed."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.0
    """L2: decoupled weight decay on embeddings and matrices."""
    warmup_ratio: float = 0.0
    """Fraction of the steps with linear warmup from 0 to lr."""
    log_interval: int = 50
    """Write a metrics row every N optimizer steps."""
    dtype: str = "float32"
    """float32 | auto | bfloat16 | float16 (embedding lookups gain nothing from low precision)."""

    def validate(self) -> None:
        from fromzero.models.recsys import RecsysConfig

        self.validate_common()
        if self.method != "full":
            raise FromzeroError(f"method {self.method!r} is not supported for recommendation (full: the models "
                                "train from scratch)")
        if self.init_from:
            raise FromzeroError("init_from is not used by recommendation: models train from scratch "
                                "(use pretrained_gmf and pretrained_mlp to initialise NeuMF)")
        if not str(self.data).strip():
            raise FromzeroError("data is required: synthetic or an interactions file")
        if self.arch not in ARCHES:
            raise FromzeroError(f"arch {self.arch!r} is not supported (supported: {', '.join(ARCHES)})")
        RecsysConfig(self.arch, 1, 1, self.factors, self.mlp_layers, self.dropout, self.buckets).validate()
        for name in ("negatives", "eval_negatives", "top_k", "eval_batch_size", "als_factors", "als_iterations",
                     "synthetic_users", "synthetic_items", "synthetic_clusters", "synthetic_per_user"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise FromzeroError(f"{name} must be a positive integer, got {v!r}")
        if self.top_k > self.eval_negatives + 1:
            raise FromzeroError(f"top_k {self.top_k} is more than the {self.eval_negatives + 1} ranked candidates")
        if not math.isfinite(self.min_rating):
            raise FromzeroError(f"min_rating must be a finite number, got {self.min_rating}")
        monitors = (f"val_ndcg@{self.top_k}", f"val_hr@{self.top_k}", "val_loss")
        if self.monitor not in monitors:
            raise FromzeroError(f"monitor {self.monitor!r} is not supported (with top_k {self.top_k}: "
                                f"{', '.join(monitors)})")
        if bool(self.pretrained_gmf) != bool(self.pretrained_mlp):
            raise FromzeroError("pretrained NeuMF needs both pretrained_gmf and pretrained_mlp")
        if self.pretrained_gmf and self.arch != "neumf":
            raise FromzeroError(f"pretrained_gmf / pretrained_mlp initialise arch neumf, not {self.arch!r}")
        if not 0.0 <= self.pretrained_alpha <= 1.0:
            raise FromzeroError(f"pretrained_alpha must be in [0, 1], got {self.pretrained_alpha}")


# ---------------------------------------------------------------------------------------------
# Data and model


def load_recommendation_data(cfg: RecommendationConfig) -> RecData:
    """The configured interactions as implicit feedback, split leave-one-out (notes in .notes)."""
    from fromzero.data.interactions import implicit, leave_one_out, read_interactions, synthetic_interactions

    notes: list[str] = []
    movielens = None
    if cfg.data == "synthetic":
        inter = synthetic_interactions(cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_clusters,
                                       cfg.synthetic_per_user, seed=cfg.synthetic_seed)
    elif cfg.data == MOVIELENS:
        from fromzero.data.movielens import load_movielens_100k

        movielens = load_movielens_100k()
        inter = movielens.interactions
    else:
        inter = read_interactions(cfg.data)
    positives = implicit(inter, cfg.min_rating, notes)
    test = implicit(read_interactions(cfg.test_data), cfg.min_rating, notes) if cfg.test_data else None
    # MovieLens: every user is evaluated, as in NCF (an item rated only by held-out interactions
    # keeps an embedding that training sees only as a sampled negative).
    data = leave_one_out(positives, test, notes, keep_cold=movielens is not None)
    if movielens is not None:
        from fromzero.data.movielens import side_features

        data.side = side_features(data.ids, movielens.items, movielens.users)
        data.catalog = movielens.items.describe()
    return data


def model_config(cfg: RecommendationConfig, ids: IdMap, side: Any = None) -> Any:
    """The model's config for the data's ids; Wide & Deep also gets the sizes of ``side`` features."""
    from fromzero.models.recsys import RecsysConfig

    sizes = side.sizes if side is not None and cfg.arch == "widedeep" else {}
    return RecsysConfig(arch=cfg.arch, num_users=ids.num_users, num_items=ids.num_items, factors=cfg.factors,
                        mlp_layers=list(cfg.mlp_layers), dropout=cfg.dropout, buckets=cfg.buckets, **sizes)


def load_recommender(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, IdMap, dict]:
    """(model, id map, info) of a recommendation checkpoint directory."""
    from fromzero.checkpoint import CONFIG_FILE, INFO_FILE, load_model, read_json

    directory = resolve_recommender_dir(directory)
    if not directory.is_dir():
        raise FromzeroError(f"checkpoint directory not found: {directory}")
    config = read_json(directory / CONFIG_FILE, "model config")
    if config.get("model_type") != "fromzero-recsys":
        raise FromzeroError(f"{directory} is not a recommender checkpoint (model_type {config.get('model_type')!r})")
    ids = IdMap.from_json(read_json(directory / IDS_FILE, "id map"), str(directory / IDS_FILE))
    model = load_model(directory, device)
    if (ids.num_users, ids.num_items) != (model.config.num_users, model.config.num_items):
        raise FromzeroError(f"{directory / IDS_FILE} names {ids.num_users} users and {ids.num_items} items but the "
                            f"model has {model.config.num_users} and {model.config.num_items}")
    info = read_json(directory / INFO_FILE, "checkpoint info") if (directory / INFO_FILE).is_file() else {}
    return model, ids, info


def build_recommender(cfg: RecommendationConfig, data: RecData) -> nn.Module:
    """A fresh model for the data (Wide & Deep with its buckets), or NeuMF from pretrained towers."""
    from fromzero.models.recsys import GMF, MLP, WideAndDeep, build_recsys, neumf_from_pretrained

    if cfg.pretrained_gmf:
        towers = []
        for key, kind in (("pretrained_gmf", GMF), ("pretrained_mlp", MLP)):
            model, ids, _ = load_recommender(getattr(cfg, key))
            if not isinstance(model, kind):
                raise FromzeroError(f"{key} {getattr(cfg, key)} is a {model.config.arch} model, not {kind.__name__}")
            if ids.users != data.ids.users or ids.items != data.ids.items:
                raise FromzeroError(f"{key} {getattr(cfg, key)} was trained on other users or items than this data "
                                    "(use the same data, min_rating and test_data)")
            towers.append(model)
        model = neumf_from_pretrained(towers[0], towers[1], cfg.pretrained_alpha, dropout=cfg.dropout)
        if model.config.factors != cfg.factors or model.config.mlp_layers != list(cfg.mlp_layers):
            print(f"note: factors {model.config.factors} and mlp_layers {model.config.mlp_layers} come from the "
                  "pretrained models")
        return model
    model = build_recsys(model_config(cfg, data.ids, data.side))
    if isinstance(model, WideAndDeep):
        model.set_buckets(np.bincount(data.train[:, 0], minlength=data.ids.num_users),
                          np.bincount(data.train[:, 1], minlength=data.ids.num_items))
        if data.side is not None:
            model.set_side_features(data.side)
    return model


# ---------------------------------------------------------------------------------------------
# Scoring and evaluation


@torch.no_grad()
def predict_scores(model: nn.Module, users: np.ndarray, items: np.ndarray, device: torch.device,
                   batch_size: int = 65536, autocast: Callable[[], Any] | None = None) -> np.ndarray:
    """Float32 logits for parallel arrays of user and item indices (any equal shapes)."""
    was_training = model.training
    model.eval()
    u = torch.as_tensor(np.asarray(users, dtype=np.int64).reshape(-1))
    i = torch.as_tensor(np.asarray(items, dtype=np.int64).reshape(-1))
    out = []
    for s in range(0, len(u), batch_size):
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = model(u[s:s + batch_size].to(device), i[s:s + batch_size].to(device))
        out.append(logits.float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy().reshape(np.shape(items)) if out else np.zeros(np.shape(items), np.float32)


def score_eval_set(score: Callable[[np.ndarray, np.ndarray], np.ndarray], es: EvalSet) -> np.ndarray:
    """(n, 1 + negatives) scores of an evaluation set from ``score(users, items)`` on flat arrays."""
    users = np.repeat(es.users, es.items.shape[1])
    return np.asarray(score(users, es.items.reshape(-1)), dtype=np.float64).reshape(es.items.shape)


def evaluate_scores(scores: np.ndarray, k: int, logits: bool = False) -> dict[str, float]:
    """HR@k and NDCG@k (and, for logits, the log loss of "positive vs sampled negatives")."""
    from fromzero.data.interactions import ranking_metrics

    metrics: dict[str, float] = dict(ranking_metrics(scores, k))
    metrics.pop("n")
    if logits:
        target = np.zeros_like(scores)
        target[:, 0] = 1.0
        metrics["loss"] = float(F.binary_cross_entropy_with_logits(torch.from_numpy(scores), torch.from_numpy(target)))
    return metrics


def run_baselines(cfg: RecommendationConfig, data: RecData, val: EvalSet, test: EvalSet) -> dict[str, dict]:
    """Popularity and ALS matrix factorisation, scored on the same val/test candidates.

    ALS' regularisation and confidence weight are chosen by validation NDCG (as the neural model's
    epoch is), from a small grid; the choice is reported with the scores.
    """
    from fromzero.models.recsys import ImplicitALS, PopularityRanker

    k = cfg.top_k
    out: dict[str, dict] = {}
    pop = PopularityRanker(data.train, data.ids.num_items)
    out["popularity"] = {"val": evaluate_scores(score_eval_set(pop.score, val), k),
                         "test": evaluate_scores(score_eval_set(pop.score, test), k)}
    best: tuple[float, ImplicitALS, dict] | None = None
    for reg in ALS_REGS:
        for alpha in ALS_ALPHAS:
            als = ImplicitALS(cfg.als_factors, reg, alpha, cfg.als_iterations, seed=cfg.seed)
            als.fit(data.train, data.ids.num_users, data.ids.num_items)
            metrics = evaluate_scores(score_eval_set(als.score, val), k)
            if best is None or metrics[f"ndcg@{k}"] > best[0]:
                best = (metrics[f"ndcg@{k}"], als, metrics)
    assert best is not None
    _, als, val_metrics = best
    out["mf_als"] = {"val": val_metrics, "test": evaluate_scores(score_eval_set(als.score, test), k),
                     "params": {"factors": als.factors, "reg": als.reg, "alpha": als.alpha,
                                "iterations": als.iterations}}
    return out


# ---------------------------------------------------------------------------------------------
# The run


def finetune_recommendation(cfg: RecommendationConfig, resume: bool = False) -> dict[str, Any]:
    """Run a RecommendationTask (train, keep the best val weights, test once); returns its summary."""
    return run_finetune_task(RecommendationTask, cfg, resume)


class RecommendationTask(FinetuneTask):
    """One recommender training run (see :class:`fromzero.finetune.engine.FinetuneTask`)."""

    name = "recommendation"

    def __init__(self, cfg: RecommendationConfig, ctx: Any, device: torch.device, dtype: str) -> None:
        self.cfg, self.ctx, self.device, self.dtype = cfg, ctx, device, dtype
        self.monitor, self.higher_is_better = cfg.monitor, cfg.monitor != "val_loss"
        self.k = cfg.top_k
        self.data = data = load_recommendation_data(cfg)
        for note in data.notes:
            print(f"note: {note}")
        self.val_set = data.eval_set("val", cfg.eval_negatives, cfg.eval_seed)
        self.test_set = data.eval_set("test", cfg.eval_negatives, cfg.eval_seed)
        torch.manual_seed(cfg.seed)
        model = build_recommender(cfg, data)
        _, self.total = count_parameters(model)
        self.model = model.to(device)
        self.baselines: dict[str, dict] = {}

    def start(self, run_dir: Path) -> None:
        cfg, data = self.cfg, self.data
        self.train_keys = data.train_keys()
        print(f"recommendation ({cfg.arch}): {data.ids.num_users} users, {data.ids.num_items} items, "
              f"{len(data.train)} training positives x (1 + {cfg.negatives} negatives), val/test "
              f"{len(self.val_set)}/{len(self.test_set)} held out vs {cfg.eval_negatives} negatives; "
              f"{self.total:,} parameters; device {self.device}, {self.dtype}")
        self.base_info = {"task": "recommendation", "arch": cfg.arch, "top_k": self.k,
                          "eval_negatives": cfg.eval_negatives, "eval_seed": cfg.eval_seed,
                          "min_rating": cfg.min_rating,
                          "data": cfg.data if cfg.data in BUILT_IN else str(Path(cfg.data).resolve())}

    def batches(self) -> tuple[Any, int]:
        n_examples = len(self.data.train) * (1 + self.cfg.negatives)
        return self.epoch_batches, math.ceil(n_examples / self.cfg.batch_size)

    def epoch_batches(self, epoch: int) -> Any:
        """One epoch: every positive with fresh negatives, shuffled; the same on every rank."""
        cfg, data = self.cfg, self.data
        rng = np.random.default_rng([cfg.seed, epoch])
        users, items, labels = training_examples(data.train, data.ids.num_items, self.train_keys, cfg.negatives, rng)
        users, items, labels = torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(labels)
        for s in range(0, len(users), cfg.batch_size):
            yield users[s:s + cfg.batch_size], items[s:s + cfg.batch_size], labels[s:s + cfg.batch_size]

    def loss(self, net: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, int, int]:
        users, items, labels = (t.to(self.device, non_blocking=True) for t in batch)
        logits = net(users, items)  # (B,)
        return F.binary_cross_entropy_with_logits(logits.float(), labels), len(labels), 0

    def _metrics(self, es: EvalSet) -> dict[str, float]:
        scores = score_eval_set(
            lambda u, i: predict_scores(self.forward, u, i, self.device, self.cfg.eval_batch_size, self.autocast), es)
        return evaluate_scores(scores, self.k, logits=True)

    def evaluate(self, _: nn.Module) -> dict[str, Any]:
        return self._metrics(self.val_set)

    def write_best(self, extra: dict[str, Any]) -> None:
        """checkpoints/best from the model as it is now (with the user / item ids)."""
        save_recommender(self.best_dir, self.model, self.data, {**self.base_info, **extra})

    def save_best(self, info: dict[str, Any]) -> None:
        val, k = info["val"], self.k
        self.write_best({"best_step": info["best_step"], "best_epoch": info["best_epoch"],
                         **{f"val_{m}": val[m] for m in (f"hr@{k}", f"ndcg@{k}", "loss")}})

    def test(self) -> dict[str, Any]:
        """The model's test metrics; rank 0 also scores the baselines (for the report)."""
        test = self._metrics(self.test_set)
        if self.cfg.baselines and self.ctx.is_main:
            self.baselines = run_baselines(self.cfg, self.data, self.val_set, self.test_set)
        return test

    def worker_summary(self, run_dir: Path, test: dict[str, Any]) -> dict[str, Any]:
        return {"run_dir": str(run_dir), "test": test}

    def finish(self, fit: FitResult, test: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The final checkpoints/best, metrics.json (test of the model and the baselines), plots and the table."""
        k, cfg, data = self.k, self.cfg, self.data
        val = {m: fit.best_metrics[m] for m in (f"hr@{k}", f"ndcg@{k}", "loss")}
        self.write_best({"best_step": fit.best_step, "best_epoch": fit.best_epoch,
                         **{f"val_{m}": v for m, v in val.items()}, **{f"test_{m}": v for m, v in test.items()}})
        summary = self.summary(fit, test, arch=cfg.arch, val=val, baselines=self.baselines, notes=data.notes,
                               num_users=data.ids.num_users, num_items=data.ids.num_items,
                               train_positives=len(data.train), n_val=len(self.val_set),
                               n_test=len(self.test_set), total_params=self.total)
        report = {**test, "split": "test", "arch": cfg.arch, "n": len(self.test_set),
                  "eval_negatives": cfg.eval_negatives, "best_step": fit.best_step, "epochs_run": fit.epochs_run,
                  "stopped_early": fit.stopped_early, **{f"val_{m}": v for m, v in val.items()},
                  "baselines": {name: {**r["test"], **{f"val_{m}": v for m, v in r["val"].items()},
                                       **({"params": r["params"]} if "params" in r else {})}
                                for name, r in self.baselines.items()}}
        write_metrics_json(report, self.run_dir / "metrics.json")
        plot_ranking(rows, k, self.run_dir / "plots" / "ranking.png")
        print(f"test: {len(self.test_set)} held-out interactions, each ranked against {cfg.eval_negatives} "
              "sampled negatives")
        print(format_table(summary, k))
        print(f"checkpoint: {self.best_dir}")
        return summary


def save_recommender(directory: Path, model: nn.Module, data: RecData, info: dict) -> None:
    """A checkpoint directory (atomic): config.json, model.safetensors, info.json, ids.json,
    history.safetensors (every user's known items) and, with a catalog, items.json."""
    from fromzero.checkpoint import (MODEL_FILE, atomic_directory, model_state_for_saving,
                                              write_checkpoint_files, write_safetensors)

    indptr, items = data.history()
    with atomic_directory(directory) as tmp:
        write_safetensors(model_state_for_saving(model), tmp / MODEL_FILE)
        write_checkpoint_files(tmp, model.config.to_dict(), None, info)
        (tmp / IDS_FILE).write_text(json.dumps(data.ids.to_json()) + "\n", encoding="utf-8")
        history = {"indptr": torch.from_numpy(indptr), "items": torch.from_numpy(items)}
        write_safetensors(history, tmp / HISTORY_FILE)
        if data.catalog is not None:
            described = {i: data.catalog[i] for i in data.ids.items if i in data.catalog}
            (tmp / ITEMS_FILE).write_text(json.dumps(described, ensure_ascii=False) + "\n", encoding="utf-8")


def format_table(summary: dict, k: int) -> str:
    """Model and baselines, val and test HR@k / NDCG@k, one row each."""
    rows = [(f"{summary['arch']} (best step {summary['best_step']})", summary["val"], summary["test"])]
    for name, result in summary["baselines"].items():
        label = name
        if "params" in result:
            p = result["params"]
            label = f"{name} (f {p['factors']}, reg {p['reg']:g}, alpha {p['alpha']:g})"
        rows.append((label, result["val"], result["test"]))
    width = max(len(r[0]) for r in rows)
    cols = [f"val HR@{k}", f"val NDCG@{k}", f"test HR@{k}", f"test NDCG@{k}"]
    lines = [f"{'model':<{width}}  " + "  ".join(f"{c:>12}" for c in cols)]
    for label, val, test in rows:
        values = [val[f"hr@{k}"], val[f"ndcg@{k}"], test[f"hr@{k}"], test[f"ndcg@{k}"]]
        lines.append(f"{label:<{width}}  " + "  ".join(f"{v:>12.4f}" for v in values))
    return "\n".join(lines)


def plot_ranking(rows: list[dict], k: int, path: Path) -> None:
    """plots/ranking.png: validation HR@k and NDCG@k after each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["step"], r[f"val_hr@{k}"], r[f"val_ndcg@{k}"]) for r in rows if f"val_hr@{k}" in r]
    if not points:
        return
    steps, hr, ndcg = zip(*points)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(steps, hr, "o-", label=f"val HR@{k}", lw=1.5, ms=4)
    ax.plot(steps, ndcg, "s-", label=f"val NDCG@{k}", lw=1.5, ms=4)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.set_title("ranking quality (held-out item vs sampled negatives)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Using a trained recommender


def resolve_recommender_dir(directory: str | Path) -> Path:
    """A checkpoint directory, or a run directory's checkpoints/best."""
    directory = Path(directory).expanduser()
    best = directory / "checkpoints" / "best"
    if not (directory / "config.json").is_file() and (best / "config.json").is_file():
        return best
    return directory


def read_history(directory: Path, ids: IdMap) -> tuple[np.ndarray, np.ndarray] | None:
    """(indptr, items) of history.safetensors (None for a checkpoint written without it)."""
    path = directory / HISTORY_FILE
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
        indptr, items = tensors["indptr"], tensors["items"]
    except (SafetensorError, KeyError, OSError) as e:
        raise FromzeroError(f"{path} is not a readable history file: {e}") from None
    if (indptr.shape != (ids.num_users + 1,) or indptr[0] != 0 or indptr[-1] != len(items)
            or np.any(np.diff(indptr) < 0)
            or (len(items) and not 0 <= items.min() <= items.max() < ids.num_items)):
        raise FromzeroError(f"{path} does not match the checkpoint's {ids.num_users} users and "
                            f"{ids.num_items} items")
    return indptr, items


def read_catalog(directory: Path) -> dict[str, dict]:
    """items.json: raw item id -> {"title", "genres"} ({} when the checkpoint has none)."""
    from fromzero.checkpoint import read_json

    path = directory / ITEMS_FILE
    if not path.is_file():
        return {}
    catalog = read_json(path, "item catalog")
    if not isinstance(catalog, dict) or not all(isinstance(v, dict) for v in catalog.values()):
        raise FromzeroError(f"{path} must map item ids to objects with a title")
    return catalog


class Recommender:
    """A trained recommender that takes and returns raw ids::

        rec = Recommender("runs/movielens-neumf")         # a run, or its checkpoints/best
        rec.recommend("42", k=10)     # [{"item": "318", "title": "Schindler's List (1993)", ...}, ...]
        rec.score("42", ["318", "7"])                   # [3.1, -0.4]

    ``recommend`` leaves out the items the user already has in the training data (train, val and
    test positives, from history.safetensors) and any ``exclude``. An unknown user or item is a
    one-line FromzeroError (the model learned nothing for it).
    """

    def __init__(self, directory: str | Path, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.directory = resolve_recommender_dir(directory)
        self.model, self.ids, self.info = load_recommender(self.directory, self.device)
        self.history = read_history(self.directory, self.ids)
        self.catalog = read_catalog(self.directory)

    def rated(self, user: str | int) -> list[str]:
        """The raw ids of the items ``user`` interacted with in the data the model was trained on."""
        u = self.ids.user_index(user)
        if self.history is None:
            return []
        indptr, items = self.history
        return [self.ids.items[i] for i in items[indptr[u]:indptr[u + 1]]]

    def score(self, user: str | int, items: list[str | int]) -> list[float]:
        u = self.ids.user_index(user)
        idx = np.array([self.ids.item_index(i) for i in items], dtype=np.int64)
        return predict_scores(self.model, np.full(len(idx), u), idx, self.device).tolist()

    def recommend(self, user: str | int, k: int = 10, exclude: list[str | int] = (),
                  exclude_rated: bool = True) -> list[dict[str, Any]]:
        """The k highest-scoring items for ``user`` (rank, item, title and genres when known,
        score), leaving out ``exclude`` and, with ``exclude_rated``, the items they already have."""
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise FromzeroError(f"k must be a positive integer, got {k!r}")
        u = self.ids.user_index(user)
        scores = predict_scores(self.model, np.full(self.ids.num_items, u), np.arange(self.ids.num_items), self.device)
        leave_out = [self.ids.item_index(item) for item in exclude]
        if exclude_rated and self.history is not None:
            indptr, items = self.history
            leave_out += items[indptr[u]:indptr[u + 1]].tolist()
        scores[np.asarray(leave_out, dtype=np.int64)] = -np.inf
        top = [i for i in np.argsort(-scores, kind="stable")[:k] if np.isfinite(scores[i])]
        out = []
        for rank, i in enumerate(top, start=1):
            raw = self.ids.items[i]
            about = self.catalog.get(raw, {})
            described = {key: about[key] for key in ("title", "genres") if key in about}
            out.append({"rank": rank, "item": raw, **described, "score": round(float(scores[i]), 6)})
        return out


def evaluate_recommender(directory: str | Path, settings: dict[str, Any], data: str | None = None,
                         split: str = "test", device: str = "cpu") -> dict[str, Any]:
    """HR@K / NDCG@K (and log loss) of a recommendation checkpoint on its data's val or test split.

    ``settings``: the fields of the run that made the checkpoint (its config.yaml), so the data,
    min_rating and candidates are rebuilt exactly (info.json's copies when the run is gone);
    ``data`` overrides the source. The rebuilt users and items must be the checkpoint's.
    """
    if split not in ("val", "test"):
        raise FromzeroError(f"a recommender is evaluated on split val or test (leave-one-out), not {split!r}")
    directory = resolve_recommender_dir(directory)
    dev = torch.device(device)
    model, ids, info = load_recommender(directory, dev)
    fields = {k: v for k, v in settings.items() if k in RecommendationConfig.__dataclass_fields__}
    for key in ("data", "min_rating", "eval_negatives", "eval_seed", "top_k"):
        if key not in fields and key in info:
            fields[key] = info[key]
    if data:
        fields["data"] = data
    try:
        cfg = RecommendationConfig(**fields)
    except TypeError as e:
        raise FromzeroError(f"cannot rebuild the run's settings: {e}") from None
    rec = load_recommendation_data(cfg)
    if rec.ids.users != ids.users or rec.ids.items != ids.items:
        raise FromzeroError(f"{cfg.data} gives {rec.ids.num_users} users and {rec.ids.num_items} items, "
                            f"not the {ids.num_users} and {ids.num_items} the checkpoint was trained on "
                            "(evaluate on the run's data, min_rating and test_data)")
    es = rec.eval_set(split, cfg.eval_negatives, cfg.eval_seed)
    scores = score_eval_set(lambda u, i: predict_scores(model, u, i, dev, cfg.eval_batch_size), es)
    metrics = evaluate_scores(scores, cfg.top_k, logits=True)
    return {"task": "recommendation", "arch": model.config.arch, "data": cfg.data, "split": split,
            "n": len(es), "eval_negatives": cfg.eval_negatives, **metrics}
