"""The rule interface: how one layer family yields per-sample gradient information.

A rule sees, for one module and one backward pass, the list of that module's calls. Each call holds
what the rule captured in forward (``ctx``) and the gradient of the loss with respect to the call's
output (``grad``), both with the batch in dimension 0 and the gradient already scaled so that it is
the gradient of a *sum* of per-sample losses.

From those a rule returns a :class:`LayerGrads`: the per-sample squared norm of each parameter's
gradient, and a way to form the clipped sum ``Σ_i c_i G_i`` once the clip factors are known. The
default builds the per-sample gradients ``G_i`` (``per_sample``); rules that can do better override
``layer_grads`` and use ghost norms when the cost model says they are cheaper.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Type

import torch
from torch import nn

Tensor = torch.Tensor

@dataclass
class Call:
    """One call of a module during a forward pass."""

    ctx: Any
    grad: Any = None  # Tensor (or tuple of tensors) with the batch in dim 0
    done: bool = False  # consumed by a backward pass


class LayerGrads:
    """Per-sample information for the parameters of one module in one backward pass."""

    norms_sq: Dict[str, Tensor]

    def clipped_sum(self, factors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Σ_i factors[name]_i · G_i for each parameter named in ``factors``."""
        raise NotImplementedError

    def per_sample(self) -> Dict[str, Tensor]:
        """The per-sample gradients themselves, shape [B, *param.shape]."""
        raise NotImplementedError

    def add_clipped_sum_(self, name: str, factors: Tensor, out: Tensor) -> None:
        """out += Σ_i factors_i · G_i for one parameter; rules may override to skip the temporary."""
        out.add_(self.clipped_sum({name: factors})[name])


@contextlib.contextmanager
def one_thread():
    """Run small scatter kernels on one intra-op thread. Measured on this 2-core CPU (torch 2.13,
    another process busy): index_add_ of 4096x128 rows took 85 ms on 2 threads and 0.11 ms on 1;
    switching the thread count costs about 0.5 ms."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def sq_norms(t: Tensor) -> Tensor:
    """Squared L2 norm of each sample (dim 0) of ``t``, in one pass."""
    if t.dim() == 1:
        return t * t
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1) if t.numel() else t.new_zeros(t.shape[0], 1), dim=1).square()


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and clip factors are never computed in less than fp32."""
    return torch.promote_types(dtype, torch.float32)


class InstantiatedGrads(LayerGrads):
    """Per-sample gradients held as B copies: norms and clipped sums read them directly."""

    def __init__(self, grads: Dict[str, Tensor]):
        self.grads = grads
        self.norms_sq = {
            n: sq_norms(g.to(norm_dtype(g.dtype))) for n, g in grads.items()
        }

    def clipped_sum(self, factors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        out = {}
        for n, c in factors.items():
            g = self.grads[n]
            c = c.to(norm_dtype(g.dtype))
            out[n] = torch.tensordot(c, g.to(c.dtype), dims=1)
        return out

    def per_sample(self) -> Dict[str, Tensor]:
        return self.grads


class Rule:
    """Base class of a layer rule. Subclasses set ``module_types`` and implement ``per_sample``."""

    module_types: Sequence[Type[nn.Module]] = ()
    #: True when the module's input may have a sequence dimension whose position follows ``batch_first``.
    sequence_input: bool = False

    def feature_dims(self, module: nn.Module) -> int:
        """Trailing dimensions of one position's input (Linear: 1); an input with at least two more
        dimensions than this has a sequence dimension, which comes first when not ``batch_first``."""
        return 1

    def capture(self, module: nn.Module, args: tuple, kwargs: dict, batch_first: bool) -> Any:
        """What to keep from forward; default: the first positional input, batch in dim 0.

        ``batch_first`` is False only when the input is [T, B, ...] (the engine has checked)."""
        x = args[0]
        if self.sequence_input and not batch_first:
            x = x.movedim(1, 0)
        return x.detach()

    def per_sample(self, module: nn.Module, calls: List[Call], names: List[str]) -> Dict[str, Tensor]:
        """Per-sample gradients [B, *shape] of the parameters ``names``, summed over calls."""
        raise NotImplementedError

    def layer_grads(self, module: nn.Module, calls: List[Call], names: List[str], mode: str) -> LayerGrads:
        """Norms and clipped sums; ``mode`` is 'auto', 'ghost' or 'instantiate'."""
        return InstantiatedGrads(self.per_sample(module, calls, names))


_RULES: Dict[Type[nn.Module], Rule] = {}


def register_rule(*module_types: Type[nn.Module]) -> Callable[[Type[Rule]], Type[Rule]]:
    """Class decorator: register a :class:`Rule` subclass for the given module types.

    Example::

        @register_rule(MyLayer)
        class MyLayerRule(Rule):
            def per_sample(self, module, calls, names): ...
    """

    def deco(cls: Type[Rule]) -> Type[Rule]:
        rule = cls()
        for t in module_types:
            _RULES[t] = rule
        cls.module_types = tuple(module_types)
        return cls

    return deco


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The rule registered for this module's exact type, if any."""
    return _RULES.get(type(module))


def batch_size_of(calls: List[Call]) -> int:
    g = calls[0].grad
    return (g[0] if isinstance(g, tuple) else g).shape[0]
