"""Fused recurrences for DPRNN / DPGRU / DPLSTM: a no-grad forward scan and a hand-written BPTT.

One layer in one direction runs as:

1. ``xg = ih(x)`` — one Linear call on the whole sequence (engine-visible);
2. :func:`scan` — the time loop, in no-grad mode into preallocated time-major buffers ``[T, B, .]``
   (one ``addmm`` and a few fused pointwise ops per step, no autograd bookkeeping);
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
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._gemm import linear, onednn_applies

Tensor = torch.Tensor


class Scan:
    """Results of the forward scan of one layer and direction (time-major buffers)."""

    def __init__(self, mode: str, order: Sequence[int], masks: Optional[Tensor], W_hh: Tensor,
                 W_hr: Optional[Tensor], h0: Tensor, c0: Optional[Tensor]):
        self.mode, self.order, self.masks = mode, list(order), masks
        self.W_hh, self.W_hr, self.h0, self.c0 = W_hh, W_hr, h0, c0
        self.out: Tensor  # [T, B, h_out], state after each step
        self.hT: Tensor
        self.cT: Optional[Tensor] = None
        self.z: Tensor  # [T, B, G*H]: W_hh h_prev + b_hh
        self.extra: dict = {}
        self._h_prev: Optional[Tensor] = None

    def h_prev(self) -> Tensor:
        """[T, B, h_out]: the state each step started from (computed once, then kept)."""
        if self._h_prev is None:
            self._h_prev = self._shift(self.out, self.h0)
        return self._h_prev

    def _shift(self, seq: Tensor, first: Tensor) -> Tensor:
        h0 = first.unsqueeze(0)
        if self.order and self.order[0] != 0:  # reverse direction
            return torch.cat([seq[1:], h0], 0)
        return torch.cat([h0, seq[:-1]], 0)

    def c_prev(self) -> Tensor:
        return self._shift(self.extra["C"], self.c0)


def scan(mode: str, xg: Tensor, b_hh: Optional[Tensor], W_hh: Tensor, W_hr: Optional[Tensor], h0: Tensor,
         c0: Optional[Tensor], reverse: bool, masks: Optional[Tensor]) -> Scan:
    """Run the recurrence forward. ``xg``: [T, B, G*H] input projections (with b_ih). No autograd."""
    T, B, G = xg.shape
    order = range(T - 1, -1, -1) if reverse else range(T)
    s = Scan(mode, order, masks, W_hh, W_hr, h0, c0)
    WT = W_hh.t()
    fast = onednn_applies(xg)  # per-step products on oneDNN (see _gemm.py); else in-place addmm
    kw = {"dtype": xg.dtype, "device": xg.device}
    if mode == "LSTM":
        H = G // 4
        gates = torch.add(xg, b_hh) if b_hh is not None else xg.clone()
        acts = torch.empty(T, B, G, **kw)
        C = torch.empty(T, B, H, **kw)
        TC = torch.empty(T, B, H, **kw)
        proj = W_hr is not None
        out = torch.empty(T, B, W_hr.shape[0] if proj else H, **kw)
        M = torch.empty(T, B, H, **kw) if proj else None
        WrT = W_hr.t() if proj else None
        h, c = h0, c0
        for t in order:
            g = gates[t]
            if fast:
                g.add_(linear(h, W_hh))
            else:
                g.addmm_(h, WT)
            a = acts[t]
            torch.sigmoid(g, out=a)
            torch.tanh(g[:, 2 * H:3 * H], out=a[:, 2 * H:3 * H])
            cn = C[t]
            torch.mul(a[:, H:2 * H], c, out=cn)
            cn.addcmul_(a[:, :H], a[:, 2 * H:3 * H])
            tc = TC[t]
            torch.tanh(cn, out=tc)
            hn = out[t]
            if proj:
                mt = M[t]
                torch.mul(a[:, 3 * H:], tc, out=mt)
                if fast:
                    hn.copy_(linear(mt, W_hr))
                else:
                    torch.mm(mt, WrT, out=hn)
            else:
                torch.mul(a[:, 3 * H:], tc, out=hn)
            if masks is not None:
                m = masks[t]
                torch.where(m, hn, h, out=hn)
                torch.where(m, cn, c, out=cn)
            h, c = hn, cn
        s.z = gates.sub_(xg)  # W_hh h_prev + b_hh
        s.extra.update(acts=acts, C=C, TC=TC, M=M)
        s.cT = c.clone()
    elif mode == "GRU":
        H = G // 3
        Z = torch.empty(T, B, G, **kw)
        RZ = torch.empty(T, B, 2 * H, **kw)
        N = torch.empty(T, B, H, **kw)
        out = torch.empty(T, B, H, **kw)
        h = h0
        for t in order:
            hg = Z[t]
            if fast:
                hg.copy_(linear(h, W_hh, b_hh))
            elif b_hh is not None:
                torch.addmm(b_hh, h, WT, out=hg)
            else:
                torch.mm(h, WT, out=hg)
            x = xg[t]
            rz = RZ[t]
            torch.add(x[:, :2 * H], hg[:, :2 * H], out=rz)
            rz.sigmoid_()
            n = N[t]
            torch.addcmul(x[:, 2 * H:], rz[:, :H], hg[:, 2 * H:], out=n)
            n.tanh_()
            hn = out[t]
            torch.lerp(n, h, rz[:, H:], out=hn)  # (1 - z) n + z h
            if masks is not None:
                torch.where(masks[t], hn, h, out=hn)
            h = hn
        s.z = Z
        s.extra.update(RZ=RZ, N=N)
    else:
        pre = torch.add(xg, b_hh) if b_hh is not None else xg.clone()
        out = torch.empty_like(pre)
        relu = mode == "RNN_RELU"
        h = h0
        for t in order:
            p = pre[t]
            if fast:
                p.add_(linear(h, W_hh))
            else:
                p.addmm_(h, WT)
            hn = out[t]
            if relu:
                torch.clamp_min(p, 0, out=hn)
            else:
                torch.tanh(p, out=hn)
            if masks is not None:
                torch.where(masks[t], hn, h, out=hn)
            h = hn
        s.z = pre - xg
        s.extra.update(pre=pre)
    s.out = out
    s.hT = h.clone() if T else h0.clone()
    return s


class Recurrence(torch.autograd.Function):
    """Outputs of a scan as a differentiable function of ``(xg, z, p, h0, c0)``; backward = BPTT."""

    @staticmethod
    def forward(ctx, s: Scan, xg: Tensor, z: Tensor, p: Optional[Tensor], h0: Tensor, c0: Optional[Tensor]):
        ctx.s = s
        out = s.out.transpose(0, 1).detach()
        if s.mode == "LSTM":
            return out, s.hT.detach(), s.cT.detach()
        return out, s.hT.detach()

    @staticmethod
    def backward(ctx, d_out: Tensor, d_hT: Tensor, d_cT: Optional[Tensor] = None):
        s: Scan = ctx.s
        need_h0, need_c0 = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        d_out = d_out.transpose(0, 1)  # [T, B, h_out]
        if s.mode == "LSTM":
            dG, dP, dh0, dc0 = _lstm_bptt(s, d_out, d_hT, d_cT, need_h0, need_c0)
            dG = dG.transpose(0, 1)
            dP = None if dP is None else dP.transpose(0, 1)
            return None, dG, dG, dP, dh0, dc0
        if s.mode == "GRU":
            dX, dZ, dh0 = _gru_bptt(s, d_out, d_hT, need_h0)
            return None, dX.transpose(0, 1), dZ.transpose(0, 1), None, dh0, None
        dZ, dh0 = _rnn_bptt(s, d_out, d_hT, need_h0)
        dZ = dZ.transpose(0, 1)
        return None, dZ, dZ, None, dh0, None


def _times(W: Tensor, like: Tensor):
    """A function x -> x @ W for the backward's per-step products (oneDNN when it applies)."""
    if onednn_applies(like):
        WT = W.t().contiguous()
        return lambda x: linear(x, WT)
    return lambda x: x @ W


