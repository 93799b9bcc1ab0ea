"""Cross-modal gradient heterogeneity, per step, from quantities the step computes anyway.

``MLFOPSOAP.diagnostics()`` returns a plain dict of the last step; everything in it comes from
the K x K Gram matrices of the streams (Euclidean, under H and under H^-1) and the FOP solve, so
no extra backward pass and no extra pass over the data. Detail levels (``diagnostics=``):

- ``"off"``: nothing is recorded;
- ``"global"`` (default): stream weights, stream norms, the fraction of blocks whose streams
  conflict (a pair with negative cosine), the global beta;
- ``"block"``: also, per parameter block, the cosines of the stream gradients (Euclidean and
  under H), their norm ratio, ``s``, ``beta`` before and after the noise shrinkage, ``eta*``
  and the noise fraction;
- ``"head"``: also the same per attention head of the blocks with a head layout.

Two sinks write the dict: :class:`JSONLinesWriter` (one JSON object per step) and
:class:`TensorBoardWriter` (scalars named ``mlfop/<block>/<quantity>``, e.g.
``mlfop/layers.0.self_attn.q_proj.weight/cos``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["DETAIL_LEVELS", "stream_record", "flatten", "JSONLinesWriter", "TensorBoardWriter"]

DETAIL_LEVELS = ("off", "global", "block", "head")


def _pairwise_cosines(gram: Tensor, names: Sequence[str]) -> dict[str, float]:
    norms = torch.diagonal(gram).clamp_min(0.0).sqrt()
    cosines = {}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            denominator = float(norms[i] * norms[j])
            cosines[f"{names[i]}|{names[j]}"] = float(gram[i, j]) / denominator if denominator > 0 else 0.0
    return cosines


def conflicts(gram_e: Tensor) -> bool:
    """Whether any pair of streams points apart (negative inner product)."""
    off_diagonal = gram_e - torch.diag(torch.diagonal(gram_e))
    return bool((off_diagonal < 0).any())


def stream_record(
    names: Sequence[str],
    *,
    gram_e: Tensor,
    gram_h: Tensor | None,
    s: Tensor,
    beta_raw: Tensor,
    beta: Tensor,
    eta: float,
    noise_fraction: float | None,
) -> dict[str, Any]:
    """Heterogeneity of one block (or head): cosines, norm ratio, ``s``, ``beta``, ``eta*``, noise."""
    cos = _pairwise_cosines(gram_e, names)
    norms = torch.diagonal(gram_e).clamp_min(0.0).sqrt().tolist()
    record: dict[str, Any] = {
        "cos": next(iter(cos.values())) if len(names) == 2 else cos,
        "norm": dict(zip(names, norms)),
        "s": dict(zip(names, s.tolist())),
        "beta_raw": dict(zip(names, beta_raw.tolist())),
        "beta": dict(zip(names, beta.tolist())),
        "eta": eta,
    }
    if gram_h is not None:
        cos_h = _pairwise_cosines(gram_h, names)
        record["cos_h"] = next(iter(cos_h.values())) if len(names) == 2 else cos_h
    if len(names) == 2:
        record["norm_ratio"] = norms[0] / norms[1] if norms[1] > 0 else math.inf
    if noise_fraction is not None:
        record["noise_fraction"] = noise_fraction
    return record


def flatten(diagnostics: dict[str, Any], prefix: str = "mlfop") -> dict[str, float]:
    """``{"mlfop/<path>/<quantity>": number}`` for every number in the (nested) dict."""
    flat: dict[str, float] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}/{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[path] = float(value)

    walk(diagnostics, prefix)
    return flat


class JSONLinesWriter:
    """Appends one JSON object per step to ``path``: ``{"step": n, **diagnostics}``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, step: int, diagnostics: dict[str, Any]) -> None:
        if diagnostics:
            self._file.write(json.dumps({"step": step, **diagnostics}, allow_nan=True) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JSONLinesWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorBoardWriter:
    """Writes every number of the dict as a scalar ``mlfop/<block>/<quantity>`` at ``step``.

    Takes a log directory or an existing ``torch.utils.tensorboard.SummaryWriter`` (shared with
    the user's own scalars); needs the ``tensorboard`` package.
    """

    def __init__(self, log_dir_or_writer: Any) -> None:
        if isinstance(log_dir_or_writer, (str, Path)):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir_or_writer))
            self._owned = True
        else:
            self.writer = log_dir_or_writer
            self._owned = False

    def write(self, step: int, diagnostics: dict[str, Any]) -> None:
        for tag, value in flatten(diagnostics).items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
