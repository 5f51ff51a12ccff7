"""Veil: differentially private training for PyTorch.

Exact per-sample clipping for every common layer, a DP step that costs little more than a plain
one, and tight privacy accounting, behind Opacus's two-line API.
"""
from .grad_sample import GradSampleModule

__version__ = "0.1.0"
__all__ = ["PrivacyEngine", "GradSampleModule", "__version__"]


def __getattr__(name: str):
    # PrivacyEngine pulls in the accountants (scipy); import it only when asked for.
    if name == "PrivacyEngine":
        from .privacy_engine import PrivacyEngine

        return PrivacyEngine
    raise AttributeError(f"module 'veil' has no attribute {name!r}")
