"""Typed, validated hyper-parameters, flattened to plain values in ``param_groups``.

A config is built from a param group at every step (so LR schedulers and per-group values are
honoured) and validated when a group is added, so a bad value fails at construction with a
message that names the argument, the accepted range and the value received.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from enum import IntEnum
from numbers import Real
from typing import Any

import torch

__all__ = ["SOAPConfig", "FOPConfig", "FOPOptions", "DetailLevel", "NONFINITE_POLICIES", "LEVELS", "WEIGHT_MODES"]

NONFINITE_POLICIES = ("skip", "raise")
# The moments' dtype: None (the statistics' dtype, float32 at least) or bfloat16, which halves them.
MOMENT_DTYPES = (None, "float32", "bfloat16")


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
    batched: bool = True
    state_dtype: str | None = None

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
        if float(torch.tensor(float(self.eps), dtype=torch.float32)) == 0.0:
            raise ValueError(
                f"eps must be representable in float32 (the statistics' dtype), got {self.eps!r}, which "
                f"rounds to 0 there and would give 0/0 = NaN; use eps >= 1e-45 (default 1e-8)"
            )
        _check_number("weight_decay", self.weight_decay, low=0.0, low_inclusive=True)
        _check_int("precondition_frequency", self.precondition_frequency, low=1)
        _check_int("max_precond_dim", self.max_precond_dim, low=0)
        for name in ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias", "maximize", "batched"):
            _check_bool(name, getattr(self, name))
        if isinstance(self.state_dtype, torch.dtype):  # kept as a name: param_groups hold plain values
            object.__setattr__(self, "state_dtype", str(self.state_dtype).removeprefix("torch."))
        if self.state_dtype not in MOMENT_DTYPES:
            raise ValueError(
                f"state_dtype must be one of {MOMENT_DTYPES} (or the torch dtype), got {self.state_dtype!r}; "
                f"it sets the moments' dtype (the factors and bases stay float32)"
            )
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

    @classmethod
    def trusted(cls, group: dict[str, Any]) -> SOAPConfig:
        """The config of a group validated when it was added, without validating it again.

        The step path uses it: validation would read a tensor ``lr`` back to the host, and LR
        schedulers only write plain numbers.
        """
        config = object.__new__(cls)
        for f in fields(cls):
            object.__setattr__(config, f.name, group[f.name])
        return config

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


LEVELS = ("global", "layer", "head")
WEIGHT_MODES = ("tokens", "fixed", "balanced")


class DetailLevel(IntEnum):
    """How much :meth:`mlfop.MLFOPSOAP.diagnostics` records; each level includes the previous."""

    OFF = 0
    GLOBAL = 1
    BLOCK = 2
    HEAD = 3

    @classmethod
    def parse(cls, value: Any) -> DetailLevel:
        names = tuple(level.name.lower() for level in cls)
        if not isinstance(value, str) or value not in names:
            raise ValueError(f"diagnostics must be one of {names}, got {value!r}")
        return cls[value.upper()]


def check_streams(streams: Iterable[str] | None, untagged: tuple[str, ...]) -> tuple[str, ...]:
    """The stream names: at least two distinct non-empty strings (``None``: ``untagged``)."""
    if streams is None:
        return untagged
    if isinstance(streams, str):
        raise TypeError(f"streams must be a sequence of names such as ('image', 'text'), got the string {streams!r}")
    names = tuple(streams)
    if not all(isinstance(name, str) and name for name in names):
        raise TypeError(f"streams must be non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"streams must be distinct, got duplicates in {names!r}")
    if len(names) < 2:
        raise ValueError(
            f"streams needs at least 2 names (got {names!r}); with a single stream use mlfop.SOAP, "
            f"or streams=None to split untagged micro-batches into two sub-batch streams"
        )
    return names


def check_stream_weights(weights: str | Mapping[str, float], streams: tuple[str, ...]) -> str | dict[str, float]:
    """A weight mode of :data:`WEIGHT_MODES`, or a ``{stream: weight >= 0}`` mapping (not all 0)."""
    if isinstance(weights, str):
        if weights not in WEIGHT_MODES:
            raise ValueError(f"stream_weights must be one of {WEIGHT_MODES} or a {{stream: weight}} mapping, got {weights!r}")
        return weights
    if not isinstance(weights, Mapping):
        raise TypeError(f"stream_weights must be one of {WEIGHT_MODES} or a mapping, got {type(weights).__name__}")
    missing = [name for name in streams if name not in weights]
    unknown = [name for name in weights if name not in streams]
    if missing or unknown:
        raise ValueError(
            f"stream_weights must give a weight for every stream {list(streams)} and no other: "
            f"missing {missing}, unknown {unknown}"
        )
    for name in streams:
        if not _is_real(weights[name]) or not 0.0 <= weights[name] < math.inf:
            raise ValueError(f"stream_weights[{name!r}] must be a finite number >= 0, got {weights[name]!r}")
    values = {name: float(weights[name]) for name in streams}
    if sum(values.values()) <= 0.0:
        raise ValueError("stream_weights must not all be zero")
    return values


def check_levels(levels: Iterable[str]) -> tuple[str, ...]:
    """A subset of :data:`LEVELS`, returned in their canonical order."""
    if isinstance(levels, str):
        raise TypeError(f"levels must be a collection such as ('global', 'layer'), got the string {levels!r}")
    chosen = tuple(levels)
    unknown = [level for level in chosen if level not in LEVELS]
    if unknown:
        raise ValueError(f"levels must be a subset of {LEVELS}, got unknown {unknown}")
    return tuple(level for level in LEVELS if level in chosen)


@dataclass(frozen=True)
class FOPOptions:
    """ML-FOP-SOAP's optimizer-wide options (the per-group values are in :class:`FOPConfig`).

    Built from the flat keyword constructor and validated here, once. ``stream_weights`` is a
    mode of :data:`WEIGHT_MODES` or a ``{stream: weight}`` dict; ``diagnostics`` a
    :class:`DetailLevel` name.
    """

    streams: tuple[str, ...]
    stream_weights: str | dict[str, float] = "tokens"
    levels: tuple[str, ...] = LEVELS
    balance_alpha: float = 0.5
    balance_beta: float = 0.9
    noise_shrinkage: bool = True
    stream_statistics: bool = True
    diagnostics: str = "global"
    heads_strict: bool = False
    stream_communication_dtype: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stream_weights", check_stream_weights(self.stream_weights, self.streams))
        object.__setattr__(self, "levels", check_levels(self.levels))
        _check_number("balance_alpha", self.balance_alpha, low=0.0, low_inclusive=True)
        if self.balance_alpha > 1.0:
            raise ValueError(f"balance_alpha must be in [0, 1], got {self.balance_alpha!r}")
        _check_number("balance_beta", self.balance_beta, low=0.0, low_inclusive=True, high=1.0)
        for name in ("noise_shrinkage", "stream_statistics", "heads_strict"):
            _check_bool(name, getattr(self, name))
        DetailLevel.parse(self.diagnostics)
        dtype = self.stream_communication_dtype
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        if dtype not in (None, "bfloat16"):
            raise ValueError(
                f"stream_communication_dtype must be None (the stream sums' own dtype) or 'bfloat16' "
                f"(halves the bytes of the stream sums in collectives), got {self.stream_communication_dtype!r}"
            )
        object.__setattr__(self, "stream_communication_dtype", dtype)
        object.__setattr__(self, "balance_alpha", float(self.balance_alpha))
        object.__setattr__(self, "balance_beta", float(self.balance_beta))

    @property
    def detail(self) -> DetailLevel:
        return DetailLevel.parse(self.diagnostics)

    @property
    def communication_dtype(self) -> torch.dtype | None:
        """The dtype of the stream sums in collectives (``None``: their own)."""
        return None if self.stream_communication_dtype is None else getattr(torch, self.stream_communication_dtype)

    def weight_mode(self) -> str | dict[str, float]:
        """The mode in force: without the global level the weights are the natural ones."""
        return self.stream_weights if "global" in self.levels else "tokens"