def _times_add(W: Tensor, like: Tensor):
    """A function (base, x) -> base + x @ W."""
    if onednn_applies(like):
        WT = W.t().contiguous()
        return lambda base, x: linear(x, WT).add_(base)
    return lambda base, x: torch.addmm(base, x, W)


def _mask_factors(s: Scan):
    """Float masks m [T, B, 1] and 1 - m, or (None, None) without masks."""
    if s.masks is None:
        return None, None
    m = s.masks.to(s.out.dtype)
    return m, 1.0 - m


def _lstm_bptt(s: Scan, d_out: Tensor, d_hT: Tensor, d_cT: Tensor, need_h0: bool, need_c0: bool):
    acts, TC = s.extra["acts"], s.extra["TC"]
    T, B, G = acts.shape
    H = G // 4
    i, f, g, o = acts[..., :H], acts[..., H:2 * H], acts[..., 2 * H:3 * H], acts[..., 3 * H:]
    # dgates = DP ⊙ [dc, dc, dc, dh]: i' g, f' c_prev, (1 - g²) i, o' tanh(c)
    DP = torch.empty_like(acts)
    torch.mul(i - i * i, g, out=DP[..., :H])
    torch.mul(f - f * f, s.c_prev(), out=DP[..., H:2 * H])
    torch.mul(1.0 - g * g, i, out=DP[..., 2 * H:3 * H])
    torch.mul(o - o * o, TC, out=DP[..., 3 * H:])
    OT = o * (1.0 - TC * TC)  # dc += dh ⊙ OT
    Fg = f
    m, nm = _mask_factors(s)
    if m is not None:
        DP.mul_(m)
        OT.mul_(m)
        Fg = f * m + nm
    W, Wr = s.W_hh, s.W_hr
    proj = Wr is not None
    times_W, times_W_add = _times(W, acts), _times_add(W, acts)
    times_Wr = _times(Wr, acts) if proj else None
    dG = torch.empty_like(acts)
    dP = torch.empty_like(s.out) if proj else None
    dc = d_cT.clone()
    rev = s.order[::-1]
    dh0 = None
    if not rev:
        return dG, dP, d_hT, dc
    dh = d_out[rev[0]] + d_hT
    for k, t in enumerate(rev):
        if proj:
            x = dP[t]
            if m is None:
                x.copy_(dh)
            else:
                torch.mul(dh, m[t], out=x)
            x = times_Wr(x)
        else:
            x = dh
        dc.addcmul_(x, OT[t])
        dg = dG[t]
        torch.mul(DP[t, :, :3 * H].view(B, 3, H), dc.unsqueeze(1), out=dg[:, :3 * H].view(B, 3, H))
        torch.mul(DP[t, :, 3 * H:], x, out=dg[:, 3 * H:])
        dc.mul_(Fg[t])
        if k + 1 < len(rev):
            base = d_out[rev[k + 1]]
            if nm is not None:
                base = torch.addcmul(base, dh, nm[t])
            dh = times_W_add(base, dg)
        elif need_h0:
            dh0 = times_W(dg)
            if nm is not None:
                dh0.addcmul_(dh, nm[t])
    return dG, dP, dh0, (dc if need_c0 else None)


