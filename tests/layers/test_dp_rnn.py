"""DPRNN / DPGRU / DPLSTM: equal to torch.nn (outputs and gradients), exact per-sample gradients."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tests.reference import assert_matches_reference, brute_force_grads
from veil import GradSampleModule
from veil.layers import DPGRU, DPLSTM, DPRNN
from veil.optimizers import DPOptimizer

PAIRS = {"lstm": (DPLSTM, nn.LSTM), "gru": (DPGRU, nn.GRU), "rnn_tanh": (DPRNN, nn.RNN), "rnn_relu": (DPRNN, nn.RNN)}


def make_pair(kind, seed=0, **kw):
    dp_cls, nn_cls = PAIRS[kind]
    if kind.startswith("rnn"):
        kw["nonlinearity"] = kind[4:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ref = nn_cls(**kw)
        torch.manual_seed(seed)
        dp = dp_cls(**kw)
    return dp, ref


def _grads(model, x, hx, lengths, batch_first):
    x = x.clone().requires_grad_()
    hx = None if hx is None else tuple(h.clone().requires_grad_() for h in hx)
    inp = x if lengths is None else pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    state_in = None if hx is None else (hx if isinstance(model, (nn.LSTM, DPLSTM)) else hx[0])
    out, state = model(inp, state_in)
    if lengths is not None:
        out = pad_packed_sequence(out, batch_first=batch_first)[0]
    states = state if isinstance(state, tuple) else (state,)
    loss = torch.sin(out).sum() + sum((torch.cos(s) * s).sum() for s in states)
    loss.backward()
    grads = [x.grad] + ([] if hx is None else [h.grad for h in hx])
    params = [p.grad for group in model.all_weights for p in group]
    return [out, *states], grads, params


@settings(max_examples=80, deadline=None)
@given(
    kind=st.sampled_from(sorted(PAIRS)),
    B=st.integers(1, 3),
    T=st.integers(1, 5),
    d=st.integers(1, 4),
    h=st.integers(2, 5),
    layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    proj=st.booleans(),
    packed=st.booleans(),
    with_hx=st.booleans(),
)
def test_matches_torch(kind, B, T, d, h, layers, bidirectional, batch_first, bias, proj, packed, with_hx):
    """Outputs, final states, input/state gradients and parameter gradients equal torch's."""
    proj_size = 1 if (proj and kind == "lstm") else 0
    kw = dict(input_size=d, hidden_size=h, num_layers=layers, bias=bias, batch_first=batch_first,
              bidirectional=bidirectional)
    if proj_size:
        kw["proj_size"] = proj_size
    dp, ref = make_pair(kind, **kw)
    assert list(dp.state_dict()) == list(ref.state_dict())
    g = torch.Generator().manual_seed(B * 100 + T)
    x = torch.randn(*((B, T, d) if batch_first else (T, B, d)), generator=g)
    D = 2 if bidirectional else 1
    hx = None
    if with_hx:
        hx = (torch.randn(layers * D, B, proj_size or h, generator=g),)
        if kind == "lstm":
            hx = hx + (torch.randn(layers * D, B, h, generator=g),)
    lengths = torch.randint(1, T + 1, (B,), generator=g) if packed else None
    a = _grads(ref, x, hx, lengths, batch_first)
    b = _grads(dp, x, hx, lengths, batch_first)
    for xs, ys in zip(a, b):
        for u, v in zip(xs, ys):
            assert u.shape == v.shape
            assert torch.allclose(u, v, rtol=1e-10, atol=1e-12), (u - v).abs().max()


@pytest.fixture
def lstm_cell_path(request):
    """Runs a float32 test with the LSTM cell's compiled pointwise kernels (veil/csrc/lstm_cell.c),
    ``native``, or with torch ops only, ``torch`` (parametrize ``lstm_cell_path`` indirectly)."""
    from veil.layers._recurrence import lstm_cell
    from veil.utils import native

    if request.param == "native" and lstm_cell() is None:
        pytest.skip("no C compiler: the compiled LSTM cell is unavailable")
    native.set_enabled("lstm_cell", request.param == "native")
    yield request.param
    native.set_enabled("lstm_cell", True)


