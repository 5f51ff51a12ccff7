"""Input validation shared by the accountants (clear ``ValueError`` messages)."""

from __future__ import annotations

import math


def _is_number(x: object) -> bool:
    try:
        float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def check_sample_rate(sample_rate: float, name: str = "sample_rate") -> float:
    """Return ``sample_rate`` as float; it must lie in (0, 1]."""
    if not _is_number(sample_rate) or not (0.0 < float(sample_rate) <= 1.0):
        raise ValueError(f"{name}={sample_rate!r} is invalid: it must be in the range (0, 1].")
    return float(sample_rate)


def check_noise_multiplier(noise_multiplier: float, name: str = "noise_multiplier") -> float:
    """Return ``noise_multiplier`` as float; it must be finite and > 0."""
    if (
        not _is_number(noise_multiplier)
        or not math.isfinite(float(noise_multiplier))
        or float(noise_multiplier) <= 0.0
    ):
        raise ValueError(
            f"{name}={noise_multiplier!r} is invalid: it must be a finite number > 0 "
            "(range (0, inf); a noise multiplier of 0 gives no privacy)."
        )
    return float(noise_multiplier)


def check_delta(delta: float, name: str = "delta") -> float:
    """Return ``delta`` as float; it must lie in (0, 1)."""
    if not _is_number(delta) or not (0.0 < float(delta) < 1.0):
        raise ValueError(f"{name}={delta!r} is invalid: it must be in the range (0, 1).")
    return float(delta)


def check_epsilon(epsilon: float, name: str = "target_epsilon") -> float:
    """Return ``epsilon`` as float; it must be finite and > 0."""
    if not _is_number(epsilon) or not math.isfinite(float(epsilon)) or float(epsilon) <= 0.0:
        raise ValueError(f"{name}={epsilon!r} is invalid: it must be a finite number > 0 (range (0, inf)).")
    return float(epsilon)


def check_steps(steps: int, name: str = "steps") -> int:
    """Return ``steps`` as int; it must be a non-negative integer."""
    if not _is_number(steps) or float(steps) != int(float(steps)) or int(float(steps)) < 0:
        raise ValueError(f"{name}={steps!r} is invalid: it must be an integer >= 0.")
    return int(float(steps))


def check_history(history: object) -> list[tuple[float, float, int]]:
    """Validate and normalise a history list of (noise_multiplier, sample_rate, steps)."""
    if not isinstance(history, (list, tuple)):
        raise ValueError(f"history must be a list of (noise_multiplier, sample_rate, steps), got {type(history)!r}")
    out: list[tuple[float, float, int]] = []
    for entry in history:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(f"history entry {entry!r} must be a (noise_multiplier, sample_rate, steps) triple")
        sigma = check_noise_multiplier(entry[0])
        q = check_sample_rate(entry[1])
        n = check_steps(entry[2], name="num_steps")
        out.append((sigma, q, n))
    return out
