"""data/plan's EpochPlan against hand-computed positions, permutations and states, in process and fast (issue 22:
`make mutation` selects these). The sizes are chosen so the plausible bugs differ: N not a multiple of W*U (the
wrap-around and the ceil), W*U > N (padding beyond one copy), and W = 2 vs 3 for the same global batch."""

from __future__ import annotations

import pytest
import torch

from mixmo_dist.data.plan import EpochPlan
from mixmo_dist.runtime.seeds import derive_seed


def _plan(num=10, unique=3, rank=0, world=2, seed=7):
    return EpochPlan(num, unique_per_rank=unique, rank=rank, world_size=world, seed=seed)


def test_steps_are_the_ceiling_of_samples_over_the_global_batch():
    assert len(_plan(10, 3, world=2)) == 2  # 10 / 6 -> 2
    assert len(_plan(12, 3, world=2)) == 2  # exact
    assert len(_plan(13, 3, world=2)) == 3
    assert len(_plan(5, 4, world=3)) == 1  # a global batch larger than the dataset


def test_global_order_is_the_seeded_permutation_wrapped_around():
    plan = _plan(5, 2, world=2, seed=11)  # steps 2, 8 positions for 5 samples
    gen = torch.Generator().manual_seed(derive_seed(11, 3))
    perm = torch.randperm(5, generator=gen)
    order = plan.global_order(3)
    assert order.tolist() == perm.tolist() + perm[:3].tolist()
    # Padding beyond one copy of the dataset: 2 samples, 3 ranks x 2 -> 6 positions, the permutation three times.
    tiny = _plan(2, 2, world=3, seed=1)
    gen = torch.Generator().manual_seed(derive_seed(1, 0))
    assert tiny.global_order(0).tolist() == torch.randperm(2, generator=gen).tolist() * 3


def test_epochs_and_seeds_give_other_permutations_and_the_same_ones_again():
    plan = _plan(50, 5, world=2, seed=3)
    assert torch.equal(plan.global_order(0), _plan(50, 5, world=2, seed=3).global_order(0))
    assert not torch.equal(plan.global_order(0), plan.global_order(1))
    assert not torch.equal(plan.global_order(0), _plan(50, 5, world=2, seed=4).global_order(0))
    assert sorted(plan.global_order(1).tolist()) == list(range(50))


def test_rank_positions_by_hand():
    assert _plan(10, 3, rank=0, world=2).rank_positions().tolist() == [[0, 1, 2], [6, 7, 8]]
    assert _plan(10, 3, rank=1, world=2).rank_positions().tolist() == [[3, 4, 5], [9, 10, 11]]
    assert _plan(20, 2, rank=2, world=3).rank_positions().tolist() == [[4, 5], [10, 11], [16, 17], [22, 23]]


@pytest.mark.parametrize("num, unique, world", [(10, 3, 2), (13, 2, 3), (4, 3, 2)])
def test_ranks_read_disjoint_parts_that_cover_the_epoch(num, unique, world):
    plans = [_plan(num, unique, rank=r, world=world) for r in range(world)]
    order = plans[0].global_order(2)
    parts = [p.rank_indices(2) for p in plans]
    for r, (p, part) in enumerate(zip(plans, parts)):
        assert part.shape == (p.steps, unique)
        assert torch.equal(part, order[p.rank_positions()]), r
    positions = torch.cat([p.rank_positions().flatten() for p in plans])
    assert sorted(positions.tolist()) == list(range(len(order)))  # disjoint and complete
    assert set(torch.cat([x.flatten() for x in parts]).tolist()) == set(range(num))


def test_a_global_step_holds_the_same_images_for_the_same_global_batch():
    two = [_plan(24, 3, rank=r, world=2, seed=5) for r in range(2)]
    three = [_plan(24, 2, rank=r, world=3, seed=5) for r in range(3)]
    for step in range(4):
        a = torch.cat([p.rank_indices(1)[step] for p in two])
        b = torch.cat([p.rank_indices(1)[step] for p in three])
        assert torch.equal(a, b), step


