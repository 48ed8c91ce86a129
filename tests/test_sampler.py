from collections import Counter

import pytest

from lightning_cit.sampler import MixtureSampler


def make(weights, sizes=(50, 50, 400), rank=0, world=1, start=0, batches=200, micro=16, seed=0):
    return MixtureSampler(
        source_sizes=list(sizes),
        weights_for_batch=lambda b: weights,
        task_index=len(sizes) - 1,
        num_batches=batches,
        micro_batch_size=micro,
        world_size=world,
        rank=rank,
        seed=seed,
        start_batch=start,
    )


def test_source_frequencies_match_weights():
    weights = [0.1, 0.3, 0.6]
    counts = Counter(source for batch in make(weights) for source, _ in batch)
    total = sum(counts.values())  # 3200 draws: binomial std of a share <= 0.009
    for source, weight in enumerate(weights):
        assert counts[source] / total == pytest.approx(weight, abs=0.03)


def test_zero_weight_sources_are_never_drawn():
    drawn = {source for batch in make([0.0, 0.0, 1.0], batches=50) for source, _ in batch}
    assert drawn == {2}


def test_each_source_is_walked_without_repeats_within_a_pass():
    batches = list(make([0.0, 0.0, 1.0], batches=25, micro=16))  # 400 draws = one pass over 400 samples
    positions = [pos for batch in batches for _, pos in batch]
    assert sorted(positions) == list(range(400))


def test_ranks_draw_disjoint_slots_of_one_reproducible_stream():
    weights = [0.2, 0.2, 0.6]
    single = list(make(weights, micro=8, world=1, batches=20))
    r0 = list(make(weights, micro=4, world=2, rank=0, batches=20))
    r1 = list(make(weights, micro=4, world=2, rank=1, batches=20))
    for whole, a, b in zip(single, r0, r1):
        assert a + b == whole
    current_task = [k for batch in r0 + r1 for k in batch if k[0] == 2]
    assert len(current_task) == len(set(current_task))  # no current-task sample on two ranks


def test_resume_continues_the_same_stream():
    weights = [0.25, 0.25, 0.5]
    full = list(make(weights, batches=40))
    resumed = list(make(weights, batches=40, start=17))
    assert resumed == full[17:]
    assert len(make(weights, batches=40, start=17)) == 40  # Lightning keeps counting from the checkpoint


def test_schedule_changes_apply_from_their_batch():
    schedule = {0: [0.0, 0.0, 1.0], 10: [1.0, 0.0, 0.0]}
    sampler = MixtureSampler([50, 50, 400], lambda b: schedule[max(k for k in schedule if k <= b)], 2, 20, 8)
    batches = list(sampler)
    assert all(s == 2 for batch in batches[:10] for s, _ in batch)
    assert all(s == 0 for batch in batches[10:] for s, _ in batch)


def test_per_entry_weights_inside_a_source():
    sampler = MixtureSampler(
        [4, 100], lambda b: [1.0, 0.0], 1, 100, 10, entry_weights_for_batch=lambda b: [[0.7, 0.1, 0.1, 0.1], None]
    )
    counts = Counter(pos for batch in sampler for _, pos in batch)
    assert counts[0] / 1000 == pytest.approx(0.7, abs=0.05)
