"""Privacy accountants for DP-SGD (Opacus-compatible API).

* :class:`RDPAccountant` - Rényi DP, fast, slightly loose upper bound.
* :class:`PRVAccountant` - privacy loss distributions composed by FFT; tight,
  certified upper bound (falls back to RDP with a warning if it cannot certify).
* :class:`GaussianAccountant` - Gaussian DP via the CLT; an approximation.
"""

from .accountant import IAccountant
from .gdp import GaussianAccountant
from .prv import PRVAccountant
from .rdp import RDPAccountant
from .registry import available_accountants, create_accountant, register_accountant
from .utils import get_noise_multiplier

__all__ = [
    "IAccountant",
    "RDPAccountant",
    "PRVAccountant",
    "GaussianAccountant",
    "create_accountant",
    "register_accountant",
    "available_accountants",
    "get_noise_multiplier",
]
