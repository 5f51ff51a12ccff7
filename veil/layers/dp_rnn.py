"""DPRNN, DPGRU, DPLSTM: drop-in replacements for nn.RNN / nn.GRU / nn.LSTM with exact per-sample clipping.

Each layer and direction keeps its weights in small ``BatchFirstLinear`` leaves:

* ``ih``: input -> gates, called ONCE on the whole sequence ``[B, T, d]`` (one matmul);
* ``hh``: hidden -> gates (its bias is ``b_hh``), called once per time step on ``[B, h]``. The
  engine joins the calls of one module along the time axis, so its per-sample norm is a ghost norm
  over time (Gram matrices of ``T x T``) and its clipped sum is one matmul;
* ``hr`` (LSTM with ``proj_size > 0``): the projection ``h = W_hr (o * tanh(c))``, called per step.

Forward signatures, outputs, PackedSequence handling and initial states follow ``torch.nn``. The
``state_dict`` uses torch's key names (``weight_ih_l0``, ``bias_hh_l1_reverse``, ``weight_hr_l0``,
...), so checkpoints move freely between ``nn.LSTM`` and ``DPLSTM``; ``load_state_dict`` also accepts
the internal names (``l0.ih.weight``) that ``named_parameters()`` reports.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..grad_sample.gemm import linear
from ._recurrence import Recurrence, scan
from .leaves import skip_init_linear

Tensor = torch.Tensor

__all__ = ["DPRNNBase", "DPRNN", "DPGRU", "DPLSTM"]

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}
# (nn name stem, internal leaf, leaf parameter), in torch's parameter order
_SLOTS = (("weight_ih", "ih", "weight"), ("weight_hh", "hh", "weight"), ("bias_ih", "ih", "bias"),
          ("bias_hh", "hh", "bias"), ("weight_hr", "hr", "weight"))


class _Direction(nn.Module):
    """The weights of one layer in one direction: ``ih``, ``hh`` and (LSTM projection) ``hr``."""

    def __init__(self, input_size: int, hidden_size: int, gates: int, bias: bool, proj_size: int,
                 device=None, dtype=None):
        super().__init__()
        real_hidden = proj_size if proj_size > 0 else hidden_size
        self.ih = skip_init_linear(input_size, gates * hidden_size, bias, device, dtype)
        self.hh = skip_init_linear(real_hidden, gates * hidden_size, bias, device, dtype)
        if proj_size > 0:
            self.hr = skip_init_linear(hidden_size, proj_size, False, device, dtype)


class DPRNNBase(nn.Module):
    """Shared machinery of :class:`DPRNN`, :class:`DPGRU` and :class:`DPLSTM` (not used directly)."""

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if mode not in _GATES:
            raise ValueError(f"Unrecognized RNN mode: {mode}")
        if (not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool)):
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             "element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                          stacklevel=2)
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError("hidden_size must be an integer greater than zero")
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError("num_layers must be an integer greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if proj_size and mode != "LSTM":
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        D = 2 if bidirectional else 1
        out_size = proj_size if proj_size > 0 else hidden_size
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else out_size * D
            for d in range(D):
                self.add_module(_leaf_name(layer, d), _Direction(layer_in, hidden_size, _GATES[mode], bias, proj_size,
                                                                 device, dtype))
        self._leaf_names = [_leaf_name(l, d) for l in range(num_layers) for d in range(D)]
        self.register_state_dict_post_hook(_save_with_torch_names)
        self.register_load_state_dict_pre_hook(_load_torch_names)
        self.reset_parameters()

    # ------------------------------------------------------------- parameters
    @property
    def _flat_weights_names(self) -> List[str]:
        """torch's parameter names, in torch's order."""
        return list(self._torch_names())

    def _torch_names(self) -> Dict[str, Tuple[str, str, str]]:
        """torch name -> (direction leaf, sub leaf, parameter), in torch's order."""
        names: Dict[str, Tuple[str, str, str]] = {}
        for layer in range(self.num_layers):
            for d in range(2 if self.bidirectional else 1):
                leaf = _leaf_name(layer, d)
                sfx = leaf[len(f"l{layer}"):]
                for stem, sub, pname in _SLOTS:
                    if (sub == "hr" and self.proj_size == 0) or (pname == "bias" and not self.bias):
                        continue
                    names[f"{stem}_l{layer}{sfx}"] = (leaf, sub, pname)
        return names

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        """Parameters grouped per layer and direction, in torch's order (as ``nn.RNNBase.all_weights``)."""
        groups: Dict[str, List[nn.Parameter]] = {}
        for leaf, sub, pname in self._torch_names().values():
            groups.setdefault(leaf, []).append(getattr(getattr(self._modules[leaf], sub), pname))
        return list(groups.values())

    def reset_parameters(self) -> None:
        """torch's initialisation: U(-1/√h, 1/√h), drawn in torch's parameter order (same RNG stream)."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        with torch.no_grad():
            for group in self.all_weights:
                for w in group:
                    nn.init.uniform_(w, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """No-op, for code written against ``nn.RNNBase`` (there is no cuDNN weight buffer here)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith(("weight_", "bias_")) and "_modules" in self.__dict__:
                loc = self._torch_names().get(name)
                if loc is not None:
                    return getattr(getattr(self._modules[loc[0]], loc[1]), loc[2])
            raise

    def __setattr__(self, name: str, value) -> None:
        if name.startswith(("weight_", "bias_")) and "_modules" in self.__dict__ and "_leaf_names" in self.__dict__:
            loc = self._torch_names().get(name)
            if loc is not None:
                setattr(getattr(self._modules[loc[0]], loc[1]), loc[2], value)
                return
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)

    # ---------------------------------------------------------------- forward
    def forward(self, input: Union[Tensor, PackedSequence], hx=None):
        """Same inputs and outputs as the torch module (see ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``)."""
        is_lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths, rows = _unpack(input)
            batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            if not batched:
                x = input.unsqueeze(0)
            else:
                x = input if self.batch_first else input.transpose(0, 1)
            lengths = None
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {x.shape[-1]}")
        B, T = x.shape[0], x.shape[1]
        if T == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        D = 2 if self.bidirectional else 1
        h0, c0 = self._initial_state(hx, B, batched, x)
        masks = None
        if lengths is not None and bool((lengths < T).any()):
            steps = torch.arange(T, device=x.device)
            masks = (steps.unsqueeze(0) < lengths.to(x.device).unsqueeze(1)).unsqueeze(2)  # [B, T, 1]

        layer_input = x
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                k = layer * D + d
                out, h, c = self._run(self._modules[self._leaf_names[k]], layer_input, h0[k], None if c0 is None else c0[k],
                                      d == 1, masks)
                outs.append(out)
                h_n.append(h)
                if is_lstm:
                    c_n.append(c)
            layer_input = outs[0] if D == 1 else torch.cat(outs, 2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)

        hidden: Tensor = torch.stack(h_n, 0)
        state = (hidden, torch.stack(c_n, 0)) if is_lstm else hidden
        if packed:
            output = PackedSequence(layer_input[rows[0], rows[1]], input.batch_sizes, input.sorted_indices,
                                    input.unsorted_indices)
            return output, state
        if not batched:
            output = layer_input.squeeze(0)
            state = tuple(s.squeeze(1) for s in state) if is_lstm else state.squeeze(1)
            return output, state
        return (layer_input if self.batch_first else layer_input.transpose(0, 1)), state

    def _initial_state(self, hx, B: int, batched: bool, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        D = 2 if self.bidirectional else 1
        L = self.num_layers * D
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        is_lstm = self.mode == "LSTM"
        if hx is None:
            h0 = x.new_zeros(L, B, out_size)
            return h0, (x.new_zeros(L, B, self.hidden_size) if is_lstm else None)
        if is_lstm:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise ValueError("LSTM expects hx to be a tuple (h_0, c_0)")
            h0, c0 = hx
        else:
            if isinstance(hx, (tuple, list)):
                raise ValueError(f"{type(self).__name__} expects hx to be a Tensor, got a tuple")
            h0, c0 = hx, None
        expect_dim = 3 if batched else 2
        for name, t in (("hx[0]" if is_lstm else "hx", h0), ("hx[1]", c0)):
            if t is not None and t.dim() != expect_dim:
                raise RuntimeError(f"For {'batched' if batched else 'unbatched'} {expect_dim}-D input, {name} should "
                                   f"also be {expect_dim}-D but got {t.dim()}-D tensor")
        if not batched:
            h0 = h0.unsqueeze(1)
            c0 = None if c0 is None else c0.unsqueeze(1)
        _check_size(h0, (L, B, out_size), "Expected hidden size" if not is_lstm else "Expected hidden[0] size")
        if c0 is not None:
            _check_size(c0, (L, B, self.hidden_size), "Expected hidden[1] size")
        return h0, c0

    # One direction of one layer. x: [B, T, d] -> out [B, T, h_out], final h (and c).
    def _run(self, cell: _Direction, x: Tensor, h0: Tensor, c0: Optional[Tensor], reverse: bool,
             masks: Optional[Tensor]):
        with torch.no_grad():  # the input projection of every step, one matmul (on oneDNN where it applies)
            xg_values = linear(x, cell.ih.weight, cell.ih.bias)
        xg = cell.ih(x, xg_values)  # [B, T, G*h], engine-visible as one Linear call
        proj = self.proj_size > 0
        with torch.no_grad():
            s = scan(self.mode, xg_values, cell.hh.bias, cell.hh.weight, cell.hr.weight if proj else None,
                     h0.detach(), None if c0 is None else c0.detach(), reverse, masks)
        if not torch.is_grad_enabled():
            return s.out, s.hT, s.cT
        # Engine-visible calls of the recurrent weights, one per sequence, returning the scan's values.
        z = cell.hh(s.h_prev(), s.z)
        p = cell.hr(s.extra["M"], s.out) if proj else None
        res = Recurrence.apply(s, xg, z, p, h0, c0)
        return res if self.mode == "LSTM" else (res[0], res[1], None)


class DPRNN(DPRNNBase):
    """Drop-in ``nn.RNN`` (tanh or relu) with exact per-sample gradients. Same arguments and outputs."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None):
        if nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         0, device, dtype)
        self.nonlinearity = nonlinearity


class DPGRU(DPRNNBase):
    """Drop-in ``nn.GRU`` with exact per-sample gradients. Same arguments and outputs.

    The reset gate multiplies ``W_hn h + b_hn`` as in torch, so ``b_hn`` lives in the ``hh`` leaf.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         0, device, dtype)


