"""Poisson sampling: batch-size statistics, empty batches through any collate_fn."""
import math

import torch
from torch.utils.data import DataLoader, TensorDataset

from veil.data_loader import DPDataLoader, UniformWithReplacementSampler


def test_poisson_batch_sizes_have_binomial_mean_and_variance():
    N, q, steps = 1000, 0.05, 4000
    sampler = UniformWithReplacementSampler(num_samples=N, sample_rate=q, steps=steps,
                                            generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    mean, var = N * q, N * q * (1 - q)
    assert abs(sizes.mean().item() - mean) < 4 * math.sqrt(var / steps)
    # variance of the sample variance of a ~normal variable: 2σ⁴/(n-1)
    assert abs(sizes.var().item() - var) < 4 * var * math.sqrt(2 / (steps - 1))


def test_each_example_is_included_independently():
    N, q, steps = 50, 0.3, 3000
    sampler = UniformWithReplacementSampler(num_samples=N, sample_rate=q, steps=steps,
                                            generator=torch.Generator().manual_seed(1))
    hits = torch.zeros(N)
    pair = 0
    for b in sampler:
        m = torch.zeros(N)
        m[b] = 1
        hits += m
        pair += m[0] * m[1]
    assert ((hits / steps - q).abs() < 4 * math.sqrt(q * (1 - q) / steps)).all()
    assert abs(pair / steps - q * q) < 4 * math.sqrt(q * q / steps)


def test_from_data_loader_uses_one_over_len_and_keeps_collate():
    ds = TensorDataset(torch.randn(100, 3), torch.arange(100))
    calls = []

    def collate(batch):
        calls.append(len(batch))
        return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])

    dl = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=10, collate_fn=collate))
    assert dl.sample_rate == 0.1 and len(dl) == 10
    for x, y in dl:
        assert x.shape[1:] == (3,) and x.dtype == torch.float32


def test_empty_batch_is_correctly_shaped_through_a_custom_collate():
    ds = TensorDataset(torch.randn(20, 2, 3), torch.arange(20))

    def collate(batch):
        return {"x": torch.stack([b[0] for b in batch]), "y": torch.stack([b[1] for b in batch]), "tag": "t"}

    dl = DPDataLoader(ds, sample_rate=1e-9, collate_fn=collate, steps=3)
    batches = list(dl)
    assert len(batches) == 3
    for b in batches:
        assert b["x"].shape == (0, 2, 3) and b["y"].shape == (0,) and b["y"].dtype == torch.int64
        assert b["tag"] == "t"


def test_sampler_resume_state_follows_deliveries():
    """Used on its own (no loader reporting deliveries) the sampler keeps no states and resumes from
    its generator's current state; with DPDataLoader it resumes from the first undelivered batch, and
    the workers' base seeds do not draw from its stream, without a generator too (seeded from
    torch.manual_seed)."""
    sampler = UniformWithReplacementSampler(num_samples=100, sample_rate=0.1, steps=50,
                                            generator=torch.Generator().manual_seed(2))
    it = iter(sampler)
    for _ in range(20):
        next(it)
    assert len(sampler._undelivered) == 0
    assert torch.equal(sampler.resume_state(), sampler.generator.get_state())

    def loader():
        torch.manual_seed(4)
        return DPDataLoader(TensorDataset(torch.arange(100.0)), sample_rate=0.1, steps=6)

    a, b = loader(), loader()
    first = [x for (x,) in a]
    assert all(torch.equal(x, y) for x, y in zip(first, [x for (x,) in b]))  # torch.manual_seed reproduces
    c = loader()
    it = iter(c)
    next(it)
    next(it)
    state = c.batch_sampler.resume_state()
    d = loader()
    d.batch_sampler.set_resume_state(state)
    rest = [x for (x,) in d]
    assert all(torch.equal(x, y) for x, y in zip(rest[:4], first[2:]))
