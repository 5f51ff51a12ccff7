"""Abstract privacy accountant (Opacus-compatible interface)."""

from __future__ import annotations

import abc
from collections import OrderedDict
from copy import deepcopy
from typing import Any, Callable, Mapping, MutableMapping, Optional

from ._checks import check_history, check_noise_multiplier, check_sample_rate


class IAccountant(abc.ABC):
    """Tracks the (noise_multiplier, sample_rate) of every DP-SGD step.

    ``history`` is a list of ``(noise_multiplier, sample_rate, num_steps)`` with
    consecutive identical steps merged.
    """

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one optimisation step (sigma > 0, 0 < q <= 1)."""
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        if self.history:
            last_sigma, last_q, n = self.history[-1]
            if last_sigma == sigma and last_q == q:
                self.history[-1] = (last_sigma, last_q, n + 1)
                return
        self.history.append((sigma, q, 1))

    @abc.abstractmethod
    def get_epsilon(self, delta: float, **kwargs: Any) -> float:
        """Privacy budget epsilon spent so far for the given ``delta``."""

    def __len__(self) -> int:
        """Total number of steps recorded."""
        return sum(n for _, _, n in self.history)

    @classmethod
    @abc.abstractmethod
    def mechanism(cls) -> str:
        """Short name of the accounting method ("rdp", "prv", "gdp")."""

    def _blocks(self) -> list[tuple[float, float, int]]:
        """History validated and grouped by distinct (sigma, q) (composition commutes)."""
        merged: dict[tuple[float, float], int] = {}
        for sigma, q, n in check_history(self.history):
            if n > 0:
                merged[(sigma, q)] = merged.get((sigma, q), 0) + n
        return [(s, q, n) for (s, q), n in merged.items()]

    def get_optimizer_hook_fn(self, sample_rate: float) -> Callable[[Any], None]:
        """Return ``hook(optimizer)`` that records one step of a DP optimizer.

        The hook reads ``optimizer.noise_multiplier`` and
        ``optimizer.accumulated_iterations`` (1 when absent) and records a step
        with sample rate ``sample_rate * accumulated_iterations``.
        """

        def hook_fn(optimizer: Any) -> None:
            accumulated = getattr(optimizer, "accumulated_iterations", 1)
            if accumulated is None:
                accumulated = 1
            self.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=sample_rate * accumulated)

        return hook_fn

    def state_dict(self, destination: Optional[MutableMapping[str, Any]] = None) -> MutableMapping[str, Any]:
        """State (history and mechanism) as a dict; ``destination`` is filled if given."""
        if destination is None:
            destination = OrderedDict()
        destination["history"] = deepcopy(self.history)
        destination["mechanism"] = self.mechanism()
        return destination

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict` (validated)."""
        if not state_dict:
            raise ValueError("state_dict is None or empty and cannot be loaded into the accountant")
        if "history" not in state_dict:
            raise ValueError("state_dict has no key 'history'")
        if "mechanism" not in state_dict:
            raise ValueError("state_dict has no key 'mechanism'")
        if state_dict["mechanism"] != self.mechanism():
            raise ValueError(
                f"state_dict of mechanism {state_dict['mechanism']!r} cannot be loaded into "
                f"an accountant with mechanism {self.mechanism()!r}"
            )
        self.history = [tuple(e) for e in check_history(deepcopy(list(state_dict["history"])))]  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={len(self)}, history={self.history!r})"
