"""BatchMemoryManager overhead: a logical batch of 1024 in physical chunks of 64, against one physical
batch of 1024, per example (median of interleaved repeats; the DP step is the same in both).
The last column is the same comparison for plain PyTorch (gradient accumulation over the same chunks
against one batch): the part of the cost that smaller GEMMs cost any model.

    python benchmarks/batch_memory.py [--repeats 10]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import interleaved_times, markdown_table  # noqa: E402
from benchmarks.workloads import TransformerBlock, _dp_attention, mlp, mnist_cnn  # noqa: E402
from veil import GradSampleModule  # noqa: E402
from veil.data_loader import DPDataLoader  # noqa: E402
from veil.optimizers import DPOptimizer  # noqa: E402
from veil.utils.batch_memory_manager import BatchMemoryManager  # noqa: E402


def main(argv=None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--logical", type=int, default=1024)
    ap.add_argument("--physical", type=int, default=64)
    args = ap.parse_args(argv)
    rows = []
    models = (("CNN (MNIST)", mnist_cnn, mnist_cnn, (1, 28, 28)),
              ("MLP 784-1024-1024-10", mlp, mlp, (784,)),
              ("Transformer block (T=64, d=128, 4 heads)", TransformerBlock,
               lambda: TransformerBlock(attention=_dp_attention()), (64, 128)))
    for name, build, dp_build, shape in models:
        n = args.logical * 4
        ds = TensorDataset(torch.randn(n, *shape), torch.randint(0, 10, (n,)))
        steps = {}
        for label, phys in (("one batch", None), ("BatchMemoryManager", args.physical)):
            model = GradSampleModule(dp_build())
            opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
                              expected_batch_size=args.logical)
            loader = DPDataLoader(ds, sample_rate=args.logical / n, generator=torch.Generator().manual_seed(0), steps=1)

            def logical_step(model=model, opt=opt, loader=loader, phys=phys):
                if phys is None:
                    batches = loader
                    for x, y in batches:
                        opt.zero_grad()
                        F.cross_entropy(model(x), y).backward()
                        opt.step()
                    return
                with BatchMemoryManager(data_loader=loader, max_physical_batch_size=phys, optimizer=opt) as dl:
                    for x, y in dl:
                        opt.zero_grad()
                        F.cross_entropy(model(x), y).backward()
                        opt.step()

            steps[label] = logical_step
        plain = build()
        plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
        xs, ys = ds.tensors[0][: args.logical], ds.tensors[1][: args.logical]

        def plain_step(chunk, model=plain, opt=plain_opt):
            """Plain PyTorch: one batch, or gradient accumulation over chunks, then one step."""
            opt.zero_grad()
            for i in range(0, args.logical, chunk):
                F.cross_entropy(model(xs[i : i + chunk]), ys[i : i + chunk]).backward()
            opt.step()

        steps["plain one batch"] = lambda: plain_step(args.logical)
        steps["plain chunks"] = lambda: plain_step(args.physical)
        t = interleaved_times(steps, repeats=args.repeats, warmup=1)
        rows.append({"model": name, "logical batch": args.logical, "physical": args.physical,
                     "one batch ms": f"{t['one batch'] * 1e3:.1f}",
                     "BatchMemoryManager ms": f"{t['BatchMemoryManager'] * 1e3:.1f}",
                     "ratio": f"{t['BatchMemoryManager'] / t['one batch']:.2f}x",
                     "plain PyTorch, same chunks / one batch": f"{t['plain chunks'] / t['plain one batch']:.2f}x"})
        print(rows[-1], file=sys.stderr)
    table = markdown_table(rows)
    print(table)
    return table


if __name__ == "__main__":
    main()
