"""Per-layer overhead of DP training, after the protocol of the Opacus paper's per-layer figures.

For every supported layer family, at batch sizes 16–512 and (for sequence layers) sequence lengths
16–1024, measures forward + backward + optimizer step with DP (GradSampleModule in the default
mode + DPOptimizer, σ=1, C=1) divided by the same without DP: the median time ratio (interleaved
repeats in one process) and the peak-RSS-growth ratio (each layer family in a fresh process, the
peak reset before every configuration). Writes a markdown table and a PNG plot.

    python benchmarks/per_layer.py [--quick] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import interleaved_times, markdown_table  # noqa: E402

Builder = Callable[[int, int], Tuple[nn.Module, Tuple[torch.Tensor, ...]]]


def _dp_layers():
    from veil import layers

    return layers


def families() -> Dict[str, Tuple[bool, Builder]]:
    """name -> (has a sequence dimension, builder(B, T) -> (module, inputs))."""
    g = torch.Generator().manual_seed(0)
    return {
        "Linear 256→256": (True, lambda B, T: (nn.Linear(256, 256), (torch.randn(B, T, 256, generator=g),))),
        "Conv2d 16→32 3x3 (32x32)": (False, lambda B, T: (nn.Conv2d(16, 32, 3, padding=1),
                                                          (torch.randn(B, 16, 32, 32, generator=g),))),
        "Embedding 10000x128": (True, lambda B, T: (nn.Embedding(10000, 128),
                                                    (torch.randint(0, 10000, (B, T), generator=g),))),
        "EmbeddingBag 10000x128 (bags of 16)": (False, lambda B, T: (nn.EmbeddingBag(10000, 128, mode="mean"),
                                                                     (torch.randint(0, 10000, (B, 16), generator=g),))),
        "LayerNorm 256": (True, lambda B, T: (nn.LayerNorm(256), (torch.randn(B, T, 256, generator=g),))),
        "RMSNorm 256": (True, lambda B, T: (nn.RMSNorm(256), (torch.randn(B, T, 256, generator=g),))),
        "GroupNorm 8x64 (16x16)": (False, lambda B, T: (nn.GroupNorm(8, 64), (torch.randn(B, 64, 16, 16, generator=g),))),
        "InstanceNorm2d 64 (16x16)": (False, lambda B, T: (nn.InstanceNorm2d(64, affine=True),
                                                           (torch.randn(B, 64, 16, 16, generator=g),))),
        "MultiheadAttention d=128 h=4": (True, lambda B, T: (_Attention(), (torch.randn(B, T, 128, generator=g),))),
        "LSTM 128→128": (True, lambda B, T: (_LSTM(), (torch.randn(B, T, 128, generator=g),))),
    }


class _Attention(nn.Module):
    """Self-attention; ``dp()`` gives the same layer as veil.layers.DPMultiheadAttention."""

    def __init__(self, cls=nn.MultiheadAttention):
        super().__init__()
        self.attn = cls(128, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]

    def dp(self):
        return _Attention(_dp_layers().DPMultiheadAttention)


class _LSTM(nn.Module):
    def __init__(self, cls=nn.LSTM):
        super().__init__()
        self.lstm = cls(128, 128, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]

    def dp(self):
        return _LSTM(_dp_layers().DPLSTM)


def configs(seq: bool, quick: bool) -> List[Tuple[int, int]]:
    """(B, T) pairs: batch sizes at T=64, and sequence lengths at B=32 for sequence layers."""
    batches = [16, 64, 256] if quick else [16, 64, 256, 512]
    lengths = [16, 256] if quick else [16, 64, 256, 1024]
    out = [(B, 64 if seq else 1) for B in batches]
    if seq:
        out += [(32, T) for T in lengths if (32, T) not in out]
    return out


def _steps(module: nn.Module, inputs, dp: bool) -> Callable[[], None]:
    if dp:
        from veil import GradSampleModule
        from veil.optimizers import DPOptimizer

        model = GradSampleModule(module)
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), noise_multiplier=1.0, max_grad_norm=1.0,
                          expected_batch_size=inputs[0].shape[0])
    else:
        model = module
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        out = model(*inputs)
        out.float().square().mean().backward()
        opt.step()

    return step


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _peak_growth(step: Callable[[], None]) -> int:
    step()
    rest = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(2):
        step()
    return max(_status_kib("VmHWM") - rest, 1) * 1024


def run_family(name: str, quick: bool, repeats: int, what: str) -> List[dict]:
    """Times (``what="time"``) or peak-RSS growths (``what="memory"``) of one family's configs."""
    seq, build = families()[name]
    rows = []
    for B, T in configs(seq, quick):
        torch.manual_seed(0)
        plain, inputs = build(B, T)
        dp = plain.dp() if hasattr(plain, "dp") else build(B, T)[0]
        row = {"layer": name, "B": B, "T": T if seq else "-"}
        if what == "memory":
            row["plain MiB"] = _peak_growth(_steps(plain, inputs, False)) / 2**20
            row["DP MiB"] = _peak_growth(_steps(dp, inputs, True)) / 2**20
        else:
            t = interleaved_times({"plain": _steps(plain, inputs, False), "dp": _steps(dp, inputs, True)},
                                  repeats=repeats, warmup=2)
            row.update({"plain ms": round(t["plain"] * 1e3, 3), "DP ms": round(t["dp"] * 1e3, 3),
                        "time ratio": round(t["dp"] / t["plain"], 2)})
        rows.append(row)
    return rows


