"""DPOptimizer and its clipping strategies."""
from .clipping import ClippingStrategy, FlatClipping
from .optimizer import DPOptimizer

__all__ = ["DPOptimizer", "ClippingStrategy", "FlatClipping"]
