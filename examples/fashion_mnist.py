"""Fashion-MNIST with DP-SGD at a target (ε, δ): a small CNN trained end to end with Veil.

Recipes (``--recipe``):

* ``tb``: Tramèr & Boneh (2021)'s tanh CNN (conv 16 8x8/2, maxpool 2/1, conv 32 4x4/2, maxpool 2/1,
  fc 32, fc 10), SGD with momentum 0.9, expected batch 2048, lr 4, C = 0.1, 40 epochs;
  ``tb20``: the same with 20 epochs (noise calibrated for 20 epochs), half the time.
* ``best``: the attempt at a better recipe: the same CNN with GroupNorm, augmentation multiplicity
  (K = 2 random crops/flips per example; every layer is called once per view and Veil sums a layer's
  calls per example, so each example's clipped gradient is the gradient of its mean loss over its
  views: exact DP, one example = one clipped gradient) and an exponential moving average (EMA) of
  the parameters for evaluation. On validation it did *worse* than ``tb20`` (examples/RESULTS.md).
* ``scatter``: Tramèr & Boneh's "ScatterNet + linear": fixed order-2 scattering features (J = 2,
  L = 8, 81 x 7 x 7 per image; ``examples/scatternet.py``, computed once and cached in
  ``~/.cache/veil``), GroupNorm with 27 groups (per example, inside the model), a linear
  classifier, ghost clipping. Hyper-parameters chosen on the validation split (RECIPES below;
  every configuration tried is in examples/RESULTS.md). ``--model scatter-cnn`` puts a small tanh
  CNN on the same features instead; ``--flip`` adds the mirror image's features as a second view,
  ``--optimizer adam`` and ``--schedule cosine`` change the update rule (all tried on validation).
  ``--ws`` makes the end-to-end CNN's convolutions weight-standardised (``veil.layers.WSConv2d``;
  with ``--model gn``, GroupNorm + weight standardisation as in De et al. 2022; tried on validation).

Every recipe value can be overridden by its flag. Sampling is Poisson (q = 1/len(loader)); noise
is calibrated by ``make_private_with_epsilon`` to spend ``--epsilon`` in ``--epochs`` epochs.
``--epsilon inf`` runs the same recipe (same clipping, Poisson batches) without noise.
``--val`` holds out the last 10,000 training images (fixed split) and reports validation accuracy:
tune on that, not on the test set.

The last line printed is ``test accuracy 0.XXXX at epsilon X.XX (delta 1e-05) in N s``
(``validation accuracy`` with ``--val``).
"""
from __future__ import annotations

import argparse
import copy
import gzip
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from veil import PrivacyEngine
from veil.layers import WSConv2d

try:  # run as a script (examples/ on sys.path) or imported by the tests
    from scatternet import ScatterCNN, ScatterLinear, scatter_features
except ImportError:  # pragma: no cover
    from examples.scatternet import ScatterCNN, ScatterLinear, scatter_features

DATA_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Fixed normalisation constants (published Fashion-MNIST statistics); they are not
# recomputed from the private training set.
MEAN, STD = 0.2860, 0.3530

RECIPES: Dict[str, Dict[str, object]] = {
    "tb": dict(model="tanh", epochs=40, batch_size=2048, lr=4.0, momentum=0.9, max_grad_norm=0.1,
               aug_mult=1, flip="none", schedule="constant", ema=0.0, grad_sample_mode="auto"),
    # 20 epochs: the recipe with the noise for 20 epochs reaches 86% within ~4.5 min on 2 cores
    "tb20": dict(model="tanh", epochs=20, batch_size=2048, lr=4.0, momentum=0.9, max_grad_norm=0.1,
                 aug_mult=1, flip="none", schedule="constant", ema=0.0, grad_sample_mode="auto"),
    "best": dict(model="gn", epochs=20, batch_size=2048, lr=4.0, momentum=0.9, max_grad_norm=0.1,
                 aug_mult=2, flip="none", schedule="constant", ema=0.99, grad_sample_mode="auto"),
    # Tramèr & Boneh's ScatterNet + linear: fixed scattering features (examples/scatternet.py),
    # GroupNorm (27 groups) inside the model, a linear classifier on 81 x 7 x 7 features
    # (ghost clipping: per-example norms of a linear layer without the per-example gradients)
    # chosen on validation (T&B's 8192 / lr 4 / 40 epochs: 88.45 %; this: 89.60-89.77 % over 3 seeds);
    # Poisson q = 1/len(loader) = 1/4, i.e. an expected batch of 15,000 on 60k (12,500 on 50k)
    "scatter": dict(model="scatter", epochs=60, batch_size=16384, lr=16.0, momentum=0.9, max_grad_norm=0.1,
                    aug_mult=1, flip="none", schedule="constant", ema=0.0, grad_sample_mode="ghost"),
}


