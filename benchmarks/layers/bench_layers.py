"""DP step / plain step for Veil's DP layers against their torch twins, in one process.

DP step    = forward + backward + DPOptimizer.step, GradSampleModule(mode="auto"),
             DPOptimizer(SGD, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B).
Plain step = forward + backward + SGD.step on the same model with nn.LSTM / nn.MultiheadAttention.

Timings are medians of interleaved repeats (plain and DP alternate, so load drift hits both), as wall
time and as this process's CPU time (the latter is less disturbed when other jobs share the machine;
with several threads it adds the threads' times).

    python benchmarks/layers/bench_layers.py [--repeats 30] [--threads N] [--out benchmarks/layers/RESULTS.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.common import markdown_table  # noqa: E402
from veil import GradSampleModule  # noqa: E402
from veil.layers import DPGRU, DPLSTM, DPMultiheadAttention  # noqa: E402
from veil.optimizers import DPOptimizer  # noqa: E402


class RNNClassifier(nn.Module):
    """One recurrent layer and a Linear head on the last step."""

    def __init__(self, rnn_cls, d: int, h: int, classes: int = 10):
        super().__init__()
        self.rnn = rnn_cls(d, h, batch_first=True)
        self.head = nn.Linear(h, classes)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class Block(nn.Module):
    """Pre-LN transformer block (attention + LayerNorm + 2-layer MLP) and a classification head."""

    def __init__(self, attn_cls, d: int = 128, heads: int = 4, classes: int = 10):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = attn_cls(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


def steps(build: Callable[[type], nn.Module], plain_cls, dp_cls, x, y) -> Dict[str, Callable[[], None]]:
    B = x.shape[0]
    torch.manual_seed(0)
    plain = build(plain_cls)
    popt = torch.optim.SGD(plain.parameters(), lr=0.01)
    torch.manual_seed(0)
    dp = GradSampleModule(build(dp_cls), mode="auto")
    dopt = DPOptimizer(torch.optim.SGD(dp.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
                       expected_batch_size=B)

    def plain_step():
        popt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        popt.step()

    def dp_step():
        dopt.zero_grad()
        F.cross_entropy(dp(x), y).backward()
        dopt.step()

    return {"plain": plain_step, "dp": dp_step}


def configs() -> List[Tuple[str, str, Callable, type, type, Tuple[int, int, int]]]:
    return [
        ("LSTM 1 layer, d=h=128", "16", lambda c: RNNClassifier(c, 128, 128), nn.LSTM, DPLSTM, (64, 16, 128)),
        ("GRU 1 layer, d=h=128", "16", lambda c: RNNClassifier(c, 128, 128), nn.GRU, DPGRU, (64, 16, 128)),
        ("Transformer block d=128, 4 heads", "64", lambda c: Block(c), nn.MultiheadAttention, DPMultiheadAttention,
         (64, 64, 128)),
        ("Transformer block d=128, 4 heads", "128", lambda c: Block(c), nn.MultiheadAttention, DPMultiheadAttention,
         (64, 128, 128)),
        ("Transformer block d=128, 4 heads", "512", lambda c: Block(c), nn.MultiheadAttention, DPMultiheadAttention,
         (64, 512, 128)),
    ]


def interleaved(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int = 3) -> Dict[str, Dict[str, float]]:
    """Median wall and process-CPU seconds of each step function, measured alternately."""
    import statistics
    import time

    for _ in range(warmup):
        for f in fns.values():
            f()
    wall: Dict[str, List[float]] = {k: [] for k in fns}
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    return {"wall": {k: statistics.median(v) for k, v in wall.items()},
            "cpu": {k: statistics.median(v) for k, v in cpu.items()}}


TARGETS = {("LSTM 1 layer, d=h=128", "16"): 2.0, ("Transformer block d=128, 4 heads", "64"): 1.35}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    rows = []
    for name, T, build, plain_cls, dp_cls, (B, T_, d) in configs():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, T_, d, generator=g)
        y = torch.randint(0, 10, (B,), generator=g)
        reps = args.repeats if T_ <= 128 else max(5, args.repeats // 4)
        m = interleaved(steps(build, plain_cls, dp_cls, x, y), repeats=reps)
        t, c = m["wall"], m["cpu"]
        ratio = t["dp"] / t["plain"]
        target = TARGETS.get((name, T))
        rows.append({"model": name, "B": B, "T": T_, "plain step (ms)": f"{t['plain'] * 1e3:.2f}",
                     "DP step (ms)": f"{t['dp'] * 1e3:.2f}", "DP / plain": f"{ratio:.2f}",
                     "DP / plain (CPU time)": f"{c['dp'] / c['plain']:.2f}",
                     "target": "-" if target is None else f"<= {target}"
                     + (" met" if ratio <= target else " missed")})
        print(rows[-1], flush=True)
    table = markdown_table(rows)
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
              f"({platform.machine()}), medians of interleaved repeats ({args.repeats}; T=512: "
              f"{max(5, args.repeats // 4)}); load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print()
    print(header)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# veil.layers benchmark: DP step / plain step\n\n")
            f.write("Produced by `python benchmarks/layers/bench_layers.py --out benchmarks/layers/RESULTS.md`.\n")
            f.write("Plain = the same model with nn.LSTM / nn.GRU / nn.MultiheadAttention and torch.optim.SGD.\n\n")
            f.write(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
