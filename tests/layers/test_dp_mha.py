"""DPMultiheadAttention: equal to nn.MultiheadAttention, exact per-sample gradients, state_dict interop."""
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from tests.reference import assert_matches_reference
from veil.layers import DPMultiheadAttention
from veil.layers.dp_multihead_attention import _torch_to_internal


def make_pair(seed=0, **kw):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(**kw)
    torch.manual_seed(seed)
    dp = DPMultiheadAttention(**kw)
    return dp, ref


MASKS = ["none", "kpm_bool", "kpm_float", "attn2_bool", "attn2_float", "attn3", "kpm_and_attn", "causal"]


@settings(max_examples=100, deadline=None)
@given(
    heads=st.sampled_from([1, 2]),
    head_dim=st.integers(1, 3),
    B=st.integers(1, 3),
    L=st.integers(1, 4),
    S=st.integers(1, 4),
    kdim=st.one_of(st.none(), st.integers(1, 4)),
    bias=st.booleans(),
    add_bias_kv=st.booleans(),
    add_zero_attn=st.booleans(),
    batch_first=st.booleans(),
    batched=st.booleans(),
    need_weights=st.booleans(),
    average=st.booleans(),
    mask=st.sampled_from(MASKS),
    self_attn=st.booleans(),
)
def test_matches_torch(heads, head_dim, B, L, S, kdim, bias, add_bias_kv, add_zero_attn, batch_first, batched,
                       need_weights, average, mask, self_attn):
    """Outputs, attention weights, input and parameter gradients equal nn.MultiheadAttention's."""
    E = heads * head_dim
    if self_attn or mask == "causal":
        S, kdim = L, None
    kw = dict(embed_dim=E, num_heads=heads, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
              kdim=kdim, vdim=kdim, batch_first=batch_first)
    dp, ref = make_pair(**kw)
    assert list(dp.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(dp.state_dict().values(), ref.state_dict().values()))
    g = torch.Generator().manual_seed(L * 10 + S)
    kd = kdim or E

    def seq(n, dim):
        if not batched:
            return torch.randn(n, dim, generator=g)
        return torch.randn(*((B, n, dim) if batch_first else (n, B, dim)), generator=g)

    q = seq(L, E)
    k = q if self_attn else seq(S, kd)
    v = q if self_attn else seq(S, kd)
    call = dict(need_weights=need_weights, average_attn_weights=average)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -1] = S > 1  # never mask a whole row
    if not batched:
        kpm = kpm[0]
    nb = B * heads if batched else heads
    if mask == "kpm_bool":
        call["key_padding_mask"] = kpm
    elif mask == "kpm_float":
        call["key_padding_mask"] = kpm.double() * -2.5
    elif mask == "attn2_bool":
        am = torch.rand(L, S, generator=g) < 0.4
        am[:, 0] = False
        call["attn_mask"] = am
    elif mask == "attn2_float":
        call["attn_mask"] = torch.randn(L, S, generator=g)
    elif mask == "attn3":
        call["attn_mask"] = torch.randn(nb, L, S, generator=g)
    elif mask == "kpm_and_attn":
        call["attn_mask"] = torch.randn(L, S, generator=g)
        call["key_padding_mask"] = kpm.double() * -1.5
    elif mask == "causal":
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
        call["is_causal"] = True

    results = []
    for m in (ref, dp):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if self_attn:
            leaves = [leaves[0]] * 3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, w = m(*leaves, **call)
        loss = torch.sin(out).sum() + (0.0 if w is None else (w * w).sum())
        m.zero_grad()
        loss.backward()
        results.append((out, w, [t.grad for t in leaves], m))
    (o1, w1, g1, _), (o2, w2, g2, _) = results
    assert o1.shape == o2.shape and torch.allclose(o1, o2, rtol=1e-10, atol=1e-12)
    assert (w1 is None) == (w2 is None)
    if w1 is not None:
        assert w1.shape == w2.shape and torch.allclose(w1, w2, rtol=1e-10, atol=1e-12)
    for u, x in zip(g1, g2):
        assert torch.allclose(u, x, rtol=1e-10, atol=1e-12)
    internal = dict(dp.named_parameters())
    for name, p in ref.named_parameters():
        mine = torch.cat([internal[n].grad for n in _torch_to_internal(dp)[name]])
        assert torch.allclose(p.grad.reshape(mine.shape), mine, rtol=1e-10, atol=1e-12), name


