"""`make bench`: runs every benchmark and writes benchmarks/RESULTS.md (plus per_layer.png).

    python benchmarks/run_all.py [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def run(script: str, *args: str) -> str:
    res = subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True)
    if res.returncode != 0:
        return f"(failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode})"
    lines = res.stdout.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    return "\n".join(lines[start:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    quick = ["--quick"] if args.quick else []
    reps = ["--repeats", "5" if args.quick else "20"]
    sections = [
        ("End to end (DP step / plain step)", run("end_to_end.py", *reps)),
        ("End to end, transformer block at T=16", run("end_to_end.py", *reps, "--only", "Transformer", "--seq-len", "16", "--no-memory")),
        ("End to end, transformer block at T=128", run("end_to_end.py", *reps, "--only", "Transformer", "--seq-len", "128", "--no-memory")),
        ("End to end, transformer block at T=256", run("end_to_end.py", "--repeats", "10", "--only", "Transformer", "--seq-len", "256", "--no-memory")),
        ("End to end, transformer block at T=512", run("end_to_end.py", "--repeats", "5", "--only", "Transformer", "--seq-len", "512", "--no-memory")),
        ("Per layer", run("per_layer.py", *quick)),
        ("BatchMemoryManager (physical 64, logical 1024)", run("batch_memory.py", "--repeats", "3" if args.quick else "10")),
    ]
    if os.path.exists(os.path.join(HERE, "accounting", "bench_accounting.py")):
        sections.append(("Accounting", run(os.path.join("accounting", "bench_accounting.py"))))
    header = (f"# Benchmark results\n\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {datetime.date.today()}. Ratios are medians of interleaved repeats in "
              "one process; memory is peak-RSS growth during a step, each side in a fresh process.\n")
    body = "\n\n".join(f"## {title}\n\n{table}" for title, table in sections)
    text = header + "\n" + body + "\n"
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
