"""Accountant registry: build an accountant from its mechanism name."""

from __future__ import annotations

from typing import Type

from .accountant import IAccountant
from .gdp import GaussianAccountant
from .prv import PRVAccountant
from .rdp import RDPAccountant

_ACCOUNTANTS: dict[str, Type[IAccountant]] = {
    "rdp": RDPAccountant,
    "prv": PRVAccountant,
    "gdp": GaussianAccountant,
}


def available_accountants() -> list[str]:
    """Names accepted by :func:`create_accountant`."""
    return list(_ACCOUNTANTS)


def register_accountant(mechanism: str, accountant: Type[IAccountant], force: bool = False) -> None:
    """Register ``accountant`` under ``mechanism`` (``force`` to overwrite)."""
    if mechanism in _ACCOUNTANTS and not force:
        raise ValueError(f"an accountant for mechanism {mechanism!r} is already registered")
    _ACCOUNTANTS[mechanism] = accountant


def create_accountant(mechanism: str) -> IAccountant:
    """New accountant for ``mechanism``: one of "rdp", "prv", "gdp"."""
    try:
        cls = _ACCOUNTANTS[mechanism]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown accounting mechanism {mechanism!r}; choose one of: {', '.join(sorted(_ACCOUNTANTS))}"
        ) from None
    return cls()
