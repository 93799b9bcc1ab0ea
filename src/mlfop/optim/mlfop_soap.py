"""``MLFOPSOAP``: SOAP plus the Fisher-orthogonal combination of per-modality gradient streams."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mlfop.diagnostics import DETAIL_LEVELS, conflicts, stream_record
from mlfop.distributed import all_reduce_folds, default_process_group
from mlfop.folding import UNTAGGED_STREAMS, StreamFolds
from mlfop.functional.fop import (
    FOPSystem,
    combination_coefficients,
    combine,
    euclidean_gram,
    fop_system,
    noise_shrinkage,
    solve_beta,
    step_scale,
    stream_gram_matrices,
    stream_noise,
)
from mlfop.functional.heads import head_gram, rotate_heads, split_heads
from mlfop.functional.rotation import kronecker_statistics, rotate
from mlfop.head_layouts import resolve_head_layouts
from mlfop.optim.config import FOPConfig
from mlfop.optim.soap import _SOAP_ARGS_DOC, SOAP, _awaits_first_call, _block_tensors, _materialize_params

__all__ = ["MLFOPSOAP", "LEVELS", "WEIGHT_MODES"]

LEVELS = ("global", "layer", "head")
WEIGHT_MODES = ("tokens", "fixed", "balanced")

# A rescale of p.grad after the last fold (clipping, unscaling) must be one global scalar: the
# residual p.grad - c * sum_k S_k may only be rounding, relative to the streams' size.
_RESCALE_RTOL = 1e-5


@dataclass
class _Block:
    """One parameter's work between the two passes of a step (a block awaiting its beta)."""

    name: str
    config: FOPConfig
    param: Tensor
    streams: Tensor  # (K, *block_shape): g_k in the original basis
    rotated: Tensor  # (K, *block_shape): rot(g_k)
    h: Tensor  # sqrt(V_t) + eps
    second_moment: Tensor
    system: FOPSystem
    gram_h: Tensor
    gram_e: Tensor  # Euclidean Gram (negligibility of the perpendicular parts, shrinkage, diagnostics)
    sigma_sq: Tensor | None  # (K, groups) sampling variances, groups = heads or 1
    reached: int  # how many streams reach the parameter (a non-zero gradient on it)
    reach: float  # W: their total weight, which scales the streams' statistics


