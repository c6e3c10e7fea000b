"""SlotBatch: the per-call row metadata shared by the ops (kernels/slot_batch.py)."""

import pytest
import torch

import kernels
from kernels import SlotBatch, replay_slots
from tests.kernels.cases import IMPLS, assert_matches, make_problem

CPU = torch.device("cpu")


def test_torch_view_groups_valid_rows_by_slot_in_arrival_order():
    slots = torch.tensor([2, -1, 0, 2, 5, 0, 2, -1])
    batch = SlotBatch(slots)
    assert batch.size == 8 and batch.num_rows == 6 and batch.num_segments == 3
    assert batch.rows.tolist() == [2, 5, 0, 3, 6, 4]
    assert batch.slot.tolist() == [0, 2, 5] and batch.count.tolist() == [2, 3, 1]
    assert batch.seg.tolist() == [0, 0, 1, 1, 1, 2] and batch.pos.tolist() == [0, 1, 0, 1, 2, 0]
    assert batch.counts_list == [2, 3, 1] and batch.max_count == 3 and not batch.rows_in_place
    assert batch.first_rows().tolist() == [2, 0, 4]
    values = torch.arange(8) * 10
    grouped = batch.gather_rows(values)
    assert grouped.tolist() == [20, 50, 0, 30, 60, 40]
    padded = batch.padded(grouped, 3)
    assert padded.tolist() == [[20, 50, 0], [0, 30, 60], [40, 0, 0]]
    assert torch.equal(batch.unpad(padded), grouped)


def test_longest_first_view_orders_groups_by_count_and_keeps_arrival_order():
    slots = torch.tensor([2, -1, 0, 2, 5, 0, 2, 5, 7])
    batch = SlotBatch(slots)
    longest = batch.longest_first()
    assert longest is batch.longest_first() and longest.longest_first() is longest and longest.is_longest_first
    assert longest.slot.tolist() == [2, 0, 5, 7] and longest.counts_list == [3, 2, 2, 1]  # ties: by slot
    assert longest.rows.tolist() == [0, 3, 6, 2, 5, 4, 7, 8]
    assert longest.seg.tolist() == [0, 0, 0, 1, 1, 2, 2, 3] and longest.pos.tolist() == [0, 1, 2, 0, 1, 0, 1, 0]
    assert longest.profile == batch.profile == (3, 2, 2, 1)
    assert longest.order is batch.order  # one Triton view for both


def test_triton_view_sorts_every_row_and_gives_each_its_slot_range():
    slots = torch.tensor([3, -1, 0, 3, -1, 0, 3], dtype=torch.int32)
    batch = SlotBatch(slots)
    assert batch.order.tolist() == [1, 4, 2, 5, 0, 3, 6]
    assert batch.sorted_slots.tolist() == [-1, -1, 0, 0, 3, 3, 3]
    assert batch.seg_start.tolist() == [0, 0, 2, 2, 4, 4, 4]
    assert batch.seg_end.tolist() == [2, 2, 4, 4, 7, 7, 7]
    assert all(t.dtype == torch.int64 and t.is_contiguous()
               for t in (batch.order, batch.sorted_slots, batch.seg_start, batch.seg_end))


def test_views_are_built_lazily_and_the_triton_path_never_builds_host_lists():
    p = make_problem(C=10, d=100, layout="mixed")
    batch = SlotBatch(p.slots)
    assert not {"_groups", "_sorted", "counts_list"} & set(vars(batch)), "nothing is computed up front"
    W, b = p.W.clone(), p.b.clone()
    kernels.sgd_step(p.x, p.y, p.slots, W, b, p.n_classes, 0.5, impl="triton", batch=batch)
    kernels.entropy_step(p.x, p.y, p.slots, W, b, p.n_classes, 0.5, 0.1, impl="triton", batch=batch)
    kernels.delta_step(p.x, p.y, p.slots, W, p.n_classes, 0.5, impl="triton", batch=batch)
    kernels.head_forward(p.x, W, b, p.slots, p.n_classes, impl="triton", batch=batch)
    assert "_sorted" in vars(batch)
    assert not {"_groups", "counts_list", "rows_in_place", "_longest_first_view"} & set(vars(batch))
    kernels.delta_step(p.x, p.y, p.slots, W, p.n_classes, 0.5, impl="torch", batch=batch)
    assert "_groups" in vars(batch.longest_first()) and "counts_list" in vars(batch.longest_first())


