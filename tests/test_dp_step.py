"""One DP step against the brute-force definition, noise statistics, and σ=0/C=∞ equivalence."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.models import MLP, MixedNet, mixed_batch
from tests.reference import brute_force_grads
from veil import GradSampleModule
from veil.optimizers import DPOptimizer


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def clipped_reference(model, inputs, y, C, reduction="mean"):
    B = y.shape[0]
    per = brute_force_grads(model, inputs, lambda out, i: F.cross_entropy(out, y[i : i + 1], reduction="sum"), B)
    flat = torch.cat([g.reshape(B, -1) for g in per.values()], 1)
    norms = flat.norm(dim=1)
    c = torch.clamp(C / norms, max=1.0)
    return {n: torch.tensordot(c, g, dims=1) for n, g in per.items()}


@pytest.mark.parametrize("mode", ["auto", "ghost", "hooks", "functorch"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_step_equals_clipped_mean(mode, reduction):
    torch.manual_seed(0)
    model = MixedNet()
    B, E, C = 6, 5, 0.05
    tokens, image, y = mixed_batch(B)
    expected = clipped_reference(model, (tokens, image), y, C)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    gsm = GradSampleModule(model, loss_reduction=reduction, mode=mode)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=C,
                      expected_batch_size=E, loss_reduction=reduction)
    F.cross_entropy(gsm(tokens, image), y, reduction=reduction).backward()
    opt.step()
    denom = E if reduction == "mean" else 1
    for n, p in model.named_parameters():
        delta = p.detach() - before[n]
        want = -expected[n] / denom
        err = (delta - want).abs().max().item()
        assert err <= 1e-10 * max(want.abs().max().item(), 1e-30), f"{mode}/{reduction}: {n} off by {err:.2e}"


def test_no_noise_no_clip_matches_plain_training():
    torch.manual_seed(0)
    model = MixedNet()
    plain = copy.deepcopy(model)
    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.Adam(gsm.parameters(), lr=1e-2), noise_multiplier=0.0, max_grad_norm=1e12,
                      expected_batch_size=8)
    popt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for step in range(5):
        tokens, image, y = mixed_batch(8, seed=step)
        opt.zero_grad()
        F.cross_entropy(gsm(tokens, image), y).backward()
        opt.step()
        popt.zero_grad()
        F.cross_entropy(plain(tokens, image), y).backward()
        popt.step()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), n


def test_noise_std_and_freshness():
    torch.set_default_dtype(torch.float32)
    model = nn.Linear(200, 200)  # 40,200 coordinates
    gsm = GradSampleModule(model)
    sigma, C, E = 1.3, 0.7, 16
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=sigma, max_grad_norm=C,
                      expected_batch_size=E, generator=torch.Generator().manual_seed(3))
    draws = []
    for _ in range(2):
        opt.zero_grad()
        gsm(torch.zeros(0, 200)).sum().backward()  # empty batch: the step adds noise only
        opt.pre_step()
        draws.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        opt._reset()
    for d in draws:
        assert d.numel() >= 40_000
        assert abs(d.std().item() / (sigma * C / E) - 1) < 0.03
        assert abs(d.mean().item()) < 4 * sigma * C / E / d.numel() ** 0.5
    corr = torch.corrcoef(torch.stack(draws))[0, 1].item()
    assert abs(corr) < 0.03, "noise must be fresh each step"


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = MLP()
    twin = copy.deepcopy(model)
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))

    def run(m, chunks):
        gsm = GradSampleModule(m, loss_reduction="sum")
        opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=0.5,
                          expected_batch_size=12, loss_reduction="sum")
        for xs, ys in zip(x.chunk(chunks), y.chunk(chunks)):
            F.cross_entropy(gsm(xs), ys, reduction="sum").backward()
        opt.step()

    run(model, 3)
    run(twin, 1)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


def test_standalone_grad_sample_matches_reference():
    torch.manual_seed(0)
    model = MixedNet()
    tokens, image, y = mixed_batch(4)
    # as Opacus: under loss_reduction="mean", row i is the gradient of sample i's own loss
    ref = brute_force_grads(model, (tokens, image), lambda out, i: F.cross_entropy(out, y[i : i + 1]), 4)
    gsm = GradSampleModule(copy.deepcopy(model))
    F.cross_entropy(gsm(tokens, image), y).backward()
    for n, p in gsm._module.named_parameters():
        assert torch.allclose(p.grad_sample, ref[n], rtol=1e-10, atol=1e-14), n


def test_optimizer_consumes_opacus_style_grad_sample():
    """A DPOptimizer with no engine attached clips from p.grad_sample, as Opacus's does."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    gs = {"weight": torch.randn(5, 2, 3), "bias": torch.randn(5, 2)}
    before = {n: p.detach().clone() for n, p in lin.named_parameters()}
    for n, p in lin.named_parameters():
        p.grad_sample = gs[n]
    opt = DPOptimizer(torch.optim.SGD(lin.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                      expected_batch_size=5, loss_reduction="sum")
    opt.step()
    norms = torch.cat([gs["weight"].reshape(5, -1), gs["bias"]], 1).norm(dim=1)
    c = torch.clamp(1.0 / norms, max=1)
    for n, p in lin.named_parameters():
        assert torch.allclose(before[n] - p.detach(), torch.tensordot(c, gs[n], dims=1), rtol=1e-12)


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_multithreaded_noise_is_standard_normal_and_seeded(kernel, monkeypatch):
    from scipy import stats

    from veil.optimizers import noise
    from veil.utils import native

    monkeypatch.setattr(noise, "_MIN_PARALLEL", 150_000)
    monkeypatch.setattr(noise, "_MIN_PARALLEL_NATIVE", 150_000)
    native.set_enabled("gaussian", kernel == "native")
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        draws = []
        for _ in range(2):
            buf = torch.zeros(600_000, dtype=torch.float32)  # 2 blocks, each split between 2 threads
            noise.add_gaussian_(buf, 2.0, torch.Generator().manual_seed(11), block=300_000)
            draws.append(buf)
    finally:
        torch.set_num_threads(old)
        native.set_enabled("gaussian", True)
    assert torch.equal(draws[0], draws[1]), "a seeded generator reproduces the noise"
    z = draws[0].double() / 2.0
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    halves = z.tensor_split(6)  # blocks and thread slices are independent streams
    corr = torch.corrcoef(torch.stack([h[:50_000] for h in halves]))
    assert (corr - torch.eye(6)).abs().max() < 0.03


def test_noise_is_topped_up_when_sigma_grows_between_backward_and_step():
    """The buffer is filled with noise when the first backward of a logical batch ends; if σ is raised
    before step(), the missing variance is added, so the update carries std σ·C/B as accounted."""
    torch.manual_seed(0)
    lin = nn.Linear(300, 300, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    model = GradSampleModule(lin)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.5, max_grad_norm=1.0,
                      expected_batch_size=4, generator=torch.Generator().manual_seed(3))
    model(torch.zeros(4, 300)).sum().backward()  # zero gradients: the update is the noise alone
    opt.noise_multiplier = 2.0
    opt.step()
    std = lin.weight.detach().std().item()
    assert abs(std - 2.0 / 4) < 0.02, std


def test_step_with_every_parameter_frozen_changes_nothing():
    model = GradSampleModule(nn.Linear(3, 2))
    for p in model.parameters():
        p.requires_grad_(False)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4)
    before = [p.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
