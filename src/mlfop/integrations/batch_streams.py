"""What the engine integrations read from a micro-batch: its stream and its loss tokens, and
the optimizer with ``fold()`` inside an engine's wrappers. Imports no engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

import torch

from mlfop.data import plain_value
from mlfop.folding import UNTAGGED_STREAMS

__all__ = ["StreamKey", "loss_tokens", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any, hint: str = "build it as mlfop.MLFOPSOAP(...) before the engine wraps it") -> Any:
    """The optimizer with ``fold()`` inside wrappers that hold it as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, Lightning's and Trainer's). ``TypeError`` ending with ``hint`` if none."""
    inner = optimizer
    for _ in range(16):
        if inner is None or hasattr(inner, "fold") or not hasattr(inner, "optimizer"):
            break
        inner = inner.optimizer
    if inner is None or not hasattr(inner, "fold"):
        raise TypeError(f"expected mlfop.MLFOPSOAP (an optimizer with fold()), got {type(optimizer).__name__}: {hint}")
    return inner


def loss_tokens(labels: torch.Tensor, shift: bool = True, ignore_index: int = -100) -> int:
    """Loss tokens of a micro-batch: labels other than ``ignore_index``, after the causal shift."""
    if shift:
        labels = labels[..., 1:]
    return int(labels.ne(ignore_index).sum())


class StreamKey:
    """Where a micro-batch names its stream, and how its values map to the optimizer's streams.

    Args:
        key (str or None): the batch key (or column) that holds the stream. ``None``: an
            untagged run, whose optimizer has ``streams=None``.
        names (Mapping or Sequence or None): ``{value: name}``, or a sequence of names indexed
            by integer ids. ``None``: values are names, or integer ids into the optimizer's
            ``streams``.
        who (str): the integration, for messages.
        kind (str): ``"key"`` or ``"column"``, for messages (and the ``stream_<kind>`` argument).

    A batch's value may be a name or id, a list of them (as a default collate makes of a string
    field) or a tensor of ids; all values of one micro-batch must agree.
    """

    def __init__(self, key: str | None, names: Mapping[Any, str] | Sequence[str] | None = None, *, who: str,
                 kind: str = "key") -> None:
        if key is not None and (not isinstance(key, str) or not key):
            raise TypeError(f"stream_{kind} must be a non-empty string or None, got {key!r}")
        if names is not None and (isinstance(names, str) or not isinstance(names, (Mapping, Sequence))):
            raise TypeError(f"stream_names must be a mapping {{value: name}} or a sequence of names, got {names!r}")
        self.key, self.names, self.who, self.kind = key, names, who, kind

    def check_optimizer(self, streams: Sequence[str]) -> None:
        """An untagged key (``None``) needs an untagged optimizer."""
        if self.key is None and tuple(streams) != UNTAGGED_STREAMS:
            raise ValueError(
                f"stream_{self.kind}=None (untagged) needs an optimizer built with streams=None, not "
                f"streams={list(streams)}"
            )

    def without(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``batch`` without the stream key (a copy)."""
        return {name: value for name, value in batch.items() if name != self.key}

    def stream_of(self, batch: Mapping[str, Any], streams: Sequence[str]) -> str | None:
        """The name among ``streams`` of the micro-batch ``batch`` (``None``: untagged)."""
        streams = tuple(streams)
        key, kind = self.key, self.kind
        if key is None or (streams == UNTAGGED_STREAMS and isinstance(batch, Mapping) and key not in batch):
            return None
        if not isinstance(batch, Mapping) or key not in batch:
            found = sorted(map(str, batch)) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(
                f"{self.who}: the batch has no {key!r} {kind} (it has {found}); every micro-batch of a run with "
                f"streams {list(streams)} needs its stream in the {key!r} {kind} (or set stream_{kind}= to the "
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
            raise ValueError(f"{self.who}: the {key!r} value of a micro-batch is empty")
        if len(distinct) > 1:
            raise ValueError(
                f"{self.who}: a micro-batch mixes the streams {distinct} under {key!r}; each micro-batch must "
                f"come from one stream: batch the data with mlfop.data.StreamBatchSampler, or split the loss "
                f"by stream with mlfop.fold_losses"
            )
        return self._name(distinct[0], streams)

    def _name(self, value: Any, streams: tuple[str, ...]) -> str:
        key = self.key
        if self.names is not None:
            try:
                name = self.names[value]
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"{self.who}: the {key!r} value {value!r} is not in stream_names {self.names!r}") from None
        elif isinstance(value, str):
            name = value
        elif isinstance(value, Integral) and not isinstance(value, bool):
            if not 0 <= value < len(streams):
                raise ValueError(f"{self.who}: the {key!r} id {value} is out of range for the streams {list(streams)}")
            name = streams[value]
        else:
            raise TypeError(f"{self.who}: the {key!r} value must be a stream name or an integer id, got {value!r}")
        if name not in streams:
            raise ValueError(f"{self.who}: the {key!r} value {value!r} names the stream {name!r}, not one of {list(streams)}")
        return name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r}, names={self.names!r})"
