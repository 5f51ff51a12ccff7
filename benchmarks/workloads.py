"""The end-to-end workloads of the fast-path benchmark, as (plain model, DP model, batch) builders.

Plain models use the standard torch.nn layers; DP models use Veil's drop-in twins where needed.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn

Batch = Tuple[torch.Tensor, torch.Tensor]


def mnist_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, stride=2, padding=3), nn.ReLU(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(), nn.MaxPool2d(2, 1),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


class TransformerBlock(nn.Module):
    """Pre-norm block: attention + 4x MLP, then mean-pool and a linear head."""

    def __init__(self, d: int = 128, heads: int = 4, classes: int = 10, attention: type = nn.MultiheadAttention):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = attention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


class CharLSTM(nn.Module):
    def __init__(self, vocab: int = 64, h: int = 128, classes: int = 18, lstm: type = nn.LSTM):
        super().__init__()
        self.emb = nn.Embedding(vocab, h)
        self.lstm = lstm(h, h, batch_first=True)
        self.head = nn.Linear(h, classes)

    def forward(self, x):
        out, _ = self.lstm(self.emb(x))
        return self.head(out[:, -1])


def _dp_attention():
    from veil.layers import DPMultiheadAttention

    return DPMultiheadAttention


def _dp_lstm():
    from veil.layers import DPLSTM

    return DPLSTM


def workloads(seq_len: int = 64) -> Dict[str, Tuple[Callable[[], nn.Module], Callable[[], nn.Module], Callable[[], Batch]]]:
    """name -> (plain builder, DP builder, batch builder)."""
    g = torch.Generator().manual_seed(0)
    return {
        "CNN (MNIST, B=256)": (mnist_cnn, mnist_cnn,
                               lambda: (torch.randn(256, 1, 28, 28, generator=g), torch.randint(0, 10, (256,), generator=g))),
        "MLP 784-1024-1024-10 (B=256)": (mlp, mlp,
                                         lambda: (torch.randn(256, 784, generator=g), torch.randint(0, 10, (256,), generator=g))),
        f"Transformer block (T={seq_len}, d=128, 4 heads, B=64)": (
            TransformerBlock, lambda: TransformerBlock(attention=_dp_attention()),
            lambda: (torch.randn(64, seq_len, 128, generator=g), torch.randint(0, 10, (64,), generator=g))),
        "char-LSTM (T=16, h=128, B=64)": (
            CharLSTM, lambda: CharLSTM(lstm=_dp_lstm()),
            lambda: (torch.randint(0, 64, (64, 16), generator=g), torch.randint(0, 18, (64,), generator=g))),
    }
