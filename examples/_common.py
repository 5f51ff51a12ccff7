"""Pieces the example scripts share: their common flags, the private setup and the training loop."""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Iterable, Tuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from tqdm import tqdm

from veil import PrivacyEngine


def add_common_args(ap: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float) -> None:
    """--epsilon, --delta, --epochs, --batch-size, --lr, --max-grad-norm, --seed, --subset."""
    ap.add_argument("--epsilon", type=float, default=3.0, help="target ε; inf: same recipe without noise")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--batch-size", type=int, default=batch_size, help="expected (Poisson) batch size")
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--max-grad-norm", "-C", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", type=int, default=0, help="train on N random training examples")


class Private:
    """The private setup of an example: a PrivacyEngine, and whether noise is added at all."""

    def __init__(self, args: argparse.Namespace):
        self.engine = PrivacyEngine()
        self.private = math.isfinite(args.epsilon)
        self.delta = args.delta

    def wrap(self, model: nn.Module, optimizer: Optimizer, loader: DataLoader, args: argparse.Namespace
             ) -> Tuple[nn.Module, Optimizer, DataLoader]:
        """Calibrates the noise to spend ``args.epsilon`` in ``args.epochs`` epochs (Poisson sampling);
        with ε = inf the same clipping and sampling without noise."""
        if self.private:
            return self.engine.make_private_with_epsilon(
                module=model, optimizer=optimizer, data_loader=loader, target_epsilon=args.epsilon,
                target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm)
        return self.engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                        noise_multiplier=0.0, max_grad_norm=args.max_grad_norm)

    def epsilon(self) -> float:
        return self.engine.get_epsilon(self.delta) if self.private else math.inf


def fit(model: nn.Module, optimizer: Optimizer, loader: Iterable, epochs: int,
          loss: Callable[[nn.Module, tuple], Tensor], epsilon: Callable[[], float], desc: str = "DP training") -> float:
    """Runs the epochs with a progress bar showing ε; returns the start time."""
    start = time.time()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", mininterval=2.0)
    for _ in bar:
        for batch in loader:
            optimizer.zero_grad()
            loss(model, batch).backward()
            optimizer.step()
        bar.set_postfix(eps=f"{epsilon():.2f}", refresh=False)
    bar.close()
    return start


def report(split: str, acc: float, epsilon: float, delta: float, start: float) -> None:
    """The examples' last line: ``<split> accuracy 0.XXXX at epsilon X.XX (delta 1e-05) in N s``."""
    print(f"{split} accuracy {acc:.4f} at epsilon {epsilon:.2f} (delta {delta:g}) in {time.time() - start:.0f} s",
          flush=True)


@torch.no_grad()
def accuracy(model: nn.Module, inputs: tuple, y: Tensor) -> float:
    """Fraction of ``y`` that ``model(*inputs)`` classifies correctly (in eval mode)."""
    model.eval()
    acc = (model(*inputs).argmax(1) == y).float().mean().item()
    model.train()
    return acc
