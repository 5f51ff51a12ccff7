"""Benchmark the accountants against history length (10^2 .. 10^6 steps).

Times ``get_epsilon`` for each Veil accountant and ``get_noise_multiplier``
(PRV and RDP), plus dp_accounting's PLD accountant and Opacus's PRV accountant
when installed (optional peers).  Prints a markdown table of medians.

    python benchmarks/accounting/bench_accounting.py [--repeats 5] [--out RESULTS.md]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
import warnings

from veil.accountants import create_accountant, get_noise_multiplier

STEPS = [10**2, 10**3, 10**4, 10**5, 10**6]
SIGMA, DELTA, TARGET_EPS = 1.0, 1e-6, 4.0


def sample_rate(steps: int) -> float:
    """A realistic sampling rate for a run of ``steps`` steps (about 100 epochs at most)."""
    return min(0.1, max(1e-3, 100.0 / steps))


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def veil_eps(mechanism: str, steps: int):
    def run():
        acc = create_accountant(mechanism)  # fresh: no cached result
        acc.history = [(SIGMA, sample_rate(steps), steps)]
        return acc.get_epsilon(DELTA)

    return run


def veil_noise(mechanism: str, steps: int):
    def run():
        return get_noise_multiplier(
            target_epsilon=TARGET_EPS, target_delta=DELTA, sample_rate=sample_rate(steps), steps=steps, accountant=mechanism
        )

    return run


def peers(steps: int) -> dict:
    out = {}
    try:
        from dp_accounting import dp_event
        from dp_accounting.pld import pld_privacy_accountant

        logging.getLogger("absl").setLevel(logging.ERROR)

        def dp_pld():
            acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
            acc.compose(dp_event.PoissonSampledDpEvent(sample_rate(steps), dp_event.GaussianDpEvent(SIGMA)), steps)
            return acc.get_epsilon(DELTA)

        out["dp_accounting PLD"] = dp_pld
    except ImportError:
        pass
    try:
        from opacus.accountants import PRVAccountant as OpacusPRV

        def opacus_prv():
            acc = OpacusPRV()
            acc.history = [(SIGMA, sample_rate(steps), steps)]
            return acc.get_epsilon(DELTA)

        out["Opacus PRV"] = opacus_prv
    except ImportError:
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    # warm-up (imports, FFT plans)
    veil_eps("prv", 1000)()
    rows = []
    for steps in STEPS:
        cells = {}
        for mech in ("prv", "rdp", "gdp"):
            cells[f"veil {mech.upper()} get_epsilon"] = (median_time(veil_eps(mech, steps), args.repeats), veil_eps(mech, steps)())
        for mech in ("prv", "rdp"):
            cells[f"veil {mech.upper()} get_noise_multiplier"] = (median_time(veil_noise(mech, steps), max(1, args.repeats // 2)), None)
        for name, fn in peers(steps).items():
            reps = 1 if steps >= 10**5 else max(1, args.repeats // 2)
            cells[name] = (median_time(fn, reps), fn())
        rows.append((steps, cells))
        print(f"done {steps} steps", flush=True)

    cols = list(rows[0][1])
    lines = [
        f"Accounting benchmark: sigma={SIGMA}, delta={DELTA}, q=min(0.1, max(1e-3, 100/steps)); "
        f"get_noise_multiplier targets epsilon={TARGET_EPS}. Median seconds (epsilon in brackets).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}.",
        "",
        "| steps | q | " + " | ".join(cols) + " |",
        "|---:|---:|" + "---:|" * len(cols),
    ]
    for steps, cells in rows:
        parts = []
        for c in cols:
            t, e = cells[c]
            parts.append(f"{t:.4f}" + (f" ({e:.4f})" if e is not None else ""))
        lines.append(f"| {steps:,} | {sample_rate(steps):g} | " + " | ".join(parts) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Accounting benchmark\n\n" + table + "\n")


if __name__ == "__main__":
    main()
