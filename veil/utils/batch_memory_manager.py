"""BatchMemoryManager: train on large logical (Poisson) batches with small physical ones.

Each logical batch drawn by the sampler is split into physical chunks of at most
``max_physical_batch_size`` examples. When the training loop receives any chunk but the last, the
optimizer is told to skip its next step, so ``optimizer.step()`` only clips and accumulates; the
weights change, noise is drawn and the accountant is told once per logical batch, exactly as with
one big batch. The sampler records, in order, which chunks end a logical batch, and the loop side
reads those marks as the batches arrive: worker processes may draw indices well ahead of the loop.
"""
from __future__ import annotations

from collections import deque
from typing import Deque, Iterator, List

from torch.utils.data import DataLoader, Sampler

from ..data_loader import DPDataLoader, worker_options
from ..optimizers.optimizer import DPOptimizer


class BatchSplittingSampler(Sampler[List[int]]):
    """Splits every batch of ``sampler`` into chunks; ``ends`` gets, per chunk yielded and in order,
    whether it is the last of its logical batch."""

    def __init__(self, *, sampler: Sampler[List[int]], max_batch_size: int):
        self.sampler = sampler
        self.max_batch_size = max_batch_size
        self.ends: Deque[bool] = deque()

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.sampler:
            chunks = [batch[i : i + self.max_batch_size] for i in range(0, len(batch), self.max_batch_size)] or [[]]
            for k, chunk in enumerate(chunks):
                self.ends.append(k == len(chunks) - 1)
                yield chunk

    def __len__(self) -> int:
        sample_rate = getattr(self.sampler, "sample_rate", None)
        n = getattr(self.sampler, "num_samples", None)
        if sample_rate is None or n is None:
            return len(self.sampler)
        expected = max(1, -(-int(n * sample_rate) // self.max_batch_size))
        return len(self.sampler) * expected


class PhysicalBatches(DataLoader):
    """The loader of physical chunks. As the loop receives each chunk it tells the optimizer whether
    the next ``step()`` ends a logical batch (DataLoader keeps the sampler's order, workers or not)."""

    def __init__(self, dataset, *, batch_sampler: BatchSplittingSampler, optimizer: DPOptimizer, **kwargs):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.optimizer = optimizer

    def __iter__(self) -> Iterator:
        self.batch_sampler.ends.clear()
        logical = getattr(self.batch_sampler.sampler, "batch_delivered", None)
        for batch in super().__iter__():
            end = self.batch_sampler.ends.popleft()
            self.optimizer.signal_skip_step(do_skip=not end)
            if end and logical is not None:
                logical()
            yield batch


def wrap_data_loader(*, data_loader: DataLoader, max_batch_size: int, optimizer: DPOptimizer) -> PhysicalBatches:
    """A loader over the same data whose batches are the physical chunks of ``data_loader``'s batches."""
    sampler = data_loader.batch_sampler
    if sampler is None:
        raise ValueError("BatchMemoryManager needs a loader with a batch sampler (a DPDataLoader or batch_size=...)")
    return PhysicalBatches(
        data_loader.dataset,
        batch_sampler=BatchSplittingSampler(sampler=sampler, max_batch_size=max_batch_size),
        optimizer=optimizer,
        collate_fn=data_loader.collate_fn,
        generator=data_loader.generator,
        **worker_options(data_loader),
    )


class BatchMemoryManager:
    """Context manager yielding a loader of physical batches of at most ``max_physical_batch_size``.

    Example::

        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=64, optimizer=optimizer) as dl:
            for x, y in dl:
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()   # a real step only at the end of each logical batch
    """

    def __init__(self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer: DPOptimizer):
        if max_physical_batch_size <= 0:
            raise ValueError(f"max_physical_batch_size must be positive, got {max_physical_batch_size}")
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError("BatchMemoryManager needs the DPOptimizer returned by make_private")
        if not isinstance(data_loader, DPDataLoader):
            import warnings

            warnings.warn("BatchMemoryManager is used with a loader that is not Poisson-sampled; the accounting "
                          "assumes Poisson sampling.")
        self.data_loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer

    def __enter__(self) -> PhysicalBatches:
        return wrap_data_loader(data_loader=self.data_loader, max_batch_size=self.max_physical_batch_size,
                                optimizer=self.optimizer)

    def __exit__(self, *exc) -> None:
        self.optimizer.signal_skip_step(do_skip=False)
