"""Fallback rule for any module that owns parameters and has no rule: torch.func per-sample vjp.

The module's forward is replayed one sample at a time under ``torch.func.vmap`` and differentiated
against that sample's output gradient. It needs only that the module treats samples independently,
which any layer that may be trained with DP must do.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten

from . import state
from .rules.base import Call, Rule, batch_size_of

Tensor = torch.Tensor


class FunctorchRule(Rule):
    """Per-sample gradients of an arbitrary module by vmap(grad(⟨f(x_i), g_i⟩))."""

    sequence_input = True

    def feature_dims(self, module: nn.Module) -> int:
        return 0

    def capture(self, module: nn.Module, args: tuple, kwargs: dict, batch_first: bool):
        bdims = tuple(0 if batch_first or not isinstance(a, Tensor) or a.dim() < 2 else 1 for a in args)
        args = tuple(a.detach().movedim(b, 0) if isinstance(a, Tensor) else a for a, b in zip(args, bdims))
        return args, dict(kwargs), bdims

    def per_sample(self, module: nn.Module, calls: List[Call], names: List[str]) -> Dict[str, Tensor]:
        own = dict(module.named_parameters(recurse=False))
        buffers = dict(module.named_buffers())
        total: Dict[str, Tensor] = {}
        B = batch_size_of(calls)
        if B == 0:
            return {n: own[n].new_zeros((0, *own[n].shape)) for n in names}
        for call in calls:
            args, kwargs, bdims = call.ctx
            grads = call.grad if isinstance(call.grad, tuple) else (call.grad,)
            batched = [isinstance(a, Tensor) for a in args]
            tensor_args = tuple(a for a in args if isinstance(a, Tensor))
            fixed = {n: p.detach() for n, p in own.items() if n not in names}

            def sample_loss(trained, xs, gs):
                it = iter(xs)
                call_args = tuple(next(it).unsqueeze(d) if b else a for a, b, d in zip(args, batched, bdims))
                out = functional_call(module, {**trained, **fixed, **buffers}, call_args, kwargs)
                outs = [o for o in tree_flatten(out)[0] if isinstance(o, Tensor) and o.is_floating_point()]
                d = bdims[0] if bdims else 0
                return sum((o.squeeze(d if o.dim() > 1 else 0) * gi).sum() for o, gi in zip(outs, gs))

            trained = {n: own[n].detach() for n in names}
            with state.replaying():
                per = vmap(grad(sample_loss), in_dims=(None, 0, 0))(trained, tensor_args, grads)
            for n in names:
                total[n] = per[n] if n not in total else total[n] + per[n]
        return total
