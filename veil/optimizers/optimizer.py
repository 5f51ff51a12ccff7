"""DPOptimizer: one optimizer wrapper for every clipping strategy.

Per logical batch it (1) clips every sample's gradient as each backward pass ends (the engine hands
it a chunk of per-sample norms), (2) sums the clipped gradients, (3) adds Gaussian noise of std
σ·sensitivity once, (4) divides by the expected batch size fixed at setup, and (5) lets the wrapped
optimizer (SGD, Adam, ...) take its step, then tells the accountant.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn
from torch.optim import Optimizer

from ..grad_sample.grad_sample_module import Chunk, GradSampleModule, PrivacyLeakError, make_entry
from ..grad_sample.rules.base import InstantiatedGrads
from .clipping import ClippingStrategy, make_strategy
from .noise import add_gaussian_, gaussian_

Tensor = torch.Tensor


class DPOptimizer(Optimizer):
    """Wraps ``optimizer`` so that each step is a DP-SGD step.

    Args:
        optimizer: the optimizer to wrap; its parameters must belong to the private model.
        noise_multiplier: σ, the noise std relative to the clipping bound.
        max_grad_norm: the clipping bound C (ignored when ``clipping`` is a strategy object).
        expected_batch_size: q·N, the divisor of the noisy sum when ``loss_reduction="mean"``.
        loss_reduction: "mean" or "sum", as the loss the user computes.
        generator: a torch.Generator for the noise (reproducible runs).
        secure_mode: draw noise from a cryptographically secure source.
        clipping: "flat", "per_layer" (``max_grad_norm`` a list, one per parameter group), "adaptive",
            "automatic", or a :class:`ClippingStrategy`. Further keyword arguments configure the
            strategy (e.g. ``target_unclipped_quantile``, ``unclipped_num_std`` for "adaptive").
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: Optional[int],
        loss_reduction: str = "mean",
        generator: Optional[torch.Generator] = None,
        secure_mode: bool = False,
        clipping: Union[str, ClippingStrategy] = "flat",
        **kwargs,
    ):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if loss_reduction == "mean" and (expected_batch_size is None or expected_batch_size <= 0):
            raise ValueError("expected_batch_size must be a positive number when loss_reduction='mean'")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.original_optimizer = optimizer
        # torch's Optimizer bookkeeping, so hooks and LR schedulers work on the wrapper
        self._optimizer_step_pre_hooks: Dict = OrderedDict()
        self._optimizer_step_post_hooks: Dict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: Dict = OrderedDict()
        self._optimizer_state_dict_post_hooks: Dict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: Dict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: Dict = OrderedDict()
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = expected_batch_size
        self.loss_reduction = loss_reduction
        self.generator = generator
        self.secure_mode = secure_mode
        self.clipping = make_strategy(clipping, max_grad_norm, optimizer.param_groups, **kwargs)
        self.step_hook: Optional[Callable[["DPOptimizer"], None]] = None
        self._step_hooks: List[Callable[["DPOptimizer"], None]] = []
        self._skip_next = False
        self._is_last_step_skipped = False
        self._gsm: Optional[GradSampleModule] = None
        self._summed: Dict[int, Tensor] = {}  # id(param) -> view of a flat buffer in self._flats
        self._flats: List[Tensor] = []
        self._noise_std = 0.0  # the std of the noise already in self._flats
        self._chunks = 0  # backward passes since the last step() call
        self._iterations = 0  # most backward passes between two step() calls in this logical batch
        self._errors: List[str] = []
        self._stamps: Dict[int, tuple] = {}
        self._in_optimizer = {id(p) for p in self.params}
        gsm = _find_gsm(self.params)
        if gsm is not None:
            self.attach(gsm)

    # --------------------------------------------------------------- plumbing
    @property
    def max_grad_norm(self) -> float:
        return self.clipping.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        self.clipping.max_grad_norm = value

    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    @property
    def params(self) -> List[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def accumulated_iterations(self) -> int:
        """Backward passes between two ``step()`` calls in this logical batch (at least 1)."""
        return max(self._chunks, self._iterations, 1)

    def attach(self, gsm: GradSampleModule) -> None:
        """Receive per-sample norms from ``gsm`` at the end of each backward pass."""
        self._gsm = gsm
        gsm.consumer = self._accumulate

    def attach_step_hook(self, fn: Callable[["DPOptimizer"], None]) -> None:
        """Run ``fn(optimizer)`` after every real (not skipped) step, e.g. the accountant."""
        self._step_hooks.append(fn)
        self.step_hook = fn

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Make the next ``step()`` only clip and accumulate (for virtual batches)."""
        self._skip_next = do_skip

    # ------------------------------------------------------------- clipping
    def _accumulate(self, chunk: Chunk) -> None:
        """Clip one chunk's samples and add them to the running clipped sum."""
        self._chunks += 1
        if chunk.errors:
            self._errors.extend(chunk.errors)
            return
        entries = [e for e in chunk.entries if id(e.param) in self._in_optimizer]
        factors = self.clipping.factors(entries, chunk.batch_size)
        for e, c in zip(entries, factors):
            e.add_clipped_sum_(c, self._grad_buffer(e.param))

    def _grad_buffer(self, p: Tensor) -> Tensor:
        """This logical batch's gradient of ``p``: a view of one flat buffer per dtype (at least fp32)."""
        if not self._summed:
            by_dtype: Dict[torch.dtype, List[Tensor]] = {}
            for q in self.params:
                if q.requires_grad:
                    by_dtype.setdefault(torch.promote_types(q.dtype, torch.float32), []).append(q)
            # the buffer starts as this logical batch's noise; the clipped sums are added to it
            self._noise_std = self.clipping.noise_std(self.noise_multiplier)
            for dtype, group in by_dtype.items():
                flat = torch.empty(sum(q.numel() for q in group), dtype=dtype, device=group[0].device)
                gaussian_(flat, self._noise_std, self.generator, secure=self.secure_mode)
                self._flats.append(flat)
                i = 0
                for q in group:
                    self._summed[id(q)] = flat[i : i + q.numel()].view(q.shape)
                    i += q.numel()
        return self._summed[id(p)]

    def _accumulate_grad_sample(self) -> None:
        """No engine attached: take per-sample gradients from ``p.grad_sample`` (Opacus's interface)."""
        entries = []
        B = None
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                continue
            if isinstance(gs, (list, tuple)):
                gs = torch.cat(list(gs), 0)
            B = gs.shape[0]  # rows are per-sample gradients of each sample's own loss, as Opacus stores them
            entries.append(make_entry(p, f"param{len(entries)}", InstantiatedGrads({"w": gs}), "w"))
            p.grad_sample = None
        if B is not None:
            self._accumulate(Chunk(batch_size=B, entries=entries,
                                   errors=[e.name for e in entries if not bool(torch.isfinite(e.norms_sq).all())]))
        elif self._chunks == 0 and any(p.grad is not None for p in self.params):
            for p in self.params:
                p.grad = None
            raise PrivacyLeakError(
                "The optimizer's parameters have ordinary gradients but no per-sample gradients, so they "
                "cannot be clipped per sample; no step was taken. Wrap the model with GradSampleModule (or use "
                "PrivacyEngine.make_private) before the forward pass, or set p.grad_sample yourself."
            )

    # ----------------------------------------------------------------- step
    def _check(self) -> None:
        if self._errors:
            names = sorted(set(self._errors))
            self._reset()
            raise FloatingPointError(
                f"Per-sample gradient norms of {', '.join(repr(n) for n in names)} are NaN or infinite, so no "
                "step was taken and the weights are unchanged. The loss or activations overflowed: lower the "
                "learning rate, check the inputs for NaN/inf, or use a more stable loss."
            )
        if self._gsm is None:
            return
        leaked = []
        for p in self.params:
            if p.grad is not None and self._stamps.get(id(p)) != (id(p.grad), p.grad._version):
                leaked.append(self._gsm.parameter_name(p))
        if leaked:
            for p in self.params:
                if self._stamps.get(id(p)) != ((id(p.grad), p.grad._version) if p.grad is not None else None):
                    p.grad = None
            self._reset()
            raise PrivacyLeakError(
                f"Parameter(s) {', '.join(repr(n) for n in leaked)} received a gradient outside a module call "
                "(for example `x @ self.emb.weight.t()` in forward), which Veil cannot clip per sample; no step "
                "was taken. Use the parameter only through its module (e.g. an nn.Linear whose weight is tied "
                "to the embedding: `self.out.weight = self.emb.weight`), or register a rule for the module that "
                "uses it."
            )

    def pre_step(self) -> bool:
        """Clip, noise and scale; returns False when the step is skipped (virtual batch)."""
        if self._gsm is None:
            self._accumulate_grad_sample()
        if self._skip_next:
            self._skip_next = False
            self._is_last_step_skipped = True
            self._iterations = self.accumulated_iterations
            self._chunks = 0
            return False
        self._check()
        denom = self.expected_batch_size * self.accumulated_iterations if self.loss_reduction == "mean" else 1
        params = [p for p in self.params if p.requires_grad]
        if params:
            self._grad_buffer(params[0])  # a step with no backward pass (empty batch): noise alone
        std = self.clipping.noise_std(self.noise_multiplier)
        # σ or C changed after the noise was drawn (between backward and step): top it up to std; a
        # lower std is not reachable, and the step then carries more noise than accounted (safe)
        extra = std * std - self._noise_std * self._noise_std
        for flat in self._flats:
            if extra > 0:
                add_gaussian_(flat, extra ** 0.5, self.generator, secure=self.secure_mode)
            if denom != 1:
                flat.div_(denom)
        for p in params:
            g = self._summed[id(p)]
            p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
        self._is_last_step_skipped = False
        return True

    def step(self, closure: Optional[Callable[[], float]] = None):
        """One private step (or only accumulation, after ``signal_skip_step``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pre_step():
            self.original_optimizer.step()
            self.clipping.on_step(self)
            for hook in self._step_hooks:
                hook(self)
            self._reset()
            self._stamp()
        return loss

    def _reset(self) -> None:
        self._noise_std = 0.0
        self._summed = {}
        self._flats = []
        self._chunks = 0
        self._iterations = 0
        self._errors = []

    def _stamp(self) -> None:
        self._stamps = {id(p): (id(p.grad), p.grad._version) for p in self.params if p.grad is not None}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears gradients. The accumulated clipped sum is kept while a virtual step is pending."""
        self.original_optimizer.zero_grad(set_to_none)
        for p in self.params:
            if getattr(p, "grad_sample", None) is not None:
                p.grad_sample = None
        if not self._is_last_step_skipped:
            self._reset()
        self._stamp()

    # ------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.original_optimizer.add_param_group(param_group)
        self._in_optimizer = {id(p) for p in self.params}

    def __repr__(self) -> str:
        return f"DPOptimizer(noise_multiplier={self.noise_multiplier}, clipping={type(self.clipping).__name__}, " \
               f"max_grad_norm={self.max_grad_norm}, optimizer={self.original_optimizer!r})"


def _find_gsm(params: List[Tensor]) -> Optional[GradSampleModule]:
    for p in params:
        ref = getattr(p, "_veil_gsm", None)
        if ref is not None and ref() is not None:
            return ref()
    return None
