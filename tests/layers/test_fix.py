"""ModuleValidator.fix swaps torch's RNN and attention layers for the DP ones, keeping the weights."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import veil.layers  # noqa: F401  (registers the converters)
from veil import GradSampleModule
from veil.layers import DPGRU, DPLSTM, DPMultiheadAttention, DPRNN
from veil.optimizers import DPOptimizer
from veil.validators import ModuleValidator


@pytest.fixture(autouse=True)
def float32_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True, proj_size=3)
        self.gru = nn.GRU(6, 6, batch_first=True)
        self.rnn = nn.RNN(6, 6, nonlinearity="relu", batch_first=True)
        self.att = nn.MultiheadAttention(6, 2, batch_first=True, add_bias_kv=True)
        self.cross = nn.MultiheadAttention(6, 3, kdim=4, vdim=5, batch_first=True)
        self.head = nn.Linear(6 + 6 + 6 + 6, 2)

    def forward(self, x, mem_k, mem_v):
        a = self.lstm(x)[0].mean(-1, keepdim=True)
        g = self.gru(x)[0]
        r = self.rnn(x)[0]
        s = self.att(x, x, x)[0]
        c = self.cross(x, mem_k, mem_v, need_weights=False)[0]
        return self.head(torch.cat([g + a, r, s, c], -1))


def test_fix_converts_and_keeps_outputs():
    torch.manual_seed(0)
    model = Mixed()
    model.gru.weight_hh_l0.requires_grad_(False)
    assert not ModuleValidator.is_valid(model)
    fixed = ModuleValidator.fix(model)
    assert ModuleValidator.is_valid(fixed)
    assert isinstance(fixed.lstm, DPLSTM) and isinstance(fixed.gru, DPGRU) and isinstance(fixed.rnn, DPRNN)
    assert isinstance(fixed.att, DPMultiheadAttention) and isinstance(fixed.cross, DPMultiheadAttention)
    assert fixed.rnn.nonlinearity == "relu" and fixed.lstm.proj_size == 3
    assert not fixed.gru.weight_hh_l0.requires_grad
    x, mk, mv = torch.randn(3, 7, 6), torch.randn(3, 4, 4), torch.randn(3, 4, 5)
    with torch.no_grad():
        assert (model(x, mk, mv) - fixed(x, mk, mv)).abs().max() < 1e-6
    assert list(model.state_dict()) == list(fixed.state_dict())
    model.load_state_dict(fixed.state_dict())  # checkpoints go back to the torch model


def test_fixed_transformer_layer_trains_privately():
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    fixed = ModuleValidator.fix(layer)
    assert isinstance(fixed.self_attn, DPMultiheadAttention)
    x = torch.randn(4, 5, 8)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    assert (layer(x, src_mask=mask, is_causal=True) - fixed(x, src_mask=mask, is_causal=True)).abs().max() < 1e-6
    layer.eval(), fixed.eval()
    with torch.no_grad():  # torch's eval fast path reads in_proj_weight / in_proj_bias
        assert (layer(x) - fixed(x)).abs().max() < 1e-6
    fixed.train()
    gsm = GradSampleModule(fixed)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4)
    gsm(x, src_mask=mask, is_causal=True).square().mean().backward()
    opt.step()


def test_converters_registered_by_validators_import():
    code = ("import torch.nn as nn\nfrom veil.validators import ModuleValidator\n"
            "m = ModuleValidator.fix(nn.LSTM(2, 3))\nassert type(m).__name__ == 'DPLSTM', type(m)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