def _gru_bptt(s: Scan, d_out: Tensor, d_hT: Tensor, need_h0: bool):
    RZ, N, Z = s.extra["RZ"], s.extra["N"], s.z
    T, B, G = Z.shape
    H = G // 3
    r, z = RZ[..., :H], RZ[..., H:]
    # dz_pre = dh ⊙ (h_prev - n) z (1 - z);  dn_pre = dh ⊙ (1 - z)(1 - n²);  dr_pre = dn_pre ⊙ hg_n r (1 - r)
    A = torch.empty(T, B, 2, H, dtype=Z.dtype, device=Z.device)
    torch.mul(s.h_prev() - N, z - z * z, out=A[:, :, 0])
    torch.mul(1.0 - z, 1.0 - N * N, out=A[:, :, 1])
    Ar = Z[..., 2 * H:] * (r - r * r)
    Zd = z
    m, nm = _mask_factors(s)
    if m is not None:
        A.mul_(m.unsqueeze(-1))
        Zd = z * m + nm
    times_W_add = _times_add(s.W_hh, Z)
    dX = torch.empty_like(Z)
    dZ = torch.empty_like(Z)
    rev = s.order[::-1]
    dh0 = None
    if not rev:
        return dX, dZ, d_hT
    dh = d_out[rev[0]] + d_hT
    for k, t in enumerate(rev):
        dx, dz = dX[t], dZ[t]
        torch.mul(A[t], dh.unsqueeze(1), out=dx[:, H:].view(B, 2, H))
        dn = dx[:, 2 * H:]
        torch.mul(dn, Ar[t], out=dx[:, :H])
        dz[:, :2 * H].copy_(dx[:, :2 * H])
        torch.mul(dn, r[t], out=dz[:, 2 * H:])
        if k + 1 < len(rev):
            dh = times_W_add(torch.addcmul(d_out[rev[k + 1]], dh, Zd[t]), dz)
        elif need_h0:
            dh0 = times_W_add(dh * Zd[t], dz)
    return dX, dZ, dh0


def _rnn_bptt(s: Scan, d_out: Tensor, d_hT: Tensor, need_h0: bool):
    if s.mode == "RNN_RELU":
        D = (s.extra["pre"] > 0).to(s.out.dtype)
    else:
        D = 1.0 - torch.tanh(s.extra["pre"]).square_()
    m, nm = _mask_factors(s)
    if m is not None:
        D = D * m
    times_W, times_W_add = _times(s.W_hh, D), _times_add(s.W_hh, D)
    dZ = torch.empty_like(D)
    rev = s.order[::-1]
    dh0 = None
    if not rev:
        return dZ, d_hT
    dh = d_out[rev[0]] + d_hT
    for k, t in enumerate(rev):
        dz = torch.mul(dh, D[t], out=dZ[t])
        if k + 1 < len(rev):
            base = d_out[rev[k + 1]]
            if nm is not None:
                base = torch.addcmul(base, dh, nm[t])
            dh = times_W_add(base, dz)
        elif need_h0:
            dh0 = times_W(dz)
            if nm is not None:
                dh0.addcmul_(dh, nm[t])
    return dZ, dh0

