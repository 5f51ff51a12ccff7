"""`make plots`: Fashion-MNIST test accuracy against ε -> examples/privacy_utility.png (+ .csv).

Runs ``examples/fashion_mnist.py`` (same recipe, same seed) once per ε in ``--epsilons``; ε = inf
is the same recipe with the noise switched off. The full run takes a while on a CPU; ``--quick``
trains 1 epoch on 2,000 examples per point (a smoke test of the pipeline, not a result).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fashion_mnist  # noqa: E402


def run_point(epsilon: float, extra: List[str], quiet: bool) -> float:
    argv = ["--epsilon", str(epsilon)] + extra
    if not quiet:
        return fashion_mnist.main(argv)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        return fashion_mnist.main(argv)


def plot(points: List[Tuple[float, float]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    finite = [(e, a) for e, a in points if math.isfinite(e)]
    inf = [a for e, a in points if not math.isfinite(e)]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot([e for e, _ in finite], [100 * a for _, a in finite], "o-", label="DP-SGD (Veil)")
    for e, a in finite:
        ax.annotate(f"{100 * a:.1f}", (e, 100 * a), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=8)
    if inf:
        ax.axhline(100 * inf[0], color="gray", ls="--", label=f"no noise (ε = ∞): {100 * inf[0]:.1f}")
    ax.set_xscale("log")
    xs = [e for e, _ in finite]
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{e:g}" for e in xs])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ys = [100 * a for _, a in points]
    ax.set_ylim(min(ys) - 1.0, max(ys) + 1.0)
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> List[Tuple[float, float]]:
    """Trains one model per ε, writes the PNG and a CSV, returns [(ε, accuracy)]."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epsilons", default="0.5,1,2,3,8,inf")
    ap.add_argument("--recipe", default="tb")
    ap.add_argument("--epochs", type=int, default=20, help="epochs per point (the tb recipe itself uses 40)")
    ap.add_argument("--quick", action="store_true", help="1 epoch on 2,000 examples per point")
    ap.add_argument("--out", type=Path, default=HERE / "privacy_utility.png")
    ap.add_argument("--extra", default="", help="more fashion_mnist.py flags, e.g. '--lr 3 --batch-size 1024'")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    extra = ["--recipe", args.recipe] + args.extra.split()
    if args.quick:
        extra += ["--epochs", "1", "--subset", "2000", "--batch-size", "250"]
        desc = f"recipe {args.recipe}, QUICK: 1 epoch on 2,000 examples"
    else:
        extra += ["--epochs", str(args.epochs)]
        desc = f"recipe {args.recipe}, {args.epochs} epochs {args.extra}".strip()
    points = []
    start = time.time()
    for eps in (float(e) for e in args.epsilons.split(",")):
        acc = run_point(eps, extra, quiet=not args.verbose)
        points.append((eps, acc))
        print(f"epsilon {eps:g}: test accuracy {acc:.4f} ({time.time() - start:.0f} s so far)", flush=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epsilon", "test_accuracy", "setup"])
        for e, a in points:
            w.writerow([e, f"{a:.4f}", desc])
    plot(points, args.out, f"Fashion-MNIST, {desc}")
    print(f"wrote {args.out} and {args.out.with_suffix('.csv')} in {time.time() - start:.0f} s")
    return points


if __name__ == "__main__":
    main()
