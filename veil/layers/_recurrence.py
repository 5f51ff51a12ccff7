"""Fused recurrences for DPRNN / DPGRU / DPLSTM: a no-grad forward scan and a hand-written BPTT.

One layer in one direction runs as:

1. ``xg = ih(x)`` — one Linear call on the whole sequence (engine-visible);
2. :func:`scan` — the time loop, in no-grad mode into preallocated buffers ``[B, T, .]`` (one
   product and a few fused pointwise ops per step, no autograd bookkeeping);
3. ``z = hh(h_prev, values=z_scan)`` and, for LSTM projections, ``p = hr(m, values=p_scan)`` — one
   engine-visible Linear call each on the whole sequence of states, returning the values the scan
   already computed (:class:`~veil.layers.leaves.BatchFirstLinear`);
4. :class:`Recurrence` — an autograd Function of ``(xg, z, p, h0, c0)`` whose outputs are the scan's
   results and whose backward is the BPTT. It hands each Linear leaf the gradient of its output
   (``dL/dz_t`` for every step), so the engine's Linear rule computes per-sample norms over time
   (ghost or instantiated) and one-matmul clipped sums, exactly as for any sequence Linear.

The values of ``z`` and ``p`` passed into the Function are not read by it: the dependency only
routes gradients. Recurrent weights enter the backward as constants (``dh_{t-1} = dz_t W_hh``); their
own gradients are formed by the leaves from ``dL/dz``.

Buffers are batch-major and contiguous, so the engine reads inputs and gradients without copies.
Masks (PackedSequence with varied lengths) hold a sample's state past its end; its gradients there
are zero.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from ..grad_sample.gemm import _LINEAR, linear, onednn_applies
from ..utils import native

Tensor = torch.Tensor


def _tanh_(x: Tensor, fast: bool) -> Tensor:
    """In-place tanh. On the fast (float32 CPU) path as 2σ(2x) - 1: torch's CPU sigmoid is vectorised and
    several times faster than its tanh; the result differs from tanh by a few float32 ulps of 1."""
    if fast:
        return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)
    return x.tanh_()


class Scan:
    """Results of the forward scan of one layer and direction (batch-major buffers ``[B, T, .]``)."""

    def __init__(self, mode: str, reverse: bool, T: int, masks: Optional[Tensor], W_hh: Tensor,
                 W_hr: Optional[Tensor], h0: Tensor, c0: Optional[Tensor]):
        self.mode, self.reverse, self.T, self.masks = mode, reverse, T, masks
        self.W_hh, self.W_hr, self.h0, self.c0 = W_hh, W_hr, h0, c0
        self.out: Tensor  # [B, T, h_out], the state after each step
        self.hT: Tensor
        self.cT: Optional[Tensor] = None
        self.z: Tensor  # [B, T, G*H]: W_hh h_prev + b_hh
        self.extra: dict = {}
        self._h_prev: Optional[Tensor] = None

    @property
    def order(self) -> range:
        return range(self.T - 1, -1, -1) if self.reverse else range(self.T)

    def h_prev(self) -> Tensor:
        """[B, T, h_out]: the state each step started from (built once, then kept)."""
        if self._h_prev is None:
            self._h_prev = self.shift(self.out, self.h0)
        return self._h_prev

    def shift(self, seq: Tensor, first: Tensor) -> Tensor:
        first = first.unsqueeze(1)
        if self.reverse:
            return torch.cat([seq[:, 1:], first], 1)
        return torch.cat([first, seq[:, :-1]], 1)


def scan(mode: str, xg: Tensor, b_hh: Optional[Tensor], W_hh: Tensor, W_hr: Optional[Tensor], h0: Tensor,
         c0: Optional[Tensor], reverse: bool, masks: Optional[Tensor]) -> Scan:
    """Run the recurrence forward without autograd. ``xg``: [B, T, G*H] input projections (with b_ih);
    ``masks``: None or bool [B, T, 1] (False: the sample has ended, its state is held)."""
    B, T, G = xg.shape
    s = Scan(mode, reverse, T, masks, W_hh, W_hr, h0, c0)
    order = s.order
    WT = W_hh.t()
    fast = onednn_applies(xg)  # per-step products on oneDNN (see veil.grad_sample.gemm); else in-place addmm
    kw = {"dtype": xg.dtype, "device": xg.device}
    ms = masks.unbind(1) if masks is not None else None
    if mode == "LSTM" and W_hr is None and xg.numel() > 0 and _use_native(xg):
        _lstm_scan_native(s, xg, b_hh, W_hh, h0, c0, masks)
        return s
    if mode == "LSTM":
        H = G // 4
        gates = torch.add(xg, b_hh) if b_hh is not None else xg.clone()
        if fast:  # cell-gate pre-activations doubled, so one sigmoid gives tanh(g) = 2σ(2g) - 1
            W_hh = W_hh.clone()
            W_hh[2 * H:3 * H].mul_(2.0)
            gates[..., 2 * H:3 * H].mul_(2.0)
        acts = torch.empty(B, T, G, **kw)
        C = torch.empty(B, T, H, **kw)
        TC = torch.empty(B, T, H, **kw)
        proj = W_hr is not None
        out = torch.empty(B, T, W_hr.shape[0] if proj else H, **kw)
        M = torch.empty(B, T, H, **kw) if proj else None
        WrT = W_hr.t() if proj else None
        gt, at, ct, tct, ot = gates.unbind(1), acts.unbind(1), C.unbind(1), TC.unbind(1), out.unbind(1)
        ai, af, ag, ao = (acts[..., k * H:(k + 1) * H].unbind(1) for k in range(4))
        gg = gates[..., 2 * H:3 * H].unbind(1)
        mt_ = M.unbind(1) if proj else None
        h, c = h0, c0
        for t in order:
            g = gt[t]
            if fast:
                g.add_(linear(h, W_hh))
            else:
                g.addmm_(h, WT)
            torch.sigmoid(g, out=at[t])
            if fast:
                ag[t].mul_(2.0).sub_(1.0)
            else:
                torch.tanh(gg[t], out=ag[t])
            cn = ct[t]
            torch.mul(af[t], c, out=cn)
            cn.addcmul_(ai[t], ag[t])
            tc = tct[t]
            if fast:
                torch.mul(cn, 2.0, out=tc).sigmoid_().mul_(2.0).sub_(1.0)
            else:
                torch.tanh(cn, out=tc)
            hn = ot[t]
            if proj:
                m = mt_[t]
                torch.mul(ao[t], tc, out=m)
                if fast:
                    hn.copy_(linear(m, W_hr))
                else:
                    torch.mm(m, WrT, out=hn)
            else:
                torch.mul(ao[t], tc, out=hn)
            if ms is not None:
                torch.where(ms[t], hn, h, out=hn)
                torch.where(ms[t], cn, c, out=cn)
            h, c = hn, cn
        s.z = gates.sub_(xg)  # W_hh h_prev + b_hh
        if fast:
            s.z[..., 2 * H:3 * H].sub_(xg[..., 2 * H:3 * H]).mul_(0.5)
        s.extra.update(acts=acts, C=C, TC=TC, M=M)
        s.cT = c.clone()
    elif mode == "GRU":
        H = G // 3
        Z = torch.empty(B, T, G, **kw)
        RZ = torch.empty(B, T, 2 * H, **kw)
        N = torch.empty(B, T, H, **kw)
        out = torch.empty(B, T, H, **kw)
        zt, rzt, nt, ot = Z.unbind(1), RZ.unbind(1), N.unbind(1), out.unbind(1)
        x_rz, x_n = xg[..., :2 * H].unbind(1), xg[..., 2 * H:].unbind(1)
        if fast:  # n-gate terms doubled, so tanh(a) = 2σ(2a) - 1 is one sigmoid
            W_hh = W_hh.clone()
            W_hh[2 * H:].mul_(2.0)
            if b_hh is not None:
                b_hh = b_hh.clone()
                b_hh[2 * H:].mul_(2.0)
            x_n = (xg[..., 2 * H:] * 2.0).unbind(1)
        z_rz, z_n = Z[..., :2 * H].unbind(1), Z[..., 2 * H:].unbind(1)
        r_, u_ = RZ[..., :H].unbind(1), RZ[..., H:].unbind(1)
        h = h0
        for t in order:
            hg = zt[t]
            if fast:
                hg.copy_(linear(h, W_hh, b_hh))
            elif b_hh is not None:
                torch.addmm(b_hh, h, WT, out=hg)
            else:
                torch.mm(h, WT, out=hg)
            rz = rzt[t]
            torch.add(x_rz[t], z_rz[t], out=rz)
            rz.sigmoid_()
            n = nt[t]
            torch.addcmul(x_n[t], r_[t], z_n[t], out=n)
            if fast:
                n.sigmoid_().mul_(2.0).sub_(1.0)
            else:
                n.tanh_()
            hn = ot[t]
            torch.lerp(n, h, u_[t], out=hn)  # (1 - z) n + z h
            if ms is not None:
                torch.where(ms[t], hn, h, out=hn)
            h = hn
        if fast:
            Z[..., 2 * H:].mul_(0.5)
        s.z = Z
        s.extra.update(RZ=RZ, N=N)
    else:
        pre = torch.add(xg, b_hh) if b_hh is not None else xg.clone()
        out = torch.empty_like(pre)
        relu = mode == "RNN_RELU"
        halve = fast and not relu  # pre-activations doubled: tanh(a) = 2σ(2a) - 1
        if halve:
            W_hh = W_hh * 2.0
            pre.mul_(2.0)
        pt, ot = pre.unbind(1), out.unbind(1)
        h = h0
        for t in order:
            p = pt[t]
            if fast:
                p.add_(linear(h, W_hh))
            else:
                p.addmm_(h, WT)
            hn = ot[t]
            if relu:
                torch.clamp_min(p, 0, out=hn)
            elif halve:
                torch.sigmoid(p, out=hn).mul_(2.0).sub_(1.0)
            else:
                torch.tanh(p, out=hn)
            if ms is not None:
                torch.where(ms[t], hn, h, out=hn)
            h = hn
        if halve:
            pre.mul_(0.5)
        s.z = pre - xg
        s.extra.update(pre=pre)
    s.out = out
    s.hT = h.clone()
    return s


class Recurrence(torch.autograd.Function):
    """Outputs of a scan as a differentiable function of ``(xg, z, p, h0, c0)``; backward = BPTT."""

    @staticmethod
    def forward(ctx, s: Scan, xg: Tensor, z: Tensor, p: Optional[Tensor], h0: Tensor, c0: Optional[Tensor]):
        ctx.s = s
        out = s.out.detach()
        if s.mode == "LSTM":
            return out, s.hT.detach(), s.cT.detach()
        return out, s.hT.detach()

    @staticmethod
    def backward(ctx, d_out: Tensor, d_hT: Tensor, d_cT: Optional[Tensor] = None):
        s: Scan = ctx.s
        need_h0, need_c0 = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        if s.mode == "LSTM":
            dG, dP, dh0, dc0 = _lstm_bptt(s, d_out, d_hT, d_cT, need_h0, need_c0)
            return None, dG, dG, dP, dh0, dc0
        if s.mode == "GRU":
            dX, dZ, dh0 = _gru_bptt(s, d_out, d_hT, need_h0)
            return None, dX, dZ, None, dh0, None
        dZ, dh0 = _rnn_bptt(s, d_out, d_hT, need_h0)
        return None, dZ, dZ, None, dh0, None


def _times(W: Tensor, like: Tensor):
    """A function x -> x @ W for the backward's per-step products (oneDNN when it applies; it reads the
    transposed view as fast as a contiguous copy, so none is made)."""
    if onednn_applies(like):
        WT = W.t()
        return lambda x: linear(x, WT)
    return lambda x: x @ W


def _times_add(W: Tensor, like: Tensor):
    """A function (base, x) -> base + x @ W."""
    if onednn_applies(like):
        WT = W.t()
        return lambda base, x: linear(x, WT).add_(base)
    return lambda base, x: torch.addmm(base, x, W)


def _mask_factors(s: Scan):
    """Float masks m [B, T, 1] and 1 - m, or (None, None) without masks."""
    if s.masks is None:
        return None, None
    m = s.masks.to(s.out.dtype)
    return m, 1.0 - m


def _declare(lib) -> None:
    for f in (lib.lstm_fwd_step, lib.lstm_bwd_step):
        f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p], None


def lstm_cell():
    """The compiled LSTM step kernels (veil/csrc/lstm_cell.c), or None (see veil.utils.native)."""
    return native.library("lstm_cell", _declare)


_CTX_FIELDS = ("B", "H", "T", "reverse", "x", "bh", "h0", "c0", "z", "acts", "c", "tc", "out", "mask", "dout", "dh",
               "dc", "dG")  # the order of lstm_ctx in lstm_cell.c


def _lstm_ctx(**fields: int) -> Tensor:
    """An lstm_ctx for the C step functions, as an int64 tensor (to be kept alive while it is used):
    tensors are given by address, absent ones as 0."""
    return torch.tensor([fields.get(k, 0) for k in _CTX_FIELDS], dtype=torch.int64)


def _use_native(like: Tensor) -> bool:
    return like.dtype == torch.float32 and like.device.type == "cpu" and lstm_cell() is not None


def _step_masks(masks: Optional[Tensor]) -> Optional[Tensor]:
    """bool [B, T, 1] -> uint8 [T, B] (one contiguous row per step), or None."""
    return None if masks is None else masks.squeeze(-1).t().contiguous().to(torch.uint8)


def _lstm_scan_native(s: Scan, xg: Tensor, b_hh: Optional[Tensor], W_hh: Tensor, h0: Tensor, c0: Tensor,
                      masks: Optional[Tensor]) -> None:
    """The LSTM forward scan with each step's pointwise work in one compiled call; fills ``s`` as the
    torch path does (``acts`` holds σ(i), σ(f), tanh(g), σ(o))."""
    step = lstm_cell().lstm_fwd_step
    B, T, G = xg.shape
    H = G // 4
    xg = xg.contiguous()
    z, acts = torch.empty_like(xg), torch.empty_like(xg)
    C, TC, out = xg.new_empty(B, T, H), xg.new_empty(B, T, H), xg.new_empty(B, T, H)
    h0, c0 = h0.contiguous(), c0.contiguous()
    bh = b_hh.contiguous() if b_hh is not None else None
    m = _step_masks(masks)
    ctx = _lstm_ctx(B=B, H=H, T=T, reverse=int(s.reverse), x=xg.data_ptr(), bh=_addr(bh), h0=h0.data_ptr(),
                    c0=c0.data_ptr(), z=z.data_ptr(), acts=acts.data_ptr(), c=C.data_ptr(), tc=TC.data_ptr(),
                    out=out.data_ptr(), mask=_addr(m))
    pctx = ctx.data_ptr()
    product = _products(xg)
    h = h0
    for t in s.order:
        hw = product(h, W_hh)
        step(pctx, t, hw.data_ptr())
        h = out[:, t]
    last = s.order[-1]
    s.z = z  # W_hh h_prev + b_hh
    s.extra.update(acts=acts, C=C, TC=TC, M=None, native=m)
    s.out, s.hT, s.cT = out, out[:, last].clone(), C[:, last].clone()
    s.c0 = c0


def _addr(x: Optional[Tensor]) -> int:
    return x.data_ptr() if x is not None else 0


def _products(like: Tensor):
    """(x, W) -> x Wᵀ for no-grad per-step products: oneDNN's op called directly when it applies."""
    if onednn_applies(like):
        return lambda x, W: _LINEAR(x, W, None, "none", [], "")
    return lambda x, W: x @ W.t()


