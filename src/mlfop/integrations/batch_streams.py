"""Helpers shared by the engine integrations: finding the optimizer, a micro-batch's stream
and its loss-token count. Imports no engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

import torch

__all__ = ["unwrap_optimizer", "loss_tokens", "stream_name", "check_stream_names", "plain_value"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer with ``fold()`` inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    inner = optimizer
    seen = 0
    while inner is not None and not hasattr(inner, "fold") and hasattr(inner, "optimizer") and seen < 16:
        inner = inner.optimizer
        seen += 1
    if inner is None or not hasattr(inner, "fold"):
        raise TypeError(
            f"expected mlfop.MLFOPSOAP (or an accelerate-wrapped one), got {type(optimizer).__name__}: "
            f"build the optimizer as mlfop.MLFOPSOAP(...) before accelerator.prepare(...)"
        )
    return inner


def loss_tokens(labels: torch.Tensor, shift: bool = True, ignore_index: int = -100) -> int:
    """Loss tokens of a micro-batch: labels other than ``ignore_index``, after the causal shift."""
    if shift:
        labels = labels[..., 1:]
    return int(labels.ne(ignore_index).sum())


def plain_value(value: Any) -> Any:
    """A stream value as a plain Python object (a 0-d tensor or numpy scalar becomes its item)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a stream value must be a single name or id, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes)):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return value


def stream_name(
    batch: Mapping[str, Any],
    key: str | None,
    names: tuple[str, ...],
    stream_names: Mapping[Any, str] | Sequence[str] | None,
    who: str,
    kind: str = "key",
) -> str | None:
    """The stream name of a micro-batch's ``batch[key]`` among the optimizer's ``names``."""
    if key is None:
        return None
    if not isinstance(batch, Mapping) or key not in batch:
        found = sorted(map(str, batch)) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(
            f"{who}: the batch has no {key!r} {kind} (it has {found}); every micro-batch of a run with "
            f"streams {list(names)} needs its stream in the {key!r} {kind} (or set stream_{kind}= to the "
            f"{kind} that has it)"
        )
    values = batch[key]
    if isinstance(values, torch.Tensor):
        items = values.reshape(-1).tolist()
    elif isinstance(values, (list, tuple)):
        items = [plain_value(v) for v in values]
    else:
        items = [plain_value(values)]
    distinct = list(dict.fromkeys(items))
    if not distinct:
        raise ValueError(f"{who}: the {key!r} value of a micro-batch is empty")
    if len(distinct) > 1:
        raise ValueError(
            f"{who}: a micro-batch mixes the streams {distinct} under {key!r}; each micro-batch must "
            f"come from one stream (batch the data per stream)"
        )
    value = distinct[0]
    if stream_names is not None:
        try:
            name = stream_names[value]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{who}: the {key!r} value {value!r} is not in stream_names {stream_names!r}") from None
    elif isinstance(value, str):
        name = value
    elif isinstance(value, Integral) and not isinstance(value, bool):
        if not 0 <= value < len(names):
            raise ValueError(f"{who}: the {key!r} id {value} is out of range for the streams {list(names)}")
        name = names[value]
    else:
        raise TypeError(f"{who}: the {key!r} value must be a stream name or an integer id, got {value!r}")
    if name not in names:
        raise ValueError(f"{who}: the {key!r} value {value!r} names the stream {name!r}, not one of {list(names)}")
    return name


def check_stream_names(stream_names: Any) -> None:
    """``stream_names`` must be None, a mapping ``{value: name}`` or a sequence of names."""
    if stream_names is not None and (isinstance(stream_names, str) or not isinstance(stream_names, (Mapping, Sequence))):
        raise TypeError(f"stream_names must be a mapping {{value: name}} or a sequence of names, got {stream_names!r}")
