"""Typed, validated hyper-parameters, flattened to plain values in ``param_groups``.

A config is built from a param group at every step (so LR schedulers and per-group values are
honoured) and validated when a group is added, so a bad value fails at construction with a
message that names the argument, the accepted range and the value received.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from numbers import Real
from typing import Any

import torch

__all__ = ["SOAPConfig", "FOPConfig", "NONFINITE_POLICIES"]

NONFINITE_POLICIES = ("skip", "raise")


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_number(name: str, value: Any, *, low: float, low_inclusive: bool, high: float | None = None) -> None:
    """Raise unless ``value`` is a finite real in the range (tensors must be 0-d)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise TypeError(f"{name} must be a real number or a one-element tensor, got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    below = value < low if low_inclusive else value <= low
    above = high is not None and value >= high
    if not math.isfinite(value) or below or above:
        interval = ("[" if low_inclusive else "(") + f"{low:g}, " + (f"{high:g})" if high is not None else "inf)")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _check_int(name: str, value: Any, *, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r})")


@dataclass(frozen=True)
class SOAPConfig:
    """SOAP's hyper-parameters (defaults as in the official implementation)."""

    lr: float = 3e-3
    betas: tuple[float, float] = (0.95, 0.95)
    shampoo_beta: float | None = None
    eps: float = 1e-8
    weight_decay: float = 0.01
    precondition_frequency: int = 10
    max_precond_dim: int = 10000
    merge_dims: bool = False
    precondition_1d: bool = False
    normalize_grads: bool = False
    correct_bias: bool = True
    maximize: bool = False
    nonfinite: str = "skip"

    def __post_init__(self) -> None:
        _check_number("lr", self.lr, low=0.0, low_inclusive=True)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), each in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(self.betas))
        _check_number("betas[0]", self.betas[0], low=0.0, low_inclusive=True, high=1.0)
        _check_number("betas[1]", self.betas[1], low=0.0, low_inclusive=True, high=1.0)
        if self.shampoo_beta is not None:
            _check_number("shampoo_beta", self.shampoo_beta, low=0.0, low_inclusive=True, high=1.0)
        # eps = 0 would turn zero-gradient coordinates into 0/0 = NaN.
        _check_number("eps", self.eps, low=0.0, low_inclusive=False)
        _check_number("weight_decay", self.weight_decay, low=0.0, low_inclusive=True)
        _check_int("precondition_frequency", self.precondition_frequency, low=1)
        _check_int("max_precond_dim", self.max_precond_dim, low=0)
        for name in ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias", "maximize"):
            _check_bool(name, getattr(self, name))
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")

    @property
    def factor_beta(self) -> float:
        """EMA factor of the Kronecker statistics: ``shampoo_beta``, or ``betas[1]`` if None."""
        return self.betas[1] if self.shampoo_beta is None else float(self.shampoo_beta)

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> SOAPConfig:
        """Read (and validate) the config from a param group's plain values."""
        return cls(**{f.name: group[f.name] for f in fields(cls)})

    def to_group(self) -> dict[str, Any]:
        """Plain values for ``param_groups`` (loadable with ``torch.load(weights_only=True)``)."""
        return asdict(self)


@dataclass(frozen=True)
class FOPConfig(SOAPConfig):
    """ML-FOP-SOAP's per-group values: SOAP's plus the Fisher-orthogonal projection's knobs.

    - ``beta_max = 1``: a correction coefficient above 1 would add more of a stream's
      (perpendicular) deviation than the stream itself has; by Cauchy-Schwarz the correction
      is never longer than the shared component under the inverse metric anyway.
    - ``eta_range = (1/3, 1)``: for two streams and an unclipped (or sign-preserving clipped)
      beta, eta* = (A + beta D) / (A + 2 beta D + beta^2 E) always lies in [1/3, 1]; the range
      only bites for rounding or clipped K > 2 solutions, and never lengthens SOAP's step.
    - ``eps_fop = 1e-30``: only keeps s = <d, g>_H / <g, g>_H finite for an all-zero block; any
      real gradient's <g, g>_H is many orders larger.
    """

    beta_max: float = 1.0
    eta_range: tuple[float, float] = (1.0 / 3.0, 1.0)
    eps_fop: float = 1e-30

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("beta_max", self.beta_max, low=0.0, low_inclusive=True)
        if not isinstance(self.eta_range, (tuple, list)) or len(self.eta_range) != 2:
            raise TypeError(f"eta_range must be a pair (eta_min, eta_max), got {self.eta_range!r}")
        object.__setattr__(self, "eta_range", tuple(float(v) for v in self.eta_range))
        _check_number("eta_range[0]", self.eta_range[0], low=0.0, low_inclusive=False)
        _check_number("eta_range[1]", self.eta_range[1], low=0.0, low_inclusive=False)
        if self.eta_range[0] > self.eta_range[1]:
            raise ValueError(f"eta_range must satisfy eta_min <= eta_max, got {self.eta_range!r}")
        _check_number("eps_fop", self.eps_fop, low=0.0, low_inclusive=True)
