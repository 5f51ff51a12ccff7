"""A user-written layer works untouched (torch.func fallback); a registered rule is used."""
import torch
from torch import nn

from tests.reference import assert_matches_reference
from veil.grad_sample import FunctorchRule, GradSampleModule, register_grad_sampler
from veil.grad_sample.rules.base import Rule, rule_for


class ScaledTanh(nn.Module):
    """A layer with its own parameters and no rule."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(x * self.scale) + self.shift


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.act = ScaledTanh(5)

    def forward(self, x):
        return self.act(self.lin(x)).sum(-1)


def test_user_layer_uses_the_fallback_and_is_exact():
    torch.manual_seed(0)
    net = Net()
    assert isinstance(GradSampleModule(net)._rules[net.act][1], FunctorchRule)
    x = torch.randn(5, 3, 4)
    assert_matches_reference(net, (x,), lambda y, i: y.square().sum(), 5, modes=("auto", "instantiate"))


def test_registered_rule_is_used():
    class Doubler(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return 2 * x * self.w

    calls = []

    @register_grad_sampler(Doubler)
    class DoublerRule(Rule):
        def per_sample(self, module, calls_, names):
            calls.append(len(calls_))
            return {"w": sum(2 * c.ctx * c.grad for c in calls_)}

    assert isinstance(rule_for(Doubler()), DoublerRule)
    torch.manual_seed(0)
    model = nn.Sequential(Doubler())
    x = torch.randn(4, 3)
    assert_matches_reference(model, (x,), lambda y, i: y.square().sum(), 4, modes=("auto",))
    assert calls == [1]


class TiedLM(nn.Module):
    """Embedding and output layer share one weight (weight tying), both used through module calls."""

    def __init__(self, vocab=9, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.emb(tokens)))).mean(1)


def test_parameter_shared_between_modules_is_exact():
    torch.manual_seed(0)
    model = TiedLM()
    tokens = torch.randint(0, 9, (5, 3))
    w = torch.randn(9)
    assert_matches_reference(model, (tokens,), lambda y, i: (y * w).sum(), 5, modes=("auto", "ghost", "instantiate"))


class Centered(nn.Module):
    """A layer with a buffer (no rule): the fallback must use the buffer as is."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.register_buffer("center", torch.randn(d))

    def forward(self, x):
        return (x - self.center) * self.weight


def test_layer_with_a_buffer_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Centered(4))
    assert_matches_reference(model, (torch.randn(6, 3),), lambda y, i: y.square().sum(), 6, modes=("auto",))