def test_rls_sizes_its_row_loop_from_host_counts_when_built_from_a_list():
    """rls_step (Triton) loops over row positions: a batch built from_list knows the counts on
    the host, so the call groups nothing on the side and never reads counts back."""
    p = make_problem(C=10, d=100, layout="mixed")
    batch = SlotBatch.from_list(p.slots.tolist(), device=p.slots.device)
    assert torch.equal(batch.slots, p.slots.long())
    assert batch.counts_list == SlotBatch(p.slots).counts_list
    assert batch.longest_first().counts_list == SlotBatch(p.slots).longest_first().counts_list
    assert "_groups" not in vars(batch)
    W, P = p.W.clone(), p.P.clone()
    kernels.rls_step(p.x, p.y, p.slots, p.state_rows, W, P, p.n_classes, impl="triton", batch=batch)
    assert "_groups" not in vars(batch), "the Triton RLS built the torch grouping (a synchronisation on CUDA)"
    W_alone, P_alone = p.W.clone(), p.P.clone()
    kernels.rls_step(p.x, p.y, p.slots, p.state_rows, W_alone, P_alone, p.n_classes, impl="triton")
    assert_matches(W, W_alone, 0.0, "W", p.seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_ops_sharing_one_batch_compute_what_they_compute_alone(impl):
    """tent's pattern: head_forward then entropy_step on the same rows, one SlotBatch."""
    p = make_problem(C=37, d=100, layout="mixed")
    y = torch.where(torch.rand(p.y.shape, device=p.y.device) < 0.5, -1, p.y.long())
    normalize = torch.rand(p.W.shape[0]) < 0.5
    W1, b1, W2, b2 = p.W.clone(), p.b.clone(), p.W.clone(), p.b.clone()
    batch = SlotBatch(p.slots)
    shared = kernels.head_forward(p.x, W1, b1, p.slots, p.n_classes, normalize, impl=impl, batch=batch)
    kernels.entropy_step(p.x, y, p.slots, W1, b1, p.n_classes, 0.5, 0.05, impl=impl, batch=batch)
    kernels.sgd_step(p.x, p.y, p.slots, W1, b1, p.n_classes, 0.3, 0.01, impl=impl, batch=batch)
    alone = kernels.head_forward(p.x, W2, b2, p.slots, p.n_classes, normalize, impl=impl)
    kernels.entropy_step(p.x, y, p.slots, W2, b2, p.n_classes, 0.5, 0.05, impl=impl)
    kernels.sgd_step(p.x, p.y, p.slots, W2, b2, p.n_classes, 0.3, 0.01, impl=impl)
    assert_matches(shared, alone, 0.0, "logits", p.seed)
    assert_matches(W1, W2, 0.0, "W", p.seed)
    assert_matches(b1, b2, 0.0, "b", p.seed)
    assert not torch.equal(W1.nan_to_num(), p.W.nan_to_num()), "the steps changed nothing"


def test_a_batch_built_for_other_rows_is_rejected():
    x, W, b = torch.zeros(3, 4, device=CPU), torch.zeros(2, 2, 4, device=CPU), torch.zeros(2, 2, device=CPU)
    slots, n = torch.tensor([0, 1, 1], device=CPU), torch.tensor([2, 2], device=CPU)
    with pytest.raises(ValueError, match="built for 2 rows"):
        kernels.head_forward(x, W, b, slots, n, batch=SlotBatch(slots[:2]))
    with pytest.raises(TypeError, match="SlotBatch"):
        kernels.sgd_step(x, slots, slots, W, b, n, 0.1, batch=slots)
    with pytest.raises(ValueError, match="1-d"):
        SlotBatch(slots.view(3, 1))
    assert SlotBatch.build(slots).check_for(slots).size == 3


def test_profile_and_the_torch_grouping_it_picks():
    cases = [([], (), "empty"), ([4, 4, 4, 4], (4,), "one_slot"), ([0, 1, 0, 2, 2], (2, 2, 1), "padded"),
             ([0] * 70 + list(range(1, 11)), (70,) + (1,) * 10, "per_row")]
    for slots, profile, path in cases:
        batch = SlotBatch(torch.tensor(slots + [-1], dtype=torch.int64))
        assert batch.profile == profile and batch.torch_path == path, slots
    rect = SlotBatch(torch.tensor([1, 0, 1, 0]))
    assert rect.is_rectangular and rect.torch_path == "padded"
    batch = SlotBatch(torch.tensor([4, 2, 4, -1, 9, 4]))
    assert batch.other_counts(4) == [1, 1] and batch.other_counts(2) == [3, 1] and batch.other_counts(3) == [1, 3, 1]


def test_replay_slots_layout():
    assert replay_slots(2, [3, 1]) == [0, 0, 1, 1, 1, 2]
    assert replay_slots(1, []) == [0]
    for own, others in ((0, [1]), (2, [1, 0]), (-1, [])):
        with pytest.raises(ValueError, match="positive"):
            replay_slots(own, others)


@pytest.mark.parametrize("seed", range(6))
def test_a_batch_from_a_host_list_groups_its_rows_as_the_tensor_one_does(seed):
    """On the CPU a from_list batch groups its rows on the host (no sort or unique ops): every
    field of both torch views, rows_in_place and the code path equal those of SlotBatch(tensor)."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    slots = torch.randint(-1, 6, (n,), generator=g)
    if seed % 3 == 0:  # already in slot order, every row valid: rows_in_place
        slots = slots.clamp(min=0).sort().values
    host, ref = SlotBatch.from_list(slots.tolist(), CPU), SlotBatch(slots)
    for a, b in ((host, ref), (host.longest_first(), ref.longest_first())):
        for name in ("rows", "slot", "count", "seg", "pos", "row_slot"):
            got, want = getattr(a, name), getattr(b, name)
            assert got.dtype == want.dtype == torch.int64 and got.is_contiguous() and torch.equal(got, want), name
        assert a.rows_in_place == b.rows_in_place and a.counts_list == b.counts_list
    assert host.rows_in_place == (seed % 3 == 0)
    at = ref.count.cumsum(0) - ref.count
    assert host.host_groups() == [(s, ref.rows[a:a + c].tolist())
                                  for s, a, c in zip(ref.slot.tolist(), at.tolist(), ref.count.tolist())]
    assert ref.host_groups() is None and host.longest_first().host_groups() is None
    assert host.profile == ref.profile and host.torch_path == ref.torch_path
