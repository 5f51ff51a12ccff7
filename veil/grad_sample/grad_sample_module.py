"""GradSampleModule: a tape around the user's model that yields per-sample gradient information.

Every module that owns trainable parameters is watched with a forward pre-hook and a forward hook:

* pre-hook: the module's own parameters stop requiring grad for the duration of its forward, so
  autograd records only what the input gradient needs and never runs a weight-gradient GEMM;
* hook: the rule captures what it needs (usually the input), and the output passes through
  :class:`_Attach`, an identity that connects the parameters to the graph and hands the output
  gradient to the tape in backward;
* at the end of each backward pass, the tape turns the recorded calls into per-sample squared
  norms and clipped-sum closures (a :class:`Chunk`) and gives them to the consumer (the DPOptimizer),
  which clips and accumulates at once, so activations are freed right away.

Parameters therefore never receive a ``.grad`` from autograd. A parameter that does receive one
was used on a path the engine cannot see (e.g. ``x @ self.emb.weight.t()``): that is reported as
an error naming it, never trained on.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import state
from ..utils.cpu_allocator import retain_freed_memory
from .functional import FunctorchRule
from .rules.base import Call, InstantiatedGrads, LayerGrads, Rule, rule_for

Tensor = torch.Tensor

MODE_ALIASES = {
    "auto": "auto",
    "ew": "auto",
    "bookkeeping": "auto",
    "ghost": "ghost",
    "hooks": "instantiate",
    "instantiate": "instantiate",
    "functorch": "functorch",
}


class UnsupportedModuleError(ValueError):
    """The engine cannot compute exact per-sample gradients for this module."""


class PrivacyLeakError(RuntimeError):
    """A parameter received a gradient that was not clipped per sample."""


@dataclass
class ParamEntry:
    """One parameter's share of a chunk: its per-sample squared norms and a clipped-sum closure."""

    param: nn.Parameter
    name: str  # qualified name in the wrapped model
    norms_sq: Tensor  # [B]
    clipped_sum: Callable[[Tensor], Tensor]  # clip factors [B] -> Σ_i c_i G_i
    per_sample: Callable[[], Tensor]
    add_clipped_sum_: Callable[[Tensor, Tensor], None]  # (factors, out): out += Σ_i c_i G_i


@dataclass
class Chunk:
    """Everything one backward pass produced: B samples, one entry per parameter that got gradient."""

    batch_size: int
    entries: List[ParamEntry] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)


class _Attach(torch.autograd.Function):
    """Identity on a module's outputs that ties its parameters into the graph and taps output grads."""

    @staticmethod
    def forward(ctx, tape, module, call, n_params, *tensors):
        ctx.tape, ctx.module, ctx.call, ctx.n_params = tape, module, call, n_params
        return tuple(t.detach() for t in tensors[n_params:])

    @staticmethod
    def backward(ctx, *grads):
        ctx.tape.record(ctx.module, ctx.call, grads)
        return (None, None, None, None) + (None,) * ctx.n_params + grads


def _tensors_in(obj) -> List[Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, Tensor)]


