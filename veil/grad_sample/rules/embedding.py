"""nn.Embedding and nn.EmbeddingBag: per-sample gradients held as scattered rows.

Sample i's gradient of the table is nonzero only on the rows it looked up:
G_i[v] = Σ_{tokens t of sample i with id v} w_t g_t, where g_t is the output gradient the token
fed (the bag's, for EmbeddingBag) and w_t its weight (1, a per-sample weight, or 1/bag size for
mean bags). The rule sums the token rows per (sample, id) into one small buffer; from it the norms
‖G_i‖² = Σ_{s,t: id_s = id_t} w_s w_t g_s·g_t and the clipped sum (one index_add into a [V, D]
table) follow without ever forming B copies of the table. Rows of ``padding_idx`` get no gradient.

For nn.Embedding, ``scale_grad_by_freq`` divides each token's contribution by how often its id
occurs in the same sample (in the same call). PyTorch counts over the whole batch, which would make
one sample's gradient depend on the others; under DP the count is per sample, as in
one-sample-at-a-time autograd.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .base import Call, InstantiatedGrads, LayerGrads, Rule, norm_dtype, one_thread, register_rule

Tensor = torch.Tensor
AnyEmbedding = nn.Embedding | nn.EmbeddingBag


class EmbeddingScatterGrads(LayerGrads):
    """Per-sample table gradients as rows ``buf[r]`` at (sample[r], ids[r]), each pair once."""

    def __init__(self, sample: Tensor, ids: Tensor, rows: Tensor, batch_size: int, num_embeddings: int):
        """``rows[n]`` is token n's contribution to G_{sample[n]}[ids[n]]; pairs may repeat."""
        V = num_embeddings
        with one_thread():
            key, inv = torch.unique(sample * V + ids, return_inverse=True)
            self.buf = rows.new_zeros(len(key), rows.shape[1]).index_add_(0, inv, rows)
            self.sample, self.ids = key // V, key % V
            sq = self.buf.square().sum(1)
            self.norms_sq = {"weight": sq.new_zeros(batch_size).index_add_(0, self.sample, sq)}
        self.batch_size, self.num_embeddings = batch_size, V

    def clipped_sum(self, factors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        if "weight" not in factors:
            return {}
        c = factors["weight"].to(self.buf.dtype)
        table = self.buf.new_zeros(self.num_embeddings, self.buf.shape[1])
        with one_thread():
            return {"weight": table.index_add_(0, self.ids, self.buf * c[self.sample, None])}

    def add_clipped_sum_(self, name: str, factors: Tensor, out: Tensor) -> None:
        """Scatter the clipped rows straight into ``out``: no table-sized temporary."""
        if out.dtype != self.buf.dtype:
            return super().add_clipped_sum_(name, factors, out)
        with one_thread():
            out.index_add_(0, self.ids, self.buf * factors.to(self.buf.dtype)[self.sample, None])

    def per_sample(self) -> Dict[str, Tensor]:
        B, V, D = self.batch_size, self.num_embeddings, self.buf.shape[1]
        dense = self.buf.new_zeros(B * V, D).index_add_(0, self.sample * V + self.ids, self.buf)
        return {"weight": dense.view(B, V, D)}


def check_supported(module: AnyEmbedding) -> None:
    """Refuse the options under which the per-sample gradient is not what the rule computes."""
    name = type(module).__name__
    if module.max_norm is not None:
        raise ValueError(
            f"{name}(max_norm={module.max_norm}) is not supported under differential privacy: max_norm "
            "renormalises rows of the weight in place during forward, outside the clipped gradient. "
            "Construct the layer with max_norm=None."
        )
    if module.sparse:
        raise ValueError(f"{name}(sparse=True) is not supported under differential privacy; use sparse=False.")


def per_sample_freq(sample: Tensor, ids: Tensor) -> Tensor:
    """For each token, how many tokens of the same sample share its id."""
    _, inv, counts = torch.unique(sample * (int(ids.max()) + 1) + ids, return_inverse=True, return_counts=True)
    return counts[inv]


class _ScatterRule(Rule):
    """Shared by both layers: ``tokens`` turns each call into (sample, id, row) triples."""

    def tokens(self, module: AnyEmbedding, call: Call) -> Tuple[Tensor, Tensor, Tensor]:
        """One call's token contributions, in at least fp32, without ``padding_idx`` tokens."""
        raise NotImplementedError

    def scatter(self, module: AnyEmbedding, calls: List[Call]) -> EmbeddingScatterGrads:
        sample, ids, rows = (torch.cat(parts) for parts in zip(*(self.tokens(module, c) for c in calls)))
        return EmbeddingScatterGrads(sample, ids, rows, calls[0].grad.shape[0], module.num_embeddings)

    def per_sample(self, module: AnyEmbedding, calls: List[Call], names: List[str]) -> Dict[str, Tensor]:
        return self.scatter(module, calls).per_sample()

    def layer_grads(self, module: AnyEmbedding, calls: List[Call], names: List[str], mode: str) -> LayerGrads:
        """The scattered form in 'auto' and 'ghost'; B dense [V, D] copies only when asked."""
        lg = self.scatter(module, calls)
        return InstantiatedGrads(lg.per_sample()) if mode == "instantiate" else lg


@register_rule(nn.Embedding)
class EmbeddingRule(_ScatterRule):
    """nn.Embedding with ids [B, *] (or [T, B, *] when not batch_first); padding_idx honoured."""

    sequence_input = True

    def feature_dims(self, module: nn.Embedding) -> int:
        return 0

    def capture(self, module: nn.Embedding, args: tuple, kwargs: dict, batch_first: bool) -> Tensor:
        check_supported(module)
        return super().capture(module, args, kwargs, batch_first)

    def tokens(self, module: nn.Embedding, call: Call) -> Tuple[Tensor, Tensor, Tensor]:
        ids, g = call.ctx, call.grad
        B = g.shape[0]
        ids = ids.reshape(B, math.prod(ids.shape[1:]))
        sample = torch.arange(B, device=ids.device).repeat_interleave(ids.shape[1])
        ids = ids.reshape(-1)
        rows = g.reshape(-1, module.embedding_dim).to(norm_dtype(g.dtype))
        if module.scale_grad_by_freq and len(ids):
            rows = rows / per_sample_freq(sample, ids).unsqueeze(1)
        if module.padding_idx is not None:
            keep = ids != module.padding_idx
            sample, ids, rows = sample[keep], ids[keep], rows[keep]
        return sample, ids, rows


@register_rule(nn.EmbeddingBag)
class EmbeddingBagRule(_ScatterRule):
    """nn.EmbeddingBag in mode 'sum' or 'mean': bags are the samples (row i of 2-D input, or bag i)."""

    def capture(self, module: nn.EmbeddingBag, args: tuple, kwargs: dict, batch_first: bool):
        """Each looked-up id, ``padding_idx`` dropped, as (bag, id, per-sample weight, divisor):
        its row is the bag's output gradient · weight / divisor.

        The divisor is the number of non-padding ids in the bag for mean bags (an integer, so exact
        in any precision).
        """
        check_supported(module)
        if module.mode not in ("sum", "mean"):
            raise ValueError(
                f"EmbeddingBag(mode={module.mode!r}) is not supported by Veil's per-sample rule; "
                "use mode='sum' or 'mean'."
            )
        if module.scale_grad_by_freq:
            raise ValueError(
                "EmbeddingBag(scale_grad_by_freq=True) is not supported by Veil's per-sample rule: the "
                "frequencies are batch statistics, and PyTorch's CPU kernel applies them to the wrong rows "
                "(pytorch/pytorch#190063), so there is no reference to match. Use scale_grad_by_freq=False, "
                "or nn.Embedding(scale_grad_by_freq=True) followed by a sum or mean."
            )
        names = ("input", "offsets", "per_sample_weights")
        given = {**dict(zip(names, args)), **kwargs}
        x, offsets, psw = (given.get(n) for n in names)
        sample, pos = bag_positions(module, x, offsets)
        ids = x.reshape(-1)[pos]
        psw = None if psw is None else psw.detach().reshape(-1)[pos]
        if module.padding_idx is not None:
            keep = ids != module.padding_idx
            sample, ids = sample[keep], ids[keep]
            psw = None if psw is None else psw[keep]
        divisor = torch.bincount(sample)[sample] if module.mode == "mean" else None
        return sample, ids, psw, divisor

    def tokens(self, module: nn.EmbeddingBag, call: Call) -> Tuple[Tensor, Tensor, Tensor]:
        sample, ids, psw, divisor = call.ctx
        g = call.grad.to(norm_dtype(call.grad.dtype))
        rows = g[sample]
        if psw is not None:
            rows = rows * psw.to(g.dtype).unsqueeze(1)
        if divisor is not None:
            rows = rows / divisor.unsqueeze(1)
        return sample, ids, rows


def bag_positions(module: nn.EmbeddingBag, x: Tensor, offsets: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """For every looked-up id: its bag and its position in the flattened input."""
    if x.dim() == 2:
        B, L = x.shape
        return torch.arange(B, device=x.device).repeat_interleave(L), torch.arange(B * L, device=x.device)
    B = len(offsets) - 1 if module.include_last_offset else len(offsets)
    starts = offsets[:B]
    ends = offsets[1 : B + 1] if module.include_last_offset else torch.cat([offsets[1:], offsets.new_tensor([len(x)])])
    lengths = ends - starts
    sample = torch.arange(B, device=x.device).repeat_interleave(lengths)
    first = torch.cumsum(lengths, 0) - lengths  # where each bag starts among the gathered positions
    pos = torch.arange(len(sample), device=x.device) + (starts - first).repeat_interleave(lengths)
    return sample, pos
