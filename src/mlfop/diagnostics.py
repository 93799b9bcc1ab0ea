"""Cross-modal gradient heterogeneity, per step, from quantities the step computes anyway.

``MLFOPSOAP.diagnostics()`` returns a plain dict of the last step; everything in it comes from
the K x K Gram matrices of the streams (Euclidean, under H and under H^-1) and the FOP solve, so
no extra backward pass and no extra pass over the data. Detail levels (``diagnostics=``):

- ``"off"``: nothing is recorded;
- ``"global"`` (default): stream weights, stream norms, the streams' global cosine (Euclidean,
  ``cos``, and under H, ``cos_h``: of the gradients over all blocks), the fraction of blocks
  whose streams conflict (a pair with negative cosine), the global beta;
- ``"block"``: also, per parameter block, the cosines of the stream gradients (Euclidean and
  under H), their norm ratio, ``s``, ``beta`` before and after the noise shrinkage, ``eta*``
  and the noise fraction;
- ``"head"``: also the same per attention head of the blocks with a head layout.

The step records device tensors only (:class:`StepRecord`); the dict is built, with one
transfer to the host, when :meth:`~mlfop.MLFOPSOAP.diagnostics` is called.

Two sinks write the dict: :class:`JSONLinesWriter` (one JSON object per step) and
:class:`TensorBoardWriter` (scalars named ``mlfop/<block>/<quantity>``, e.g.
``mlfop/layers.0.self_attn.q_proj.weight/cos``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlfop.functional.fop import Combination, FOPSystem, SystemTotals, gram_step_scale

__all__ = ["StepRecord", "stream_record", "flatten", "JSONLinesWriter", "TensorBoardWriter"]


def _pairwise_cosines(gram: Tensor, names: Sequence[str]) -> dict[str, float]:
    norms = torch.diagonal(gram).clamp_min(0.0).sqrt()
    cosines = {}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            denominator = float(norms[i] * norms[j])
            cosines[f"{names[i]}|{names[j]}"] = float(gram[i, j]) / denominator if denominator > 0 else 0.0
    return cosines


def _cosine(gram: Tensor, names: Sequence[str]) -> float | dict[str, float]:
    """The streams' cosine (K = 2) or pairwise cosines (``{"a|b": cos}``) from a Gram matrix."""
    cosines = _pairwise_cosines(gram, names)
    return next(iter(cosines.values())) if len(names) == 2 else cosines


def stream_record(
    names: Sequence[str],
    *,
    gram_e: Tensor,
    gram_h: Tensor | None,
    s: Tensor,
    beta_raw: Tensor | None,
    beta: Tensor | None,
    eta: float,
    noise_fraction: float | None,
) -> dict[str, Any]:
    """Heterogeneity of one block (or head): cosines, norm ratio, ``s``, ``beta``, ``eta*``, noise."""
    norms = torch.diagonal(gram_e).clamp_min(0.0).sqrt().tolist()
    record: dict[str, Any] = {"cos": _cosine(gram_e, names), "norm": dict(zip(names, norms)),
                              "s": dict(zip(names, s.tolist()))}
    if beta is not None:
        record["beta_raw"] = dict(zip(names, beta_raw.tolist()))
        record["beta"] = dict(zip(names, beta.tolist()))
    record["eta"] = eta
    if gram_h is not None:
        record["cos_h"] = _cosine(gram_h, names)
    if len(names) == 2:
        record["norm_ratio"] = norms[0] / norms[1] if norms[1] > 0 else math.inf
    if noise_fraction is not None:
        record["noise_fraction"] = noise_fraction
    return record


@dataclass
class _Blocks:
    """One batch of blocks' statistics, on the device (``heads``: the head level's)."""

    order: list[int]
    names: list[str]
    system: FOPSystem
    combination: Combination
    heads: bool
    eta_range: tuple[float, float]


