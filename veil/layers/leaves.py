"""Small parameter-owning leaf modules used inside Veil's DP layers, and their per-sample rules.

The DP layers keep every parameter inside one of these leaves so the engine sees exactly how each
parameter is used. The leaves always take the batch in dimension 0, whatever the layout of the
layer that owns them and whatever ``batch_first`` the :class:`~veil.GradSampleModule` was given, so
their rules never move dimensions (``sequence_input = False``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..grad_sample import state
from ..grad_sample.rules.base import Call, LayerGrads, Rule, norm_dtype, register_rule
from ..grad_sample.rules.linear import LinearRule, flat3, linear_layer_grads
from ..grad_sample.gemm import linear, onednn_applies

Tensor = torch.Tensor

__all__ = ["BatchFirstLinear", "KVBias", "InProjection"]


class BatchFirstLinear(nn.Linear):
    """An ``nn.Linear`` whose input always has the batch in dimension 0: ``[B, d]`` or ``[B, T, d]``.

    Numerically identical to ``nn.Linear``. Its rule is the Linear rule (ghost norms over the
    time axis and over repeated calls, one-matmul clipped sums) without the ``batch_first``
    reinterpretation that the engine applies to user-facing sequence layers.

    ``forward(input, values)``: when the caller has already computed ``input @ W.T + b`` (a
    recurrent layer computes it step by step inside its scan), it passes those ``values`` and gets
    them back without a second matmul; autograd and the engine still see ``F.linear(input, W, b)``
    (its backward is the Linear backward). Under a torch.func replay the values are recomputed.
    Products run on oneDNN where it applies (see :mod:`veil.grad_sample.gemm`).
    """

    def forward(self, input: Tensor, values: Optional[Tensor] = None) -> Tensor:
        if state.is_replaying():
            return F.linear(input, self.weight, self.bias)
        if values is None:
            if (not onednn_applies(input) or self.weight.dtype != input.dtype
                    or torch.is_autocast_enabled(input.device.type)):  # autocast picks F.linear's dtype
                return F.linear(input, self.weight, self.bias)
            with torch.no_grad():
                values = linear(input, self.weight, self.bias)
        return _KnownLinear.apply(values, input, self.weight, self.bias)


class _KnownLinear(torch.autograd.Function):
    """``F.linear(input, weight, bias)`` whose forward value is already known, returned whole or as
    ``chunks`` equal slices of its last dimension (the packed q, k, v of an attention layer). With
    slices, the input gradient is the sum of each slice's product with its rows of the weight, so
    their gradients are never joined into a copy (autograd's backward of ``chunk`` would)."""

    @staticmethod
    def forward(ctx, values, input, weight, bias, chunks=1):
        ctx.save_for_backward(input, weight)
        ctx.has_bias, ctx.chunks = bias is not None, chunks
        values = values.detach()
        return values if chunks == 1 else tuple(values.chunk(chunks, -1))

    @staticmethod
    def backward(ctx, *grads):  # unused slices arrive as zeros (gradients are materialized)
        input, weight = ctx.saved_tensors
        _, need_in, need_w, need_b = ctx.needs_input_grad[:4]
        d_in = None
        if need_in:  # Σ_s g_s @ W_s, on oneDNN where it applies
            for g, w in zip(grads, weight.chunk(ctx.chunks, 0)):
                part = linear(g, w.t())  # oneDNN reads the transposed view directly
                d_in = part if d_in is None else d_in.add_(part)
        d_w = d_b = None
        if need_w or (need_b and ctx.has_bias):  # outside the engine: ordinary gradients
            g2, a2 = _rows(grads[0] if ctx.chunks == 1 else torch.cat(grads, -1), input)
            d_w = linear(g2.t(), a2.t()) if need_w else None  # g2ᵀ a2 (on oneDNN where it applies)
            d_b = g2.sum(0) if (need_b and ctx.has_bias) else None
        return None, d_in, d_w, d_b, None


def _rows(g: Tensor, a: Tensor) -> Tuple[Tensor, Tensor]:
    """``g`` [B, T, p] and ``a`` [B, T, d] as matrices of rows in the same order, without copying
    when both are time-major buffers seen batch-first."""
    if g.dim() == 3 and not g.is_contiguous() and g.transpose(0, 1).is_contiguous() \
            and a.transpose(0, 1).is_contiguous():
        g, a = g.transpose(0, 1), a.transpose(0, 1)
    return g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1])


@register_rule(BatchFirstLinear)
class BatchFirstLinearRule(LinearRule):
    """The Linear rule for inputs whose batch is always dimension 0."""

    sequence_input = False


