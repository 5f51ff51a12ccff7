"""DPOptimizer and its clipping strategies."""
from .clipping import AdaptiveClipping, AutomaticClipping, ClippingStrategy, FlatClipping, PerLayerClipping
from .optimizer import DPOptimizer

__all__ = ["DPOptimizer", "ClippingStrategy", "FlatClipping", "PerLayerClipping", "AdaptiveClipping", "AutomaticClipping"]
