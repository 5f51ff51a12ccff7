"""`make demo` and `veil demo`: a small DP CNN on scikit-learn's 8x8 digits (bundled with the wheel, no download).

Trains with Poisson sampling and per-sample clipping at a target ε, then prints test accuracy and ε.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from veil import PrivacyEngine


class DigitsCNN(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.GroupNorm(4, channels), nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.GroupNorm(4, 2 * channels), nn.Tanh(),
            nn.AvgPool2d(2),
        )
        self.head = nn.Linear(2 * channels * 4, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def load(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = 360
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def accuracy(model: nn.Module, ds: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = ds.tensors
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    ap.add_argument("--channels", type=int, default=16)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train, test = load(args.seed)
    model = DigitsCNN(args.channels)
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)

    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader,
        target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs,
        max_grad_norm=args.max_grad_norm,
    )
    print(f"Veil demo: {len(train)} training digits, noise multiplier {optimizer.noise_multiplier:.3f}, "
          f"sample rate {loader.sample_rate:.4f}, {args.epochs} epochs")
    start = time.time()
    bar = tqdm(range(args.epochs), desc="DP training", unit="epoch")
    for _ in bar:
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        bar.set_postfix(eps=f"{engine.get_epsilon(args.delta):.2f}")
    acc = accuracy(model, test)
    eps = engine.get_epsilon(args.delta)
    print(f"test accuracy {acc:.4f} at epsilon {eps:.2f} (delta {args.delta:g}) in {time.time() - start:.0f} s")
    return acc


if __name__ == "__main__":
    main()
