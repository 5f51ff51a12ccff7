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
from veil.accountants.analysis import rdp as rdp_analysis

STEPS = [10**2, 10**3, 10**4, 10**5, 10**6]
SIGMA, DELTA, TARGET_EPS = 1.0, 1e-6, 4.0


def sample_rate(steps: int) -> float:
    """A realistic sampling rate for a run of ``steps`` steps (about 100 epochs at most)."""
    return min(0.1, max(1e-3, 100.0 / steps))


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        rdp_analysis._rdp_single_step.cache_clear()  # time cold calls (no memoised RDP curves)
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


STRESS = [
    ("sigma=0.5, q=1e-3, delta=1e-12", [(0.5, 1e-3, 10**6)], 1e-12, 50.0),
    ("sigma=1, q=1e-4, delta=1e-12", [(1.0, 1e-4, 10**6)], 1e-12, 0.5),
    ("sigma=0.3, q=0.01, delta=1e-5 (eps ~ 1.7e4)", [(0.3, 0.01, 10**6)], 1e-5, None),
    ("sigma=2, q=0.1, delta=1e-5", [(2.0, 0.1, 10**6)], 1e-5, None),
    ("10 blocks sigma=0.8..0.89, q=1e-3, delta=1e-6", [(0.8 + 0.01 * i, 1e-3, 10**5) for i in range(10)], 1e-6, None),
]


def stress_table(repeats: int) -> str:
    """Harder settings, 10^6 steps in total: PRV get_epsilon (and get_noise_multiplier)."""
    lines = [
        "Harder settings (10^6 steps in total), PRV accountant, median ms:",
        "",
        "| setting | PRV get_epsilon | epsilon | RDP epsilon | PRV get_noise_multiplier (target) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, history, delta, target in STRESS:
        def run(mech="prv", history=history, delta=delta):
            acc = create_accountant(mech)
            acc.history = list(history)
            return acc.get_epsilon(delta)

        t = median_time(run, repeats)
        noise = ""
        if target is not None:
            (sigma, q, steps), = history
            tn = median_time(lambda: get_noise_multiplier(target, delta, q, steps=steps), max(1, repeats // 2))
            noise = f"{1e3 * tn:.1f} (eps={target:g})"
        lines.append(f"| {name} | {1e3 * t:.1f} | {run():.4f} | {run('rdp'):.4f} | {noise} |")
    return "\n".join(lines)


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
        f"get_noise_multiplier targets epsilon={TARGET_EPS}. Median wall time in milliseconds over "
        f"{args.repeats} cold runs (epsilon in brackets).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
        f"load average at start {os.getloadavg()[0]:.1f}.",
        "",
        "| steps | q | " + " | ".join(cols) + " |",
        "|---:|---:|" + "---:|" * len(cols),
    ]
    for steps, cells in rows:
        parts = []
        for c in cols:
            t, e = cells[c]
            parts.append(f"{1e3 * t:.2f}" + (f" ({e:.4f})" if e is not None else ""))
        lines.append(f"| {steps:,} | {sample_rate(steps):g} | " + " | ".join(parts) + " |")
    lines += ["", stress_table(args.repeats)]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Accounting benchmark\n\n" + table + "\n")


if __name__ == "__main__":
    main()