# ----------------------------------------------------------------------------- data
def dataset_available(root: Path = DATA_DIR) -> bool:
    """Whether the four idx files are installed (Debian package ``dataset-fashion-mnist``)."""
    return all((root / f).exists() for pair in FILES.values() for f in pair)


def read_idx(path: Path) -> np.ndarray:
    """An idx (LeCun) file, gzipped, as a numpy array."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str, root: Path = DATA_DIR) -> Tuple[Tensor, Tensor]:
    """Normalised images [N, 1, 28, 28] (float32) and labels [N] (int64)."""
    img_file, lbl_file = FILES[split]
    x = torch.from_numpy(read_idx(root / img_file).copy()).float().div_(255.0)
    x = x.sub_(MEAN).div_(STD).unsqueeze(1)
    y = torch.from_numpy(read_idx(root / lbl_file).astype(np.int64))
    return x, y


class BatchTensorDataset(Dataset):
    """In-memory images and labels served a whole batch at a time (``__getitems__``).

    With ``aug_mult`` = K > 0 each example comes out as K augmented views, [B, K, 1, 28, 28]:
    random translations by up to ``shift`` pixels (zero padding) and horizontal flips.
    With K = 0 the images come out unchanged, [B, 1, 28, 28].
    """

    def __init__(self, x: Tensor, y: Tensor, aug_mult: int = 0, shift: int = 2,
                 generator: Optional[torch.Generator] = None):
        self.x, self.y, self.aug_mult, self.shift, self.generator = x, y, aug_mult, shift, generator

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, idx: Sequence[int]) -> Tuple[Tensor, Tensor]:
        index = torch.as_tensor(idx, dtype=torch.long)
        x, y = self.x[index], self.y[index]
        if self.aug_mult > 0:
            x = augment(x, self.aug_mult, self.shift, self.generator)
        return x, y


def augment(x: Tensor, k: int, shift: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """K random crops (after zero padding by ``shift``) and flips of each image: [B, K, C, H, W]."""
    b, c, h, w = x.shape
    views = x.unsqueeze(1).expand(b, k, c, h, w).reshape(b * k, c, h, w)
    if shift > 0:
        padded = F.pad(views, (shift, shift, shift, shift))
        oy = torch.randint(0, 2 * shift + 1, (b * k,), generator=generator)
        ox = torch.randint(0, 2 * shift + 1, (b * k,), generator=generator)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        n = torch.arange(b * k)[:, None, None, None]
        ch = torch.arange(c)[None, :, None, None]
        views = padded[n, ch, rows, cols]
    flip = torch.rand(b * k, generator=generator) < 0.5
    views = torch.where(flip[:, None, None, None], views.flip(-1), views)
    return views.reshape(b, k, c, h, w)


def with_flip(images: Tensor, flip: bool, cache: bool = True) -> Tensor:
    """ScatterNet features ``[N, 81, 7, 7]``; with ``flip``, ``[N, 2, 81, 7, 7]``: the image's and its
    mirror image's (a second view of the same example)."""
    features = scatter_features(images, cache=cache)
    if not flip:
        return features
    return torch.stack([features, scatter_features(images.flip(-1), cache=cache)], 1)


def identity_collate(batch):
    """The dataset already returns stacked tensors."""
    return batch


