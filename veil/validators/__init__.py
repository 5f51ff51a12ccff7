"""Model validation and repair for DP training."""
from .module_validator import ModuleValidator, UnsupportedModuleError, register_converter

__all__ = ["ModuleValidator", "UnsupportedModuleError", "register_converter"]