class DPLSTM(DPRNNBase):
    """Drop-in ``nn.LSTM`` (including ``proj_size``) with exact per-sample gradients. Same arguments and
    outputs: ``output, (h_n, c_n)``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype)


# ------------------------------------------------------------------ helpers
def _leaf_name(layer: int, direction: int) -> str:
    return f"l{layer}" + ("_reverse" if direction else "")


def _check_size(t: Tensor, expected: tuple, msg: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise RuntimeError(f"{msg} {tuple(expected)}, got {tuple(t.shape)}")


def _unpack(ps: PackedSequence) -> Tuple[Tensor, Tensor, Tuple[Tensor, Tensor]]:
    """PackedSequence -> padded [B, T, d] in the caller's sample order, lengths [B], and for every packed
    row its (sample, step) position."""
    data, batch_sizes, sorted_idx = ps.data, ps.batch_sizes, ps.sorted_indices
    bs = batch_sizes.to("cpu", torch.long)
    T, B, N = len(bs), int(bs[0]), data.shape[0]
    t_idx = torch.repeat_interleave(torch.arange(T), bs)
    starts = torch.cumsum(bs, 0) - bs
    slot = torch.arange(N) - torch.repeat_interleave(starts, bs)  # position in the length-sorted batch
    lengths_sorted = (bs.unsqueeze(0) > torch.arange(B).unsqueeze(1)).sum(1)
    if sorted_idx is not None:
        sorted_cpu = sorted_idx.to("cpu", torch.long)
        sample = sorted_cpu[slot]
        lengths = torch.empty_like(lengths_sorted)
        lengths[sorted_cpu] = lengths_sorted
    else:
        sample, lengths = slot, lengths_sorted
    sample, t_idx = sample.to(data.device), t_idx.to(data.device)
    x = data.new_zeros(B, T, data.shape[-1]).index_put((sample, t_idx), data)
    return x, lengths, (sample, t_idx)


def _save_with_torch_names(module: DPRNNBase, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: internal keys (``l0.ih.weight``) -> torch keys (``weight_ih_l0``), torch's order."""
    moved = {}
    for tname, (leaf, sub, pname) in module._torch_names().items():
        key = f"{prefix}{leaf}.{sub}.{pname}"
        if key in state_dict:
            moved[prefix + tname] = state_dict.pop(key)
    state_dict.update(moved)