class KVBias(nn.Module):
    """Holds ``bias_k`` and ``bias_v`` of an attention layer (``add_bias_kv=True``).

    ``forward(k, v)`` appends them as one extra key/value position: ``[B, S, E] -> [B, S + 1, E]``.
    The parameters have nn.MultiheadAttention's shape ``[1, 1, E]``.
    """

    def __init__(self, embed_dim: int, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **kw))
        self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.bias_k)
        nn.init.xavier_normal_(self.bias_v)

    def forward(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        B = k.shape[0]
        k = torch.cat([k, self.bias_k.expand(B, 1, -1)], 1)
        v = torch.cat([v, self.bias_v.expand(B, 1, -1)], 1)
        return k, v


@register_rule(KVBias)
class KVBiasRule(Rule):
    """Sample i's gradient of ``bias_k`` is the output gradient at its appended key position."""

    sequence_input = False

    def capture(self, module: nn.Module, args: tuple, kwargs: dict, batch_first: bool) -> None:
        return None

    def per_sample(self, module: nn.Module, calls: List[Call], names: List[str]) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for call in calls:
            gk, gv = call.grad
            for name, g in (("bias_k", gk), ("bias_v", gv)):
                if name in names:
                    gs = g[:, -1:, :].unsqueeze(1)  # [B, 1, 1, E]
                    out[name] = gs if name not in out else out[name] + gs
        return out


def skip_init_linear(in_features: int, out_features: int, bias: bool, device=None, dtype=None) -> BatchFirstLinear:
    """A BatchFirstLinear with uninitialised weights that draws nothing from the global RNG."""
    m = BatchFirstLinear(in_features, out_features, bias=bias, device="meta", dtype=dtype)
    return m.to_empty(device=device if device is not None else torch.get_default_device())


class InProjection(nn.Module):
    """The packed query/key/value projection of an attention layer: ``weight`` [3E, E], ``bias`` [3E].

    ``forward(query, key, value) -> (q, k, v)`` (batch first). For self-attention (``query is key is
    value``) it is one matmul, and its rule sees one Linear call with a [B, T, 3E] output gradient, so
    the per-sample norm needs one input Gram matrix instead of three. For cross-attention each input is
    projected by its third of the weight and the rule adds the three slices' norms.
    """

    def __init__(self, embed_dim: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(3 * embed_dim, **kw))
        else:
            self.register_parameter("bias", None)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if query is key and key is value:
            if (state.is_replaying() or not onednn_applies(query) or self.weight.dtype != query.dtype
                    or torch.is_autocast_enabled(query.device.type)):
                return tuple(F.linear(query, self.weight, self.bias).chunk(3, -1))  # type: ignore[return-value]
            with torch.no_grad():
                values = linear(query, self.weight, self.bias)
            return _KnownLinear.apply(values, query, self.weight, self.bias, 3)
        E = self.embed_dim
        ws = self.weight.split(E)
        bs = self.bias.split(E) if self.bias is not None else (None, None, None)
        return (F.linear(query, ws[0], bs[0]), F.linear(key, ws[1], bs[1]), F.linear(value, ws[2], bs[2]))


@register_rule(InProjection)
class InProjectionRule(Rule):
    """Per-sample gradients of the packed projection from its inputs and the gradients of q, k, v."""

    sequence_input = False

    def capture(self, module: nn.Module, args: tuple, kwargs: dict, batch_first: bool):
        q, k, v = args[:3]
        if q is k and k is v:
            return (q.detach(),)
        return (q.detach(), k.detach(), v.detach())

    def _parts(self, calls: List[Call]):
        """Per slice (q, k, v): inputs and output gradients of all calls, joined along T (for
        self-attention the three inputs are one tensor)."""
        a = [[], [], []]
        g = [[], [], []]
        for c in calls:
            xs = c.ctx * 3 if len(c.ctx) == 1 else c.ctx
            for s in range(3):
                a[s].append(flat3(xs[s]))
                g[s].append(flat3(c.grad[s]))
        if all(len(c.ctx) == 1 for c in calls):
            shared = _join_t(a[0])
            return [shared] * 3, [_join_t(x) for x in g]
        return [_join_t(x) for x in a], [_join_t(x) for x in g]

    def layer_grads(self, module: nn.Module, calls: List[Call], names: List[str], mode: str) -> LayerGrads:
        # One Linear per slice (q, k, v), its rows of the weight. For self-attention the three slices
        # share their input, whose Gram matrix is then computed once (state.shared_products), and the
        # gradients of q, k and v are used where they are, not joined into a [B, T, 3E] copy.
        dt = norm_dtype(calls[0].grad[0].dtype)
        a, g = self._parts(calls)
        a = [a[0].to(dt)] * 3 if a[0] is a[1] is a[2] else [x.to(dt) for x in a]
        return _StackedGrads([linear_layer_grads(a[s], g[s].to(dt), names, mode) for s in range(3)])

    def per_sample(self, module: nn.Module, calls: List[Call], names: List[str]) -> Dict[str, Tensor]:
        return self.layer_grads(module, calls, names, "instantiate").per_sample()


class _StackedGrads(LayerGrads):
    """A parameter made of row blocks, each with its own LayerGrads: norms add, sums concatenate."""

    def __init__(self, parts: List[LayerGrads]):
        self.parts = parts
        self.norms_sq = {n: sum(p.norms_sq[n] for p in parts) for n in parts[0].norms_sq}

    def clipped_sum(self, factors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        sums = [p.clipped_sum(factors) for p in self.parts]
        return {n: torch.cat([s[n] for s in sums], 0) for n in factors}

    def add_clipped_sum_(self, name: str, factors: Tensor, out: Tensor) -> None:
        """Each block adds its sum into its own rows of ``out``."""
        for part, rows in zip(self.parts, out.chunk(len(self.parts), 0)):
            part.add_clipped_sum_(name, factors, rows)

    def per_sample(self) -> Dict[str, Tensor]:
        per = [p.per_sample() for p in self.parts]
        return {n: torch.cat([q[n] for q in per], 1) for n in per[0]}


def _join_t(ts: List[Tensor]) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, 1)
