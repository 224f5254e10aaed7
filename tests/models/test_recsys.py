"""Recommender models (fromzero.models.recsys): shapes, exact algebra, checkpoints, baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fromzero.errors import FromzeroError
from fromzero.models.recsys import (ARCHES, GMF, MLP, ImplicitALS, NeuMF, PopularityRanker, RecsysConfig,
                                    WideAndDeep, build_recsys, neumf_from_pretrained)

U, I = 7, 11


def config(arch: str, **kw) -> RecsysConfig:
    return RecsysConfig(arch=arch, num_users=U, num_items=I, factors=4, mlp_layers=[8, 6, 3], **kw)


def pairs(n: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, U, (n,), generator=g), torch.randint(0, I, (n,), generator=g)


@pytest.mark.parametrize("arch", ARCHES)
def test_forward_gives_one_finite_logit_per_pair(arch: str) -> None:
    torch.manual_seed(0)
    model = build_recsys(config(arch, dropout=0.1))
    users, items = pairs()
    logits = model(users, items)
    assert logits.shape == (9,) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.sum().backward()  # every trained tensor is reachable from the loss
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    # one pair alone scores the same as inside a batch (eval mode: no dropout)
    model.eval()
    with torch.no_grad():
        batch = model(users, items)
        alone = torch.stack([model(users[k:k + 1], items[k:k + 1])[0] for k in range(9)])
    torch.testing.assert_close(alone, batch)


def test_tower_and_layer_shapes() -> None:
    neumf = NeuMF(config("neumf"))
    assert neumf.gmf.user_embed.weight.shape == (U, 4) and neumf.gmf.item_embed.weight.shape == (I, 4)
    assert neumf.mlp.user_embed.weight.shape == (U, 4)  # half of mlp_layers[0] = 8
    linears = [m for m in neumf.mlp.layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 6), (6, 3)]
    assert neumf.predict.in_features == 4 + 3
    wd = WideAndDeep(config("widedeep"))
    assert wd.wide_user_x_popularity.weight.shape == (U * 8, 1)
    assert wd.wide_activity_x_item.weight.shape == (8 * I, 1)
    assert wd.deep[0].in_features == 2 * 4 + 2 * 4  # user + item (4 each) + two bucket embeddings


def test_gmf_with_unit_weights_is_a_dot_product() -> None:
    model = GMF(config("gmf"))
    with torch.no_grad():
        model.predict.weight.fill_(1.0)
        model.predict.bias.zero_()
    users, items = pairs()
    expected = (model.gmf.user_embed.weight[users] * model.gmf.item_embed.weight[items]).sum(-1)
    torch.testing.assert_close(model(users, items), expected)


def test_pretrained_neumf_is_the_alpha_blend_of_gmf_and_mlp() -> None:
    torch.manual_seed(1)
    gmf, mlp = GMF(config("gmf")), MLP(config("mlp"))
    with torch.no_grad():  # non-trivial output layers
        for layer in (gmf.predict, mlp.predict):
            layer.weight.normal_()
            layer.bias.normal_()
    users, items = pairs(seed=3)
    neumf = neumf_from_pretrained(gmf, mlp, alpha=0.3).eval()
    with torch.no_grad():
        expected = 0.3 * gmf(users, items) + 0.7 * mlp.eval()(users, items)
        torch.testing.assert_close(neumf(users, items), expected)
    torch.testing.assert_close(neumf.gmf.user_embed.weight, gmf.gmf.user_embed.weight)
    torch.testing.assert_close(neumf.mlp.layers[0].weight, mlp.mlp.layers[0].weight)


def test_pretrained_neumf_refuses_mismatched_models() -> None:
    other = MLP(RecsysConfig("mlp", U + 1, I, mlp_layers=[8, 4]))
    with pytest.raises(FromzeroError, match="different data"):
        neumf_from_pretrained(GMF(config("gmf")), other)
    with pytest.raises(FromzeroError, match="GMF and an MLP"):
        neumf_from_pretrained(MLP(config("mlp")), MLP(config("mlp")))


def test_wide_and_deep_buckets_and_crosses() -> None:
    model = WideAndDeep(RecsysConfig("widedeep", 4, 5, mlp_layers=[4, 2], buckets=2))
    model.set_buckets(np.array([1, 1, 5, 9]), np.array([0, 3, 3, 10, 20]))
    # 2 buckets split at the median (3.0 for users, 3 for items): at or above it is bucket 1
    assert model.user_bucket.tolist() == [0, 0, 1, 1]
    assert model.item_bucket.tolist() == [0, 1, 1, 1, 1]
    with torch.no_grad():  # switch the deep part off and set known wide weights
        model.deep_out.weight.zero_()
        model.deep_out.bias.zero_()
        model.bias.fill_(0.5)
        model.wide_user.weight[2] = 1.0
        model.wide_item.weight[4] = 2.0
        model.wide_user_x_popularity.weight[2 * 2 + 1] = 4.0  # user 2 x popular items (bucket 1)
        model.wide_activity_x_item.weight[1 * 5 + 4] = 8.0  # active users (bucket 1) x item 4
        logits = model(torch.tensor([2, 2, 0]), torch.tensor([4, 0, 4]))
    assert logits.tolist() == [0.5 + 1 + 2 + 4 + 8, 0.5 + 1, 0.5 + 2]


def test_checkpoint_round_trip_for_every_arch(tmp_path) -> None:
    from fromzero.checkpoint import load_model, save_checkpoint

    users, items = pairs()
    for arch in ARCHES:
        torch.manual_seed(2)
        model = build_recsys(config(arch)).eval()
        if isinstance(model, WideAndDeep):
            model.set_buckets(np.arange(U), np.arange(I) ** 2)
        save_checkpoint(tmp_path / arch, model, model.config.to_dict())
        loaded = load_model(tmp_path / arch)
        assert type(loaded) is type(model) and loaded.config == model.config
        with torch.no_grad():
            torch.testing.assert_close(loaded(users, items), model(users, items), rtol=0, atol=0)
        if isinstance(model, WideAndDeep):  # the buckets travel as buffers
            assert loaded.item_bucket.tolist() == model.item_bucket.tolist()


@pytest.mark.parametrize("bad, message", [
    (dict(arch="svd"), "arch 'svd' is not supported"),
    (dict(mlp_layers=[7, 4]), "must be even"),
    (dict(mlp_layers=[8]), "at least 2"),
    (dict(num_users=0), "num_users must be a positive integer"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_configs_are_one_line_errors(bad: dict, message: str) -> None:
    fields = dict(arch="neumf", num_users=3, num_items=3, mlp_layers=[8, 4]) | bad
    with pytest.raises(FromzeroError, match=message):
        build_recsys(RecsysConfig(**fields))


def test_registry_rebuilds_from_config_json() -> None:
    from fromzero.models import build_model

    model = build_model(config("widedeep").to_dict())
    assert isinstance(model, WideAndDeep)
    with pytest.raises(FromzeroError, match="invalid fromzero-recsys config|not supported"):
        build_model({**config("gmf").to_dict(), "arch": "nope"})


def test_popularity_scores_are_training_counts() -> None:
    train = np.array([[0, 1], [1, 1], [2, 1], [0, 3]])
    pop = PopularityRanker(train, num_items=5)
    assert pop.score(np.array([4, 4, 4]), np.array([1, 3, 0])).tolist() == [3.0, 1.0, 0.0]


def test_als_step_is_the_closed_form_ridge_solution() -> None:
    """Each half-step solves (Y^T C_u Y + reg I) x_u = Y^T C_u p_u exactly (dense reference)."""
    rng = np.random.default_rng(0)
    train = np.unique(np.stack([rng.integers(0, 30, 300), rng.integers(0, 20, 300)], 1), axis=0)
    als = ImplicitALS(factors=5, reg=0.7, alpha=4.0, iterations=2).fit(train, 32, 21)  # 30, 31, item 20: no data
    Y = als.item_factors
    P = np.zeros((32, 21))
    P[train[:, 0], train[:, 1]] = 1.0
    C = 1.0 + 4.0 * P
    reference = np.stack([np.linalg.solve(Y.T @ (C[u][:, None] * Y) + 0.7 * np.eye(5), Y.T @ (C[u] * P[u]))
                          if P[u].any() else np.zeros(5) for u in range(32)])
    np.testing.assert_allclose(als._solve(Y, train[:, 0], train[:, 1], 32), reference, atol=1e-10)
    # and it learns: observed pairs score above unobserved ones on average
    scores = als.user_factors @ als.item_factors.T
    assert scores[P == 1].mean() > scores[P == 0].mean() + 0.3
