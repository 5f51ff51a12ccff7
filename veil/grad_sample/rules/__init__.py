"""Built-in layer rules, one file per layer family. Importing this package registers them."""
import importlib

from .base import Call, InstantiatedGrads, LayerGrads, Rule, register_rule, rule_for

for _family in ("linear", "conv", "embedding", "norm"):
    try:
        importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as e:  # a family not written yet
        if e.name != f"{__name__}.{_family}":
            raise
