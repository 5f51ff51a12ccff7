"""Small models shared by the tests."""
import torch
from torch import nn


class MixedNet(nn.Module):
    """Every layer family in one model: Embedding, Linear, Conv1d/2d, LayerNorm, GroupNorm, RMSNorm."""

    def __init__(self, vocab=11, dim=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.conv1 = nn.Conv1d(dim, 5, kernel_size=3, padding=1)
        self.ln = nn.LayerNorm(5)
        self.conv2 = nn.Conv2d(1, 2, kernel_size=2, stride=1)
        self.gn = nn.GroupNorm(1, 2)
        self.rms = nn.RMSNorm(5)
        self.head = nn.Linear(5 + 2, classes)

    def forward(self, tokens, image):
        h = self.emb(tokens).transpose(1, 2)          # B, dim, T
        h = torch.tanh(self.conv1(h)).transpose(1, 2)  # B, T, 5
        h = self.rms(self.ln(h)).mean(1)               # B, 5
        z = torch.tanh(self.gn(self.conv2(image)))     # B, 2, H, W
        return self.head(torch.cat([h, z.mean((2, 3))], 1))


def mixed_batch(B, T=7, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    image = torch.randn(B, 1, 5, 5, generator=g, dtype=torch.get_default_dtype())
    y = torch.randint(0, 3, (B,), generator=g)
    return tokens, image, y


class MLP(nn.Module):
    def __init__(self, d=8, h=16, classes=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, classes))

    def forward(self, x):
        return self.net(x)


class CalledTwice(nn.Module):
    """``layer`` applied to ``x`` and, when ``calls == 2``, again to ``second(x)``; outputs flattened and
    joined (a layer called twice in one forward: the engine sums its calls per sample)."""

    def __init__(self, layer: nn.Module, calls: int, second):
        super().__init__()
        self.layer, self.calls, self.second = layer, calls, second

    def forward(self, x):
        ys = [self.layer(x).flatten(1)]
        if self.calls == 2:
            ys.append(self.layer(self.second(x)).flatten(1))
        return torch.cat(ys, 1)