_LSTM_CASES = [("lstm", dict(bidirectional=True, num_layers=2)), ("lstm", dict(proj_size=3))]
_OTHER_CASES = [("gru", dict(bidirectional=True)), ("rnn_tanh", dict()), ("rnn_relu", dict())]


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("kind,kw,lstm_cell_path",
                         [(k, kw, path) for k, kw in _LSTM_CASES for path in ("native", "torch")]
                         + [(k, kw, "torch") for k, kw in _OTHER_CASES], indirect=["lstm_cell_path"])
def test_float32_kernels_match_torch(kind, kw, onednn, lstm_cell_path, monkeypatch):
    """In float32 the per-step products may run on oneDNN (veil/grad_sample/gemm.py) and the LSTM cell's
    pointwise work in compiled code; every path matches torch, with and without initial states."""
    from veil.grad_sample import gemm as _gemm

    monkeypatch.setattr(_gemm, "USE_ONEDNN", onednn)
    torch.set_default_dtype(torch.float32)
    dp, ref = make_pair(kind, input_size=5, hidden_size=6, batch_first=True, **kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 5, generator=g)
    D = 2 if kw.get("bidirectional") else 1
    L = kw.get("num_layers", 1) * D
    h0 = torch.randn(L, 4, kw.get("proj_size") or 6, generator=g)
    c0 = torch.randn(L, 4, 6, generator=g)
    hx = (h0, c0) if kind == "lstm" else (h0,)
    for lengths, state in ((None, None), (torch.tensor([7, 3, 5, 1]), None), (torch.tensor([7, 3, 5, 1]), hx)):
        a = _grads(ref, x, state, lengths, True)
        b = _grads(dp, x, state, lengths, True)
        for xs, ys in zip(a, b):
            for u, v in zip(xs, ys):
                assert torch.allclose(u, v, rtol=1e-4, atol=1e-5), (u - v).abs().max()


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_unbatched_and_no_grad(kind):
    dp, ref = make_pair(kind, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3)
    with torch.no_grad():
        (o1, s1), (o2, s2) = ref(x), dp(x)
    assert torch.allclose(o1, o2, atol=1e-12)
    for u, v in zip(s1 if isinstance(s1, tuple) else (s1,), s2 if isinstance(s2, tuple) else (s2,)):
        assert u.shape == v.shape and torch.allclose(u, v, atol=1e-12)


def test_empty_batch_shapes():
    dp, ref = make_pair("lstm", input_size=3, hidden_size=4, batch_first=True)
    x = torch.randn(0, 5, 3)
    (o1, (h1, c1)), (o2, (h2, c2)) = ref(x), dp(x)
    assert o1.shape == o2.shape and h1.shape == h2.shape and c1.shape == c2.shape


def test_dropout_between_layers():
    dp, ref = make_pair("gru", input_size=3, hidden_size=4, num_layers=2, dropout=0.5)
    x = torch.randn(6, 2, 3)
    dp.eval(), ref.eval()
    assert torch.allclose(dp(x)[0], ref(x)[0], atol=1e-12)
    dp.train()
    torch.manual_seed(1)
    y1 = dp(x)[0]
    torch.manual_seed(2)
    y2 = dp(x)[0]
    assert not torch.allclose(y1, y2)


