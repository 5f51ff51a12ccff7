"""The façade: make_private, make_private_with_epsilon, get_epsilon, checkpoints, empty batches."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.models import MLP
from veil import GradSampleModule, PrivacyEngine
from veil.data_loader import DPDataLoader
from veil.optimizers import DPOptimizer


def data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def epoch(model, optimizer, loader):
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_make_private_wraps_the_three_objects_and_accounts():
    engine = PrivacyEngine(accountant="rdp")
    model = MLP()
    loader = DataLoader(data(), batch_size=20)
    m, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=loader, noise_multiplier=1.1, max_grad_norm=1.0)
    assert isinstance(m, GradSampleModule) and isinstance(opt, DPOptimizer) and isinstance(dl, DPDataLoader)
    assert dl.sample_rate == pytest.approx(0.1) and opt.expected_batch_size == 20
    assert engine.get_epsilon(1e-5) == 0
    epoch(m, opt, dl)
    assert len(engine.accountant) == 10
    assert engine.accountant.history == [(1.1, 0.1, 10)]
    assert 0 < engine.get_epsilon(1e-5) < 10
    m.net[0]  # attribute access reaches the wrapped model


def test_make_private_with_epsilon_reaches_the_target():
    engine = PrivacyEngine()
    model = MLP()
    loader = DataLoader(data(), batch_size=20)
    m, opt, dl = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        target_epsilon=2.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0)
    for _ in range(2):
        epoch(m, opt, dl)
    eps = engine.get_epsilon(1e-5)
    assert 1.9 <= eps <= 2.0


def test_poisson_sampling_off_keeps_the_loader():
    engine = PrivacyEngine(accountant="rdp")
    model = MLP()
    loader = DataLoader(data(), batch_size=20)
    _, _, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                   data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                   poisson_sampling=False)
    assert dl is loader


def test_empty_batches_train_with_noise_only():
    engine = PrivacyEngine(accountant="rdp")
    model = MLP()
    ds = data(50)
    loader = DPDataLoader(ds, sample_rate=1e-9, steps=3)
    m, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                    data_loader=DataLoader(ds, batch_size=10), noise_multiplier=1.0,
                                    max_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    n = 0
    for x, y in loader:
        assert x.shape == (0, 8)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()  # mean over nothing: NaN loss, but no per-sample gradient
        opt.step()
        n += 1
    assert n == 3 and len(engine.accountant) == 3
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoint_round_trip_keeps_epsilon_weights_and_random_streams(tmp_path):
    def setup():
        torch.manual_seed(0)
        engine = PrivacyEngine()
        model = MLP()
        loader = DataLoader(data(), batch_size=20, generator=torch.Generator().manual_seed(3))
        m, opt, dl = engine.make_private(module=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
                                         data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                         noise_generator=torch.Generator().manual_seed(5))
        return engine, m, opt, dl

    engine, m, opt, dl = setup()
    epoch(m, opt, dl)
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(path=path, module=m, optimizer=opt, checkpoint_dict={"epoch": 1})
    eps = engine.get_epsilon(1e-5)
    history = list(engine.accountant.history)
    epoch(m, opt, dl)
    expected = [p.detach().clone() for p in m.parameters()]

    engine2, m2, opt2, dl2 = setup()
    rest = engine2.load_checkpoint(path=path, module=m2, optimizer=opt2)
    assert rest == {"epoch": 1}
    assert engine2.get_epsilon(1e-5) == eps
    assert engine2.accountant.history == history == [(1.0, 0.1, 10)]
    epoch(m2, opt2, dl2)  # the resumed run continues the same sampling and noise streams
    for p, q in zip(m2.parameters(), expected):
        assert torch.equal(p, q)


def private_with_workers(seeded: bool):
    """A fresh private run whose loader has 2 worker processes (which draw batches ahead of the loop)."""
    torch.manual_seed(0)
    engine = PrivacyEngine()
    model = MLP()
    loader = DataLoader(data(), batch_size=20, num_workers=2, prefetch_factor=2,
                        generator=torch.Generator().manual_seed(3) if seeded else None)
    m, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                     noise_generator=torch.Generator().manual_seed(5))
    return engine, m, opt, dl


@pytest.mark.parametrize("seeded", [True, False], ids=["loader generator", "global seed"])
def test_checkpoint_mid_epoch_with_workers_resumes_where_the_loop_stopped(tmp_path, seeded):
    """Worker processes draw Poisson batches ahead of the loop; a checkpoint taken mid-epoch must
    resume from the first batch the loop has not received, not from where the sampler got to."""
    def steps(m, opt, it, n):
        seen = []
        for _ in range(n):
            x, y = next(it)
            seen.append(x)
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        return seen

    engine, m, opt, dl = private_with_workers(seeded)
    it = iter(dl)
    steps(m, opt, it, 3)
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(path=path, module=m, optimizer=opt)
    expected = steps(m, opt, it, 3)
    weights = [p.detach().clone() for p in m.parameters()]
    del it

    engine2, m2, opt2, dl2 = private_with_workers(seeded)
    engine2.load_checkpoint(path=path, module=m2, optimizer=opt2)
    got = steps(m2, opt2, iter(dl2), 3)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    for p, q in zip(m2.parameters(), weights):
        assert torch.equal(p, q)


def test_checkpoint_mid_epoch_with_batch_memory_manager_and_workers(tmp_path):
    """The same with logical batches split into physical chunks: the resume point is the first
    logical batch whose last chunk the loop has not received."""
    from veil.utils.batch_memory_manager import BatchMemoryManager

    def logical_steps(m, opt, it, n):
        seen = []
        while n:
            x, y = next(it)
            seen.append(x)
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
            n -= not opt._is_last_step_skipped
        return seen

    engine, m, opt, dl = private_with_workers(True)
    with BatchMemoryManager(data_loader=dl, max_physical_batch_size=7, optimizer=opt) as chunks:
        it = iter(chunks)
        logical_steps(m, opt, it, 3)
        path = tmp_path / "ckpt.pt"
        engine.save_checkpoint(path=path, module=m, optimizer=opt)
        expected = logical_steps(m, opt, it, 2)
        del it
    weights = [p.detach().clone() for p in m.parameters()]

    engine2, m2, opt2, dl2 = private_with_workers(True)
    engine2.load_checkpoint(path=path, module=m2, optimizer=opt2)
    with BatchMemoryManager(data_loader=dl2, max_physical_batch_size=7, optimizer=opt2) as chunks:
        got = logical_steps(m2, opt2, iter(chunks), 2)
    assert len(got) == len(expected) > 2
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    for p, q in zip(m2.parameters(), weights):
        assert torch.equal(p, q)


def test_make_private_refuses_negative_noise():
    model = MLP()
    with pytest.raises(ValueError, match="noise_multiplier"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(data(), batch_size=20), noise_multiplier=-1,
                                     max_grad_norm=1.0)


def test_training_without_noise_reports_infinite_epsilon():
    import math

    engine = PrivacyEngine()
    model = MLP()
    with pytest.warns(UserWarning, match="not private"):
        m, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=DataLoader(data(), batch_size=20), noise_multiplier=0.0,
                                         max_grad_norm=1.0)
    epoch(m, opt, dl)
    assert engine.get_epsilon(1e-5) == math.inf