# ----------------------------------------------------------------------------- models
class TanhCNN(nn.Module):
    """Tramèr & Boneh's Fashion-MNIST CNN; ``norm=True`` adds GroupNorm after each convolution.

    Accepts [B, 1, 28, 28] or [B, K, 1, 28, 28]; the latter runs every layer once per view (Veil
    sums a layer's calls per sample) and returns logits [B, K, 10].
    """

    def __init__(self, width: int = 16, hidden: int = 32, norm: bool = False, groups: int = 4, ws: bool = False):
        super().__init__()
        c1, c2 = width, 2 * width
        conv = WSConv2d if ws else nn.Conv2d  # ws: weight standardisation (Veil's WSConv2d, exact clipping)
        self.conv1 = conv(1, c1, 8, stride=2, padding=2)
        self.norm1 = nn.GroupNorm(groups, c1) if norm else nn.Identity()
        self.conv2 = conv(c1, c2, 4, stride=2)
        self.norm2 = nn.GroupNorm(groups, c2) if norm else nn.Identity()
        self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def one_view(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(torch.tanh(self.norm1(self.conv1(x))), 2, 1)
        x = F.max_pool2d(torch.tanh(self.norm2(self.conv2(x))), 2, 1)
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            return self.one_view(x)
        return torch.stack([self.one_view(x[:, k]) for k in range(x.shape[1])], dim=1)


def build_model(name: str, width: int, groups: int = 27, ws: bool = False) -> nn.Module:
    """``tanh``: no normalisation; ``gn``: GroupNorm after each convolution; ``scatter``: GroupNorm
    + linear on ScatterNet features; ``scatter-cnn``: GroupNorm + small tanh CNN on them."""
    if name == "tanh":
        return TanhCNN(width, norm=False, ws=ws)
    if name == "gn":
        return TanhCNN(width, norm=True, ws=ws)
    if name == "scatter":
        return ScatterLinear(groups=groups)
    if name == "scatter-cnn":
        return ScatterCNN(groups=groups, width=2 * width)
    raise ValueError(f"unknown model {name!r}")


def view_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean over the batch of each example's mean loss over its views (one loss per example)."""
    if logits.dim() == 3:
        per_view = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(logits.shape[1]), reduction="none")
        return per_view.view(logits.shape[:2]).mean(1).mean()
    return F.cross_entropy(logits, y)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 2500) -> float:
    model.eval()
    def predict(xb: Tensor) -> Tensor:
        logits = model(xb)
        return logits.mean(1) if logits.dim() == 3 else logits  # views of one example: mean logits

    correct = sum((predict(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(y), batch))
    model.train()
    return correct / len(y)


class EMA:
    """Exponential moving average of parameters (post-processing: no privacy cost)."""

    def __init__(self, module: nn.Module, decay: float):
        self.module = copy.deepcopy(module)
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update(self, params: List[Tensor]) -> None:
        self.steps += 1
        # warm-up: early on the average forgets faster
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for e, p in zip(self.module.parameters(), params):
            e.lerp_(p, 1 - d)


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="tb")
    ap.add_argument("--epsilon", type=float, default=3.0, help="target ε; inf: no noise")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int, help="expected (Poisson) batch size")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--momentum", type=float)
    ap.add_argument("--max-grad-norm", "-C", type=float)
    ap.add_argument("--model", choices=["tanh", "gn", "scatter", "scatter-cnn"])
    ap.add_argument("--groups", type=int, default=27, help="GroupNorm groups over the 81 scattering channels (0: none)")
    ap.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    ap.add_argument("--ws", action="store_true", help="weight-standardised convolutions (tanh / gn models)")
    ap.add_argument("--aug-mult", type=int, help="augmented views per example (1 = no augmentation)")
    ap.add_argument("--flip", choices=["none", "train", "test", "both"],
                    help="ScatterNet models: also use the features of the horizontally flipped image, as a second "
                         "view of each training example (train), averaged into the prediction (test), or both")
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                    help="SGD with --momentum, or Adam (on the noisy clipped gradients: no privacy cost)")
    ap.add_argument("--schedule", choices=["constant", "cosine"],
                    help="learning rate: constant, or cosine decay to 0 over the training steps")
    ap.add_argument("--ema", type=float, help="EMA decay of the evaluated parameters (0 = off)")
    ap.add_argument("--physical-batch", type=int, default=0, help="split logical batches (BatchMemoryManager)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", type=int, default=0, help="train on N random training examples")
    ap.add_argument("--val", action="store_true", help="hold out 10k training images; report validation accuracy")
    ap.add_argument("--smoke", action="store_true", help="CI: 1 epoch on 2,000 examples")
    ap.add_argument("--grad-sample-mode", choices=["auto", "hooks", "ghost", "functorch"],
                    help="Veil's per-sample gradient mode (each recipe sets one: 'auto' for the CNNs, "
                         "'ghost' for ScatterNet + linear)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = ap.parse_args(argv)
    for k, v in RECIPES[args.recipe].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.smoke:
        args.epochs, args.subset = 1, args.subset or 2000
        args.batch_size = min(args.batch_size, 256)
    return args


def main(argv: Optional[Sequence[str]] = None) -> float:
    """Trains and returns the final test (or validation) accuracy."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)

    scatter = args.model.startswith("scatter")
    if scatter and args.aug_mult > 1:
        raise SystemExit("random augmentation is not supported on fixed ScatterNet features; use --flip")
    if args.flip != "none" and not scatter:
        raise SystemExit("--flip applies to the ScatterNet models; the CNNs use --aug-mult")
    flip_train, flip_test = args.flip in ("train", "both"), args.flip in ("test", "both")
    feature_s = time.time()  # the ScatterNet features' time (computed once, then cached) is counted
    whole = scatter and not (args.subset or args.smoke)
    x_train, y_train = load_split("train", args.data_dir)
    if whole:
        x_train = with_flip(x_train, flip_train or (flip_test and args.val))  # all 60k, cached in ~/.cache/veil
    if args.val:
        x_eval, y_eval = x_train[50000:], y_train[50000:]
        x_train, y_train = x_train[:50000], y_train[:50000]
        split = "validation"
    else:
        x_eval, y_eval = load_split("test", args.data_dir)
        if whole:
            x_eval = with_flip(x_eval, flip_test)
        split = "test"
    if args.subset:
        keep = torch.randperm(len(y_train), generator=gen)[:args.subset]
        x_train, y_train = x_train[keep], y_train[keep]
    if args.smoke:
        x_eval, y_eval = x_eval[:1000], y_eval[:1000]
    if scatter and not whole:
        x_train, x_eval = with_flip(x_train, flip_train, cache=False), with_flip(x_eval, flip_test, cache=False)
    if whole and args.val:  # the held-out images come from the training features
        x_train = x_train[:, 0] if x_train.dim() == 5 and not flip_train else x_train
        x_eval = x_eval[:, 0] if x_eval.dim() == 5 and not flip_test else x_eval
    feature_s = time.time() - feature_s if scatter else 0.0

    aug = args.aug_mult if args.aug_mult > 1 else 0
    train = BatchTensorDataset(x_train, y_train, aug_mult=aug, generator=gen)
    loader = DataLoader(train, batch_size=args.batch_size, collate_fn=identity_collate)

    model = build_model(args.model, args.width, args.groups, args.ws)
    ema = EMA(model, args.ema) if args.ema > 0 else None
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    engine = PrivacyEngine()
    private = math.isfinite(args.epsilon)
    if private:
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=args.epsilon,
            target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm,
            grad_sample_mode=args.grad_sample_mode)
    else:
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=args.max_grad_norm, grad_sample_mode=args.grad_sample_mode)
    params = list(model.parameters())
    schedule = None
    if args.schedule == "cosine":  # post-processing of the noisy gradients: no privacy cost
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(loader))
    print(f"Fashion-MNIST ({args.recipe}, model {args.model}): {len(train)} training examples, {split} "
          f"{len(y_eval)}, sample rate {loader.sample_rate:.5f}, noise multiplier "
          f"{optimizer.noise_multiplier:.3f}, C {args.max_grad_norm}, lr {args.lr}, {args.epochs} epochs, "
          f"K {max(1, args.aug_mult)}, flip {args.flip}, lr schedule {args.schedule}, EMA {args.ema}, {torch.get_num_threads()} threads", flush=True)

    def epsilon() -> float:
        return engine.get_epsilon(args.delta) if private else math.inf

    start = time.time() - feature_s
    acc = 0.0
    for epoch in range(1, args.epochs + 1):
        batches = loader
        if args.physical_batch:
            from veil.utils.batch_memory_manager import BatchMemoryManager
            manager = BatchMemoryManager(data_loader=loader, max_physical_batch_size=args.physical_batch,
                                         optimizer=optimizer)
            batches = manager.__enter__()
        bar = tqdm(batches, desc=f"epoch {epoch}/{args.epochs}", leave=False, mininterval=2.0)
        for x, y in bar:
            optimizer.zero_grad()
            loss = view_loss(model(x), y)
            loss.backward()
            optimizer.step()
            if schedule is not None and not optimizer._is_last_step_skipped:
                schedule.step()
            if ema is not None and not optimizer._is_last_step_skipped:
                ema.update(params)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        if args.physical_batch:
            manager.__exit__(None, None, None)
        acc = accuracy(model, x_eval, y_eval)
        line = f"epoch {epoch:3d}  {split} accuracy {acc:.4f}"
        if ema is not None:
            acc = accuracy(ema.module, x_eval, y_eval)
            line += f"  (EMA {acc:.4f})"
        tqdm.write(f"{line}  epsilon {epsilon():.2f}  {time.time() - start:.0f} s")
    print(f"{split} accuracy {acc:.4f} at epsilon {epsilon():.2f} (delta {args.delta:g}) "
          f"in {time.time() - start:.0f} s", flush=True)
    return acc


if __name__ == "__main__":
    main()