class StepRecord:
    """The heterogeneity statistics of one step, as device tensors until :meth:`as_dict`.

    ``detail``: 1 the global quantities, 2 also per block, 3 also per attention head; ``names``
    the streams', ``param_names`` the blocks' (in the order of the parameters).
    """

    def __init__(self, names: Sequence[str], detail: int, param_names: dict[Tensor, str]) -> None:
        self.names = list(names)
        self.detail = detail
        self._param_names = param_names
        self._param_order = {param: i for i, param in enumerate(param_names)}
        self._blocks: list[_Blocks] = []
        self._global: dict[str, Tensor] = {}
        self._dict: dict[str, Any] | None = None

    def add(self, params: Sequence[Tensor], system: FOPSystem, combination: Combination,
            eta_range: tuple[float, float], heads: bool = False) -> None:
        """A batch of blocks (of ``params``), its FOP system and its combination."""
        if self.detail >= 2:
            self._blocks.append(_Blocks([self._param_order[p] for p in params], [self._param_names[p] for p in params],
                                        system, combination, heads, eta_range))

    def finish(self, weights: Tensor, totals: SystemTotals, beta_raw: Tensor, beta: Tensor) -> None:
        """The global quantities, once every block is in."""
        self._global = {"weights": weights, "norms_hinv_sq": totals.norms_hinv_sq, "gram_e": totals.gram_e,
                        "gram_h": totals.gram_h, "conflicting": totals.conflicting, "blocks": totals.blocks,
                        "beta_raw": beta_raw, "beta": beta}

    def as_dict(self) -> dict[str, Any]:
        """The plain dict of :mod:`mlfop.diagnostics` (built once, with one transfer to the host)."""
        if self._dict is None:
            self._dict = self._build()
        return self._dict

    def _tensors(self) -> list[Tensor]:
        tensors = list(self._global.values())
        for entry in self._blocks:
            c = entry.combination
            tensors += [entry.system.gram_e, entry.system.gram_h, entry.system.s, c.eta, c.beta_raw, c.beta]
            if c.noise_fraction is not None:
                tensors.append(c.noise_fraction)
            if entry.heads:
                tensors += [c.system.gram_e, c.system.gram_h, c.system.s,
                            gram_step_scale(c.system, c.coefficients, entry.eta_range)]
        return tensors

    def _build(self) -> dict[str, Any]:
        tensors = self._tensors()
        host = torch.cat([t.detach().double().reshape(-1) for t in tensors]).cpu()
        parts = iter(part.view(t.shape) for part, t in zip(host.split([t.numel() for t in tensors]), tensors))
        glob = {key: next(parts) for key in self._global}
        names = self.names
        blocks = glob["blocks"].item() if "blocks" in glob else 0
        record: dict[str, Any] = {
            "streams": names,
            "weights": dict(zip(names, glob["weights"].tolist())),
            "norms_hinv": dict(zip(names, glob["norms_hinv_sq"].clamp_min(0.0).sqrt().tolist())),
            "norms": dict(zip(names, torch.diagonal(glob["gram_e"]).clamp_min(0.0).sqrt().tolist())),
            "cos": _cosine(glob["gram_e"], names),
            "cos_h": _cosine(glob["gram_h"], names),
            "conflict_fraction": glob["conflicting"].item() / blocks if blocks else 0.0,
            "global": {"beta_raw": dict(zip(names, glob["beta_raw"].tolist())),
                       "beta": dict(zip(names, glob["beta"].tolist()))},
        }
        if self.detail >= 2:
            records = {}
            for entry in self._blocks:
                for index, name, block in self._block_records(entry, parts):
                    records[index] = (name, block)
            record["blocks"] = dict(records[i] for i in sorted(records))
        return record

    def _block_records(self, entry: _Blocks, parts: Any) -> list[tuple[int, str, dict[str, Any]]]:
        gram_e, gram_h, s, eta, beta_raw, beta = (next(parts) for _ in range(6))
        noise = next(parts) if entry.combination.noise_fraction is not None else None
        if entry.heads:
            head_e, head_h, head_s, head_eta = (next(parts) for _ in range(4))
        out = []
        for b, (index, name) in enumerate(zip(entry.order, entry.names)):
            if not entry.heads:
                out.append((index, name, stream_record(
                    self.names, gram_e=gram_e[b], gram_h=gram_h[b], s=s[b], beta_raw=beta_raw[b], beta=beta[b],
                    eta=float(eta[b]), noise_fraction=None if noise is None else float(noise[b]))))
                continue
            block = stream_record(self.names, gram_e=gram_e[b], gram_h=gram_h[b], s=s[b], beta_raw=None, beta=None,
                                  eta=float(eta[b]), noise_fraction=None)
            if self.detail >= 3:
                block["heads"] = {
                    str(h): stream_record(
                        self.names, gram_e=head_e[b, h], gram_h=head_h[b, h], s=head_s[b, h],
                        beta_raw=beta_raw[b, h], beta=beta[b, h], eta=float(head_eta[b, h]),
                        noise_fraction=None if noise is None else float(noise[b, h]))
                    for h in range(head_e.shape[1])
                }
            out.append((index, name, block))
        return out


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