def _lstm_bptt_native(s: Scan, d_out: Tensor, d_hT: Tensor, d_cT: Tensor, need_h0: bool, need_c0: bool):
    step = lstm_cell().lstm_bwd_step
    acts, TC, C = s.extra["acts"], s.extra["TC"], s.extra["C"]
    m = s.extra["native"]
    B, T, G = acts.shape
    H = G // 4
    WT = s.W_hh.t()  # a view: oneDNN reads it as fast as a copy
    d_out = d_out.contiguous()
    dG = torch.empty_like(acts)
    rev = list(s.order)[::-1]
    dh = (d_out[:, rev[0]] + d_hT).contiguous()
    dc = d_cT.clone(memory_format=torch.contiguous_format)
    ctx = _lstm_ctx(B=B, H=H, T=T, reverse=int(s.reverse), c0=s.c0.data_ptr(), acts=acts.data_ptr(),
                    c=C.data_ptr(), tc=TC.data_ptr(), mask=_addr(m), dout=d_out.data_ptr(), dh=dh.data_ptr(),
                    dc=dc.data_ptr(), dG=dG.data_ptr())
    pctx = ctx.data_ptr()
    product = _products(acts)
    gw = None
    for t in rev:
        step(pctx, t, gw.data_ptr() if gw is not None else None)
        if t != rev[-1]:
            gw = product(dG[:, t], WT)
    dh0 = None
    if need_h0:
        dh0 = product(dG[:, rev[-1]], WT)
        if m is not None:
            dh0.addcmul_(dh, (m[rev[-1]] == 0).to(dh.dtype).unsqueeze(1))
    return dG, None, dh0, (dc if need_c0 else None)


