"""End-to-end benchmark: DP step / plain step, time and peak memory, with Opacus as an optional peer.

Each step is forward + backward + optimizer step. DP runs through PrivacyEngine-equivalent objects
(GradSampleModule in the default mode + DPOptimizer with σ=1, C=1); plain uses torch.nn layers and
torch.optim.SGD. Times are medians of interleaved repeats in one process. Peak memory is the growth
of the process's peak RSS during a step over the RSS before it, in fresh processes (median of 3):
for the first step (with one-time costs) and for later steps (steady state); and the process's
whole peak RSS over a steady step (model, framework and data included).

    python benchmarks/end_to_end.py [--repeats 20] [--no-opacus] [--no-memory]
"""
from __future__ import annotations

import argparse
import statistics
import json
import os
import subprocess
import sys
from typing import Callable, Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import interleaved_times, markdown_table  # noqa: E402
from benchmarks.workloads import workloads  # noqa: E402


def plain_step(model, batch) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def veil_step(model, batch, mode: str = "auto") -> Callable[[], None]:
    from veil import GradSampleModule
    from veil.optimizers import DPOptimizer

    gsm = GradSampleModule(model, mode=mode)
    x, y = batch
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=len(y))

    def step():
        opt.zero_grad()
        F.cross_entropy(gsm(x), y).backward()
        opt.step()

    return step


def opacus_step(model, batch, mode: str) -> Callable[[], None]:
    import warnings

    from opacus import GradSampleModule as OGSM
    from opacus.optimizers import DPOptimizer as ODPOptimizer

    warnings.filterwarnings("ignore")
    x, y = batch
    if mode == "ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(gsm.parameters(), lr=0.01), noise_multiplier=1.0,
                                              max_grad_norm=1.0, expected_batch_size=len(y))
        crit = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss(reduction="mean"))

        def step():
            opt.zero_grad()
            crit(gsm(x), y).backward()
            opt.step()

        return step
    gsm = OGSM(model)
    opt = ODPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
                       expected_batch_size=len(y))

    def step():
        opt.zero_grad()
        F.cross_entropy(gsm(x), y).backward()
        opt.step()

    return step


def opacus_model(name: str, plain_builder):
    """Opacus needs its own DP layers for attention and LSTM."""
    from benchmarks.workloads import CharLSTM, TransformerBlock

    if name.startswith("Transformer"):
        from opacus.layers import DPMultiheadAttention

        return TransformerBlock(attention=DPMultiheadAttention)
    if name.startswith("char-LSTM"):
        from opacus.layers import DPLSTM

        return CharLSTM(lstm=DPLSTM)
    return plain_builder()


def memory_child(name: str, which: str, seq_len: int) -> None:
    """Runs in a fresh process: prints the peak-RSS growth (bytes) of the first step over the resting
    RSS, and of two later steps over the RSS after that first step (the steady state, without
    one-time costs such as oneDNN's kernel generation or thread pools)."""
    torch.manual_seed(0)
    plain_b, dp_b, batch_b = workloads(seq_len)[name]
    batch = batch_b()
    step = plain_step(plain_b(), batch) if which == "plain" else veil_step(dp_b(), batch)
    out = {}
    for key, steps in (("first", 1), ("steady", 2)):
        rest = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak RSS, to the current RSS
            f.write("5")
        for _ in range(steps):
            step()
        out[key] = max(_status_kib("VmHWM") - rest, 1) * 1024
        out[key + " peak"] = _status_kib("VmHWM") * 1024
    print(json.dumps(out))


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure_memory(name: str, seq_len: int, runs: int = 3) -> Dict[str, Dict[str, int]]:
    """Medians over ``runs`` fresh processes per side, with the same allocator settings on both sides:
    Veil's malloc tuning off (VEIL_TUNE_MALLOC=0: with it freed memory stays resident, which would
    hide the growth), and glibc's mmap threshold fixed at 64 KiB, so every tensor of 64 KiB or more
    is mapped when allocated and unmapped when freed: the resident size then follows the live tensors
    and repeats to 0.1 MiB between runs (with glibc's adaptive threshold it varied by several MiB)."""
    env = dict(os.environ, VEIL_TUNE_MALLOC="0", MALLOC_MMAP_THRESHOLD_="65536")
    out: Dict[str, Dict[str, int]] = {}
    for which in ("plain", "veil"):
        res = [json.loads(subprocess.run([sys.executable, __file__, "--memory-child", name, which, str(seq_len)],
                                         capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1])
               for _ in range(runs)]
        out[which] = {k: int(statistics.median(r[k] for r in res)) for k in res[0]}
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--no-opacus", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--only", default=None, help="substring of the workloads to run")
    ap.add_argument("--memory-child", nargs=3, default=None)
    args = ap.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child[0], args.memory_child[1], int(args.memory_child[2]))
        return ""
    try:
        import opacus  # noqa: F401

        have_opacus = not args.no_opacus
    except ImportError:
        have_opacus = False
    rows = []
    for name, (plain_b, dp_b, batch_b) in workloads(args.seq_len).items():
        if args.only and args.only not in name:
            continue
        torch.manual_seed(0)
        batch = batch_b()
        try:
            dp_model = dp_b()
        except ImportError as e:
            rows.append({"workload": name, "plain ms": "-", "Veil ms": "-", "Veil / plain": f"skipped ({e})"})
            continue
        plain_model = plain_b()
        fns = {"plain": plain_step(plain_model, batch), "veil": veil_step(dp_model, batch)}
        if have_opacus:
            for mode in ("hooks", "ghost"):
                try:
                    fns[f"opacus-{mode}"] = opacus_step(opacus_model(name, plain_b), batch, mode)
                except Exception as e:  # an optional peer: report, don't fail
                    print(f"opacus {mode} failed on {name}: {type(e).__name__}: {e}", file=sys.stderr)
        t = interleaved_times(fns, repeats=args.repeats)
        row = {"workload": name, "plain ms": f"{t['plain'] * 1e3:.2f}", "Veil ms": f"{t['veil'] * 1e3:.2f}",
               "Veil / plain": f"{t['veil'] / t['plain']:.2f}x"}
        if have_opacus:
            for mode in ("hooks", "ghost"):
                k = f"opacus-{mode}"
                row[f"Opacus {mode} / plain"] = f"{t[k] / t['plain']:.2f}x" if k in t else "failed"
        if not args.no_memory:
            mem = measure_memory(name, args.seq_len)
            for key, label in (("steady", "peak mem growth Veil / plain, steady step"), ("first", "first step"),
                               ("steady peak", "process peak RSS Veil / plain")):
                v, pl = mem["veil"][key], mem["plain"][key]
                row[label] = f"{v / pl:.2f}x ({v / 2**20:.{1 if key != 'steady peak' else 0}f}/{pl / 2**20:.{1 if key != 'steady peak' else 0}f} MiB)"
        rows.append(row)
        print(row, file=sys.stderr)
    cols = set().union(*rows)
    for r in rows:
        for c in cols:
            r.setdefault(c, "")
    table = markdown_table(rows)
    print(table)
    return table


if __name__ == "__main__":
    main()