def _load_torch_names(module: DPRNNBase, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: accept torch keys (``weight_ih_l0``) as well as the internal ones."""
    for tname, (leaf, sub, pname) in module._torch_names().items():
        key = prefix + tname
        if key in state_dict:
            state_dict[f"{prefix}{leaf}.{sub}.{pname}"] = state_dict.pop(key)


# ---------------------------------------------------------------- converters
def _dp_twin_kwargs(m: nn.RNNBase) -> dict:
    p = next(m.parameters())
    return dict(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers, bias=m.bias,
                batch_first=m.batch_first, dropout=m.dropout, bidirectional=m.bidirectional,
                device=p.device, dtype=p.dtype)


def _copy_state(src: nn.Module, dst: DPRNNBase) -> DPRNNBase:
    dst.load_state_dict(src.state_dict())
    for name, p in src.named_parameters():
        getattr(dst, name).requires_grad_(p.requires_grad)
    dst.train(src.training)
    return dst


def from_rnn(m: nn.RNN) -> DPRNN:
    """A DPRNN with ``m``'s configuration and weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _copy_state(m, DPRNN(nonlinearity=m.nonlinearity, **_dp_twin_kwargs(m)))


def from_gru(m: nn.GRU) -> DPGRU:
    """A DPGRU with ``m``'s configuration and weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _copy_state(m, DPGRU(**_dp_twin_kwargs(m)))


def from_lstm(m: nn.LSTM) -> DPLSTM:
    """A DPLSTM with ``m``'s configuration and weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _copy_state(m, DPLSTM(proj_size=m.proj_size, **_dp_twin_kwargs(m)))

