"""DPMultiheadAttention: a drop-in nn.MultiheadAttention whose weights live in leaves with exact rules.

* ``in_proj`` (:class:`~veil.layers.leaves.InProjection`) holds the packed ``[3E, E]`` query/key/value
  projection when ``kdim == vdim == embed_dim``: self-attention is one matmul and its per-sample norm
  one Linear ghost norm over the sequence; cross-attention projects each input by its third.
  With other ``kdim``/``vdim``: three :class:`~veil.layers.leaves.BatchFirstLinear` leaves ``q_proj``,
  ``k_proj``, ``v_proj``.
* ``out_proj``: a BatchFirstLinear; ``kv_bias`` (``add_bias_kv=True``): a :class:`KVBias` leaf.

Every leaf is called once on the whole sequence, so the engine computes exact per-sample norms (ghost
norms over the sequence when cheaper) and one-matmul clipped sums.

``state_dict()`` uses nn.MultiheadAttention's keys (``in_proj_weight``/``in_proj_bias``, or
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when kdim/vdim differ, ``out_proj.*``, ``bias_k``,
``bias_v``); ``load_state_dict`` accepts those, the internal keys that ``named_parameters()`` reports
(``in_proj.weight``, ``kv_bias.bias_k``, ...), and Opacus's DPMultiheadAttention keys.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .leaves import BatchFirstLinear, InProjection, KVBias, skip_init_linear

Tensor = torch.Tensor

__all__ = ["DPMultiheadAttention"]


class DPMultiheadAttention(nn.Module):
    """Multi-head attention with exact per-sample gradients; same arguments, inputs and outputs as
    ``nn.MultiheadAttention`` (see its documentation). With ``need_weights=False`` the attention runs
    in ``F.scaled_dot_product_attention``; otherwise the softmax is explicit and the weights are
    returned (averaged over heads when ``average_attn_weights=True``)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} and "
                             f"num_heads={num_heads} instead")
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise AssertionError("embed_dim must be divisible by num_heads")
        self.add_zero_attn = add_zero_attn
        # Same RNG draws, in the same order, as nn.MultiheadAttention: out_proj's default init, then
        # _reset_parameters. The input projections are allocated without drawing.
        if self._qkv_same_embed_dim:
            self.in_proj: Optional[InProjection] = InProjection(embed_dim, bias, device, dtype)
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            self.in_proj = None
            self.q_proj = skip_init_linear(embed_dim, embed_dim, bias, device, dtype)
            self.k_proj = skip_init_linear(self.kdim, embed_dim, bias, device, dtype)
            self.v_proj = skip_init_linear(self.vdim, embed_dim, bias, device, dtype)
        self._has_bias = bias
        self.out_proj = BatchFirstLinear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        if add_bias_kv:
            self.kv_bias: Optional[KVBias] = KVBias(embed_dim, device="meta", dtype=dtype).to_empty(
                device=device if device is not None else torch.get_default_device())
        else:
            self.kv_bias = None
        self.register_state_dict_post_hook(_save_with_torch_names)
        self.register_load_state_dict_pre_hook(_load_any_names)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation (xavier on the packed or separate in-projections)."""
        with torch.no_grad():
            if self.in_proj is not None:
                nn.init.xavier_uniform_(self.in_proj.weight)
                if self.in_proj.bias is not None:
                    self.in_proj.bias.zero_()
            else:
                for proj in (self.q_proj, self.k_proj, self.v_proj):
                    nn.init.xavier_uniform_(proj.weight)
                    if proj.bias is not None:
                        proj.bias.zero_()
            if self.out_proj.bias is not None:
                self.out_proj.bias.zero_()
            if self.kv_bias is not None:
                self.kv_bias.reset_parameters()

    # --------------------------------------------- nn.MultiheadAttention views
    @property
    def in_proj_weight(self) -> Optional[Tensor]:
        """The packed ``[3E, E]`` in-projection parameter, or None when kdim/vdim differ."""
        return None if self.in_proj is None else self.in_proj.weight

    @property
    def in_proj_bias(self) -> Optional[Tensor]:
        """The packed ``[3E]`` in-projection bias (a concatenated copy when kdim/vdim differ), or None."""
        if not self._has_bias:
            return None
        if self.in_proj is not None:
            return self.in_proj.bias
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])

    @property
    def q_proj_weight(self) -> Optional[Tensor]:
        return None if self.q_proj is None else self.q_proj.weight

    @property
    def k_proj_weight(self) -> Optional[Tensor]:
        return None if self.k_proj is None else self.k_proj.weight

    @property
    def v_proj_weight(self) -> Optional[Tensor]:
        return None if self.v_proj is None else self.v_proj.weight

    @property
    def bias_k(self) -> Optional[Tensor]:
        return None if self.kv_bias is None else self.kv_bias.bias_k

    @property
    def bias_v(self) -> Optional[Tensor]:
        return None if self.kv_bias is None else self.kv_bias.bias_v

    def merge_masks(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    query: Tensor) -> Tuple[Optional[Tensor], Optional[int]]:
        """As ``nn.MultiheadAttention.merge_masks`` (used by torch's transformer fast path in eval)."""
        merged, mask_type = None, None
        if key_padding_mask is not None:
            merged, mask_type = key_padding_mask, 1
        if attn_mask is not None:
            B, L, _ = query.shape
            mask_type = 2
            if attn_mask.dim() == 3:
                merged = attn_mask.view(B, -1, L, L)
            else:
                merged = attn_mask.view(1, 1, L, L).expand(B, self.num_heads, -1, -1)
            if key_padding_mask is not None:
                merged = merged + key_padding_mask.view(B, 1, 1, L).expand(-1, self.num_heads, -1, -1)
        return merged, mask_type

    def to_nn_state_dict(self) -> dict:
        """The state_dict in nn.MultiheadAttention's layout (the same as ``state_dict()``)."""
        return self.state_dict()

    @classmethod
    def from_nn(cls, m: nn.MultiheadAttention) -> "DPMultiheadAttention":
        """A DPMultiheadAttention with ``m``'s configuration, weights, trainability and mode."""
        p = m.out_proj.weight
        new = cls(m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                  add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim,
                  batch_first=m.batch_first, device=p.device, dtype=p.dtype)
        new.load_state_dict(m.state_dict())
        frozen = {n for n, q in m.named_parameters() if not q.requires_grad}
        for name, leaves in _torch_to_internal(new).items():
            if name in frozen:
                for leaf in leaves:
                    new.get_parameter(leaf).requires_grad_(False)
        new.train(m.training)
        return new

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Returns ``(attn_output, attn_weights)`` exactly as nn.MultiheadAttention does."""
        is_batched = _shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        key_padding_mask = _canonical_mask(key_padding_mask, "key_padding_mask",
                                           None if attn_mask is None else attn_mask.dtype, "attn_mask", query.dtype)
        attn_mask = _canonical_mask(attn_mask, "attn_mask", None, "", query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention builds the causal mask itself
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal

        # Internally everything is batch-first: [B, L, E] (keeping query is key is value when so).
        if not is_batched:
            query, key, value = _same_map(lambda t: t.unsqueeze(0), query, key, value)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = _same_map(lambda t: t.transpose(0, 1), query, key, value)
        B, L, E = query.shape
        if E != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {E}")
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {tuple(key.shape[:2])} do not match value's "
                                 f"{tuple(value.shape[:2])}")
        S = key.shape[1]
        H, hd = self.num_heads, self.head_dim

        if self.in_proj is not None:
            q, k, v = self.in_proj(query, key, value)
        else:
            q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, but should be "
                                       f"{(L, S)}.")
                attn_mask = attn_mask.view(1, 1, L, S)
            else:
                if tuple(attn_mask.shape) != (B * H, L, S):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should be "
                                       f"{(B * H, L, S)}.")
                attn_mask = attn_mask.view(B, H, L, S)
        if self.kv_bias is not None:
            k, v = self.kv_bias(k, v)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        if self.add_zero_attn:
            zeros = k.new_zeros(B, 1, E)
            k, v = torch.cat([k, zeros], 1), torch.cat([v, zeros], 1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        S = k.shape[1]
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (B, S):
                raise AssertionError(f"Expected key_padding_mask of shape {(B, S)}, got "
                                     f"{tuple(key_padding_mask.shape)}")
            kpm = key_padding_mask.view(B, 1, 1, S)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm

        q = q.view(B, L, H, hd).transpose(1, 2)  # [B, H, L, hd]
        k = k.view(B, S, H, hd).transpose(1, 2)
        v = v.view(B, S, H, hd).transpose(1, 2)
        p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / hd), k.transpose(-2, -1))
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, p, is_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, E))

        if not is_batched:
            return out.squeeze(0), (None if weights is None else weights.squeeze(0))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")


# ------------------------------------------------------------------ masks
def _canonical_mask(mask: Optional[Tensor], name: str, other_type, other_name: str,
                    target: torch.dtype) -> Optional[Tensor]:
    """Boolean masks -> additive float masks (True = not allowed = -inf); float masks unchanged."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    if other_type is not None and mask.dtype != other_type:
        warnings.warn(f"Support for mismatched {name} and {other_name} is deprecated. Use same type for both "
                      "instead.", stacklevel=3)
    if not torch.is_floating_point(mask):
        mask = torch.zeros_like(mask, dtype=target).masked_fill_(mask, float("-inf"))
    return mask


def _shape_check(query, key, value, key_padding_mask, attn_mask, num_heads) -> bool:
    if query.dim() == 3:
        if key.dim() != 3 or value.dim() != 3:
            raise AssertionError("For batched (3-D) `query`, expected `key` and `value` to be 3-D but found "
                                 f"{key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 2:
            raise AssertionError("For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D but "
                                 f"found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError("For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D but "
                                 f"found {attn_mask.dim()}-D tensor instead")
        return True
    if query.dim() == 2:
        if key.dim() != 2 or value.dim() != 2:
            raise AssertionError("For unbatched (2-D) `query`, expected `key` and `value` to be 2-D but found "
                                 f"{key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 1:
            raise AssertionError("For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or 1-D but "
                                 f"found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise AssertionError("For unbatched (2-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D "
                                     f"but found {attn_mask.dim()}-D tensor instead")
            if attn_mask.dim() == 3 and tuple(attn_mask.shape) != (num_heads, query.shape[0], key.shape[0]):
                raise AssertionError(f"Expected `attn_mask` shape to be {(num_heads, query.shape[0], key.shape[0])} "
                                     f"but got {tuple(attn_mask.shape)}")
        return False
    raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor")


# ------------------------------------------------------------- state_dict
def _torch_to_internal(m: DPMultiheadAttention) -> dict:
    """nn.MultiheadAttention key -> internal keys it packs, in nn's state_dict order."""
    names: dict = {}
    if m.in_proj is not None:
        names["in_proj_weight"] = ["in_proj.weight"]
        if m._has_bias:
            names["in_proj_bias"] = ["in_proj.bias"]
    else:
        names.update(q_proj_weight=["q_proj.weight"], k_proj_weight=["k_proj.weight"], v_proj_weight=["v_proj.weight"])
        if m._has_bias:
            names["in_proj_bias"] = ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
    if m.kv_bias is not None:
        names.update(bias_k=["kv_bias.bias_k"], bias_v=["kv_bias.bias_v"])
    names["out_proj.weight"] = ["out_proj.weight"]
    if m.out_proj.bias is not None:
        names["out_proj.bias"] = ["out_proj.bias"]
    return names


_OPACUS_KEYS = {"qlinear.weight": "q_proj.weight", "klinear.weight": "k_proj.weight", "vlinear.weight": "v_proj.weight",
                "qlinear.bias": "q_proj.bias", "klinear.bias": "k_proj.bias", "vlinear.bias": "v_proj.bias",
                "seq_bias_k.bias": "kv_bias.bias_k", "seq_bias_v.bias": "kv_bias.bias_v"}


def _save_with_torch_names(module: DPMultiheadAttention, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: write nn.MultiheadAttention's keys (packing q/k/v when nn would)."""
    entries = {}
    for tname, internal in _torch_to_internal(module).items():
        parts = [state_dict.pop(prefix + k) for k in internal if prefix + k in state_dict]
        if len(parts) == len(internal):
            entries[prefix + tname] = parts[0] if len(parts) == 1 else torch.cat(parts)
    state_dict.update(entries)


def _load_any_names(module: DPMultiheadAttention, state_dict: dict, prefix: str, local_metadata, strict,
                    missing_keys, unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: accept nn.MultiheadAttention's and Opacus's keys besides the internal ones."""
    for old, new in _OPACUS_KEYS.items():
        if prefix + old in state_dict:
            t = state_dict.pop(prefix + old)
            state_dict[prefix + new] = t.reshape(1, 1, -1) if new.startswith("kv_bias") else t
    if module.in_proj is not None:  # separate q/k/v tensors (Opacus's layout) -> the packed parameter
        for kind in ("weight", "bias"):
            parts = [prefix + f"{x}_proj.{kind}" for x in "qkv"]
            if all(k in state_dict for k in parts):
                state_dict[prefix + f"in_proj.{kind}"] = torch.cat([state_dict.pop(k) for k in parts])
    for tname, internal in _torch_to_internal(module).items():
        if tname in internal or prefix + tname not in state_dict:
            continue
        t = state_dict.pop(prefix + tname)
        parts = t.chunk(len(internal)) if len(internal) > 1 else [t]
        if len(internal) > 1 and t.shape[0] % len(internal):
            error_msgs.append(f"size mismatch for {prefix + tname}: cannot split {tuple(t.shape)} into "
                              f"{len(internal)} projections")
            continue
        for k, part in zip(internal, parts):
            state_dict[prefix + k] = part.clone() if len(internal) > 1 else part


def _same_map(fn, query: Tensor, key: Tensor, value: Tensor):
    """fn applied to each of query, key, value, computing it once for arguments that are the same tensor."""
    q = fn(query)
    k = q if key is query else fn(key)
    v = k if value is key else (q if value is query else fn(value))
    return q, k, v


def from_mha(m: nn.MultiheadAttention) -> DPMultiheadAttention:
    """Converter for ModuleValidator.fix."""
    return DPMultiheadAttention.from_nn(m)