def _lstm_bptt(s: Scan, d_out: Tensor, d_hT: Tensor, d_cT: Tensor, need_h0: bool, need_c0: bool):
    if "native" in s.extra:
        return _lstm_bptt_native(s, d_out, d_hT, d_cT, need_h0, need_c0)
    acts, TC, C = s.extra["acts"], s.extra["TC"], s.extra["C"]
    B, T, G = acts.shape
    H = G // 4
    i, f, g, o = acts[..., :H], acts[..., H:2 * H], acts[..., 2 * H:3 * H], acts[..., 3 * H:]
    # dgates = S ⊙ [dc, dc, dc, dh] with S = [i' g, f' c_prev, (1 - g²) i, o' tanh(c)]
    S = torch.addcmul(acts, acts, acts, value=-1.0)  # σ' = a (1 - a)
    S[..., :H].mul_(g)
    Sf = S[..., H:2 * H]
    if s.reverse:
        Sf[:, :-1].mul_(C[:, 1:])
        Sf[:, -1].mul_(s.c0)
    else:
        Sf[:, 1:].mul_(C[:, :-1])
        Sf[:, 0].mul_(s.c0)
    torch.addcmul(i, i * g, g, value=-1.0, out=S[..., 2 * H:3 * H])
    S[..., 3 * H:].mul_(TC)
    OT = torch.addcmul(o, o * TC, TC, value=-1.0)  # o (1 - tanh(c)²): dc += dh ⊙ OT
    Fg = f
    m, nm = _mask_factors(s)
    if m is not None:
        S.mul_(m)
        OT.mul_(m)
        Fg = torch.addcmul(nm, f, m)
    proj = s.W_hr is not None
    times_W, times_W_add = _times(s.W_hh, acts), _times_add(s.W_hh, acts)
    times_Wr = _times(s.W_hr, acts) if proj else None
    dG = torch.empty_like(acts)
    dP = torch.empty_like(s.out) if proj else None
    S3, So = S[..., :3 * H].unflatten(-1, (3, H)).unbind(1), S[..., 3 * H:].unbind(1)
    dG3, dGo, dGt = dG[..., :3 * H].unflatten(-1, (3, H)).unbind(1), dG[..., 3 * H:].unbind(1), dG.unbind(1)
    OTt, Ft, dOt = OT.unbind(1), Fg.unbind(1), d_out.unbind(1)
    dPt = dP.unbind(1) if proj else None
    mt = m.unbind(1) if m is not None else None
    nmt = nm.unbind(1) if nm is not None else None
    dc = d_cT.clone()
    rev = list(s.order)[::-1]
    dh0 = None
    dh = dOt[rev[0]] + d_hT
    for k, t in enumerate(rev):
        if proj:
            x = dPt[t]
            if mt is None:
                x.copy_(dh)
            else:
                torch.mul(dh, mt[t], out=x)
            x = times_Wr(x)
        else:
            x = dh
        dc.addcmul_(x, OTt[t])
        torch.mul(S3[t], dc.unsqueeze(1), out=dG3[t])
        torch.mul(So[t], x, out=dGo[t])
        dc.mul_(Ft[t])
        if k + 1 < len(rev):
            base = dOt[rev[k + 1]]
            if nmt is not None:
                base = torch.addcmul(base, dh, nmt[t])
            dh = times_W_add(base, dGt[t])
        elif need_h0:
            dh0 = times_W(dGt[t])
            if nmt is not None:
                dh0.addcmul_(dh, nmt[t])
    return dG, dP, dh0, (dc if need_c0 else None)


