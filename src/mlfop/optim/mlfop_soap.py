"""``MLFOPSOAP``: SOAP plus the Fisher-orthogonal combination of per-modality gradient streams."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mlfop.diagnostics import StepRecord
from mlfop.distributed import DDPFoldReducer, LocalMicroNorms, default_process_group
from mlfop.folding import UNTAGGED_STREAMS, FinishedFolds, FoldReducer, StreamFolds
from mlfop.functional.fop import FOPSystem, SystemTotals, combine_block, fop_system, global_beta, stream_grams, stream_noise
from mlfop.functional.heads import combine_heads, split_heads
from mlfop.functional.rotation import rotate
from mlfop.functional.soap import soap_denominator
from mlfop.functional.streams import (
    reach_weight,
    stream_factor_statistics,
    stream_order,
    stream_second_moment,
    stream_weights,
    update_norm_ema,
)
from mlfop.head_layouts import resolve_head_layouts
from mlfop.mixed_batches import fold_losses
from mlfop.optim.block_state import BlockBatch, BlockTensors, materialize_params
from mlfop.optim.config import LEVELS, FOPConfig, FOPOptions, check_streams
from mlfop.optim.soap import SOAP, SOAP_ARGS_DOC

__all__ = ["MLFOPSOAP"]


@dataclass
class _Streams:
    """A batch of blocks with its stream gradients, between the two passes of a step."""

    batch: BlockBatch
    streams: Tensor  # (B, K, *block): g_k in the original basis
    reaching: tuple[bool, ...]  # which present streams reach these blocks
    heads: tuple[int, int] | None  # the head layout, where the head level applies
    noise: Tensor | None = None  # (B, K, groups) sampling variances
    tensors: BlockTensors | None = None
    rotated: Tensor | None = None
    second_moment: Tensor | None = None
    h: Tensor | None = None
    system: FOPSystem | None = None
    order: Tensor | None = None
    reach: Tensor | None = None  # W


def _flat(x: Tensor, kept: int) -> Tensor:
    """``x`` with its dimensions after the first ``kept`` flattened into one (0-d blocks too)."""
    return x.reshape(*x.shape[:kept], -1)


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

    A step reads top to bottom: finish the folds (reduce across ranks, check the rescale), the
    stream weights, per batch of same-shaped blocks the rotation, the metric and one
    Fisher-orthogonal combination (:func:`~mlfop.functional.fop.combine_block` or
    :func:`~mlfop.functional.heads.combine_heads`), the global :math:`\beta_G` for the blocks
    that wait for it, and one SOAP update per batch. It reads two values back to the host
    (whether the gradients are finite; the rescale flag with the reach of every block), whatever
    the number of parameters; the diagnostics stay on the device until :meth:`diagnostics`.

    Stream weights (``stream_weights``): ``"tokens"`` (natural: each stream's share of loss
    tokens, or of micro-batches without token counts; then :math:`\bar g` is exactly the
    accumulated gradient), ``"fixed"`` (equal), a mapping ``{name: weight}``, or
    ``"balanced"``: :math:`w_k \propto \mathrm{EMA}(\lVert g_k\rVert_{H^{-1}})^{-\alpha}`, so a
    modality with much larger gradients cannot drown the others (weights from the EMA of
    previous steps; equal on the first).
    """

    __doc__ = (__doc__ or "") + SOAP_ARGS_DOC + r"""
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
        stream_communication_dtype (torch.dtype or str or None): the dtype of the stream sums in
            collectives: ``torch.bfloat16`` halves their bytes (DDP's all-reduce of the streams,
            FSDP2's gather to the owners) at the cost of bf16 rounding of the streams; the math
            stays float32 (default: None, their own dtype).
"""

    config_class = FOPConfig
    state_kind = "MLFOPSOAP"
    _pickled_attributes = SOAP._pickled_attributes + (
        "options", "head_layouts", "_norm_ema", "_norm_started", "_record", "_folds",
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
        batched: bool = True,
        state_dtype: torch.dtype | str | None = None,
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
        stream_communication_dtype: torch.dtype | str | None = None,
        shard_refresh: bool = False,
        process_group: Any = None,
    ) -> None:
        params = materialize_params(params, type(self).__name__)
        self.options = FOPOptions(
            streams=check_streams(streams, UNTAGGED_STREAMS), stream_weights=stream_weights, levels=levels,
            balance_alpha=balance_alpha, balance_beta=balance_beta, noise_shrinkage=noise_shrinkage,
            stream_statistics=stream_statistics, diagnostics=diagnostics, heads_strict=heads_strict,
            stream_communication_dtype=stream_communication_dtype,
        )
        self.head_layouts = resolve_head_layouts(heads, params, strict=heads_strict)
        self._norm_ema: Tensor | None = None  # (K,) float64 EMA of each stream's norm, for "balanced"
        self._norm_started = [False] * len(self.streams)
        self._record: StepRecord | None = None
        active_heads = self.head_layouts if "head" in self.options.levels else {}
        self._folds = StreamFolds(self.streams, track_norms=noise_shrinkage, head_layouts=active_heads)
        # the SOAP and FOP arguments, validated
        self._init_from_config(params, FOPConfig.from_group(locals()), shard_refresh, process_group)
        self._hook_local_norms()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._hook_local_norms()

    def _hook_local_norms(self) -> None:
        """Under DDP with the noise estimate, hooks that record each rank's micro-gradient norms
        before DDP's sync (:class:`~mlfop.distributed.LocalMicroNorms`): the synced micro-batch
        then counts as a sample, as in one process. Nothing in one process or under FSDP2 (whose
        folds see the ranks' joint micro-batch)."""
        group = self.process_group if self.process_group is not None else default_process_group()
        if not self.options.noise_shrinkage or self._is_sharded or group is None:
            return
        optimizer = weakref.ref(self)
        hooks = LocalMicroNorms(self._params(), lambda: None if optimizer() is None else optimizer()._folds)
        weakref.finalize(self, hooks.remove)

    @property
    def streams(self) -> tuple[str, ...]:
        """The stream names (``("even", "odd")`` for untagged folding)."""
        return self.options.streams

    # ------------------------------------------------------------------------- folding
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def fold(self, stream: str | None = None, tokens: float | Tensor | None = None) -> None:
        """Record what this micro-batch's backward added to ``p.grad`` as stream ``stream``.

        Call it once after each micro-batch's ``backward()``; ``tokens`` is the micro-batch's
        number of loss tokens (give it for every fold of a step or for none; a Python number
        avoids reading a tensor back). ``p.grad`` is left as is, and nothing is read back to the
        host.
        """
        if self._folds.reduced:
            raise RuntimeError(
                "the last step() was refused after its folds were reduced across ranks; call "
                "zero_grad() and redo the accumulation before folding again"
            )
        self._folds.fold(stream, self._params(), tokens)

    def record_dual_gradient(self, params, sums) -> None:
        """Take the even and odd ranks' streams of a DDP bucket from
        :class:`mlfop.distributed.DualGradientGroups` (no fold needed in that mode)."""
        self._folds.record_group_sums(params, sums)

    def fold_losses(self, losses: Mapping[str, Tensor], tokens: Mapping[str, float | Tensor] | None = None) -> None:
        """Fold a micro-batch that mixes streams from its per-stream losses ``{stream: loss}``:
        one backward and one fold per stream (:func:`mlfop.mixed_batches.fold_losses`)."""
        fold_losses(self, losses, tokens)

    @property
    def accumulating(self) -> bool:
        """Whether folds are pending (after a fold, before ``step()`` or ``zero_grad()``)."""
        return self._folds.active

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and this step's folds (a new accumulation starts)."""
        super().zero_grad(set_to_none=set_to_none)
        self._folds.reset()

    def current_stream_gradients(self) -> dict[str, list[Tensor | None]]:
        """This rank's stream gradients ``g_k = S_k / a_k`` of the pending folds, per parameter.

        In the loop's own loss normalisation, before any rescale of ``p.grad`` and before the
        cross-rank reduction; ``None`` for a parameter that got no gradient.
        """
        return self._folds.stream_gradients(self._params())

    def current_stream_weights(self) -> dict[str, float]:
        """The weights ``w_k`` the next ``step()`` would give the streams folded so far."""
        present = self._folds.present()
        if not present:
            return {}
        weights = self._weights(present, self._folds.shares(present), torch.device("cpu"))
        return {self.streams[k]: float(w) for k, w in zip(present, weights.tolist())}

    @property
    def stream_norm_ema(self) -> dict[str, float]:
        """The EMA of each stream's norm under the inverse metric (``"balanced"`` weights)."""
        if self._norm_ema is None:
            return {}
        values = self._norm_ema.tolist()
        return {name: values[k] for k, name in enumerate(self.streams) if self._norm_started[k]}

    def diagnostics(self) -> dict[str, Any]:
        """Plain dict of the last step's heterogeneity statistics (see :mod:`mlfop.diagnostics`).

        Empty after a step without folds (plain SOAP) or with ``diagnostics="off"``.
        """
        return {} if self._record is None else self._record.as_dict()

    def fold_buffer_bytes(self) -> int:
        """Bytes currently held by the stream buffers (at most K gradient-sized per parameter)."""
        return self._folds.buffer_bytes()

    # ---------------------------------------------------------------------- state dict
    def _global_state(self) -> dict[str, Any]:
        """Every stream has an entry, also before its EMA starts: DCP's ``dcp.load`` fills only
        the keys that a fresh optimizer's state dict already has."""
        values = self._norm_ema.tolist() if self._norm_ema is not None else [0.0] * len(self.streams)
        return {**super()._global_state(), "stream_norm_ema": dict(zip(self.streams, values)),
                "stream_norm_started": dict(zip(self.streams, self._norm_started))}

    def _load_global_state(self, global_state: dict[str, Any]) -> None:
        super()._load_global_state(global_state)
        saved = {str(k): float(v) for k, v in global_state.get("stream_norm_ema", {}).items()}
        # (checkpoints without the flags listed only the streams whose EMA had started)
        started = global_state.get("stream_norm_started", dict.fromkeys(saved, True))
        self._norm_started = [bool(started.get(name, False)) for name in self.streams]
        self._norm_ema = torch.tensor([saved.get(name, 0.0) for name in self.streams], dtype=torch.float64,
                                      device=self._params()[0].device) if any(self._norm_started) else None

    def state_dict(self) -> dict[str, Any]:
        """As :class:`SOAP`; refused in the middle of an accumulation (after a fold, before the step)."""
        self._refuse_mid_accumulation("state_dict()")
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :class:`SOAP`; refused in the middle of an accumulation. A :class:`SOAP` checkpoint
        loads too: its groups take this optimizer's FOP values, and its state is the same."""
        self._refuse_mid_accumulation("load_state_dict()")
        super().load_state_dict(state_dict)

    def _refuse_mid_accumulation(self, what: str) -> None:
        if self._folds.active:
            raise RuntimeError(
                f"{what} was called between fold() and step(): the folded stream sums and p.grad "
                f"are not part of a checkpoint. Save after step() (or call zero_grad() first)."
            )

    # ---------------------------------------------------------------------------- step
    def _step_gradients(self, work: list[tuple[FOPConfig, Tensor, Tensor]]) -> None:
        self._record = None
        if not self._folds.active:
            super()._step_gradients(work)
            return
        reducer = self._reducer()
        finished = self._folds.finish([(param, grad) for _, param, grad in work], reducer)
        if len(finished.present) == 1:
            super()._step_gradients(work)
        else:
            self._combined_step(work, finished, reducer)
        self._folds.reset()

    def _shard_pieces(self, param: Tensor, grad: Tensor) -> list[Tensor]:
        """As :class:`SOAP`, and the parameter's stacked stream sums where a fold saw it."""
        sums = self._folds.local_sums(param)
        dtype = self.options.communication_dtype
        return super()._shard_pieces(param, grad) + ([] if sums is None else [sums if dtype is None else sums.to(dtype)])

    def _take_owned(self, full: dict[Tensor, list[Tensor]]) -> None:
        if self._folds.active:
            self._folds.take_owned({param: tensors[2].to(torch.promote_types(param.dtype, torch.float32))
                                    for param, tensors in full.items() if len(tensors) > 2})

    def _refuse(self, configs: list[FOPConfig], where: str) -> None:
        """As :class:`SOAP`; a skipped step also ends the accumulation (its folds are dropped)."""
        super()._refuse(configs, where)
        self._folds.reset()

    def _reducer(self) -> FoldReducer | None:
        if self._sharding is not None:
            return self._sharded_reducer(self.options.communication_dtype)
        group = self.process_group if self.process_group is not None else default_process_group()
        return None if group is None else DDPFoldReducer(group, self._device(), self.options.communication_dtype)

    def _weights(self, present: list[int], shares: list[float], device: torch.device) -> Tensor:
        """Weights ``w`` of the present streams for this step (sum 1, float64, on ``device``)."""
        mode = self.options.weight_mode()
        norms = None
        if mode == "balanced" and self._norm_ema is not None and all(self._norm_started[k] for k in present):
            norms = self._norm_ema[present]
        names = [self.streams[k] for k in present]
        return stream_weights(mode, names, shares, norms, self.options.balance_alpha, device)

    def _combined_step(self, work: list[tuple[FOPConfig, Tensor, Tensor]], finished: FinishedFolds,
                       reducer: FoldReducer | None) -> None:
        """Pass 1: per batch the streams' statistics and the blocks' own combinations; pass 2:
        the blocks that take the global beta (the totals added up over the ranks that own
        parameters: :mod:`mlfop.fully_sharded`)."""
        options, present = self.options, finished.present
        device = self._params()[0].device
        weights = self._weights(present, finished.shares, device)
        detail = int(options.detail)
        record = StepRecord([self.streams[k] for k in present], detail, self._param_names()) if detail else None
        totals = SystemTotals.zeros(len(present), device)
        deferred = []
        for item in self._stream_batches(work, finished, weights):
            if item.batch.step == 0:  # a block that no stream reaches waits for a real first call
                self._initialise(item.batch, self._factor_statistics(item, weights),
                                 [any(item.reaching)] * len(item.batch.params))
                continue
            self._prepare(item, weights)
            totals.add(item.system, None if item.noise is None else item.noise.sum(-1))
            own = ("layer" in options.levels or item.heads is not None) and item.batch.params[0].dim() >= 2
            if own:
                self._finish(item, weights, record)
            else:
                deferred.append(item)
        if reducer is not None:
            reducer.total(list(vars(totals).values()))
        beta_raw = beta = torch.zeros(len(present), dtype=torch.float64, device=device)
        if "global" in options.levels and deferred:
            beta_raw, beta = global_beta(totals, weights, deferred[0].batch.config.beta_max, options.noise_shrinkage)
        for item in deferred:
            self._finish(item, weights, record, beta)
        norms = totals.norms_hinv_sq.clamp_min(0.0).sqrt()
        self._norm_ema = update_norm_ema(
            self._norm_ema if self._norm_ema is not None else torch.zeros(len(self.streams), dtype=torch.float64, device=device),
            self._norm_started, present, norms, options.balance_beta)
        for k in present:
            self._norm_started[k] = True
        if record is not None:
            record.finish(weights, totals, beta_raw, beta)
            self._record = record

    def _stream_batches(
        self, work: list[tuple[FOPConfig, Tensor, Tensor]], finished: FinishedFolds, weights: Tensor
    ) -> list[_Streams]:
        """Batches of same-shaped blocks that the same streams reach, with their stream gradients
        ``g_k = sign * c * S_k / a_k`` (and the noise estimate, with the shrinkage on)."""
        k = len(finished.present)
        heads = self.head_layouts if "head" in self.options.levels else {}

        def reach_and_heads(param: Tensor) -> tuple[tuple[bool, ...], tuple[int, int] | None]:
            return finished.reach.get(param, (False,) * k), heads.get(param)

        items = []
        for batch, _ in self._batches(work, extra_key=reach_and_heads):
            config, params, layout = batch.config, batch.params, batch.layout
            reaching, layout_h = reach_and_heads(params[0])
            sign = -1.0 if config.maximize else 1.0
            coefficients = finished.scale.to(batch.dtype) * torch.tensor(
                [sign / share for share in finished.shares], dtype=batch.dtype, device=finished.scale.device)
            sums = [self._folds.sums(p, finished.present).reshape(k, *layout[0]) for p in params]
            raw = sums[0].unsqueeze(0) if len(sums) == 1 else torch.stack(sums)  # one block: the buffer itself
            item = _Streams(batch, raw, reaching, layout_h)
            item.noise = self._noise(params, raw, layout_h, finished)
            per_stream = coefficients.view(1, k, *[1] * len(layout[0]))
            item.streams = raw * per_stream if len(sums) == 1 else raw.mul_(per_stream)
            item.order = stream_order(item.streams)
            item.reach = reach_weight(weights, reaching)
            items.append(item)
        return items

    def _noise(self, params: list[Tensor], raw: Tensor, layout_h: tuple[int, int] | None,
               finished: FinishedFolds) -> Tensor | None:
        """``(B, K, groups)``: the streams' sampling variances from the level-0 norms, or ``None``
        with the shrinkage off (or before any measured fold)."""
        if not self.options.noise_shrinkage:
            return None
        inputs = [self._folds.noise_inputs(p, finished.present) for p in params]
        if all(value is None for value in inputs):
            return None
        known = next(value for value in inputs if value is not None)
        micro_sq = torch.stack([torch.zeros_like(known[0]) if value is None else value[0] for value in inputs])
        batch, k = raw.shape[:2]
        shaped = raw.reshape(batch, k, *params[0].shape)
        grouped = split_heads(shaped, *layout_h, leading=2).flatten(3) if layout_h else shaped.reshape(batch, k, 1, -1)
        sums_sq = torch.linalg.vector_norm(grouped, dim=-1).double().square()
        counts = torch.tensor(known[1])
        return stream_noise(micro_sq, sums_sq, counts, torch.tensor(known[2]), torch.tensor(finished.shares),
                            finished.scale)

    def _factor_statistics(self, item: _Streams, weights: Tensor) -> list[Tensor | None]:
        return stream_factor_statistics(item.streams, weights, item.reach, item.batch.layout[1], item.order,
                                        shared_only=not self.options.stream_statistics)

    def _prepare(self, item: _Streams, weights: Tensor) -> None:
        """Rotate the streams; the metric h (this step's SOAP denominator) and the FOP system."""
        config = item.batch.config
        item.tensors = item.batch.tensors(self._stacks)
        item.rotated = rotate(item.streams, item.tensors.bases).contiguous()
        item.second_moment = stream_second_moment(item.rotated, weights, item.reach, item.order)
        item.h = soap_denominator(item.tensors.exp_avg_sq.to(item.batch.dtype), item.second_moment, config.betas[1],
                                  config.eps)
        grams = stream_grams(_flat(item.rotated, 2), _flat(item.h, 1))
        item.system = fop_system(*grams, weights, config.eps_fop)

    def _finish(self, item: _Streams, weights: Tensor, record: StepRecord | None, beta: Tensor | None = None) -> None:
        """One combination (own, per head, or with the global ``beta``), then SOAP's update."""
        config, batch = item.batch.config, item.batch
        heads = beta is None and item.heads is not None and sum(item.reaching) > 1
        if heads:
            combination = combine_heads(
                item.streams, item.rotated, item.second_moment, item.h, item.tensors.bases, batch.params[0].shape,
                item.heads, weights, item.order, eps_fop=config.eps_fop, beta_max=config.beta_max,
                eta_range=config.eta_range, sigma_sq=item.noise,
            )
        else:
            combination = combine_block(
                _flat(item.rotated, 2), _flat(item.second_moment, 1), item.system, beta_max=config.beta_max,
                eta_range=config.eta_range, beta=beta,
                sigma_sq=None if item.noise is None or beta is not None else item.noise.sum(-1),
            )
        shape = (len(batch.params), *batch.block_shape)
        self._update(batch, item.tensors, momentum_input=combination.momentum.view(shape),
                     second_moment_input=combination.second_moment.view(shape),
                     factor_statistics=self._factor_statistics(item, weights),
                     update_scale=combination.eta.to(batch.dtype))
        if record is not None:
            record.add(batch.params, item.system, combination, config.eta_range, heads)

    def _param_names(self) -> dict[Tensor, str]:
        """Names for diagnostics: from ``named_parameters()`` pairs, else ``group{g}.param{i}``."""
        names = {}
        for g, group in enumerate(self.param_groups):
            given = group.get("param_names")
            for i, param in enumerate(group["params"]):
                names[param] = given[i] if given else f"group{g}.param{i}"
        return names
