"""ModuleValidator: find the layers DP-SGD cannot train exactly, and replace them with ones it can."""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional, Type

from torch import nn

from ..grad_sample.grad_sample_module import UnsupportedModuleError
from ..grad_sample.rules.base import rule_for


def _batchnorm_msg(name: str, m: nn.Module) -> str:
    return (f"'{name}' ({type(m).__name__}) mixes statistics across the samples of a batch, so a sample's "
            "gradient depends on the others and cannot be clipped per sample. Replace it with GroupNorm: "
            "ModuleValidator.fix(model)")


def _check(name: str, m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return _batchnorm_msg(name, m)
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
        return (f"'{name}' ({type(m).__name__}) tracks running statistics across batches, which leak "
                "information outside the clipped gradient. Turn them off: ModuleValidator.fix(model)")
    if type(m) in _CONVERTERS:
        return (f"'{name}' ({type(m).__name__}) keeps its weights inside a fused kernel that per-sample "
                "clipping cannot see into. Replace it with its drop-in DP twin (veil.layers): "
                "ModuleValidator.fix(model)")
    if isinstance(m, nn.Embedding) and m.max_norm is not None and any(p.requires_grad for p in m.parameters()):
        return (f"'{name}' (Embedding with max_norm) renormalises its weights in place during forward, which "
                "DP training cannot account for. Set max_norm=None.")
    own = [n for n, p in m._parameters.items() if p is not None and p.requires_grad]
    if own and rule_for(m) is None and any(p is not None for c in m.children() for p in c.parameters()):
        return (f"'{name}' ({type(m).__name__}) owns parameter(s) {own} directly and also has submodules with "
                "parameters, so Veil cannot see how they are used. Move them into a small nn.Module of their own.")
    return None


def _batchnorm_to_groupnorm(m: nn.Module, num_groups: Optional[int] = None) -> nn.Module:
    C = m.num_features
    groups = num_groups if num_groups is not None else math.gcd(32, C)
    if C % groups:
        raise ValueError(f"num_groups={groups} does not divide the {C} channels of {type(m).__name__}")
    return nn.GroupNorm(groups, C, eps=m.eps, affine=m.affine)


def _instancenorm_without_stats(m: nn.Module) -> nn.Module:
    new = copy.deepcopy(m)
    new.track_running_stats = False
    new.running_mean = None
    new.running_var = None
    new.num_batches_tracked = None
    return new


# torch layer type -> converter(module) to its DP twin; filled in by veil.layers.
_CONVERTERS: Dict[Type[nn.Module], Callable[[nn.Module], nn.Module]] = {}


def register_converter(module_type: Type[nn.Module], fn: Callable[[nn.Module], nn.Module]) -> None:
    """Teach ``ModuleValidator.fix`` to replace ``module_type`` with ``fn(module)``."""
    _CONVERTERS[module_type] = fn


def _load_dp_layers() -> None:
    from .. import layers  # noqa: F401  (importing it registers the converters)


class ModuleValidator:
    """Checks a model for layers that DP-SGD cannot train exactly, and fixes them."""

    @classmethod
    def validate(cls, module: nn.Module, *, strict: bool = False) -> List[UnsupportedModuleError]:
        """All problems found; with ``strict=True`` raise them instead."""
        _load_dp_layers()
        errors = []
        for name, m in module.named_modules():
            msg = _check(name or "<root>", m)
            if msg:
                errors.append(UnsupportedModuleError(msg))
        if strict and errors:
            raise UnsupportedModuleError("The model cannot be made private:\n" + "\n".join(f"- {e}" for e in errors))
        return errors

    @classmethod
    def is_valid(cls, module: nn.Module) -> bool:
        return not cls.validate(module, strict=False)

    @classmethod
    def fix(cls, module: nn.Module, *, num_groups: Optional[int] = None, **kwargs) -> nn.Module:
        """A copy of ``module`` with BatchNorm -> GroupNorm (``num_groups``, default gcd(32, C)),
        InstanceNorm without running stats, and RNN/attention layers replaced by their DP twins."""
        _load_dp_layers()
        module = copy.deepcopy(module)
        return cls._fix(module, num_groups)

    @classmethod
    def _fix(cls, m: nn.Module, num_groups: Optional[int]) -> nn.Module:
        replaced = cls._replacement(m, num_groups)
        if replaced is not None:
            return replaced
        for name, child in list(m.named_children()):
            new = cls._fix(child, num_groups)
            if new is not child:
                setattr(m, name, new)
        return m

    @staticmethod
    def _replacement(m: nn.Module, num_groups: Optional[int]) -> Optional[nn.Module]:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return _batchnorm_to_groupnorm(m, num_groups)
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            return _instancenorm_without_stats(m)
        conv = _CONVERTERS.get(type(m))
        return conv(m) if conv is not None else None

    @classmethod
    def fix_and_validate(cls, module: nn.Module, **kwargs) -> nn.Module:
        fixed = cls.fix(module, **kwargs)
        cls.validate(fixed, strict=True)
        return fixed