def _gru_bptt(s: Scan, d_out: Tensor, d_hT: Tensor, need_h0: bool):
    RZ, N, Z = s.extra["RZ"], s.extra["N"], s.z
    B, T, G = Z.shape
    H = G // 3
    r, z = RZ[..., :H], RZ[..., H:]
    # dz_pre = dh ⊙ (h_prev - n) z (1 - z);  dn_pre = dh ⊙ (1 - z)(1 - n²);  dr_pre = dn_pre ⊙ hg_n r (1 - r)
    A = torch.empty(B, T, 2, H, dtype=Z.dtype, device=Z.device)
    torch.mul(s.h_prev() - N, torch.addcmul(z, z, z, value=-1.0), out=A[:, :, 0])
    torch.mul(1.0 - z, torch.addcmul(torch.ones_like(N), N, N, value=-1.0), out=A[:, :, 1])
    Ar = Z[..., 2 * H:] * torch.addcmul(r, r, r, value=-1.0)
    Zd = z
    m, nm = _mask_factors(s)
    if m is not None:
        A.mul_(m.unsqueeze(-1))
        Zd = torch.addcmul(nm, z, m)
    times_W_add = _times_add(s.W_hh, Z)
    dX = torch.empty_like(Z)
    dZ = torch.empty_like(Z)
    At, Art, rt, Zdt, dOt = A.unbind(1), Ar.unbind(1), r.unbind(1), Zd.unbind(1), d_out.unbind(1)
    dX_zn, dX_n, dX_rz, dX_r = (dX[..., H:].unflatten(-1, (2, H)).unbind(1), dX[..., 2 * H:].unbind(1),
                                dX[..., :2 * H].unbind(1), dX[..., :H].unbind(1))
    dZt, dZ_rz, dZ_n = dZ.unbind(1), dZ[..., :2 * H].unbind(1), dZ[..., 2 * H:].unbind(1)
    rev = list(s.order)[::-1]
    dh0 = None
    dh = dOt[rev[0]] + d_hT
    for k, t in enumerate(rev):
        torch.mul(At[t], dh.unsqueeze(1), out=dX_zn[t])
        torch.mul(dX_n[t], Art[t], out=dX_r[t])
        dZ_rz[t].copy_(dX_rz[t])
        torch.mul(dX_n[t], rt[t], out=dZ_n[t])
        if k + 1 < len(rev):
            dh = times_W_add(torch.addcmul(dOt[rev[k + 1]], dh, Zdt[t]), dZt[t])
        elif need_h0:
            dh0 = times_W_add(dh * Zdt[t], dZt[t])
    return dX, dZ, dh0