class AttnNet(nn.Module):
    def __init__(self, mask, need_weights, cross=False, **kw):
        super().__init__()
        self.att = DPMultiheadAttention(6, 2, batch_first=True, **kw)
        self.mask, self.need_weights, self.cross = mask, need_weights, cross
        self.head = nn.Linear(6, 2)

    def forward(self, x, mem, kpm, am):
        call = {}
        L = x.shape[1]
        if self.mask == "kpm":
            call["key_padding_mask"] = kpm
        if self.mask == "both":
            call["key_padding_mask"] = torch.zeros_like(kpm, dtype=x.dtype).masked_fill(kpm, float("-inf"))
        if self.mask in ("attn3", "both"):
            call["attn_mask"] = am.reshape(-1, *am.shape[2:])  # [B, H, L, S] -> [B*H, L, S]
        if self.mask == "causal":
            call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=x.dtype)
            call["is_causal"] = True
        kv = mem if self.cross else x
        out, w = self.att(x, kv, kv, need_weights=self.need_weights, **call)
        y = self.head(out)
        return y if w is None else y + w.sum(-1, keepdim=True)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask,cross,extra", [
    ("none", False, {}), ("kpm", True, {}), ("attn3", False, {}), ("both", True, {"add_bias_kv": True}),
    ("causal", False, {"add_zero_attn": True}), ("kpm", False, {"add_bias_kv": True, "add_zero_attn": True}),
    ("none", True, {"bias": False}),
])
def test_per_sample_exact(mask, cross, extra, need_weights):
    B, L = 4, 5
    torch.manual_seed(0)
    net = AttnNet(mask, need_weights, cross, **extra)
    x, mem = torch.randn(B, L, 6), torch.randn(B, L, 6)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, -2:] = True
    kpm[3, 0] = True
    am = torch.randn(B, 2, L, L)
    w = torch.randn(2)
    assert_matches_reference(net, (x, mem, kpm, am), lambda y, i: (torch.tanh(y) * w).sum(), B)


@pytest.mark.parametrize("need_weights", [False, True])
def test_per_sample_exact_kdim_vdim(need_weights):
    """Separate q/k/v projections (kdim, vdim != embed_dim), with key padding and bias_k/bias_v."""
    torch.manual_seed(5)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = DPMultiheadAttention(6, 3, kdim=4, vdim=5, add_bias_kv=True, batch_first=True)

        def forward(self, x, k, v, kpm):
            out, w = self.att(x, k, v, key_padding_mask=kpm, need_weights=need_weights)
            return out if w is None else out + w.sum(-1, keepdim=True)

    B = 3
    x, k, v = torch.randn(B, 4, 6), torch.randn(B, 5, 4), torch.randn(B, 5, 5)
    kpm = torch.zeros(B, 5, dtype=torch.bool)
    kpm[0, 1] = True
    assert_matches_reference(Net(), (x, k, v, kpm), lambda y, i: torch.sin(y).sum(), B)


def test_self_attention_mixed_calls():
    """One module called for self- and cross-attention in one forward: slices and fused paths agree."""
    torch.manual_seed(6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = DPMultiheadAttention(4, 2, batch_first=True)

        def forward(self, x, mem):
            h = self.att(x, x, x, need_weights=False)[0]
            return self.att(h, mem, mem, need_weights=False)[0]

    x, mem = torch.randn(3, 4, 4), torch.randn(3, 2, 4)
    assert_matches_reference(Net(), (x, mem), lambda y, i: torch.sin(y).sum(), 3)


def test_per_sample_time_major_engine():
    """DPMultiheadAttention(batch_first=False) under GradSampleModule(batch_first=False)."""
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = DPMultiheadAttention(4, 2, add_bias_kv=True)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.att(x, x, x, need_weights=False)[0])

    x = torch.randn(5, 3, 4)  # [L, B, E]
    assert_matches_reference(Net(), (x,), lambda y, i: torch.sin(y).sum(), 3, batch_first=False,
                             modes=("auto", "ghost", "instantiate"))


