"""Drop-in DP versions of torch layers whose weights per-sample clipping cannot otherwise see.

``DPMultiheadAttention``, ``DPLSTM``, ``DPGRU`` and ``DPRNN`` take the same arguments, inputs and
outputs as their ``torch.nn`` twins and load/save the same ``state_dict``. ``WSConv1d/2d/3d`` are
weight-standardised convolutions with exact per-sample clipping. Importing this package
also teaches ``ModuleValidator.fix`` to swap the torch layers for these, keeping their weights.
"""
from .dp_multihead_attention import DPMultiheadAttention
from .dp_rnn import DPGRU, DPLSTM, DPRNN, DPRNNBase
from .leaves import BatchFirstLinear, KVBias
from .ws_conv import WSConv1d, WSConv2d, WSConv3d

__all__ = ["DPMultiheadAttention", "DPRNNBase", "DPRNN", "DPGRU", "DPLSTM", "BatchFirstLinear", "KVBias",
           "WSConv1d", "WSConv2d", "WSConv3d"]


def _register_converters() -> None:
    from torch import nn

    from ..validators.module_validator import register_converter
    from . import dp_multihead_attention, dp_rnn

    register_converter(nn.MultiheadAttention, dp_multihead_attention.from_mha)
    register_converter(nn.LSTM, dp_rnn.from_lstm)
    register_converter(nn.GRU, dp_rnn.from_gru)
    register_converter(nn.RNN, dp_rnn.from_rnn)


_register_converters()