def _rnn_bptt(s: Scan, d_out: Tensor, d_hT: Tensor, need_h0: bool):
    if s.mode == "RNN_RELU":
        D = (s.extra["pre"] > 0).to(s.out.dtype)
    else:
        D = _tanh_(s.extra["pre"].clone(), onednn_applies(s.out))
        D = torch.addcmul(torch.ones_like(D), D, D, value=-1.0)
    m, nm = _mask_factors(s)
    if m is not None:
        D.mul_(m)
    times_W, times_W_add = _times(s.W_hh, D), _times_add(s.W_hh, D)
    dZ = torch.empty_like(D)
    Dt, dZt, dOt = D.unbind(1), dZ.unbind(1), d_out.unbind(1)
    nmt = nm.unbind(1) if nm is not None else None
    rev = list(s.order)[::-1]
    dh0 = None
    dh = dOt[rev[0]] + d_hT
    for k, t in enumerate(rev):
        dz = torch.mul(dh, Dt[t], out=dZt[t])
        if k + 1 < len(rev):
            base = dOt[rev[k + 1]]
            if nmt is not None:
                base = torch.addcmul(base, dh, nmt[t])
            dh = times_W_add(base, dz)
        elif need_h0:
            dh0 = times_W(dz)
            if nmt is not None:
                dh0.addcmul_(dh, nmt[t])
    return dZ, dh0