def test_position_set_epoch_advance_and_roll_over():
    plan = _plan(10, 3, world=2)  # 2 steps
    assert plan.state_dict() == {"epoch": 0, "batch": 0} and plan.epoch == 0
    plan.advance()
    plan.set_epoch(0)  # the current epoch: the position stays
    assert plan.state_dict() == {"epoch": 0, "batch": 1}
    assert plan.begin_pass() == (0, 1)
    plan.advance()
    assert plan.begin_pass() == (1, 0)  # finished: the next epoch starts
    assert plan.state_dict() == {"epoch": 1, "batch": 0}
    plan.advance()
    plan.set_epoch(4)  # another epoch: its start
    assert plan.state_dict() == {"epoch": 4, "batch": 0} and plan.epoch == 4
    assert plan.begin_pass() == (4, 0)


@pytest.mark.parametrize("bad", [-1, 1.0, True, "2"])
def test_set_epoch_refuses_what_is_not_a_non_negative_int(bad):
    with pytest.raises(ValueError, match=rf"^epoch must be a non-negative int, got {bad!r}$"):
        _plan().set_epoch(bad)


def test_state_round_trip_and_the_last_batch_is_a_valid_position():
    plan = _plan(10, 3, world=2)
    plan.load_state_dict({"epoch": 3, "batch": 2})  # batch == steps: the epoch is finished
    assert plan.state_dict() == {"epoch": 3, "batch": 2}
    assert plan.begin_pass() == (4, 0)
    plan.load_state_dict({"epoch": 0, "batch": 1})
    assert plan.begin_pass() == (0, 1)


@pytest.mark.parametrize(
    "state, message",
    [
        ({"epoch": 0}, "data state must be a dict with keys 'epoch' and 'batch', got {'epoch': 0}"),
        ([0, 0], "data state must be a dict with keys 'epoch' and 'batch', got [0, 0]"),
        ({"epoch": 0, "batch": 0, "x": 1}, "data state must be a dict with keys"),
        ({"epoch": -1, "batch": 0}, "data state 'epoch' must be a non-negative int, got -1"),
        ({"epoch": 0, "batch": True}, "data state 'batch' must be a non-negative int, got True"),
        ({"epoch": 0, "batch": 1.0}, "data state 'batch' must be a non-negative int, got 1.0"),
        (
            {"epoch": 0, "batch": 3},
            (
                "data state batch=3 exceeds the 2 batches per epoch of this run (was the checkpoint written with "
                "another world size, batch size or dataset?)"
            ),
        ),
    ],
)
def test_bad_states_are_refused_by_name(state, message):
    plan = _plan(10, 3, world=2)
    with pytest.raises(ValueError) as err:
        plan.load_state_dict(state)
    assert str(err.value).startswith(message)
    assert plan.state_dict() == {"epoch": 0, "batch": 0}  # nothing half-loaded


def test_load_resharded_takes_the_agreed_position_or_names_the_disagreement():
    plan = _plan(24, 2, rank=1, world=3)
    plan.load_resharded([{"epoch": 2, "batch": 3}] * 2, step=99)
    assert plan.state_dict() == {"epoch": 2, "batch": 3}
    with pytest.raises(ValueError, match=r"disagree on the position: \[\(2, 1\), \(2, 3\)\]"):
        plan.load_resharded([{"epoch": 2, "batch": 3}, {"epoch": 2, "batch": 1}], step=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 0}, r"^cannot train on an empty dataset \(num_samples=0\)$"),
        ({"unique_per_rank": 0}, r"^unique_per_rank must be >= 1, got 0$"),
        ({"rank": 2}, r"^rank 2 is outside the world of size 2$"),
        ({"rank": -1}, r"^rank -1 is outside the world of size 2$"),
    ],
)
def test_constructor_refuses_bad_sizes_by_name(kwargs, message):
    args = {"num_samples": 10, "unique_per_rank": 3, "rank": 0, "world_size": 2, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        EpochPlan(args.pop("num_samples"), **args)
    # The boundaries themselves are accepted.
    EpochPlan(1, unique_per_rank=1, rank=1, world_size=2, seed=0)
