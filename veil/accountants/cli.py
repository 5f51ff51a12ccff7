"""Command line helpers: ``veil epsilon`` and ``veil noise``.

The main ``veil`` CLI calls :func:`add_subcommands` on its argparse subparsers;
:func:`main` runs the two subcommands standalone (``python -m veil.accountants.cli``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

from .registry import available_accountants, create_accountant
from .utils import get_noise_multiplier

_NAMES = {"rdp": "RDP", "prv": "PRV (tight)", "gdp": "GDP (CLT approx.)"}


def _steps(args: argparse.Namespace) -> int:
    if args.steps is not None:
        if args.steps < 0:
            raise ValueError(f"--steps={args.steps} is invalid: it must be >= 0")
        return int(args.steps)
    if args.epochs <= 0:
        raise ValueError(f"--epochs={args.epochs} is invalid: it must be > 0")
    return int(round(args.epochs / args.sample_rate))


def _accountants(choice: str) -> list[str]:
    return available_accountants() if choice == "all" else [choice]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample-rate", "-q", type=float, required=True, help="Poisson sampling rate q in (0, 1]")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--steps", type=int, help="number of optimisation steps")
    g.add_argument("--epochs", type=float, help="number of epochs (steps = round(epochs / sample_rate))")
    p.add_argument("--delta", "-d", type=float, required=True, help="target delta in (0, 1)")


def _run_epsilon(args: argparse.Namespace) -> int:
    try:
        steps = _steps(args)
        rows = []
        for name in _accountants(args.accountant):
            acc = create_accountant(name)
            acc.history = [(args.noise_multiplier, args.sample_rate, steps)]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                eps = acc.get_epsilon(args.delta)
            note = "; ".join(str(w.message) for w in caught)
            rows.append((name, eps, note))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"noise_multiplier={args.noise_multiplier:g}  sample_rate={args.sample_rate:g}  steps={steps}  delta={args.delta:g}")
    print(f"{'accountant':<20} {'epsilon':>12}")
    print(f"{'-' * 20} {'-' * 12}")
    for name, eps, note in rows:
        print(f"{_NAMES.get(name, name):<20} {eps:>12.4f}" + (f"  ({note})" if note else ""))
    return 0


def _run_noise(args: argparse.Namespace) -> int:
    try:
        steps = _steps(args)
        rows = []
        for name in _accountants(args.accountant):
            sigma = get_noise_multiplier(
                target_epsilon=args.target_epsilon,
                target_delta=args.delta,
                sample_rate=args.sample_rate,
                steps=steps,
                accountant=name,
                epsilon_tolerance=args.tolerance,
            )
            rows.append((name, sigma))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(rows) == 1:
        print(f"{rows[0][1]:.6f}")
        return 0
    print(f"target_epsilon={args.target_epsilon:g}  sample_rate={args.sample_rate:g}  steps={steps}  delta={args.delta:g}")
    print(f"{'accountant':<20} {'noise_multiplier':>16}")
    print(f"{'-' * 20} {'-' * 16}")
    for name, sigma in rows:
        print(f"{_NAMES.get(name, name):<20} {sigma:>16.6f}")
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``epsilon`` and ``noise`` subcommands on ``subparsers``."""
    choices = available_accountants()
    p = subparsers.add_parser("epsilon", help="privacy budget epsilon spent by DP-SGD")
    p.add_argument("--noise-multiplier", "-s", type=float, required=True, help="noise multiplier sigma > 0")
    _add_common(p)
    p.add_argument("--accountant", choices=choices + ["all"], default="all", help="accounting method (default: all)")
    p.set_defaults(func=_run_epsilon)

    p = subparsers.add_parser("noise", help="noise multiplier reaching a target (epsilon, delta)")
    p.add_argument("--target-epsilon", "-e", type=float, required=True, help="target epsilon > 0")
    _add_common(p)
    p.add_argument("--accountant", choices=choices + ["all"], default="prv", help="accounting method (default: prv)")
    p.add_argument("--tolerance", type=float, default=0.01, help="accepted epsilon shortfall (default 0.01)")
    p.set_defaults(func=_run_noise)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry point running the accounting subcommands."""
    parser = argparse.ArgumentParser(prog="veil", description="Differential privacy accounting")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
