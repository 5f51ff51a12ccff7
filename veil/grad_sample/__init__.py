"""Per-sample gradient engine: GradSampleModule and the layer rules."""
from . import rules  # noqa: F401  (registers the built-in rules)
from .functional import FunctorchRule
from .grad_sample_module import Chunk, GradSampleModule, ParamEntry, PrivacyLeakError, UnsupportedModuleError
from .rules.base import Call, InstantiatedGrads, LayerGrads, Rule, register_rule

register_grad_sampler = register_rule

__all__ = [
    "GradSampleModule",
    "Rule",
    "LayerGrads",
    "InstantiatedGrads",
    "Call",
    "Chunk",
    "ParamEntry",
    "FunctorchRule",
    "register_rule",
    "register_grad_sampler",
    "UnsupportedModuleError",
    "PrivacyLeakError",
]
