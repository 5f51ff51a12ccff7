"""Schedules for the noise multiplier and the clipping bound of a DPOptimizer.

Call ``scheduler.step()`` once per epoch (or whenever you choose); the optimizer then uses the new
value, and the accountant records the σ actually used at every step.
"""
from __future__ import annotations

from typing import Callable

from .optimizers.optimizer import DPOptimizer


class _Scheduler:
    attribute: str = ""

    def __init__(self, optimizer: DPOptimizer, *, last_epoch: int = -1):
        self.optimizer = optimizer
        self.base_value = getattr(optimizer, self.attribute)
        self.last_epoch = last_epoch
        self.step()

    def value(self) -> float:
        raise NotImplementedError

    def step(self) -> None:
        self.last_epoch += 1
        setattr(self.optimizer, self.attribute, self.value())

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer" and not callable(v)}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
        setattr(self.optimizer, self.attribute, self.value())


class _Exponential(_Scheduler):
    def __init__(self, optimizer: DPOptimizer, *, gamma: float, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def value(self) -> float:
        return self.base_value * self.gamma ** max(self.last_epoch, 0)


class _Step(_Scheduler):
    def __init__(self, optimizer: DPOptimizer, *, step_size: int, gamma: float, last_epoch: int = -1):
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def value(self) -> float:
        return self.base_value * self.gamma ** (max(self.last_epoch, 0) // self.step_size)


class _Lambda(_Scheduler):
    def __init__(self, optimizer: DPOptimizer, *, fn: Callable[[int], float], last_epoch: int = -1):
        self.fn = fn
        super().__init__(optimizer, last_epoch=last_epoch)

    def value(self) -> float:
        return self.base_value * self.fn(max(self.last_epoch, 0))


class ExponentialNoise(_Exponential):
    """σ_t = σ_0 · gamma^t."""

    attribute = "noise_multiplier"


class StepNoise(_Step):
    """σ_t = σ_0 · gamma^(t // step_size)."""

    attribute = "noise_multiplier"


class LambdaNoise(_Lambda):
    """σ_t = σ_0 · noise_lambda(t)."""

    attribute = "noise_multiplier"

    def __init__(self, optimizer: DPOptimizer, *, noise_lambda: Callable[[int], float], last_epoch: int = -1):
        super().__init__(optimizer, fn=noise_lambda, last_epoch=last_epoch)


class ExponentialGradClip(_Exponential):
    """C_t = C_0 · gamma^t."""

    attribute = "max_grad_norm"


class StepGradClip(_Step):
    """C_t = C_0 · gamma^(t // step_size)."""

    attribute = "max_grad_norm"


class LambdaGradClip(_Lambda):
    """C_t = C_0 · scheduler_function(t)."""

    attribute = "max_grad_norm"

    def __init__(self, optimizer: DPOptimizer, *, scheduler_function: Callable[[int], float], last_epoch: int = -1):
        super().__init__(optimizer, fn=scheduler_function, last_epoch=last_epoch)