class GradSampleModule(nn.Module):
    """Wraps a model so that every backward pass yields exact per-sample gradient information.

    Args:
        m: the model.
        batch_first: whether the batch is dimension 0 of sequence inputs (else dimension 1).
        loss_reduction: "mean" or "sum": how the loss combines samples.
        strict: refuse modules the engine cannot handle exactly (always True in effect; kept for
            Opacus compatibility).
        force_functorch: use the torch.func fallback for every layer.
        mode: "auto" (cheapest per layer), "ghost", "hooks"/"instantiate" or "functorch".

    Used alone (no DPOptimizer attached), each backward pass stores per-sample gradients in
    ``p.grad_sample`` as Opacus does.
    """

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        strict: bool = True,
        force_functorch: bool = False,
        mode: str = "auto",
    ):
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if mode not in MODE_ALIASES:
            raise ValueError(f"grad_sample_mode must be one of {sorted(MODE_ALIASES)}, got {mode!r}")
        retain_freed_memory()
        self._module = m
        self.batch_first = batch_first
        self.loss_reduction = loss_reduction
        self.mode = "functorch" if force_functorch else MODE_ALIASES[mode]
        self._hooks_enabled = True
        self._handles: list = []
        self._rules: Dict[nn.Module, Tuple[str, Rule]] = {}
        self._param_names: Dict[int, str] = {}
        self._shared: set = set()
        self._stack: list = []
        self._pending: list = []
        self._scheduled = False
        self.consumer: Optional[Callable[[Chunk], None]] = None
        self._scan()
        self.add_hooks()

    # ------------------------------------------------------------------ setup
    def _scan(self) -> None:
        owners: Dict[int, list] = {}
        fallback = FunctorchRule()
        for mname, module in self._module.named_modules():
            own = [(n, p) for n, p in module._parameters.items() if p is not None]
            if not own:
                continue
            rule = fallback if self.mode == "functorch" else (rule_for(module) or fallback)
            if rule is fallback and any(
                p is not None for child in module.children() for p in child.parameters()
            ):
                names = ", ".join(f"'{_join(mname, n)}'" for n, _ in own)
                raise UnsupportedModuleError(
                    f"Module '{mname or type(module).__name__}' ({type(module).__name__}) owns parameter(s) "
                    f"{names} directly and also has submodules with parameters, so Veil cannot see how those "
                    "parameters are used. Move them into a small nn.Module of their own (a layer that owns "
                    "them and is called in forward), or register a rule for this module type with "
                    "veil.grad_sample.register_grad_sampler."
                )
            self._rules[module] = (mname, rule)
            for n, p in own:
                other = getattr(p, "_veil_gsm", lambda: None)()
                if other is not None and other is not self and other._handles and other.managed(p):
                    raise ValueError(
                        f"Parameter '{_join(mname, n)}' is already watched by another GradSampleModule, so each "
                        "backward pass would be counted twice. Keep using that one, or call its remove_hooks() "
                        "first."
                    )
                p._veil_gsm = weakref.ref(self)
                owners.setdefault(id(p), []).append(module)
                self._param_names.setdefault(id(p), _join(mname, n))
        self._shared = {pid for pid, mods in owners.items() if len(mods) > 1}

    def add_hooks(self) -> None:
        """Start watching the model's layers (done by the constructor)."""
        if self._handles:
            return
        for module in self._rules:
            self._handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(
                module.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True)
            )

    def remove_hooks(self) -> None:
        """Stop watching the model; it behaves as the plain model again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def disable_hooks(self) -> None:
        self._hooks_enabled = False

    def enable_hooks(self) -> None:
        self._hooks_enabled = True

    def _close(self) -> None:
        self.remove_hooks()

    def __getattr__(self, item: str) -> Any:
        try:
            return super().__getattr__(item)
        except AttributeError as e:
            module = self._modules.get("_module")
            if module is not None and item != "_module":
                return getattr(module, item)
            raise e

    def trainable_parameters(self) -> Iterable[Tuple[str, nn.Parameter]]:
        for n, p in self._module.named_parameters():
            if p.requires_grad:
                yield n, p

    def parameter_name(self, p: Tensor) -> str:
        return self._param_names.get(id(p), "<unnamed>")

    def managed(self, p: Tensor) -> bool:
        return id(p) in self._param_names

    # ---------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def _pre_hook(self, module, args, kwargs):
        if not self._hooks_enabled or state.is_replaying() or not torch.is_grad_enabled():
            return None
        names = [n for n, p in module._parameters.items() if p is not None and p.requires_grad]
        if not names:
            return None
        for n in names:
            module._parameters[n].requires_grad_(False)
        self._stack.append((module, names))
        return None

    def _post_hook(self, module, args, kwargs, output):
        if not self._stack or self._stack[-1][0] is not module:
            return None
        _, names = self._stack.pop()
        params = [module._parameters[n] for n in names]
        for p in params:
            p.requires_grad_(True)
        if output is None:
            return None
        _, rule = self._rules[module]
        seq_first = (
            rule.sequence_input and not self.batch_first and bool(args) and isinstance(args[0], Tensor)
            and args[0].dim() >= rule.feature_dims(module) + 2
        )
        ctx = rule.capture(module, args, kwargs, not seq_first)
        call = Call(ctx=ctx)
        call.seq_first = seq_first
        call.names = names
        call.versions = [(ctx, ctx._version)] if isinstance(ctx, Tensor) else [(t, t._version) for t in _tensors_in(ctx)]
        if isinstance(output, Tensor) and output.is_floating_point():  # the common case, without pytree
            return _Attach.apply(self, module, call, len(params), *params, output)[0]
        flat, spec = tree_flatten(output)
        idx = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.is_floating_point()]
        outs = _Attach.apply(self, module, call, len(params), *params, *[flat[i] for i in idx])
        for i, o in zip(idx, outs):
            flat[i] = o
        return tree_unflatten(flat, spec)

    # --------------------------------------------------------------- backward
    def record(self, module: nn.Module, call: Call, grads: tuple) -> None:
        """Called from backward with the output gradient of one module call."""
        if call.done or call.grad is not None:
            raise RuntimeError(
                "backward() ran twice through the same forward pass. Each backward pass is treated as a "
                "new set of samples, so this would clip the same samples twice and break the privacy "
                "guarantee. Add the losses together and call backward() once."
            )
        call.grad = grads[0] if len(grads) == 1 else tuple(grads)
        self._pending.append((module, call))
        if not self._scheduled:
            self._scheduled = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)

    def _backward_end(self) -> None:
        pending, self._pending, self._scheduled = self._pending, [], False
        # backward() may run inside an autocast region; norms and clipped sums must not be downcast
        with torch.no_grad(), torch.autocast("cpu", enabled=False), _no_cuda_autocast(), state.shared_products():
            chunk = self._make_chunk(pending)
            if self.consumer is not None:
                self.consumer(chunk)
            else:
                self._store_grad_sample(chunk)

    def _make_chunk(self, pending) -> Chunk:
        by_module: Dict[nn.Module, List[Call]] = {}
        for module, call in pending:
            by_module.setdefault(module, []).append(call)
        batch_sizes = set()
        errors: List[str] = []
        for module, calls in by_module.items():
            name, rule = self._rules[module]
            for call in calls:
                for t, v in call.versions:
                    if t._version != v:
                        raise RuntimeError(
                            f"The input of module '{name}' was modified in place after the module used it; "
                            "its per-sample gradient would be wrong. Remove the in-place operation "
                            "(e.g. use x = x + y instead of x += y)."
                        )
                call.grad = self._normalise_grad(call.seq_first, call.grad)
                g0 = call.grad[0] if isinstance(call.grad, tuple) else call.grad
                batch_sizes.add(g0.shape[0])
        if len(batch_sizes) > 1:
            raise RuntimeError(
                f"Layers saw different batch sizes {sorted(batch_sizes)} in one backward pass. If your "
                "inputs are [T, B, ...], pass batch_first=False."
            )
        B = batch_sizes.pop() if batch_sizes else 0
        chunk = Chunk(batch_size=B, errors=errors)
        # Under a mean loss each output gradient is 1/B of the per-sample one; rules are linear in the
        # gradient, so the factor B is applied to their results instead of copying every gradient.
        scale = float(B) if self.loss_reduction == "mean" and B else 1.0
        shared: Dict[int, Tuple[nn.Parameter, List[Tensor]]] = {}
        for module, calls in by_module.items():
            name, rule = self._rules[module]
            names = calls[0].names
            for c in calls[1:]:
                names = [n for n in names if n in c.names]
            own_names = [n for n in names if id(module._parameters[n]) not in self._shared]
            shared_names = [n for n in names if id(module._parameters[n]) in self._shared]
            if own_names:
                lg = rule.layer_grads(module, calls, own_names, self._mode_for_rule(rule))
                for n in own_names:
                    p = module._parameters[n]
                    chunk.entries.append(make_entry(p, _join(name, n), lg, n, scale))
            if shared_names:
                per = rule.per_sample(module, calls, shared_names)
                for n in shared_names:
                    p = module._parameters[n]
                    shared.setdefault(id(p), (p, []))[1].append(per[n])
        for pid, (p, parts) in shared.items():
            lg = InstantiatedGrads({"w": torch.stack(parts).sum(0)})
            chunk.entries.append(make_entry(p, self._param_names[pid], lg, "w", scale))
        if chunk.entries and not bool(torch.isfinite(torch.stack([e.norms_sq.sum(dtype=torch.float64) for e in chunk.entries])).all()):
            errors.extend(e.name for e in chunk.entries if not bool(torch.isfinite(e.norms_sq).all()))
        for _, call in pending:  # a retained graph must not keep activations alive, nor be replayed
            call.ctx, call.grad, call.versions, call.done = None, None, None, True
        return chunk

    def _mode_for_rule(self, rule: Rule) -> str:
        if self.consumer is None:
            return "instantiate"
        return "auto" if self.mode == "functorch" else self.mode

    def _normalise_grad(self, seq_first: bool, grad):
        def one(g: Tensor) -> Tensor:
            return g.movedim(1, 0) if seq_first and g.dim() >= 2 else g

        return tuple(one(g) for g in grad) if isinstance(grad, tuple) else one(grad)

    def _store_grad_sample(self, chunk: Chunk) -> None:
        """Standalone use: expose per-sample gradients as p.grad_sample (Opacus's interface: with
        loss_reduction="mean" each row is the gradient of that sample's own loss, i.e. B times its
        share of the batch gradient)."""
        for e in chunk.entries:
            gs = e.per_sample()
            prev = getattr(e.param, "grad_sample", None)
            e.param.grad_sample = gs if prev is None else torch.cat([prev, gs], 0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears ``.grad`` and ``.grad_sample`` of every parameter."""
        for p in self.parameters():
            p.grad = None
            if hasattr(p, "grad_sample"):
                p.grad_sample = None
        self._pending = []


def _no_cuda_autocast():
    if torch.cuda.is_available():
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def make_entry(p: nn.Parameter, qualname: str, lg: LayerGrads, key: str, scale: float = 1.0) -> ParamEntry:
    """The entry of parameter ``key`` of ``lg``, whose per-sample gradients are ``scale`` times the rule's."""
    if scale == 1.0:
        return ParamEntry(
            param=p,
            name=qualname,
            norms_sq=lg.norms_sq[key],
            clipped_sum=lambda c: lg.clipped_sum({key: c})[key],
            per_sample=lambda: lg.per_sample()[key],
            add_clipped_sum_=lambda c, out: lg.add_clipped_sum_(key, c, out),
        )
    return ParamEntry(
        param=p,
        name=qualname,
        norms_sq=lg.norms_sq[key] * (scale * scale),
        clipped_sum=lambda c: lg.clipped_sum({key: c * scale})[key],
        per_sample=lambda: lg.per_sample()[key] * scale,
        add_clipped_sum_=lambda c, out: lg.add_clipped_sum_(key, c * scale, out),
    )
