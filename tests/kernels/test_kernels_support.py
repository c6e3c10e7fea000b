import pytest
import torch

from kernels import head_forward, reference, support_step
from tests.kernels.cases import CASES, IMPLS, assert_matches, tolerance, make_problem

K = 4  # support capacity: small so that rows compete for entries


def _state(p, seed_offset=0):
    """Support pool for the problem: some entries filled (finite priority), some empty (+inf),
    the state row no touched slot uses poisoned with NaN. Drawn on the CPU (the generator is a
    CPU one), then moved to the problem's device."""
    R, C, d = p.sums.shape
    with torch.device("cpu"):
        g = torch.Generator().manual_seed(p.seed + seed_offset)
        supports = torch.nn.functional.normalize(torch.randn(R, C, K, d, generator=g), dim=3)
        prio = torch.rand(R, C, K, generator=g)
        empty = torch.rand(R, C, K, generator=g) < 0.4
        prio[empty] = float("inf")
        supports[empty] = 0.0
        used = torch.zeros(R, dtype=torch.bool)
        used[p.state_rows[p.slots >= 0].long().cpu()] = True
        supports[~used] = float("nan")
        prio[~used] = float("nan")
    device = p.x.device
    return supports.to(device), prio.to(device)


def _inputs(p):
    with torch.device("cpu"):
        g = torch.Generator().manual_seed(p.seed + 1)
        priority = torch.rand(p.x.shape[0], generator=g)
        priority[0] = -1.0  # a labelled row: better than any entropy
        capacity = torch.tensor([K, 2, 3, K, 1, K], dtype=torch.float32)[: p.W.shape[0]]
    return priority.to(p.x.device), capacity.to(p.x.device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, impl):
    p = make_problem(**case)
    supports, prio = _state(p)
    priority, capacity = _inputs(p)
    temperature = 10.0 * p.per_slot if case["layout"] == "mixed" else 16.0
    W, sup, pr = p.W.clone(), supports.clone(), prio.clone()
    support_step(p.x, p.y, priority, p.slots, p.state_rows, sup, pr, W, p.n_classes, capacity, temperature,
                 impl=impl)
    sup_ref, pr_ref, W_ref = reference.support_step_ref(
        p.x, p.y, priority, p.slots, p.state_rows, supports, prio, p.W, p.n_classes, capacity, temperature)
    tol = tolerance(case)
    assert_matches(pr, pr_ref, 0.0, "support_priority", p.seed)
    assert_matches(sup, sup_ref, tol, "supports", p.seed)
    assert_matches(W, W_ref, tol, "W", p.seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_keeps_the_lowest_priorities_and_predicts_by_cosine_to_their_mean(impl):
    C, d, cap = 3, 16, 2
    x = torch.randn(6, d)
    y = torch.tensor([0, 0, 0, 1, 0, 2])
    priority = torch.tensor([0.5, 0.2, 0.9, 0.3, 0.2, 0.1])
    slots, rows = torch.zeros(6, dtype=torch.int64), torch.zeros(6, dtype=torch.int64)
    sup = torch.zeros(1, C, 4, d)
    prio = torch.full((1, C, 4), float("inf"))
    W = torch.zeros(1, C, d)
    support_step(x, y, priority, slots, rows, sup, prio, W, torch.tensor([C]), float(cap), 5.0, impl=impl)
    # class 0 saw 0.5, 0.2, 0.9, 0.2: keeps 0.2 (row 1) and the older of the rest that beats 0.5 -> row 4
    assert sorted(prio[0, 0, :cap].tolist()) == pytest.approx([0.2, 0.2])
    assert torch.isinf(prio[0, 0, cap:]).all()  # beyond the cap: untouched
    unit = torch.nn.functional.normalize(x, dim=1)
    torch.testing.assert_close(sup[0, 0, :cap].sum(0), unit[1] + unit[4])
    mean = torch.nn.functional.normalize(unit[1] + unit[4], dim=0)
    logits = head_forward(x, W, torch.zeros(1, C), slots, torch.tensor([C]), normalize=torch.tensor([True]),
                          impl=impl)
    torch.testing.assert_close(logits[:, 0], 5.0 * unit @ mean, atol=1e-5, rtol=1e-5)
    # a row of equal priority never displaces an older entry
    support_step(x[2:3], torch.tensor([0]), torch.tensor([0.2]), slots[:1], rows[:1], sup, prio, W,
                 torch.tensor([C]), float(cap), 5.0, impl=impl)
    torch.testing.assert_close(sup[0, 0, :cap].sum(0), unit[1] + unit[4])


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_and_filtered_rows_change_nothing(impl):
    p = make_problem(C=10, d=100, layout="empty")
    supports, prio = _state(p)
    W, sup, pr = p.W.clone(), supports.clone(), prio.clone()
    support_step(p.x, p.y, torch.zeros(0), p.slots, p.state_rows, sup, pr, W, p.n_classes, 4.0, 1.0, impl=impl)
    x = torch.randn(3, 100)
    support_step(x, torch.zeros(3, dtype=torch.int64), torch.zeros(3), torch.full((3,), -1), torch.zeros(3,
                 dtype=torch.int64), sup, pr, W, p.n_classes, 4.0, 1.0, impl=impl)
    for new, old in ((W, p.W), (sup, supports), (pr, prio)):
        assert torch.equal(new.nan_to_num(7.0), old.nan_to_num(7.0))
