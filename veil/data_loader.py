"""DPDataLoader: Poisson sampling, where every example joins each batch independently with probability q.

Batches therefore have random size (possibly zero). An empty batch still comes out as correctly
shaped empty tensors through the user's collate_fn, so the training step runs and adds noise only.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate
from torch.utils._pytree import tree_map


#: Batches drawn ahead of the loop whose generator states are kept (DataLoader's prefetch depth,
#: num_workers x prefetch_factor, is far below this).
_MAX_IN_FLIGHT = 1024


class UniformWithReplacementSampler(Sampler[List[int]]):
    """Yields index batches; each index is included independently with probability ``sample_rate``.

    Args:
        num_samples: dataset size N.
        sample_rate: q in (0, 1].
        generator: torch.Generator for the Bernoulli masks (ignored in secure mode). Without one, the
            sampler seeds a generator of its own from torch's global generator, once, so that sampling
            is reproducible under ``torch.manual_seed`` and its stream can be checkpointed exactly.
        steps: batches per epoch (default: round(1/q)).
        secure_mode: draw the masks from a cryptographically secure source.

    A DataLoader with worker processes draws batches ahead of the training loop. When the loader
    reports deliveries (``tracks_delivery = True``, set by DPDataLoader: it calls
    :meth:`batch_delivered` as the loop receives each batch), the sampler keeps the generator's state
    from before each batch it has drawn but the loop has not received yet, so :meth:`resume_state` is
    where a resumed run must continue the stream. Otherwise it is the generator's current state.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        generator: Optional[torch.Generator] = None,
        steps: Optional[int] = None,
        secure_mode: bool = False,
    ):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        if generator is None and not secure_mode:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        self.generator = generator
        self.secure_mode = secure_mode
        self.tracks_delivery = False
        self._undelivered: Deque[torch.Tensor] = deque(maxlen=_MAX_IN_FLIGHT)
        self.steps = steps if steps is not None else max(1, int(round(1 / sample_rate)))

    def __len__(self) -> int:
        return self.steps

    def _uniform(self) -> torch.Tensor:
        if self.secure_mode:
            from .utils.secure_rng import secure_uniform

            return secure_uniform(self.num_samples)
        return torch.rand(self.num_samples, generator=self.generator)

    def __iter__(self) -> Iterator[List[int]]:
        self._undelivered.clear()  # a new pass: batches drawn for an abandoned one are not coming
        for _ in range(self.steps):
            if self.tracks_delivery and not self.secure_mode:
                self._undelivered.append(self.generator.get_state())
            mask = self._uniform() < self.sample_rate
            yield mask.nonzero().flatten().tolist()

    def batch_delivered(self) -> None:
        """The training loop has received the oldest batch drawn."""
        if self._undelivered:
            self._undelivered.popleft()

    def resume_state(self) -> Optional[torch.Tensor]:
        """The generator state from which the batches the loop has not received yet are drawn."""
        if self.secure_mode:
            return None
        return self._undelivered[0].clone() if self._undelivered else self.generator.get_state()

    def set_resume_state(self, state: torch.Tensor) -> None:
        """Continue the stream from ``state`` (as returned by :meth:`resume_state`)."""
        self._undelivered.clear()
        self.generator.set_state(state)


def _empty_like_batch(collate_fn: Callable, example: Any) -> Any:
    """A batch of zero examples with the structure, dtypes and trailing shapes of a real batch."""
    one = collate_fn([example])
    return tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, one)


class _EmptySafeCollate:
    def __init__(self, collate_fn: Callable, dataset: Dataset):
        self.collate_fn = collate_fn
        self.dataset = dataset
        self._empty = None

    def __call__(self, batch: List[Any]) -> Any:
        if len(batch) == 0:
            if self._empty is None:
                self._empty = _empty_like_batch(self.collate_fn, self.dataset[0])
            return self._empty
        return self.collate_fn(batch)


class DPDataLoader(DataLoader):
    """A DataLoader whose batches are Poisson samples of the dataset.

    Args:
        dataset: the training set (map-style).
        sample_rate: q, the probability that an example is in a given batch.
        collate_fn: as in DataLoader; empty batches are handled.
        drop_last: accepted for compatibility and ignored (batch sizes are random).
        generator: torch.Generator for sampling.
        distributed: not supported yet (raises).
        secure_mode: draw the sampling masks from a cryptographically secure source.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        collate_fn: Optional[Callable] = None,
        drop_last: bool = False,
        generator: Optional[torch.Generator] = None,
        distributed: bool = False,
        steps: Optional[int] = None,
        secure_mode: bool = False,
        **kwargs,
    ):
        if distributed:
            raise NotImplementedError("distributed Poisson sampling is not available in this version of Veil")
        self.sample_rate = sample_rate
        sampler = UniformWithReplacementSampler(
            num_samples=len(dataset), sample_rate=sample_rate, generator=generator, steps=steps,
            secure_mode=secure_mode,
        )
        sampler.tracks_delivery = True  # __iter__ below reports each batch the loop receives
        super().__init__(
            dataset,
            batch_sampler=sampler,
            collate_fn=_EmptySafeCollate(collate_fn or default_collate, dataset),
            generator=_loader_generator(sampler, generator),
            **kwargs,
        )

    def __iter__(self) -> Iterator:
        sampler = self.batch_sampler
        for batch in super().__iter__():
            sampler.batch_delivered()
            yield batch

    @classmethod
    def from_data_loader(
        cls, data_loader: DataLoader, *, generator: Optional[torch.Generator] = None, distributed: bool = False,
        secure_mode: bool = False,
    ) -> "DPDataLoader":
        """The Poisson-sampling twin of ``data_loader``: sample rate 1/len(data_loader), same collate and workers."""
        if not hasattr(data_loader.dataset, "__len__"):
            raise ValueError("Poisson sampling needs a map-style dataset with a length")
        collate = data_loader.collate_fn
        if isinstance(collate, _EmptySafeCollate):
            collate = collate.collate_fn
        return cls(
            data_loader.dataset,
            sample_rate=1 / len(data_loader),
            collate_fn=collate,
            generator=generator if generator is not None else data_loader.generator,
            distributed=distributed,
            secure_mode=secure_mode,
            **worker_options(data_loader),
        )


def _loader_generator(sampler: UniformWithReplacementSampler,
                      generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """DataLoader draws its workers' base seed from its generator each time an iterator starts; a
    generator of its own, seeded once from the sampler's, keeps those draws out of the Poisson stream."""
    if sampler.secure_mode:
        return generator
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=sampler.generator).item()))


def worker_options(data_loader: DataLoader) -> dict:
    """The loading options (workers, pinning, timeouts) of ``data_loader``, to build a twin with."""
    return dict(
        num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory,
        timeout=data_loader.timeout,
        worker_init_fn=data_loader.worker_init_fn,
        multiprocessing_context=data_loader.multiprocessing_context,
        prefetch_factor=data_loader.prefetch_factor if data_loader.num_workers > 0 else None,
        persistent_workers=data_loader.persistent_workers,
    )
