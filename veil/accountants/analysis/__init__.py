"""Numerical privacy analyses behind the accountants (RDP, PLD/PRV, GDP)."""

from . import gdp, pld, rdp

__all__ = ["gdp", "pld", "rdp"]
