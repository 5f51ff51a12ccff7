"""Built-in layer rules, one file per layer family. Importing this package registers them."""
from . import conv, embedding, linear, norm  # noqa: F401  (registration happens at import)
from .base import Call, InstantiatedGrads, LayerGrads, Rule, register_rule, rule_for

__all__ = ["Call", "InstantiatedGrads", "LayerGrads", "Rule", "register_rule", "rule_for"]
