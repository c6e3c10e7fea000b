"""rls with a source prior: P starts at (lambda A)^-1 with A = prior S + (1 - prior) I, S the
backbone's within-class feature covariance, so the head is the generalised ridge solution; the
prior reaches sessions, episodic heads and the evaluation's simulation, and is refused where the
backbone has no such statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.source_stats import compute_source_stats
from server.client import Client, FwserveError
from server.errors import InvalidInput
from server.rules import RULES, scratch_heads
from tests.server.conftest import arr, backbone, digits, live_server  # noqa: F401 (the shared backbone fixture)

RLS = RULES["rls"]


def within_cov(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return (A @ A.T / (3 * d)).float()


def generalised_ridge(x, y, ways, lam, prior, S):
    """Float64 closed form: W = Y^T X (X^T X + lam A)^-1, A = prior S d / tr S + (1 - prior) I."""
    x, S = x.double(), S.double()
    d = x.shape[1]
    A = prior * S * (d / torch.trace(S)) + (1 - prior) * torch.eye(d, dtype=torch.float64)
    T = F.one_hot(y, ways).double()
    return torch.linalg.solve(x.T @ x + lam * A, x.T @ T).T


@pytest.mark.parametrize("prior", [0.0, 0.5, 0.97])
def test_the_head_after_a_stream_is_the_generalised_ridge_solution(prior):
    n, d, ways, lam = 37, 9, 4, 3.0
    g = torch.Generator().manual_seed(int(prior * 100))
    x, y = torch.randn(n, d, generator=g), torch.randint(0, ways, (n,), generator=g)
    S = within_cov(d, 1)
    hp = RLS.validate({"lambda": lam, "prior": prior})
    heads, rows = scratch_heads([(RLS, hp, ways, None)], ways, d, "cpu", source={"feature_within_cov": S})
    for at in range(0, n, 5):  # several adapt calls, as a stream arrives
        sl = torch.zeros(len(x[at:at + 5]), dtype=torch.long)
        RLS.update(heads, x[at:at + 5], y[at:at + 5], sl, torch.tensor(rows)[sl])
    torch.testing.assert_close(heads.W[0].double(), generalised_ridge(x, y, ways, lam, prior, S),
                               rtol=1e-3, atol=1e-4)


def test_prior_zero_is_plain_ridge_and_a_prior_needs_the_statistics():
    d = 6
    hp0 = RLS.validate({"lambda": 2.0})
    assert hp0["prior"] == 0.0
    torch.testing.assert_close(RLS.init_state(3, d, hp0)["P"], torch.eye(d) / 2.0)
    hp = RLS.validate({"lambda": 2.0, "prior": 0.9})
    with pytest.raises(InvalidInput) as e:
        RLS.init_state(3, d, hp, head={"W": torch.zeros(3, d), "b": torch.zeros(3)})
    assert e.value.code == "missing_source_stats"
    P = RLS.init_state(3, d, hp, head={"feature_within_cov": within_cov(d, 2)})["P"]
    assert torch.equal(P, P.T) and bool(torch.linalg.eigvalsh(P.double()).min() > 0)
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidInput):
            RLS.validate({"prior": bad})
    # prior 1 on a covariance of rank 2 in 6 dimensions: no ridge penalty in 4 of them
    low_rank = torch.randn(d, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InvalidInput) as e:
        RLS.init_state(3, d, RLS.validate({"prior": 1.0}), head={"feature_within_cov": low_rank @ low_rank.T})
    assert e.value.code == "invalid_hyperparameter"


def test_within_class_covariance_pools_rows_about_their_class_means():
    g = torch.Generator().manual_seed(5)
    f, y = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (50,), generator=g)
    expected = sum((f[y == c] - f[y == c].mean(0)).T @ (f[y == c] - f[y == c].mean(0)) for c in range(3)) / 50
    stats = compute_source_stats(f, y)
    torch.testing.assert_close(stats["within_cov"].double(), expected, rtol=1e-5, atol=1e-6)
    assert "within_cov" not in compute_source_stats(f)


def test_a_prior_session_over_http_answers_with_the_generalised_ridge_head(backbone, tmp_path):
    S = (backbone.source_stats or {}).get("within_cov")
    if S is None:
        pytest.skip("the backbone has no within-class covariance beside its weights")
    xs, labels = digits(12, seed=21), [str(i % 3) for i in range(12)]
    feats = backbone.features(torch.stack([backbone.preprocess(a) for a in xs]))
    y = torch.tensor([int(v) for v in labels])
    W = generalised_ridge(feats[:9], y[:9], 3, 10.0, 0.9, S)
    expected = torch.softmax(feats[9:].double() @ W.T, 1)
    with live_server(backbone, tmp_path) as srv, Client(srv.url) as c:
        sid = c.create_session("rls", ["0", "1", "2"], {"lambda": 10.0, "prior": 0.9}).id
        assert c.adapt(sid, [arr(a) for a in xs[:9]], labels=labels[:9]).version == 1
        got = c.predict([arr(a) for a in xs[9:]], session_id=sid, top_k=3).predictions
        for p, e in zip(got, expected):
            scores = {k.label: k.score for k in p.top_k}
            np.testing.assert_allclose([scores[str(c)] for c in range(3)], e.numpy(), rtol=2e-3, atol=2e-4)
        # an episodic head with the prior gets the same statistics
        ep = c.predict_episodic([arr(a) for a in xs[9:]], [arr(a) for a in xs[:9]], labels[:9], rule="rls",
                                hyperparameters={"lambda": 10.0, "prior": 0.9}, classes=["0", "1", "2"])
        assert [p.label for p in ep.predictions] == [p.label for p in got]
        with pytest.raises(FwserveError) as e:
            c.create_session("rls", ["0", "1"], {"prior": 2.0})
        assert e.value.status == 422


def test_the_starting_P_is_computed_once_per_covariance_and_never_shared_between_sessions():
    import gc

    d = 8
    hp = RLS.validate({"lambda": 4.0, "prior": 0.8})

    def expected(S):
        S = S.double()
        A = 0.8 * S * (d / torch.trace(S)) + 0.2 * torch.eye(d, dtype=torch.float64)
        return torch.linalg.inv(4.0 * A).float()

    for seed in range(4):  # a covariance freed and a new one made (perhaps at the same address)
        S = within_cov(d, seed)
        first = RLS.init_state(2, d, hp, head={"feature_within_cov": S})["P"]
        first.add_(1.0)  # a session's P is its own
        again = RLS.init_state(2, d, hp, head={"feature_within_cov": S})["P"]
        torch.testing.assert_close(again, expected(S), rtol=1e-5, atol=1e-6)
        del S, first, again
        gc.collect()
