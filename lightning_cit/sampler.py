"""The mixture sampler: draws every sample from the current task or a replay buffer, as weighted.

The sampler never decides weights (a :class:`~lightning_cit.callbacks.MixtureController` does), it
only draws. Decisions reach it as a *schedule* ``{batch_index: weights}`` within the task: the draw
for batch ``b`` uses the entry with the largest key ``<= b``. Keying decisions by batch index instead
of "whatever is current when the draw happens" is what makes a run reproducible and resumable even
though batches are drawn ahead of the training step that consumes them (see ``draw_ahead`` in the
DataModule).

Reproducibility and ranks: batch ``b`` of task ``k`` is drawn from a generator seeded with
``(seed, k, b)``, identically on every rank, for the *global* micro-batch (``micro_batch_size *
world_size`` slots); rank ``r`` keeps slots ``[r * m, (r + 1) * m)``. Ranks therefore read disjoint
slots of one stream. Each source is walked in seeded permutations (one per pass), so a source is
exhausted before any of its samples repeats; buffers that return :meth:`sampling_weights` are
drawn by weight instead. Resuming at batch ``n`` replays the (cheap, index-only) draws of batches
``0..n-1`` to restore the cursors, then yields from ``n``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

Key = tuple[int, int]  # (source index, position within the source)


def _seed(*parts: int) -> int:
    # a stable 63-bit mix of the parts (Python's hash() of tuples is stable for ints, but be explicit)
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & 0x7FFFFFFFFFFFFFFF
    return value


class MixtureSampler(Sampler[list[Key]]):
    """A batch sampler over ``num_sources`` sources (earlier tasks' buffers, then the current task).

    Args:
        source_sizes: number of entries in each source; the current task is the last one.
        weights_for_batch: returns the mixture weights (one per source) in force for a batch index.
        task_index: the task being trained (seeds the draws).
        num_batches: batches in this task (the epoch length).
        micro_batch_size: samples per batch on this rank.
        world_size, rank: the data-parallel layout.
        seed: base seed of the run.
        start_batch: first batch to yield (resume); earlier draws are replayed silently.
        entry_weights_for_batch: per-entry draw weights of each source in force for a batch
            (``None`` for a source = walk it in seeded permutations); None = permutations everywhere.
    """

    def __init__(
        self,
        source_sizes: Sequence[int],
        weights_for_batch: Callable[[int], Sequence[float]],
        task_index: int,
        num_batches: int,
        micro_batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        start_batch: int = 0,
        entry_weights_for_batch: Callable[[int], Sequence[Sequence[float] | None]] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.source_sizes = list(source_sizes)
        self.weights_for_batch = weights_for_batch
        self.task_index = task_index
        self.num_batches = num_batches
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.start_batch = start_batch
        self.entry_weights_for_batch = entry_weights_for_batch

    def __len__(self) -> int:
        # the full task length, also when resuming: Lightning continues its batch index from the checkpoint
        return self.num_batches

    def __iter__(self) -> Iterator[list[Key]]:
        cursors = [0] * len(self.source_sizes)
        orders: list[torch.Tensor | None] = [None] * len(self.source_sizes)
        start, self.start_batch = self.start_batch, 0  # a resumed position is used once
        for batch in range(self.num_batches):
            keys = self._draw(batch, cursors, orders)
            if batch >= start:
                lo = self.rank * self.micro_batch_size
                yield keys[lo : lo + self.micro_batch_size]

    def _draw(self, batch: int, cursors: list[int], orders: list[torch.Tensor | None]) -> list[Key]:
        weights = torch.as_tensor(self.weights_for_batch(batch), dtype=torch.float64)
        generator = torch.Generator().manual_seed(_seed(self.seed, self.task_index, batch))
        global_size = self.micro_batch_size * self.world_size
        sources = torch.multinomial(weights, global_size, replacement=True, generator=generator).tolist()
        entry_weights = self.entry_weights_for_batch(batch) if self.entry_weights_for_batch else None
        keys = []
        for source in sources:
            size = self.source_sizes[source]
            per_entry = entry_weights[source] if entry_weights is not None else None
            if per_entry is not None:
                position = int(torch.multinomial(torch.as_tensor(per_entry, dtype=torch.float64), 1, generator=generator))
                keys.append((source, position))
                continue
            step = cursors[source]
            pass_index, offset = divmod(step, size)
            if offset == 0 or orders[source] is None:
                perm_gen = torch.Generator().manual_seed(_seed(self.seed, self.task_index, source, pass_index, 7))
                orders[source] = torch.randperm(size, generator=perm_gen)
            keys.append((source, int(orders[source][offset])))
            cursors[source] = step + 1
        return keys
