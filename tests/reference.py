"""Brute-force references for the per-sample engine: one sample at a time through plain autograd."""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from veil.grad_sample import GradSampleModule

Tensor = torch.Tensor


def _index(x, i: int, batch_first: bool):
    if isinstance(x, Tensor):
        return x[i : i + 1] if batch_first or x.dim() < 2 else x[:, i : i + 1]
    if isinstance(x, (tuple, list)):
        return type(x)(_index(t, i, batch_first) for t in x)
    return x


def brute_force_grads(
    model: nn.Module,
    inputs: tuple,
    loss_fn: Callable[[object, int], Tensor],
    batch_size: int,
    batch_first: bool = True,
) -> Dict[str, Tensor]:
    """Per-sample gradients [B, *shape] of every trainable parameter, one sample at a time.

    ``loss_fn(output, i)`` returns sample i's loss from the model's output on that single sample.
    Parameters that get no gradient for a sample get zeros.
    """
    ref = copy.deepcopy(model)
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    out: Dict[str, List[Tensor]] = {n: [] for n in params}
    for i in range(batch_size):
        y = ref(*_index(inputs, i, batch_first))
        loss = loss_fn(y, i)
        gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), gs):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) if v else torch.zeros(0, *params[n].shape, dtype=params[n].dtype)
            for n, v in out.items()}


class ChunkProbe:
    """A GradSampleModule consumer that records each chunk's norms and clipped sums for given factors."""

    def __init__(self, factors: Optional[Tensor] = None):
        self.factors = factors
        self.norms_sq: Dict[str, Tensor] = {}
        self.clipped: Dict[str, Tensor] = {}
        self.batch_size = None
        self.errors: List[str] = []

    def __call__(self, chunk) -> None:
        self.batch_size = chunk.batch_size
        self.errors = chunk.errors
        c = self.factors
        for e in chunk.entries:
            self.norms_sq[e.name] = e.norms_sq
            f = torch.ones(chunk.batch_size, dtype=e.norms_sq.dtype) if c is None else c.to(e.norms_sq.dtype)
            self.clipped[e.name] = e.clipped_sum(f)


def engine_chunk(
    model: nn.Module,
    inputs: tuple,
    loss_fn: Callable[[object], Tensor],
    mode: str,
    factors: Optional[Tensor] = None,
    batch_first: bool = True,
    loss_reduction: str = "sum",
) -> ChunkProbe:
    """Run one forward/backward of ``model`` under the engine in ``mode``; return what it produced."""
    gsm = GradSampleModule(copy.deepcopy(model), batch_first=batch_first, loss_reduction=loss_reduction, mode=mode)
    probe = ChunkProbe(factors)
    gsm.consumer = probe
    loss = loss_fn(gsm(*inputs))
    loss.backward()
    for n, p in gsm._module.named_parameters():
        assert p.grad is None, f"autograd wrote a gradient into {n}"
    gsm.remove_hooks()
    return probe


def assert_matches_reference(
    model: nn.Module,
    inputs: tuple,
    sample_loss: Callable[[object, int], Tensor],
    batch_size: int,
    modes=("auto", "ghost", "instantiate", "functorch"),
    batch_first: bool = True,
    rtol: float = 1e-10,
) -> None:
    """The engine's norms and clipped sums equal the brute-force ones in every mode (float64).

    ``sample_loss(output, i)`` is sample i's loss given the output of the model on that one sample
    (batch of 1); the batched loss is the sum of these over the batch.
    """
    ref = brute_force_grads(model, inputs, sample_loss, batch_size, batch_first)
    gen = torch.Generator().manual_seed(1)
    factors = torch.rand(batch_size, generator=gen, dtype=torch.float64)

    def batched_loss(y):
        total = 0.0
        for i in range(batch_size):
            total = total + sample_loss(_index(y, i, batch_first), i)
        return total if batch_size else _sum_all(y)

    for mode in modes:
        probe = engine_chunk(model, inputs, batched_loss, mode, factors, batch_first)
        for n, G in ref.items():
            exp_norm = G.square().sum(tuple(range(1, G.dim())))
            exp_sum = torch.tensordot(factors, G, dims=1)
            if n not in probe.norms_sq:
                assert G.abs().max() == 0 if G.numel() else True, f"{mode}: no entry for {n}"
                continue
            _close(probe.norms_sq[n], exp_norm, rtol, f"{mode}: norms of {n}")
            _close(probe.clipped[n], exp_sum, rtol, f"{mode}: clipped sum of {n}")


def _sum_all(y):
    if isinstance(y, Tensor):
        return y.sum() * 0
    return sum(t.sum() * 0 for t in y if isinstance(t, Tensor))


def _close(actual: Tensor, expected: Tensor, rtol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-300) or err == 0.0, f"{what}: max error {err:.3e} vs scale {scale:.3e}"
