"""Surname -> language with a character-level DPLSTM, trained with DP-SGD (Veil).

Data: the ``last_names`` lists of faker's person providers for 17 languages (bundled with faker, no
download), transliterated to ASCII with faker's own ``unidecode`` so that the model must learn
spelling patterns rather than scripts. A name listed under two languages is dropped (its label is
ambiguous); the rest is split 80/20 per language with a fixed seed.

Class balance: each language is capped at ``--cap`` names (a fixed, public number; the default 400
keeps the largest classes from drowning the small ones). Capping by a fixed count needs no
privacy accounting of its own. We deliberately do *not* use class weights or a weighted sampler
computed from the class counts: DP accounting assumes each example joins a batch with the same
probability q, and weights derived from the private data would need their own privacy budget.
Per-class counts are printed for transparency (they are a statistic of the training set).

The last line printed is ``test accuracy 0.XXXX at epsilon X.XX (delta 1e-05) in N s``.
"""
from __future__ import annotations

import argparse
import importlib
import random
import string
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from _common import Private, accuracy, add_common_args, fit, report
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from veil.layers import DPLSTM

# language -> faker locales whose person provider's last_names are pooled
LANGUAGES: Dict[str, Tuple[str, ...]] = {
    "Arabic": ("ar_AA",),
    "Chinese": ("zh_CN",),
    "Croatian": ("hr_HR",),
    "Czech": ("cs_CZ",),
    "Dutch": ("nl_NL",),
    "English": ("en_US", "en_GB"),
    "Finnish": ("fi_FI",),
    "French": ("fr_FR",),
    "German": ("de_DE",),
    "Greek": ("el_GR",),
    "Hungarian": ("hu_HU",),
    "Irish": ("ga_IE",),
    "Italian": ("it_IT",),
    "Portuguese": ("pt_PT", "pt_BR"),
    "Russian": ("ru_RU",),
    "Spanish": ("es_ES",),
    "Swedish": ("sv_SE",),
}
# fixed vocabulary (index 0 is padding): no statistic of the data is used to build it
ALPHABET = string.ascii_letters + " '-."
CHAR_INDEX = {c: i + 1 for i, c in enumerate(ALPHABET)}


def faker_available() -> bool:
    """Whether faker is importable."""
    return importlib.util.find_spec("faker") is not None


def load_names(cap: int, seed: int = 0) -> Tuple[List[Tuple[str, int]], List[Tuple[str, int]], List[str]]:
    """(train, test, languages): lists of (ASCII surname, class) pairs, at most ``cap`` per language."""
    from faker.decode import unidecode

    by_lang: Dict[str, set] = {}
    for lang, locales in LANGUAGES.items():
        names = set()
        for loc in locales:
            provider = importlib.import_module(f"faker.providers.person.{loc}").Provider
            for raw in provider.last_names:  # a tuple, or a dict name -> frequency
                name = unidecode(raw).strip()
                if name and all(c in CHAR_INDEX for c in name):
                    names.add(name)
        by_lang[lang] = names
    seen: Dict[str, int] = {}
    for names in by_lang.values():
        for n in names:
            seen[n] = seen.get(n, 0) + 1
    rng = random.Random(seed)
    langs = sorted(by_lang)
    train, test = [], []
    for label, lang in enumerate(langs):
        names = sorted(n for n in by_lang[lang] if seen[n] == 1)
        rng.shuffle(names)
        names = names[:cap]
        n_test = len(names) // 5
        test += [(n, label) for n in names[:n_test]]
        train += [(n, label) for n in names[n_test:]]
    return train, test, langs


def encode(pairs: List[Tuple[str, int]], max_len: int) -> TensorDataset:
    """Right-padded character ids [N, max_len], lengths [N] and labels [N]."""
    ids = torch.zeros(len(pairs), max_len, dtype=torch.long)
    lengths = torch.zeros(len(pairs), dtype=torch.long)
    for i, (name, _) in enumerate(pairs):
        name = name[:max_len]
        ids[i, :len(name)] = torch.tensor([CHAR_INDEX[c] for c in name])
        lengths[i] = len(name)
    labels = torch.tensor([y for _, y in pairs], dtype=torch.long)
    return TensorDataset(ids, lengths, labels)


class CharLSTM(nn.Module):
    """Embedding -> DPLSTM -> linear head on the hidden state after each name's last character."""

    def __init__(self, classes: int, embed: int = 32, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(len(ALPHABET) + 1, embed, padding_idx=0)
        self.lstm = DPLSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(ids))  # [B, T, H]; padding comes after the name, so it
        last = (lengths - 1).clamp(min=0)     # never influences the state we read out
        h = out[torch.arange(len(ids)), last]
        return self.head(h)


def main(argv: Optional[Sequence[str]] = None) -> float:
    """Trains and returns the final test accuracy."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, epochs=20, batch_size=512, lr=0.01)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--embed", type=int, default=32)
    ap.add_argument("--cap", type=int, default=400, help="at most this many names per language")
    ap.add_argument("--max-len", type=int, default=16, help="names are truncated to this many characters")
    ap.add_argument("--smoke", action="store_true", help="CI: 1 epoch on 1,000 names")
    args = ap.parse_args(argv)
    if args.smoke:
        args.epochs, args.subset, args.batch_size = 1, args.subset or 1000, min(args.batch_size, 128)

    torch.manual_seed(args.seed)
    train_pairs, test_pairs, langs = load_names(args.cap, args.seed)
    if args.subset:
        train_pairs = random.Random(args.seed).sample(train_pairs, min(args.subset, len(train_pairs)))
    counts = [sum(1 for _, y in train_pairs if y == k) for k in range(len(langs))]
    print("training names per language: " + ", ".join(f"{l} {c}" for l, c in zip(langs, counts)))
    train, test = encode(train_pairs, args.max_len), encode(test_pairs, args.max_len)

    model = CharLSTM(len(langs), args.embed, args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = DataLoader(train, batch_size=args.batch_size)
    dp = Private(args)
    model, optimizer, loader = dp.wrap(model, optimizer, loader, args)
    print(f"names: {len(train)} train / {len(test)} test, {len(langs)} languages, sample rate "
          f"{loader.sample_rate:.4f}, noise multiplier {optimizer.noise_multiplier:.3f}, {args.epochs} epochs",
          flush=True)

    start = fit(model, optimizer, loader, args.epochs, lambda m, b: F.cross_entropy(m(b[0], b[1]), b[2]), dp.epsilon)
    acc = accuracy(model, test.tensors[:2], test.tensors[2])
    report("test", acc, dp.epsilon(), args.delta, start)
    return acc


if __name__ == "__main__":
    main()