# --------------------------------------------------------------- per-sample
class SeqNet(nn.Module):
    """An RNN (optionally packed, with initial states) followed by a Linear head on every step."""

    def __init__(self, kind, packed=False, batch_first=True, **kw):
        super().__init__()
        dp, _ = make_pair(kind, batch_first=batch_first, **kw)
        self.rnn, self.packed, self.batch_first = dp, packed, batch_first
        D = 2 if kw.get("bidirectional") else 1
        out = kw.get("proj_size") or kw["hidden_size"]
        self.head = nn.Linear(out * D, 2)

    def forward(self, x, lengths, h0):
        bf = self.batch_first
        T = x.shape[1 if bf else 0]
        if self.packed:
            x = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False)
        if bf:
            h0 = h0.transpose(0, 1)  # given [B, L*D, h] so that the reference can slice it
        h0 = h0.contiguous()
        hx = (h0[..., : self.rnn.proj_size or h0.shape[-1]], h0) if isinstance(self.rnn, DPLSTM) else h0
        y, state = self.rnn(x, hx)
        if self.packed:
            y = pad_packed_sequence(y, batch_first=bf, total_length=T)[0]
        h = state[0] if isinstance(state, tuple) else state
        return self.head(y), (h.transpose(0, 1) if bf else h)


def seq_loss(w):
    return lambda y, i: (torch.tanh(y[0]) * w).sum() + y[1].pow(2).sum()


CASES = [
    ("lstm", dict(num_layers=2, bidirectional=True), True),
    ("lstm", dict(proj_size=2, bidirectional=True), True),
    ("lstm", dict(proj_size=2, num_layers=2), False),
    ("lstm", dict(bias=False), False),
    ("gru", dict(num_layers=2, bidirectional=True), True),
    ("gru", dict(), False),
    ("rnn_tanh", dict(bidirectional=True), True),
    ("rnn_relu", dict(num_layers=2), True),
]


@pytest.mark.parametrize("kind,kw,packed", CASES)
def test_per_sample_exact(kind, kw, packed):
    B, T, d, h = 4, 5, 3, 4
    torch.manual_seed(3)
    net = SeqNet(kind, packed=packed, input_size=d, hidden_size=h, **kw)
    D = 2 if kw.get("bidirectional") else 1
    x = torch.randn(B, T, d)
    lengths = torch.tensor([5, 2, 4, 1])
    h0 = torch.randn(B, kw.get("num_layers", 1) * D, h)
    assert_matches_reference(net, (x, lengths, h0), seq_loss(torch.randn(2)), B)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_per_sample_time_major_engine(kind):
    """DP layer with batch_first=False under GradSampleModule(batch_first=False): still exact."""
    B, T, d, h = 3, 4, 3, 4
    torch.manual_seed(4)
    net = SeqNet(kind, packed=True, batch_first=False, input_size=d, hidden_size=h, bidirectional=True)
    x = torch.randn(T, B, d)
    lengths = torch.tensor([4, 1, 3])
    h0 = torch.randn(2, B, h)
    # "functorch" replays each leaf with the batch taken from dim 1 when batch_first=False; see docs/layers.md
    assert_matches_reference(net, (x, lengths, h0), seq_loss(torch.randn(2)), B, batch_first=False,
                             modes=("auto", "ghost", "instantiate"))


def test_per_sample_empty_batch():
    torch.manual_seed(5)
    net = SeqNet("lstm", input_size=3, hidden_size=4, num_layers=2)
    x, lengths, h0 = torch.randn(0, 4, 3), torch.zeros(0, dtype=torch.long), torch.randn(0, 2, 4)
    assert_matches_reference(net, (x, lengths, h0), seq_loss(torch.randn(2)), 0, modes=("auto", "ghost", "instantiate"))


