"""The LAME-style affinity step (affinity_step) against its float64 reference, on fresh random
problems with NaN-poisoned memory, heads and statistics that no slot of the call owns."""

import pytest
import torch

from kernels import affinity_step, head_forward
from kernels import label_free_reference as ref
from tests.kernels.cases import CASES, IMPLS, SEQUENCE_RMSE, TOLERANCE, assert_matches, make_problem, relative_rmse, tolerance
from tests.kernels.test_kernels_feature_stats import stats_pools


def memory_pool(p, poison: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(p.seed + 2)
    R, C, d = p.sums.shape
    M = 0.3 * torch.randn(R, C, d, generator=g)
    if poison:
        used = torch.zeros(R, dtype=torch.bool)
        used[p.state_rows[p.slots >= 0].long().cpu()] = True
        M[~used] = float("nan")
        # masked classes of the rows in use belong to nobody either
        for s, r in zip(p.slots[p.slots >= 0].cpu().tolist(), p.state_rows[p.slots >= 0].cpu().tolist()):
            M[r, int(p.n_classes[s]):] = float("nan")
    return M.to(p.x.device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, impl):
    p = make_problem(**case)
    t = stats_pools(p)
    M = memory_pool(p)
    lam = 2.0 * p.per_slot if case["layout"] == "mixed" else 3.0
    memory = 1.0 + 20 * p.per_slot if case["layout"] == "mixed" else 7.0
    M_new, W, b = M.clone(), p.W.clone(), p.b.clone()
    affinity_step(p.x, p.slots, p.state_rows, M_new, t["mean"], t["var"], W, b, p.n_classes, lam, memory, impl=impl)
    e_M, e_W, e_b = ref.affinity_step_ref(p.x, p.slots, p.state_rows, M, t["mean"], t["var"], p.W, p.b, p.n_classes,
                                          lam, memory)
    tol = tolerance(case)
    assert_matches(M_new, e_M, tol, "M", p.seed)
    assert_matches(W, e_W, tol, "W", p.seed)
    assert_matches(b, e_b, tol, "b", p.seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_head_then_adds_the_affinity_to_the_memory(impl):
    """After a call, head_forward(x) == old head(x) + lam * M_new u(x) for any row x."""
    p = make_problem(C=10, d=100, layout="mixed", poison=False)
    t = stats_pools(p, poison=False)
    M = memory_pool(p, poison=False)
    W, b = p.W.clone(), p.b.clone()
    affinity_step(p.x, p.slots, p.state_rows, M, t["mean"], t["var"], W, b, p.n_classes, 1.5, 10.0, impl=impl)
    q = torch.randn(p.x.shape, device=p.x.device)
    valid = p.slots >= 0
    got = head_forward(q, W, b, p.slots, p.n_classes, impl=impl)[valid]
    before = head_forward(q, p.W, p.b, p.slots, p.n_classes, impl=impl)[valid]
    r = p.state_rows[valid].long()
    sigma = t["var"][r].sum(1).sqrt().unsqueeze(1)
    u = (q[valid] - t["mean"][r]) / sigma
    want = before + 1.5 * torch.einsum("bcd,bd->bc", M[r], u)
    live = got.isfinite()
    torch.testing.assert_close(got[live], want[live], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_forgets_at_its_rate(impl):
    """memory = 1: the memory is exactly this call's mean assignment outer products."""
    p = make_problem(C=10, d=100, B=8, layout="one_session", poison=False)
    t = stats_pools(p, poison=False)
    M = memory_pool(p, poison=False)
    W, b = p.W.clone(), p.b.clone()
    affinity_step(p.x, p.slots, p.state_rows, M, t["mean"], t["var"], W, b, p.n_classes, 0.0, 1.0, impl=impl)
    r, s = int(p.state_rows[0]), int(p.slots[0])
    n = int(p.n_classes[s])
    u = (p.x - t["mean"][r]) / t["var"][r].sum().sqrt()
    z = torch.softmax(p.x @ p.W[s, :n].T + p.b[s, :n], 1)
    torch.testing.assert_close(M[r, :n], z.T @ u / len(p.x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_step_sequence(impl):
    p = make_problem(C=10, d=100, B=10, poison=False)
    t = stats_pools(p, poison=False)
    M = memory_pool(p, poison=False)
    W, b = p.W.clone(), p.b.clone()
    e = (M.double(), p.W.double(), p.b.double())
    for _ in range(3):
        batch = p.next_batch()
        affinity_step(batch.x, batch.slots, batch.state_rows, M, t["mean"], t["var"], W, b, p.n_classes, 1.0, 5.0,
                      impl=impl)
        e = ref.affinity_step_ref(batch.x, batch.slots, batch.state_rows, e[0], t["mean"], t["var"], e[1], e[2],
                                  p.n_classes, 1.0, 5.0)
    for got, want in zip((M, W, b), e):
        assert relative_rmse(got, want) < SEQUENCE_RMSE[torch.float32], f"seed={p.seed}"


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_changes_nothing(impl):
    p = make_problem(C=10, d=100, layout="empty")
    t = stats_pools(p)
    M = memory_pool(p)
    M0, W, b = M.clone(), p.W.clone(), p.b.clone()
    affinity_step(p.x, p.slots, p.state_rows, M, t["mean"], t["var"], W, b, p.n_classes, 1.0, 5.0, impl=impl)
    assert torch.equal(M.nan_to_num(7.0), M0.nan_to_num(7.0))
    assert torch.equal(W.nan_to_num(7.0), p.W.nan_to_num(7.0)) and torch.equal(b.nan_to_num(7.0), p.b.nan_to_num(7.0))


def test_triton_writes_every_assignment():
    from kernels.dispatch import per_slot
    from kernels.triton.affinity import affinity_step_triton

    p = make_problem(C=37, d=100, layout="mixed")
    t = stats_pools(p)
    M = memory_pool(p)
    S, dev = p.W.shape[0], p.W.device
    z = torch.full((p.x.shape[0], 37), float("nan"), device=dev)
    affinity_step_triton(p.x, p.slots, p.state_rows, M, t["mean"], t["var"], p.W.clone(), p.b.clone(), p.n_classes,
                         per_slot(1.0, S, dev), per_slot(5.0, S, dev), z=z)
    assert not z.isnan().any()
    valid = p.slots >= 0
    torch.testing.assert_close(z[valid].sum(1), torch.ones_like(z[valid, 0]), atol=1e-5, rtol=0)
    assert torch.equal(z[~valid], torch.zeros_like(z[~valid]))
