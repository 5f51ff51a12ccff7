"""Bad input is refused with an error that says how to fix it, and no weight changes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.models import MLP
from veil import GradSampleModule
from veil.grad_sample import PrivacyLeakError, UnsupportedModuleError
from veil.optimizers import DPOptimizer
from veil.validators import ModuleValidator


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model, snap):
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), snap))


def make_private(model, **kw):
    from veil import PrivacyEngine

    data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    opt = kw.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.1)
    return PrivacyEngine(accountant="rdp").make_private(module=model, optimizer=opt, data_loader=loader,
                                                        noise_multiplier=1.0, max_grad_norm=1.0, **kw)


def test_batchnorm_is_refused_and_fix_names_it():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(UnsupportedModuleError) as e:
        make_private(model)
    assert "'1'" in str(e.value) and "ModuleValidator.fix(model)" in str(e.value)
    fixed = ModuleValidator.fix(model)
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].num_groups == 4
    assert ModuleValidator.is_valid(fixed)
    assert isinstance(ModuleValidator.fix(model, num_groups=2)[1], nn.GroupNorm)
    assert isinstance(model[1], nn.BatchNorm2d), "fix returns a copy"


def test_instancenorm_running_stats_are_turned_off():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    assert not ModuleValidator.is_valid(model)
    fixed = ModuleValidator.fix(model)
    assert not fixed[1].track_running_stats and ModuleValidator.is_valid(fixed)


def test_optimizer_with_foreign_parameters_is_refused():
    model = MLP()
    stranger = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD(list(model.parameters()) + [stranger], lr=0.1)
    with pytest.raises(ValueError, match=r"not in the model.*param_groups\[0\]\['params'\]\[4\]"):
        make_private(model, optimizer=opt)


class TiedOutput(nn.Module):
    """Uses the embedding matrix functionally in the output layer: invisible to the engine."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, tokens):
        h = torch.tanh(self.lin(self.emb(tokens))).mean(1)
        return h @ self.emb.weight.t()


def test_parameter_used_outside_a_module_call_is_refused():
    model = TiedOutput()
    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                      expected_batch_size=4)
    snap = snapshot(model)
    F.cross_entropy(gsm(torch.randint(0, 10, (4, 3))), torch.randint(0, 10, (4,))).backward()
    with pytest.raises(PrivacyLeakError, match="'emb.weight'"):
        opt.step()
    assert unchanged(model, snap)
    # after the refusal the optimizer is usable again
    opt.zero_grad()


def test_nan_per_sample_norm_is_refused_before_any_weight_changes():
    model = MLP()
    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4)
    snap = snapshot(model)
    x = torch.randn(4, 8)
    x[2, 0] = float("nan")
    F.cross_entropy(gsm(x), torch.randint(0, 3, (4,))).backward()
    with pytest.raises(FloatingPointError, match=r"'net\.0\.weight'.*unchanged"):
        opt.step()
    assert unchanged(model, snap)
    x[2, 0] = float("inf")
    opt.zero_grad()
    F.cross_entropy(gsm(x), torch.randint(0, 3, (4,))).backward()
    with pytest.raises(FloatingPointError):
        opt.step()
    assert unchanged(model, snap)


def test_second_backward_through_the_same_forward_is_refused():
    gsm = GradSampleModule(MLP())
    out = gsm(torch.randn(4, 8))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward\\(\\) ran twice"):
        out.sum().backward()


def test_in_place_change_of_a_captured_input_is_refused():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

        def forward(self, x):
            h = x * 1.0
            y = self.a(h)
            h.mul_(2)  # changes a's input after a used it
            return y + self.b(h)

    gsm = GradSampleModule(Bad())
    with pytest.raises(RuntimeError, match="modified in place"):
        gsm(torch.randn(2, 3)).sum().backward()


def test_loss_reduction_disagreeing_with_criterion_is_refused():
    with pytest.raises(ValueError, match="reduction='mean'"):
        make_private(MLP(), criterion=nn.CrossEntropyLoss(reduction="sum"), loss_reduction="mean")


def test_parameters_owned_beside_submodules_are_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) * self.scale

    with pytest.raises(UnsupportedModuleError, match="'scale'"):
        GradSampleModule(Odd())


def test_frozen_parameters_are_skipped():
    model = MLP()
    model.net[0].weight.requires_grad_(False)
    gsm = GradSampleModule(model)
    seen = []
    gsm.consumer = lambda chunk: seen.extend(e.name for e in chunk.entries)
    gsm(torch.randn(3, 8)).sum().backward()
    assert "net.0.weight" not in seen and "net.0.bias" in seen
    assert model.net[0].weight.grad is None


def test_eval_under_no_grad_records_nothing():
    gsm = GradSampleModule(MLP())
    with torch.no_grad():
        gsm(torch.randn(3, 8))
    assert gsm._pending == [] and gsm._stack == []


def test_wrapping_a_model_twice_is_refused_until_the_first_is_removed():
    model = MLP()
    first = GradSampleModule(model)
    with pytest.raises(ValueError, match="already watched"):
        GradSampleModule(model)
    first.remove_hooks()
    GradSampleModule(model)


def test_calling_the_unwrapped_model_still_trains_privately():
    """Hooks sit on the layers, so calling the original model object is as good as calling the wrapper."""
    model = MLP()
    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1e-3,
                      expected_batch_size=4)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 8)), torch.randint(0, 3, (4,))).backward()
        opt.step()
        total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        assert total <= 1e-3 + 1e-9  # clipped: the mean of 4 gradients of norm ≤ C


def test_optimizer_without_per_sample_gradients_is_refused():
    """A DPOptimizer over an unwrapped model would otherwise discard the plain gradients and step on
    noise alone; it refuses, names the fix and changes no weight."""
    model = MLP()
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=8)
    snap = snapshot(model)
    F.cross_entropy(model(torch.randn(8, 8)), torch.randint(0, 3, (8,))).backward()
    with pytest.raises(PrivacyLeakError, match="GradSampleModule"):
        opt.step()
    assert unchanged(model, snap)
    assert all(p.grad is None for p in model.parameters())
    opt.zero_grad()
    opt.step()  # no backward at all (e.g. an empty Poisson batch): a noise-only step is legitimate
    assert not unchanged(model, snap)