def test_dp_step_mean_reduction():
    """One DPOptimizer step (mean loss, σ = 0) equals the clipped brute-force mean."""
    torch.manual_seed(6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = DPLSTM(3, 5, batch_first=True, bidirectional=True)
            self.head = nn.Linear(10, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Net()
    B, E, C = 5, 4, 0.3
    x, y = torch.randn(B, 6, 3), torch.randint(0, 3, (B,))
    per = brute_force_grads(model, (x,), lambda out, i: F.cross_entropy(out, y[i:i + 1], reduction="sum"), B)
    norms = torch.cat([g.reshape(B, -1) for g in per.values()], 1).norm(dim=1)
    c = torch.clamp(C / norms, max=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=C,
                      expected_batch_size=E)
    F.cross_entropy(gsm(x), y).backward()
    opt.step()
    for n, p in model.named_parameters():
        want = -torch.tensordot(c, per[n], dims=1) / E
        assert torch.allclose(p.detach() - before[n], want, rtol=1e-10, atol=1e-14), n


# -------------------------------------------------------------- state_dict
@pytest.mark.parametrize("kind,kw", [("lstm", dict(num_layers=2, bidirectional=True, proj_size=2)),
                                     ("gru", dict(bias=False)), ("rnn_relu", dict(num_layers=2))])
def test_state_dict_round_trip(kind, kw):
    dp, ref = make_pair(kind, input_size=3, hidden_size=4, **kw)
    _, other = make_pair(kind, seed=9, input_size=3, hidden_size=4, **kw)
    dp.load_state_dict(other.state_dict())  # torch keys in
    assert list(dp.state_dict()) == list(other.state_dict())
    ref.load_state_dict(dp.state_dict())  # torch keys out
    for (k, u), v in zip(ref.state_dict().items(), other.state_dict().values()):
        assert torch.equal(u, v), k
    internal = {n: p.detach() + 1 for n, p in dp.named_parameters()}  # internal keys also load
    dp.load_state_dict(internal)
    assert all(torch.equal(p, internal[n]) for n, p in dp.named_parameters())
    assert torch.equal(dp.weight_ih_l0, dp.l0.ih.weight)  # torch attribute names


def test_deepcopy_and_pickle_keep_torch_keys(tmp_path):
    dp, ref = make_pair("lstm", input_size=3, hidden_size=4)
    dp2 = copy.deepcopy(dp)
    torch.save(dp2, tmp_path / "m.pt")
    dp3 = torch.load(tmp_path / "m.pt", weights_only=False)
    assert list(dp3.state_dict()) == list(ref.state_dict())


def test_make_private_time_major():
    """make_private(batch_first=False) with a DPLSTM(batch_first=False) on [T, B, d] batches: one step
    (σ = 0) equals the brute-force clipped mean."""
    import warnings as _w

    from veil import PrivacyEngine

    torch.manual_seed(7)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = DPLSTM(3, 4, num_layers=2)  # time-major
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][-1])

    N, B, T, C = 8, 4, 5, 0.2
    xs, ys = torch.randn(N, T, 3), torch.randint(0, 2, (N,))
    data = torch.utils.data.TensorDataset(xs, ys)
    loader = torch.utils.data.DataLoader(
        data, batch_size=B, collate_fn=lambda items: (torch.stack([i[0] for i in items], 1),
                                                      torch.stack([i[1] for i in items])))
    model = Net()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with _w.catch_warnings():
        _w.simplefilter("ignore")
        model, opt, loader = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=C,
            batch_first=False, poisson_sampling=False)
    x, y = next(iter(loader))
    assert x.shape == (T, B, 3)
    per = brute_force_grads(ref, (x,), lambda out, i: F.cross_entropy(out, y[i:i + 1], reduction="sum"), B,
                            batch_first=False)
    norms = torch.cat([g.reshape(B, -1) for g in per.values()], 1).norm(dim=1)
    c = torch.clamp(C / norms, max=1.0)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for n, p in model._module.named_parameters():
        want = -torch.tensordot(c, per[n], dims=1) / opt.expected_batch_size
        assert torch.allclose(p.detach() - before[n], want, rtol=1e-10, atol=1e-14), n


@pytest.mark.parametrize("mode", ["ghost", "instantiate"])
@pytest.mark.parametrize("kind,lstm_cell_path", [("lstm", "native"), ("lstm", "torch"), ("gru", "torch"),
                                                 ("rnn_tanh", "torch")], indirect=["lstm_cell_path"])
