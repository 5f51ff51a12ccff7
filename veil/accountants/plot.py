"""Plot epsilon against the number of steps for several accountants."""

from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np

from .registry import create_accountant

_LABELS = {"rdp": "RDP", "prv": "PRV (tight)", "gdp": "GDP (CLT approx.)"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install veil[plot]") from exc
    return plt


def plot_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    path: Union[str, os.PathLike],
    accountants: Sequence[str] = ("rdp", "prv", "gdp"),
    num_points: int = 40,
) -> str:
    """Write a PNG of epsilon against steps (1..``steps``), one curve per accountant.

    Returns the path written.  Needs matplotlib (``pip install veil[plot]``).
    """
    if int(steps) < 1:
        raise ValueError(f"steps={steps!r} is invalid: it must be an integer >= 1")
    plt = _pyplot()
    xs = np.unique(np.round(np.geomspace(1, int(steps), num_points)).astype(int))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        for name in accountants:
            acc = create_accountant(name)
            eps = []
            for t in xs:
                acc.history = [(noise_multiplier, sample_rate, int(t))]
                eps.append(acc.get_epsilon(delta))
            ax.plot(xs, eps, label=_LABELS.get(name, name))
        ax.set_xlabel("steps")
        ax.set_ylabel(f"epsilon (delta = {delta:g})")
        ax.set_title(f"sigma = {noise_multiplier:g}, q = {sample_rate:g}")
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="png")
    finally:
        plt.close(fig)
    return os.fspath(path)
