"""The ``epsilon`` / ``noise`` subcommands and the plot helper."""

import argparse

import pytest

from veil.accountants import cli, create_accountant


def test_epsilon_table(capsys):
    assert cli.main(["epsilon", "--sample-rate", "0.04", "--noise-multiplier", "1.5", "--steps", "2250", "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "RDP" in out and "PRV" in out and "GDP" in out
    assert "7.3291" in out


def test_epsilon_single_accountant_and_epochs(capsys):
    assert cli.main(["epsilon", "-q", "0.01", "-s", "1.0", "--epochs", "2", "-d", "1e-5", "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    assert "steps=200" in out and "RDP" in out and "PRV" not in out


def test_noise(capsys):
    assert cli.main(["noise", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "1000"]) == 0
    sigma = float(capsys.readouterr().out.strip())
    acc = create_accountant("prv")
    acc.history = [(sigma, 0.01, 1000)]
    assert 2.99 <= acc.get_epsilon(1e-5) <= 3.0


def test_noise_all(capsys):
    assert cli.main(["noise", "-e", "2", "-d", "1e-5", "-q", "0.02", "--epochs", "3", "--accountant", "all"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 5 and "GDP" in out


def test_bad_input_exit_code(capsys):
    assert cli.main(["epsilon", "-q", "2", "-s", "1", "--steps", "10", "-d", "1e-5"]) == 2
    assert "sample_rate" in capsys.readouterr().err


def test_requires_steps_or_epochs():
    with pytest.raises(SystemExit):
        cli.main(["epsilon", "-q", "0.1", "-s", "1", "-d", "1e-5"])


def test_add_subcommands_on_existing_parser(capsys):
    parser = argparse.ArgumentParser(prog="veil")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("other")
    cli.add_subcommands(sub)
    args = parser.parse_args(["epsilon", "-q", "0.1", "-s", "2", "--steps", "10", "-d", "1e-5", "--accountant", "gdp"])
    assert args.func(args) == 0
    assert "GDP" in capsys.readouterr().out


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from veil.accountants.plot import plot_epsilon

    path = plot_epsilon(1.0, 0.01, 1000, 1e-5, tmp_path / "eps.png", num_points=8)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_rejects_bad_steps(tmp_path):
    pytest.importorskip("matplotlib")
    from veil.accountants.plot import plot_epsilon

    with pytest.raises(ValueError, match="steps"):
        plot_epsilon(1.0, 0.01, 0, 1e-5, tmp_path / "x.png")