def test_float32_engine_matches_float64(kind, mode, lstm_cell_path):
    """The float32 fast path (oneDNN products, tanh via sigmoid, oneDNN clipped sums) gives the float64
    per-sample norms and clipped sums to float32 accuracy."""
    from tests.reference import engine_chunk

    torch.manual_seed(8)
    net = SeqNet(kind, packed=True, input_size=3, hidden_size=5, bidirectional=True)
    B = 4
    x, lengths, h0 = torch.randn(B, 6, 3), torch.tensor([6, 2, 5, 1]), torch.randn(B, 2, 5)
    w = torch.randn(2)
    factors = torch.rand(B, dtype=torch.float64)

    def loss(y):
        return (torch.tanh(y[0]) * w.to(y[0].dtype)).sum() + y[1].pow(2).sum()

    res = {}
    for dt in (torch.float64, torch.float32):
        m = copy.deepcopy(net).to(dt)
        res[dt] = engine_chunk(m, (x.to(dt), lengths, h0.to(dt)), loss, mode, factors.to(dt))
    for name, n64 in res[torch.float64].norms_sq.items():
        n32 = res[torch.float32].norms_sq[name].double()
        assert torch.allclose(n32, n64, rtol=1e-4, atol=1e-6 * n64.abs().max().item()), name
        c64, c32 = res[torch.float64].clipped[name], res[torch.float32].clipped[name].double()
        assert torch.allclose(c32, c64, rtol=1e-4, atol=1e-5 * c64.abs().max().item()), name



@pytest.mark.parametrize("use_onednn", [True, False])
def test_batch_first_linear_float32_matches_linear(use_onednn, monkeypatch):
    """The leaf's own products (forward on oneDNN, input gradient on oneDNN) equal F.linear's."""
    from veil.grad_sample import gemm
    from veil.layers.leaves import BatchFirstLinear

    monkeypatch.setattr(gemm, "USE_ONEDNN", use_onednn)
    torch.manual_seed(0)
    leaf = BatchFirstLinear(8, 12)
    x = torch.randn(3, 5, 8, requires_grad=True)
    y = leaf(x)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    x2 = x.detach().double().requires_grad_()
    y2 = torch.nn.functional.linear(x2, leaf.weight.double(), leaf.bias.double())
    (y2 * w.double()).sum().backward()
    torch.testing.assert_close(y.double(), y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x2.grad, rtol=1e-5, atol=1e-5)
    assert leaf.weight.grad is not None and leaf.bias.grad is not None


def test_batch_first_linear_follows_autocast_like_linear():
    """Under bf16 autocast the leaf's output has nn.Linear's dtype (its oneDNN path steps aside)."""
    from veil.layers.leaves import BatchFirstLinear

    torch.manual_seed(0)
    leaf, ref = BatchFirstLinear(8, 12, dtype=torch.float32), nn.Linear(8, 12, dtype=torch.float32)
    ref.load_state_dict(leaf.state_dict())
    x = torch.randn(3, 5, 8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = leaf(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)


def test_lstm_projections_share_the_output_gradient_gram(monkeypatch):
    """W_ih and W_hh get the same output gradient (the gates'): its Gram matrix is formed once, so a
    one-layer DPLSTM needs three (input, previous state, gates) for its ghost norms."""
    import veil.grad_sample.rules.linear as linear_rule
    from veil import GradSampleModule

    calls = []
    real = linear_rule.gram
    monkeypatch.setattr(linear_rule, "gram", lambda t: calls.append(t.shape) or real(t))
    torch.manual_seed(0)
    gsm = GradSampleModule(DPLSTM(8, 16, batch_first=True), mode="ghost")
    gsm.consumer = lambda chunk: None
    out, _ = gsm(torch.randn(4, 12, 8))
    out.sum().backward()
    assert len(calls) == 3, calls