def test_per_sample_empty_batch():
    torch.manual_seed(2)
    net = AttnNet("kpm", False)
    x = torch.randn(0, 3, 6)
    kpm = torch.zeros(0, 3, dtype=torch.bool)
    assert_matches_reference(net, (x, x, kpm, torch.zeros(0, 2, 3, 3)), lambda y, i: y.sum(), 0,
                             modes=("auto", "ghost", "instantiate"))


@pytest.mark.parametrize("kw", [dict(), dict(kdim=3, vdim=5, bias=False), dict(add_bias_kv=True)])
def test_state_dict_round_trip(kw):
    dp, ref = make_pair(embed_dim=4, num_heads=2, **kw)
    _, other = make_pair(seed=7, embed_dim=4, num_heads=2, **kw)
    dp.load_state_dict(other.state_dict())
    assert list(dp.state_dict()) == list(other.state_dict())
    ref.load_state_dict(dp.to_nn_state_dict())
    for (k, u), v in zip(ref.state_dict().items(), other.state_dict().values()):
        assert torch.equal(u, v), k
    internal = {n: p.detach() * 2 for n, p in dp.named_parameters()}
    dp.load_state_dict(internal)
    assert all(torch.equal(p, internal[n]) for n, p in dp.named_parameters())
    if dp.in_proj is not None:
        assert dp.in_proj_weight is dp.in_proj.weight
    else:
        assert dp.in_proj_bias is None or torch.equal(dp.in_proj_bias, other.in_proj_bias * 2)


def test_loads_opacus_layout():
    opacus = pytest.importorskip("opacus.layers")
    torch.manual_seed(3)
    theirs = opacus.DPMultiheadAttention(4, 2, add_bias_kv=True)
    dp = DPMultiheadAttention(4, 2, add_bias_kv=True)
    dp.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 2, 4)
    theirs.eval(), dp.eval()
    assert torch.allclose(theirs(x, x, x)[0], dp(x, x, x)[0], atol=1e-10)


@pytest.mark.parametrize("use_onednn", [True, False])
@pytest.mark.parametrize("used", ["qkv", "q", "kv"])
def test_in_projection_self_attention_matches_linear_chunks(use_onednn, used, monkeypatch):
    """The packed self-attention projection (oneDNN forward; input gradient as dq W_q + dk W_k + dv W_v,
    without joining dq, dk, dv) equals F.linear(...).chunk(3), also when only some of q, k, v are
    used, and outside the engine it gives ordinary weight and bias gradients."""
    from veil.grad_sample import gemm
    from veil.layers.leaves import InProjection

    monkeypatch.setattr(gemm, "USE_ONEDNN", use_onednn)
    torch.manual_seed(0)
    proj = InProjection(6, bias=True)
    nn.init.normal_(proj.weight)
    nn.init.normal_(proj.bias)
    x = torch.randn(3, 5, 6, requires_grad=True)
    outs = proj(x, x, x)
    ws = [torch.randn(3, 5, 6) for _ in range(3)]
    sum((o * w).sum() for o, w, u in zip(outs, ws, "qkv") if u in used).backward()

    x2 = x.detach().double().requires_grad_()
    W2, b2 = proj.weight.detach().double().requires_grad_(), proj.bias.detach().double().requires_grad_()
    outs2 = torch.nn.functional.linear(x2, W2, b2).chunk(3, -1)
    sum((o * w.double()).sum() for o, w, u in zip(outs2, ws, "qkv") if u in used).backward()
    for o, o2 in zip(outs, outs2):
        torch.testing.assert_close(o.double(), o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.weight.grad.double(), W2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.bias.grad.double(), b2.grad, rtol=1e-5, atol=1e-5)
