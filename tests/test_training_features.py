"""Virtual batches, clipping strategies, schedulers, secure mode, mixed precision, RNG in checkpoints."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from tests.models import MLP
from tests.reference import brute_force_grads
from veil import GradSampleModule
from veil.data_loader import DPDataLoader
from veil.optimizers import DPOptimizer
from veil.utils.batch_memory_manager import BatchMemoryManager


def dataset(n=64, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g))


def train(model, loader, opt, physical=None):
    def loop(dl):
        for x, y in dl:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    if physical is None:
        loop(loader)
    else:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=opt) as dl:
            loop(dl)


@pytest.mark.parametrize("physical", [1, 5, 16])
def test_batch_memory_manager_equals_one_big_batch(physical):
    torch.manual_seed(0)
    base = MLP()
    results = []
    for phys in (None, physical):
        model = GradSampleModule(copy.deepcopy(base))
        loader = DPDataLoader(dataset(), sample_rate=0.4, generator=torch.Generator().manual_seed(7))
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=0.0, max_grad_norm=0.3,
                          expected_batch_size=26)
        steps = []
        opt.attach_step_hook(lambda o: steps.append(1))
        train(model, loader, opt, phys)
        results.append((model, len(steps)))
    (a, na), (b, nb) = results
    assert na == nb == len(loader)  # the weights change once per logical batch
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), "physical batching must not change the result"


def test_weights_change_only_at_the_end_of_a_logical_batch():
    model = GradSampleModule(MLP())
    loader = DPDataLoader(dataset(), sample_rate=0.9, generator=torch.Generator().manual_seed(1), steps=1)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=0.0, max_grad_norm=1.0,
                      expected_batch_size=58)
    before = [p.detach().clone() for p in model.parameters()]
    unchanged, sizes = [], []
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=8, optimizer=opt) as dl:
        for x, y in dl:
            sizes.append(len(y))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            unchanged.append(all(torch.equal(p, q) for p, q in zip(model.parameters(), before)))
    assert len(sizes) > 2 and max(sizes) <= 8
    assert all(unchanged[:-1]) and not unchanged[-1]


def per_sample_norms(model, x, y):
    per = brute_force_grads(model, (x,), lambda out, i: F.cross_entropy(out, y[i : i + 1], reduction="sum"), len(y))
    return per


def test_per_layer_clipping_clips_each_group_and_scales_noise():
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = MLP()
        x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
        per = per_sample_norms(model, x, y)
        bounds = [0.05, 0.2]
        groups = [{"params": list(model.net[0].parameters())}, {"params": list(model.net[2].parameters())}]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        gsm = GradSampleModule(model, loss_reduction="sum")
        opt = DPOptimizer(torch.optim.SGD(groups, lr=1.0), noise_multiplier=0.0, max_grad_norm=bounds,
                          expected_batch_size=6, loss_reduction="sum", clipping="per_layer")
        assert math.isclose(opt.clipping.noise_std(2.0), 2.0 * math.hypot(*bounds))
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        opt.step()
        for layer, C in (("net.0", bounds[0]), ("net.2", bounds[1])):
            names = [f"{layer}.weight", f"{layer}.bias"]
            norm = torch.cat([per[n].reshape(6, -1) for n in names], 1).norm(dim=1)
            c = torch.clamp(C / norm, max=1)
            for n in names:
                p = dict(model.named_parameters())[n]
                assert torch.allclose(before[n] - p.detach(), torch.tensordot(c, per[n], dims=1), rtol=1e-10)
    finally:
        torch.set_default_dtype(torch.float32)


def test_automatic_clipping_normalises_each_sample():
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = MLP()
        x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
        per = per_sample_norms(model, x, y)
        norm = torch.cat([g.reshape(5, -1) for g in per.values()], 1).norm(dim=1)
        C, gamma = 2.0, 0.01
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        gsm = GradSampleModule(model, loss_reduction="sum")
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=C,
                          expected_batch_size=5, loss_reduction="sum", clipping="automatic", gamma=gamma)
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        opt.step()
        c = C / (norm + gamma)
        for n, p in model.named_parameters():
            assert torch.allclose(before[n] - p.detach(), torch.tensordot(c, per[n], dims=1), rtol=1e-10)
    finally:
        torch.set_default_dtype(torch.float32)


def test_adaptive_clipping_moves_the_bound_towards_the_quantile_and_splits_the_noise():
    model = GradSampleModule(MLP())
    sigma, std_b = 1.0, 5.0
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=sigma, max_grad_norm=1e-4,
                      expected_batch_size=32, clipping="adaptive", target_unclipped_quantile=0.5,
                      clipbound_learning_rate=0.5, unclipped_num_std=std_b,
                      generator=torch.Generator().manual_seed(0))
    grad_sigma = (sigma ** -2 - (2 * std_b) ** -2) ** -0.5
    assert math.isclose(opt.clipping.noise_std(sigma), grad_sigma * 1e-4)
    assert grad_sigma > sigma  # the count query takes part of the budget
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    bounds = []
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        bounds.append(opt.max_grad_norm)
    assert bounds[-1] > 1e-3, "all samples clipped: the bound must grow"
    with pytest.raises(ValueError, match="unclipped_num_std"):
        DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=4.0, max_grad_norm=1.0,
                    expected_batch_size=32, clipping="adaptive", unclipped_num_std=1.0).clipping.noise_std(4.0)


def test_noise_and_clip_schedulers_change_what_the_optimizer_uses():
    from veil.schedulers import ExponentialNoise, LambdaGradClip, StepNoise

    model = GradSampleModule(MLP())
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=2.0, max_grad_norm=1.0,
                      expected_batch_size=4)
    used = []
    opt.attach_step_hook(lambda o: used.append(o.noise_multiplier))
    sched = ExponentialNoise(opt, gamma=0.5)
    clip = LambdaGradClip(opt, scheduler_function=lambda t: 1.0 / (t + 1))
    for epoch in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 8)), torch.randint(0, 3, (4,))).backward()
        opt.step()
        sched.step()
        clip.step()
    assert used == [2.0, 1.0, 0.5]
    assert math.isclose(opt.max_grad_norm, 0.25)
    s = StepNoise(opt, step_size=2, gamma=0.1)
    state = s.state_dict()
    s.step(); s.step()
    s.load_state_dict(state)
    assert math.isclose(opt.noise_multiplier, s.base_value)


def test_secure_noise_is_gaussian_and_not_reproducible_from_torch_seed():
    from scipy import stats

    from veil.utils.secure_rng import secure_normal, secure_uniform

    torch.manual_seed(0)
    a = secure_normal((50_000,), 2.0, dtype=torch.float64)
    torch.manual_seed(0)
    b = secure_normal((50_000,), 2.0, dtype=torch.float64)
    assert not torch.equal(a, b)
    assert stats.kstest(a.numpy() / 2.0, "norm").pvalue > 1e-4
    assert abs(a.std().item() / 2.0 - 1) < 0.02
    u = secure_uniform(50_000)
    assert (u > 0).all() and (u <= 1).all() and stats.kstest(u.numpy(), "uniform").pvalue > 1e-4

    model = GradSampleModule(nn.Linear(100, 100))
    grads = []
    for _ in range(2):
        torch.manual_seed(0)
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0,
                          expected_batch_size=1, secure_mode=True)
        model(torch.zeros(0, 100)).sum().backward()
        opt.step()
        grads.append(model.weight.grad.clone())
        opt.zero_grad()
    assert not torch.equal(*grads)
    assert abs(grads[0].std().item() - 1.0) < 0.05


def test_secure_poisson_sampling_is_not_reproducible_from_torch_seed():
    batches = []
    for _ in range(2):
        torch.manual_seed(0)
        dl = DPDataLoader(dataset(200), sample_rate=0.5, secure_mode=True, steps=1)
        batches.append(next(iter(dl))[1])
    assert not (len(batches[0]) == len(batches[1]) and torch.equal(*batches))


def test_bf16_autocast_matches_fp32_within_bf16_tolerance():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    updates = []
    for amp in (False, True):
        model = GradSampleModule(copy.deepcopy(base))
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.1,
                          expected_batch_size=32)
        seen = {}
        inner = opt._accumulate

        def spy(chunk, inner=inner):
            seen["dtypes"] = {e.norms_sq.dtype for e in chunk.entries}
            inner(chunk)

        model.consumer = spy
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            F.cross_entropy(model(x).float(), y).backward()
        opt.step()
        assert seen["dtypes"] == {torch.float32}
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        updates.append([p.grad.clone() for p in model.parameters()])
    for g32, g16 in zip(*updates):
        assert torch.allclose(g16, g32, rtol=0.05, atol=0.02 * g32.abs().max().item())


def test_batch_memory_manager_with_prefetching_workers():
    """Worker processes draw batch indices ahead of the training loop; step boundaries must still
    follow the batches the loop receives (one real step per logical batch, same result)."""
    torch.manual_seed(0)
    base = MLP()
    results = []
    for workers in (0, 2):
        model = GradSampleModule(copy.deepcopy(base))
        loader = DPDataLoader(dataset(), sample_rate=0.4, generator=torch.Generator().manual_seed(7),
                              num_workers=workers)
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=0.0, max_grad_norm=0.3,
                          expected_batch_size=26)
        steps = []
        opt.attach_step_hook(lambda o: steps.append(1))
        train(model, loader, opt, physical=5)
        results.append((model, len(steps)))
    (a, na), (b, nb) = results
    assert na == nb == len(loader)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