def plot(rows: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_b, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["layer"] for r in rows):
        mine = [r for r in rows if r["layer"] == name]
        by_b = [r for r in mine if r["T"] in ("-", 64)]
        ax_b.plot([r["B"] for r in by_b], [r["time ratio"] for r in by_b], marker="o", label=name)
        by_t = sorted((r for r in mine if r["B"] == 32 and r["T"] != "-"), key=lambda r: r["T"])
        if by_t:
            ax_t.plot([r["T"] for r in by_t], [r["time ratio"] for r in by_t], marker="o", label=name)
    for ax, x in ((ax_b, "batch size (T=64 for sequence layers)"), (ax_t, "sequence length (B=32)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_ylabel("DP step time / plain step time")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    ax_b.legend(fontsize=7)
    fig.suptitle("Veil per-layer DP overhead (forward + backward + step), 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--family", default=None)
    ap.add_argument("--child", choices=["time", "memory"], default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_family(args.family, args.quick, args.repeats, args.child)))
        return ""
    rows = []
    for name in families():
        if args.family and args.family not in name:
            continue
        fam = {}
        for what in ("time", "memory"):
            env = dict(os.environ)
            if what == "memory":  # large blocks go back to the OS, so RSS tracks live memory (slows timing);
                env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # Veil must not raise the threshold in this child
                env["VEIL_TUNE_MALLOC"] = "0"
            cmd = [sys.executable, __file__, "--child", what, "--family", name, "--repeats", str(args.repeats)]
            res = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(f"{name} ({what}): failed\n{res.stderr[-2000:]}", file=sys.stderr)
                break
            for r in json.loads(res.stdout.strip().splitlines()[-1]):
                fam.setdefault((r["B"], r["T"]), {}).update(r)
        else:
            for r in fam.values():  # the growths themselves too: a ratio of two near-zero growths means little
                dp_mib, plain_mib = r.pop("DP MiB"), r.pop("plain MiB")
                r["memory ratio"] = round(dp_mib / max(plain_mib, 1e-3), 2)
                r["peak growth DP / plain (MiB)"] = f"{dp_mib:.1f} / {plain_mib:.1f}"
            rows += fam.values()
            print(markdown_table(list(fam.values())), file=sys.stderr)
    table = markdown_table(rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "per_layer.md"), "w") as f:
        f.write(table + "\n")
    try:
        plot(rows, os.path.join(args.out, "per_layer.png"))
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    print(table)
    return table


if __name__ == "__main__":
    main()