class MLFOPSOAP(SOAP):
    r"""ML-FOP-SOAP: SOAP with a Fisher-orthogonal combination of K >= 2 gradient streams.

    Gradient accumulation produces, per micro-batch, one stream's contribution (a modality such
    as image generation or text understanding, or, untagged, alternate sub-batches);
    :meth:`fold` after each backward records it (see :mod:`mlfop.folding`: ``p.grad`` keeps
    the total). At :meth:`step`, per block, with stream gradients :math:`g_k = S_k / a_k`,
    weights :math:`w_k` and :math:`r_k = \operatorname{rot}(g_k)`:

    .. math::
       \begin{aligned}
            &F_i \leftarrow \beta_s F_i + (1-\beta_s)\, W \textstyle\sum_k w_k G_{k(i)} G_{k(i)}^\top,
            \quad h = \sqrt{\beta_2 V + (1-\beta_2)\, W \textstyle\sum_k w_k r_k^2} + \epsilon    \\
            &\bar g = \textstyle\sum_k w_k r_k, \quad
              g^\perp_k = (r_k - \bar g) - s_k \bar g \;\; (\langle g^\perp_k, \bar g\rangle_H = 0),
              \quad \beta = \operatorname{clip}(E^{+} D)                                          \\
            &g_{comb} = \bar g + \textstyle\sum_k \beta_k g^\perp_k, \quad
              \eta^* = \operatorname{clip}\big(\langle \bar g, g_{comb}\rangle_{H^{-1}} /
                       \langle g_{comb}, g_{comb}\rangle_{H^{-1}}\big)                           \\
            &M \leftarrow \beta_1 M + (1-\beta_1)\, g_{comb}, \quad
              V \leftarrow \beta_2 V + (1-\beta_2) \max\big(W \textstyle\sum_k w_k r_k^2,\, g_{comb}^2\big) \\
            &\theta \leftarrow \theta - \eta^* \gamma \tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
              \operatorname{unrot}\big(M / (\sqrt{V} + \epsilon)\big), \quad
              \theta \leftarrow \theta(1-\gamma\lambda)
       \end{aligned}

    (:mod:`mlfop.functional.fop` has the definitions of :math:`s, D, E`.) The rest is SOAP's
    step, shared with :class:`mlfop.SOAP`: same refresh, same first call. The metric :math:`h`
    is the denominator of this very step's SOAP update (the design's :math:`\sqrt{\hat V} +
    \epsilon` up to a constant factor, which every FOP ratio ignores) wherever the streams'
    squares bound :math:`g_{comb}^2`; without a correction they always do (:math:`\bar g^2 \le
    W \sum_k w_k r_k^2` by Cauchy-Schwarz over the reaching streams). Where a correction leaves
    that envelope, :math:`V` takes
    :math:`g_{comb}^2`, so no coordinate of the first update exceeds :math:`\gamma`: the head
    masks do not follow the eigenbasis, and per-head coefficients can put energy in
    eigen-coordinates where every stream is small (on the benchmark's first step,
    :math:`g_{comb}^2` reaches :math:`10^7` times the envelope; ``benchmarks/first_step_envelope.py``).

    Levels of the variance correction (``levels``, any subset, for ablation):

    - ``"layer"``: each block with two or more dimensions gets its own :math:`\beta` and
      :math:`\eta^*`;
    - ``"global"``: the stream weights follow ``stream_weights``, and one global
      :math:`\beta_G` (the solve of :math:`\sum D`, :math:`\sum E` over all blocks) serves the
      blocks without a layer estimate (1-D/0-D parameters, or all blocks when ``"layer"`` is
      off). Off: the natural weights :math:`w_k = a_k` and no global :math:`\beta`;
    - ``"head"``: each attention head of a block with a head layout (``heads=``) gets its own
      projection, :math:`\beta_h` and noise shrinkage: FOP on the subspace of the head's slice
      (the streams masked to the head, so the metrics are exact inner products there; the
      coupling between heads is dropped, a block-diagonal approximation). One head is exactly
      the layer level. The H heads together cost about one rotation of the K streams.

    :math:`W = \sum_{k \text{ reaching}} w_k` is the weight of the streams that reach the block
    (a non-zero gradient on it); it is 1 unless a modality-specific module, e.g. Janus's vision
    encoder or generation head, is outside some stream's reach. Unscaled, the streams'
    statistics would count the absent streams' zeros as disagreement and shrink the step by
    :math:`\sqrt{W}`; scaled, streams that agree get SOAP's step, and a block that one stream
    reaches gets exactly SOAP's statistics (:math:`W w_k r_k^2 = \bar g^2`). Such a block skips
    the head level.

    The finest enabled level that applies to a block decides its :math:`\beta`. With the noise
    shrinkage on, each :math:`\beta` is multiplied by :math:`\rho = \max(0, 1 - \nu)`, where
    :math:`\nu` is the share of the streams' spread that their micro-batch sampling noise
    explains (:func:`mlfop.functional.fop.noise_shrinkage`, from the level-0 squared norms).

    With no level, the step is SOAP on the accumulated gradient with curvature statistics taken
    from the streams. A step with no fold, or with a single stream folded, is plain SOAP on
    ``p.grad``, bit for bit.

    Stream weights (``stream_weights``): ``"tokens"`` (natural: each stream's share of loss
    tokens, or of micro-batches without token counts; then :math:`\bar g` is exactly the
    accumulated gradient), ``"fixed"`` (equal), a mapping ``{name: weight}``, or
    ``"balanced"``: :math:`w_k \propto \mathrm{EMA}(\lVert g_k\rVert_{H^{-1}})^{-\alpha}`, so a
    modality with much larger gradients cannot drown the others (weights from the EMA of
    previous steps; equal on the first).
    """

    __doc__ = (__doc__ or "") + _SOAP_ARGS_DOC + r"""
        streams (Sequence[str] or None): names of the K >= 2 gradient streams, e.g.
            ``("image", "text")``; ``None`` folds untagged micro-batches alternately into two
            sub-batch streams (FOP's large-batch setting) (default: ("image", "text")).
        stream_weights (str or Mapping[str, float]): ``"tokens"``, ``"fixed"``, ``"balanced"``
            or ``{name: weight >= 0}`` (default: "tokens").
        levels (Iterable[str]): enabled levels, a subset of ``("global", "layer", "head")``
            (default: all).
        beta_max (float): clip of each correction coefficient (default: 1.0, see
            :class:`mlfop.optim.config.FOPConfig` for every FOP default's reason).
        eta_range (Tuple[float, float]): clip of the step scale :math:`\eta^*` (default: (1/3, 1)).
        eps_fop (float): added to :math:`\langle\bar g, \bar g\rangle_H` (default: 1e-30).
        balance_alpha (float): strength :math:`\alpha \in [0, 1]` of ``"balanced"`` (default: 0.5).
        balance_beta (float): EMA factor of the stream norms for ``"balanced"`` (default: 0.9).
        heads: head layouts for the head level: a model to detect them from (Llama-style
            q/k/v/o, grouped-query attention, fused qkv) or ``{param: (num_heads, axis)}``
            (default: None, no head level).
        heads_strict (bool): raise instead of warning when detection cannot read a module's
            head counts (default: False).
        noise_shrinkage (bool): fade corrections that the micro-batch noise explains; costs a
            few elementwise passes per fold (default: True).
        stream_statistics (bool): Kronecker factors from the streams, :math:`\sum_k w_k G_k G_k^\top`
            (True), or from the shared component only, which saves K - 1 matrix products
            per factor and step (False) (default: True).
        diagnostics (str): detail of :meth:`diagnostics`: ``"off"``, ``"global"``, ``"block"``
            or ``"head"`` (default: "global").
        process_group: group whose ranks fold data-parallel shares of the batch; ``None`` uses
            the world group when ``torch.distributed`` runs with several ranks (default: None).
"""

    config_class = FOPConfig
    _pickled_attributes = SOAP._pickled_attributes + (
        "streams",
        "stream_weights",
        "levels",
        "balance_alpha",
        "balance_beta",
        "process_group",
        "stream_norm_ema",
        "head_layouts",
        "noise_shrinkage",
        "stream_statistics",
        "diagnostics_level",
        "_last_diagnostics",
        "_folds",
    )

    def __init__(
        self,
        params: Iterable[Any],
        streams: Iterable[str] | None = ("image", "text"),
        *,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        maximize: bool = False,
        nonfinite: str = "skip",
        stream_weights: str | Mapping[str, float] = "tokens",
        levels: Iterable[str] = LEVELS,
        beta_max: float = 1.0,
        eta_range: tuple[float, float] = (1.0 / 3.0, 1.0),
        eps_fop: float = 1e-30,
        balance_alpha: float = 0.5,
        balance_beta: float = 0.9,
        heads: Any = None,
        heads_strict: bool = False,
        noise_shrinkage: bool = True,
        stream_statistics: bool = True,
        diagnostics: str = "global",
        process_group: Any = None,
    ) -> None:
        params = _materialize_params(params, type(self).__name__)
        self.streams = _check_streams(streams)
        self.stream_weights = _check_weights(stream_weights, self.streams)
        self.levels = _check_levels(levels)
        for name, value, high in (("balance_alpha", balance_alpha, 1.0), ("balance_beta", balance_beta, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= high:
                raise ValueError(f"{name} must be a number in [0, {high:g}], got {value!r}")
        if balance_beta == 1.0:
            raise ValueError("balance_beta must be below 1 (an EMA factor of 1 never updates the norms)")
        self.balance_alpha = float(balance_alpha)
        self.balance_beta = float(balance_beta)
        for flag, value in (("noise_shrinkage", noise_shrinkage), ("heads_strict", heads_strict),
                            ("stream_statistics", stream_statistics)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        self.stream_statistics = stream_statistics
        if diagnostics not in DETAIL_LEVELS:
            raise ValueError(f"diagnostics must be one of {DETAIL_LEVELS}, got {diagnostics!r}")
        self.noise_shrinkage = noise_shrinkage
        self.diagnostics_level = diagnostics
        self.head_layouts = resolve_head_layouts(heads, params, strict=heads_strict)
        self.process_group = process_group
        self.stream_norm_ema: dict[str, float] = {}
        self._last_diagnostics: dict[str, Any] = {}
        active_heads = self.head_layouts if "head" in self.levels else {}
        self._folds = StreamFolds(self.streams, track_norms=noise_shrinkage, head_layouts=active_heads)
        config = FOPConfig.from_group(locals())  # the SOAP and FOP arguments, validated
        self._init_from_config(params, config)

    # ------------------------------------------------------------------------- folding
    def fold(self, stream: str | None = None, tokens: float | Tensor | None = None) -> None:
        """Record what this micro-batch's backward added to ``p.grad`` as stream ``stream``.

        Call it after each micro-batch's ``backward()``; ``tokens`` is the micro-batch's number
        of loss tokens (give it for every fold of a step or for none). ``p.grad`` is left as is.
        """
        if self._folds.reduced:
            raise RuntimeError(
                "the last step() was refused after its folds were reduced across ranks; call "
                "zero_grad() and redo the accumulation before folding again"
            )
        params = [p for group in self.param_groups for p in group["params"]]
        self._folds.fold(stream, params, tokens)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and this step's folds (a new accumulation starts)."""
        super().zero_grad(set_to_none=set_to_none)
        self._folds.reset()

    def current_stream_gradients(self) -> dict[str, list[Tensor | None]]:
        """This rank's stream gradients ``g_k = S_k / a_k`` of the pending folds, per parameter.

        In the loop's own loss normalisation, before any rescale of ``p.grad`` and before the
        cross-rank reduction; ``None`` for a parameter that got no gradient.
        """
        present = self._folds.present()
        shares = self._folds.shares(present) if present else []
        params = [p for group in self.param_groups for p in group["params"]]
        return {
            self.streams[k]: [
                self._folds.buffers[p][k] / share if p in self._folds.buffers else None for p in params
            ]
            for k, share in zip(present, shares)
        }

    def current_stream_weights(self) -> dict[str, float]:
        """The weights ``w_k`` the next ``step()`` would give the streams folded so far."""
        present = self._folds.present()
        if not present:
            return {}
        weights = self._stream_weights(present, self._folds.shares(present))
        return {self.streams[k]: float(w) for k, w in zip(present, weights)}

    def diagnostics(self) -> dict[str, Any]:
        """Plain dict of the last step's heterogeneity statistics (see :mod:`mlfop.diagnostics`).

        Empty after a step without folds (plain SOAP) or with ``diagnostics="off"``.
        """
        return self._last_diagnostics

    def fold_buffer_bytes(self) -> int:
        """Bytes currently held by the stream buffers (at most K gradient-sized per parameter)."""
        return self._folds.buffer_bytes()

    # ---------------------------------------------------------------------- state dict
    def _global_state(self) -> dict[str, Any]:
        return {**super()._global_state(), "stream_norm_ema": dict(self.stream_norm_ema)}

    def _load_global_state(self, global_state: dict[str, Any]) -> None:
        super()._load_global_state(global_state)
        self.stream_norm_ema = {str(k): float(v) for k, v in global_state.get("stream_norm_ema", {}).items()}

    def state_dict(self) -> dict[str, Any]:
        """As :class:`SOAP`; refused in the middle of an accumulation (after a fold, before the step)."""
        self._refuse_mid_accumulation("state_dict()")
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :class:`SOAP`; refused in the middle of an accumulation."""
        self._refuse_mid_accumulation("load_state_dict()")
        super().load_state_dict(state_dict)

    def _refuse_mid_accumulation(self, what: str) -> None:
        if self._folds.active:
            raise RuntimeError(
                f"{what} was called between fold() and step(): the folded stream sums and p.grad "
                f"are not part of a checkpoint. Save after step() (or call zero_grad() first)."
            )

    # ---------------------------------------------------------------------------- step
    def _step_gradients(self) -> None:
        folds = self._folds
        self._last_diagnostics = {}
        if not folds.active:
            super()._step_gradients()
            return
        work = self._gradients()
        if not self._gradients_are_finite(work):
            return
        group = self.process_group if self.process_group is not None else default_process_group()
        with_buffers = [param for _, param, _ in work if param in folds.buffers]
        folds.commit_last_norms(keep=group is None)  # under DDP the last fold is the synced one
        if group is not None and not folds.reduced:
            all_reduce_folds(folds, with_buffers, group)
            folds.reduced = True
        present = folds.present()
        if len(present) == 1:
            if group is not None:  # p.grad must be the ranks' average (DDP synced), else ranks diverge
                self._rescale_factor(work, present, group)
            self._update_params(work)
        else:
            scale = self._rescale_factor(work, present, group)
            self._combined_step(work, present, scale)
        folds.reset()

    def _rescale_factor(self, work: list[tuple[FOPConfig, Tensor, Tensor]], present: list[int], group) -> float:
        """The global factor c with ``p.grad = c * sum_k S_k`` (clipping, unscaling); else an error."""
        folded = [param for _, param, _ in work if param in self._folds.buffers]

        def total(param: Tensor) -> Tensor:  # recomputed, so no second model-sized copy is kept
            return self._folds.present_sums(param, present).sum(0)

        grad_sq = sum(float(torch.linalg.vector_norm(param.grad)) ** 2 for _, param, _ in work)
        sums_sq = sum(float(torch.linalg.vector_norm(total(param))) ** 2 for param in folded)
        streams_sq = sum(float(torch.linalg.vector_norm(self._folds.present_sums(param, present))) ** 2 for param in folded)
        scale = math.sqrt(grad_sq / sums_sq) if sums_sq > 0.0 else 1.0
        if abs(scale - 1.0) <= 1e-6:
            scale = 1.0
        residual_sq = sum(
            float(torch.linalg.vector_norm(param.grad - scale * total(param) if param in self._folds.buffers else param.grad))
            ** 2
            for _, param, _ in work
        )
        tolerance = _RESCALE_RTOL * (math.sqrt(grad_sq) + scale * len(present) * math.sqrt(streams_sq))
        mismatch = math.sqrt(residual_sq) > tolerance
        if group is not None:
            flag = torch.tensor([float(mismatch)], dtype=torch.float64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            mismatch = bool(flag.item() > 0)
        if mismatch:
            raise ValueError(
                "p.grad no longer matches the folded streams beyond a global scale (relative "
                f"residual {math.sqrt(residual_sq) / max(math.sqrt(grad_sq), 1e-300):.3g}): fold() after "
                "every micro-batch's backward, change p.grad after the last fold only by a global "
                "factor (clip_grad_norm_, GradScaler.unscale_), and under DDP let the last "
                "micro-batch sync (no_sync() on the others only). No parameter or state was changed."
            )
        return scale

    def _stream_weights(self, present: list[int], shares: list[float]) -> Tensor:
        """Weights ``w`` of the present streams for this step (sum 1, float64)."""
        mode = self.stream_weights
        natural = torch.tensor(shares, dtype=torch.float64)
        if "global" not in self.levels or mode == "tokens":
            return natural
        names = [self.streams[k] for k in present]
        if mode == "fixed":
            weights = torch.ones(len(present), dtype=torch.float64)
        elif mode == "balanced":
            if not all(name in self.stream_norm_ema for name in names):
                weights = torch.ones(len(present), dtype=torch.float64)
            else:
                norms = torch.tensor([self.stream_norm_ema[name] for name in names], dtype=torch.float64)
                weights = norms.clamp_min(1e-30).pow(-self.balance_alpha)
        else:
            weights = torch.tensor([float(mode[name]) for name in names], dtype=torch.float64)
        total = float(weights.sum())
        return weights / total if total > 0.0 else natural

    def _combined_step(self, work: list[tuple[FOPConfig, Tensor, Tensor]], present: list[int], scale: float) -> None:
        """Pass 1: statistics and layer/head betas; pass 2: blocks that take the global beta."""
        folds = self._folds
        shares = folds.shares(present)
        weights = self._stream_weights(present, shares)
        names = [self.streams[k] for k in present]
        use_layer, use_global = "layer" in self.levels, "global" in self.levels
        detail = DETAIL_LEVELS.index(self.diagnostics_level)
        deferred: list[_Block] = []
        k = len(present)
        d_global, e_global = torch.zeros(k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.float64)
        gram_e_global, sigma_global = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        norms_sq = torch.zeros(k, dtype=torch.float64)
        spread_global, spread_reference_global = torch.zeros(k, k, dtype=torch.float64), 0.0
        blocks: dict[str, Any] = {}
        conflicting = counted = 0
        param_names = self._param_names()
        for config, param, _ in work:
            block = self._prepare_block(param_names[param], config, param, present, shares, scale, weights, detail)
            if block is None:
                continue
            norms_sq += torch.diagonal(block.system.gram_hinv)
            if use_global:
                d_global += block.system.d
                e_global += block.system.e
                spread_global += block.system.spread
                spread_reference_global += block.system.spread_reference
                if block.sigma_sq is not None:
                    sigma_global += block.sigma_sq.sum(1)
            gram_e_global += block.gram_e
            counted += 1
            conflicting += conflicts(block.gram_e)
            if (use_layer or block.param in self._folds.head_layouts) and param.dim() >= 2:
                blocks[block.name] = self._finish_block(block, weights, None, names, detail)
            else:
                deferred.append(block)
        beta_global = beta_raw_global = torch.zeros(k, dtype=torch.float64)
        if use_global and deferred:
            beta_raw_global = solve_beta(d_global, e_global, weights, deferred[0].config.beta_max, spread_global,
                                         spread_reference_global)
            beta_global = beta_raw_global * self._shrink(sigma_global, gram_e_global, weights)[0]
        for block in deferred:
            blocks[block.name] = self._finish_block(block, weights, beta_global, names, detail)
        self._update_stream_norms(present, norms_sq)
        if detail:
            self._last_diagnostics = {
                "streams": names,
                "weights": dict(zip(names, weights.tolist())),
                "norms_hinv": dict(zip(names, norms_sq.clamp_min(0.0).sqrt().tolist())),
                "norms": dict(zip(names, torch.diagonal(gram_e_global).clamp_min(0.0).sqrt().tolist())),
                "conflict_fraction": conflicting / counted if counted else 0.0,
                "global": {
                    "beta_raw": dict(zip(names, beta_raw_global.tolist())),
                    "beta": dict(zip(names, beta_global.tolist())),
                },
            }
            if detail >= DETAIL_LEVELS.index("block"):
                self._last_diagnostics["blocks"] = blocks

    def _param_names(self) -> dict[Tensor, str]:
        """Names for diagnostics: from ``named_parameters()`` pairs, else ``group{g}.param{i}``."""
        names = {}
        for g, group in enumerate(self.param_groups):
            given = group.get("param_names")
            for i, param in enumerate(group["params"]):
                names[param] = given[i] if given else f"group{g}.param{i}"
        return names

    def _shrink(self, sigma_sq: Tensor | None, gram_e: Tensor, weights: Tensor) -> tuple[float, float | None]:
        """``(rho, noise_fraction)``, or ``(1, None)`` with the shrinkage off."""
        if not self.noise_shrinkage or sigma_sq is None:
            return 1.0, None
        return noise_shrinkage(sigma_sq, gram_e, weights)

    def _prepare_block(
        self,
        name: str,
        config: FOPConfig,
        param: Tensor,
        present: list[int],
        shares: list[float],
        scale: float,
        weights: Tensor,
        detail: int,
    ) -> _Block | None:
        """Stream gradients of one parameter, rotated, with their Gram matrices (or first-call init)."""
        block_shape, preconditioned = layout = self._layout(config, param)
        sign = -1.0 if config.maximize else 1.0
        dtype = torch.promote_types(param.dtype, torch.float32)
        if param in self._folds.buffers:
            sums = self._folds.present_sums(param, present)
        else:  # a parameter whose gradient is all zero (the rescale test checked it)
            sums = torch.zeros((len(present), *param.shape), dtype=dtype, device=param.device)
        coef = torch.tensor([sign * scale / a for a in shares], dtype=dtype, device=param.device)
        streams = sums.reshape((len(present), *block_shape)) * coef.view(-1, *[1] * len(block_shape))
        state = self.state[param]
        # Streams whose gradient on this parameter is exactly zero do not reach it (a module of
        # another modality): their zeros are no disagreement. The statistics are scaled by the
        # reaching streams' weight W, so a module that one stream reaches gets SOAP's.
        reaching = (streams.reshape(len(present), -1).abs().amax(1) > 0).cpu()
        reached, reach = int(reaching.sum()), float(weights[reaching].sum())
        if _awaits_first_call(state):
            statistics = self._factor_statistics(streams, weights, preconditioned, reach)
            self._init_state(config, param, layout, statistics, bool(streams.any()))
            return None
        exp_avg, exp_avg_sq, _, bases = _block_tensors(state, layout)
        rotated = rotate(streams, bases)
        w = weights.to(dtype=dtype, device=param.device)
        second_moment = torch.tensordot(w * reach, rotated.square(), dims=1)
        h = exp_avg_sq.lerp(second_moment, 1.0 - config.betas[1]).sqrt_().add_(config.eps)
        gram_h, gram_hinv = stream_gram_matrices(rotated, h)
        gram_e = euclidean_gram(rotated)
        system = fop_system(gram_h, gram_hinv, weights, config.eps_fop, gram_e)
        sigma_sq = None
        if self.noise_shrinkage and param in self._folds.micro_sq:
            layout_h = self._folds.head_layouts.get(param)
            grouped = split_heads(sums, *layout_h, leading=1).flatten(2) if layout_h else sums.reshape(len(present), 1, -1)
            sums_sq = grouped.square().sum(2).double().cpu()
            micro_sq = self._folds.micro_sq[param][present]
            counts = torch.tensor([self._folds.micro_batches[k] for k in present])
            norm_counts = torch.tensor([self._folds.norm_counts[k] for k in present])
            sigma_sq = stream_noise(micro_sq, sums_sq, counts, norm_counts, torch.tensor(shares), scale)
        return _Block(name, config, param, streams, rotated, h, second_moment, system, gram_h, gram_e, sigma_sq,
                      reached, reach)

    def _finish_block(
        self, block: _Block, weights: Tensor, beta: Tensor | None, names: list[str], detail: int
    ) -> dict[str, Any]:
        """Combine the streams (with ``beta``, or the block's own per layer or per head) and step."""
        config, param = block.config, block.param
        layout = self._layout(config, param)
        record: dict[str, Any] = {}
        heads = self._folds.head_layouts.get(param)
        if beta is None and heads is not None and block.reached > 1:
            momentum, eta, record = self._combine_heads(block, weights, heads, names, detail)
        else:
            noise_fraction = None
            beta_raw = beta
            if beta is None:
                beta_raw = solve_beta(block.system.d, block.system.e, weights, config.beta_max, block.system.spread,
                                      block.system.spread_reference)
                rho, noise_fraction = self._shrink(
                    None if block.sigma_sq is None else block.sigma_sq.sum(1), block.gram_e, weights
                )
                beta = beta_raw * rho
            if bool((beta == 0).all()):
                coefficients, eta = block.system.weights, 1.0
            else:
                coefficients = combination_coefficients(block.system, beta)
                eta = step_scale(block.system, coefficients, config.eta_range)
            momentum = combine(block.rotated, coefficients)
            if detail >= DETAIL_LEVELS.index("block"):
                record = stream_record(
                    names, gram_e=block.gram_e, gram_h=block.gram_h, s=block.system.s, beta_raw=beta_raw,
                    beta=beta, eta=eta, noise_fraction=noise_fraction,
                )
        self._real_step(
            config,
            param,
            self.state[param],
            layout,
            momentum_input=momentum,
            second_moment_input=torch.maximum(block.second_moment, momentum.square()),
            factor_statistics=self._factor_statistics(block.streams, weights, layout[1], block.reach),
            update_scale=eta,
        )
        return record

    def _combine_heads(
        self, block: _Block, weights: Tensor, heads: tuple[int, int], names: list[str], detail: int
    ) -> tuple[Tensor, float, dict[str, Any]]:
        """Head level: FOP on each head's subspace (block-diagonal across heads), summed.

        Head h's streams are the streams masked to the head's slice (zero elsewhere), rotated:
        the metrics restricted to that subspace are then exact inner products, and a single
        head is exactly the layer level. The H heads together cost about one rotation of the K
        streams (:func:`mlfop.functional.heads.rotate_heads`).
        """
        config, param = block.config, block.param
        num_heads, axis = heads
        bases = _block_tensors(self.state[param], self._layout(config, param))[3]
        k = block.streams.shape[0]
        momentum = torch.zeros_like(block.rotated[0])
        # Plain inner products need no rotation: one contraction for all heads.
        flat = block.streams.reshape(k, *param.shape)
        grams_e = head_gram(flat, flat, num_heads, axis)
        corrected = False  # whether any head's combination differs from the shared component
        head_records: dict[str, Any] = {}
        for h, rotated in enumerate(rotate_heads(block.streams, bases, param.shape, num_heads, axis)):
            gram_h, gram_hinv = stream_gram_matrices(rotated, block.h)
            system = fop_system(gram_h, gram_hinv, weights, config.eps_fop, grams_e[h])
            beta_raw = solve_beta(system.d, system.e, weights, config.beta_max, system.spread, system.spread_reference)
            gram_e = grams_e[h]
            sigma = None if block.sigma_sq is None else block.sigma_sq[:, h]
            rho, noise_fraction = self._shrink(sigma, gram_e, weights)
            beta = beta_raw * rho
            coefficients = combination_coefficients(system, beta)
            momentum += combine(rotated, coefficients)
            corrected |= not bool((coefficients == block.system.weights).all())
            if detail >= DETAIL_LEVELS.index("head"):
                head_records[str(h)] = stream_record(
                    names, gram_e=gram_e, gram_h=gram_h, s=system.s, beta_raw=beta_raw, beta=beta,
                    eta=step_scale(system, coefficients, config.eta_range), noise_fraction=noise_fraction,
                )
        shared = combine(block.rotated, block.system.weights)
        comb_norm = float((momentum.square() / block.h).sum())
        eta = 1.0
        if comb_norm > 0.0 and corrected:
            eta = float((shared * momentum / block.h).sum()) / comb_norm
            eta = min(max(eta, config.eta_range[0]), config.eta_range[1])
        record: dict[str, Any] = {}
        if detail >= DETAIL_LEVELS.index("block"):
            zeros = torch.zeros(len(names), dtype=torch.float64)
            record = stream_record(
                names, gram_e=block.gram_e, gram_h=block.gram_h, s=block.system.s, beta_raw=zeros,
                beta=zeros, eta=eta, noise_fraction=None,
            )
            del record["beta_raw"], record["beta"]  # the betas are per head
            if head_records:
                record["heads"] = head_records
        return momentum, eta, record

    def _factor_statistics(
        self, streams: Tensor, weights: Tensor, preconditioned: tuple[bool, ...], reach: float
    ) -> list[Tensor | None]:
        r"""Kronecker statistics: :math:`W \sum_k w_k G_{k(i)} G_{k(i)}^\top` from the streams
        (``reach`` :math:`= W`, the weight of the streams that reach the parameter), or, with
        ``stream_statistics=False``, :math:`\bar G_{(i)} \bar G_{(i)}^\top` of the shared
        component (SOAP's own statistic under the natural weights; K - 1 fewer products)."""
        w = weights.to(dtype=streams.dtype, device=streams.device)
        if not self.stream_statistics:
            return kronecker_statistics(torch.tensordot(w, streams, dims=1), preconditioned)
        scale = (w * reach).sqrt().view(-1, *[1] * (streams.dim() - 1))
        return kronecker_statistics(streams * scale, preconditioned)

    def _update_stream_norms(self, present: list[int], norms_sq: Tensor) -> None:
        """EMA of each stream's global norm under the inverse metric (for ``"balanced"``)."""
        for k, norm_sq in zip(present, norms_sq.tolist()):
            name, norm = self.streams[k], math.sqrt(max(norm_sq, 0.0))
            previous = self.stream_norm_ema.get(name)
            self.stream_norm_ema[name] = norm if previous is None else (
                self.balance_beta * previous + (1.0 - self.balance_beta) * norm
            )

    def fold_losses(self, losses: Mapping[str, Tensor], tokens: Mapping[str, float | Tensor] | None = None) -> None:
        """Fold a micro-batch that mixes streams from its per-stream losses ``{stream: loss}``:
        one backward and one fold per stream, as :func:`mlfop.mixed_batches.fold_losses`."""
        from mlfop.mixed_batches import fold_losses

        fold_losses(self, losses, tokens)




def _check_streams(streams: Iterable[str] | None) -> tuple[str, ...]:
    if streams is None:
        return UNTAGGED_STREAMS
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


def _check_weights(weights: str | Mapping[str, float], streams: tuple[str, ...]) -> str | dict[str, float]:
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
    values = {}
    for name in streams:
        value = weights[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < math.inf:
            raise ValueError(f"stream_weights[{name!r}] must be a finite number >= 0, got {value!r}")
        values[name] = float(value)
    if sum(values.values()) <= 0.0:
        raise ValueError("stream_weights must not all be zero")
    return values


def _check_levels(levels: Iterable[str]) -> tuple[str, ...]:
    if isinstance(levels, str):
        raise TypeError(f"levels must be a collection such as ('global', 'layer'), got the string {levels!r}")
    chosen = tuple(levels)
    unknown = [level for level in chosen if level not in LEVELS]
    if unknown:
        raise ValueError(f"levels must be a subset of {LEVELS}, got unknown {unknown}")
    return tuple(level for level in LEVELS if level in chosen)
