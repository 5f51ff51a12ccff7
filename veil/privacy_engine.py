"""PrivacyEngine: turns a model, an optimizer and a data loader into their private versions."""
from __future__ import annotations

import math
import os
import warnings
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .accountants import IAccountant, create_accountant
from .accountants.utils import get_noise_multiplier
from .data_loader import DPDataLoader
from .grad_sample.grad_sample_module import GradSampleModule
from .optimizers.clipping import ClippingStrategy
from .optimizers.optimizer import DPOptimizer
from .validators.module_validator import ModuleValidator


class PrivacyEngine:
    """The two-line entry point to DP-SGD.

    Example::

        engine = PrivacyEngine()
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=1.1, max_grad_norm=1.0)
        ...  # unchanged training loop
        engine.get_epsilon(delta=1e-5)

    Args:
        accountant: "prv" (tight, default), "rdp" or "gdp".
        secure_mode: draw noise and sampling masks from a cryptographically secure source.
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        self.accountant: IAccountant = create_accountant(mechanism=accountant)
        self.secure_mode = secure_mode
        self.secure_rng = None
        self.dataset = None
        self._data_loader: Optional[DataLoader] = None
        self.steps_without_noise = 0
        if secure_mode:
            warnings.warn("secure_mode=True: noise and sampling use the OS's cryptographic generator; "
                          "runs cannot be reproduced from a seed.")

    # ---------------------------------------------------------------- setup
    def _prepare_model(self, module: nn.Module, *, batch_first: bool, loss_reduction: str,
                       grad_sample_mode: str) -> GradSampleModule:
        if isinstance(module, GradSampleModule):
            if module.batch_first != batch_first or module.loss_reduction != loss_reduction:
                raise ValueError("The model is already a GradSampleModule with other batch_first/loss_reduction "
                                 "settings; pass the unwrapped model.")
            return module
        ModuleValidator.validate(module, strict=True)
        return GradSampleModule(module, batch_first=batch_first, loss_reduction=loss_reduction, mode=grad_sample_mode)

    @staticmethod
    def _check_optimizer(module: GradSampleModule, optimizer: Optimizer) -> None:
        if isinstance(optimizer, DPOptimizer):
            raise ValueError("The optimizer is already a DPOptimizer; pass the plain torch optimizer.")
        foreign = []
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if not module.managed(p):
                    foreign.append(f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})")
        if foreign:
            raise ValueError(
                "The optimizer holds parameters that are not in the model, so they would be updated without "
                f"per-sample clipping: {', '.join(foreign)}. Build the optimizer from model.parameters() "
                "(after ModuleValidator.fix, which returns a new model)."
            )

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: Union[float, List[float]],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: Union[str, ClippingStrategy] = "flat",
        noise_generator: Optional[torch.Generator] = None,
        grad_sample_mode: str = "auto",
        criterion: Optional[nn.Module] = None,
        **kwargs: Any,
    ):
        """Wraps the three objects for DP-SGD.

        Returns ``(module, optimizer, data_loader)``; if ``criterion`` is given (Opacus's ghost-mode
        spelling), ``(module, optimizer, criterion, data_loader)``. The accounting assumes Poisson
        sampling: with ``poisson_sampling=False`` the user's loader is kept as is and the reported
        ε is only valid if its batches are Poisson samples.
        """
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if noise_multiplier == 0:
            warnings.warn("noise_multiplier=0: training is not private and get_epsilon() will return inf.")
        if criterion is not None:
            reduction = getattr(criterion, "reduction", loss_reduction)
            if reduction != loss_reduction:
                raise ValueError(f"The criterion reduces with '{reduction}' but loss_reduction='{loss_reduction}'; "
                                 f"pass loss_reduction='{reduction}' or build the criterion with "
                                 f"reduction='{loss_reduction}'.")
        gsm = self._prepare_model(module, batch_first=batch_first, loss_reduction=loss_reduction,
                                  grad_sample_mode=grad_sample_mode)
        self._check_optimizer(gsm, optimizer)
        if len(data_loader) == 0:
            raise ValueError("The data loader is empty.")
        sample_rate = 1 / len(data_loader)
        n = len(data_loader.dataset)
        expected_batch_size = int(n * sample_rate)
        if poisson_sampling:
            data_loader = DPDataLoader.from_data_loader(data_loader, generator=None,
                                                        secure_mode=self.secure_mode)
        self.dataset = data_loader.dataset
        self._data_loader = data_loader
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=noise_generator,
            secure_mode=self.secure_mode,
            clipping=clipping,
        )
        dp_optimizer.attach(gsm)
        dp_optimizer.attach_step_hook(self._accounting_hook(sample_rate))
        if criterion is not None:
            return gsm, dp_optimizer, criterion, data_loader
        return gsm, dp_optimizer, data_loader

    def _accounting_hook(self, sample_rate: float):
        """Records each step; a step taken without noise makes ε infinite from then on."""
        record = self.accountant.get_optimizer_hook_fn(sample_rate=sample_rate)

        def hook(optimizer: DPOptimizer) -> None:
            if optimizer.noise_multiplier > 0:
                record(optimizer)
            else:
                self.steps_without_noise += 1

        return hook

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: Union[float, List[float]],
        epsilon_tolerance: float = 0.01,
        **kwargs: Any,
    ):
        """As ``make_private``, with σ chosen so that ``epochs`` epochs spend ``target_epsilon``."""
        sample_rate = 1 / len(data_loader)
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            epochs=epochs,
            accountant=self.accountant.mechanism(),
            epsilon_tolerance=epsilon_tolerance,
        )
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm, **kwargs)

    # ------------------------------------------------------------- privacy
    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at this δ (infinite once a step was taken with noise_multiplier=0)."""
        if self.steps_without_noise:
            return math.inf
        return self.accountant.get_epsilon(delta=delta)

    # ---------------------------------------------------------- checkpoints
    def save_checkpoint(
        self,
        *,
        path: Union[str, os.PathLike],
        module: nn.Module,
        optimizer: Optional[Optimizer] = None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        checkpoint_dict: Optional[Dict[str, Any]] = None,
        module_name: str = "module_state_dict",
        optimizer_name: str = "optimizer_state_dict",
        **torch_save_kwargs: Any,
    ) -> None:
        """Saves the weights, the optimizer, the privacy spent and the schedulers."""
        ckpt = dict(checkpoint_dict or {})
        ckpt[module_name] = module.state_dict()
        ckpt["privacy_accountant_state_dict"] = self.accountant.state_dict()
        ckpt["steps_without_noise"] = self.steps_without_noise
        if optimizer is not None:
            ckpt[optimizer_name] = optimizer.state_dict()
            if isinstance(optimizer, DPOptimizer):
                ckpt["dp_optimizer_state"] = {"noise_multiplier": optimizer.noise_multiplier,
                                              "clipping": optimizer.clipping.state_dict()}
        if not self.secure_mode:
            ckpt["rng_state"] = self._rng_state(optimizer)
        if noise_scheduler is not None:
            ckpt["noise_scheduler_state_dict"] = noise_scheduler.state_dict()
        if grad_clip_scheduler is not None:
            ckpt["grad_clip_scheduler_state_dict"] = grad_clip_scheduler.state_dict()
        torch.save(ckpt, path, **torch_save_kwargs)

    def _sampler(self):
        return getattr(self._data_loader, "batch_sampler", None)

    def _rng_state(self, optimizer: Optional[Optimizer]) -> Dict[str, torch.Tensor]:
        """The random streams a resumed run must continue: torch's default, the sampler's (from the
        first batch the loop has not received: workers may have drawn some ahead), the noise's."""
        state = {"torch": torch.get_rng_state()}
        sampler = self._sampler()
        if hasattr(sampler, "resume_state"):
            sampler_state = sampler.resume_state()
            if sampler_state is not None:
                state["sampler"] = sampler_state
        elif getattr(sampler, "generator", None) is not None:
            state["sampler"] = sampler.generator.get_state()
        noise = getattr(optimizer, "generator", None)
        if noise is not None:
            state["noise"] = noise.get_state()
        return state

    def _set_rng_state(self, state: Dict[str, torch.Tensor], optimizer: Optional[Optimizer]) -> None:
        torch.set_rng_state(state["torch"])
        sampler = self._sampler()
        if "sampler" in state and hasattr(sampler, "set_resume_state"):
            sampler.set_resume_state(state["sampler"])
        elif "sampler" in state and getattr(sampler, "generator", None) is not None:
            sampler.generator.set_state(state["sampler"])
        noise = getattr(optimizer, "generator", None)
        if noise is not None and "noise" in state:
            noise.set_state(state["noise"])

    def load_checkpoint(
        self,
        *,
        path: Union[str, os.PathLike],
        module: nn.Module,
        optimizer: Optional[Optimizer] = None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        module_name: str = "module_state_dict",
        optimizer_name: str = "optimizer_state_dict",
        **torch_load_kwargs: Any,
    ) -> Dict[str, Any]:
        """Restores what ``save_checkpoint`` wrote; returns the remaining checkpoint entries."""
        torch_load_kwargs.setdefault("weights_only", False)
        ckpt = torch.load(path, **torch_load_kwargs)
        module.load_state_dict(ckpt.pop(module_name))
        self.accountant.load_state_dict(ckpt.pop("privacy_accountant_state_dict"))
        self.steps_without_noise = ckpt.pop("steps_without_noise", 0)
        opt_state = ckpt.pop(optimizer_name, None)
        dp_state = ckpt.pop("dp_optimizer_state", None)
        if optimizer is not None and opt_state is not None:
            optimizer.load_state_dict(opt_state)
            if isinstance(optimizer, DPOptimizer) and dp_state is not None:
                optimizer.noise_multiplier = dp_state["noise_multiplier"]
                optimizer.clipping.load_state_dict(dp_state["clipping"])
        rng = ckpt.pop("rng_state", None)
        if rng is not None and not self.secure_mode:
            self._set_rng_state(rng, optimizer)
        ns = ckpt.pop("noise_scheduler_state_dict", None)
        if noise_scheduler is not None and ns is not None:
            noise_scheduler.load_state_dict(ns)
        cs = ckpt.pop("grad_clip_scheduler_state_dict", None)
        if grad_clip_scheduler is not None and cs is not None:
            grad_clip_scheduler.load_state_dict(cs)
        return ckpt
