"""``SOAP``: the optimizer class. It validates, keeps state and orchestrates ``mlfop.functional``."""

from __future__ import annotations

from collections.abc import Iterable
import math
from itertools import chain
from typing import Any, Callable, Hashable

import torch
from torch import Tensor

from mlfop._warnings import warn_at_caller
from mlfop.distributed import RefreshSharding, ShardedFoldReducer, default_process_group
from mlfop.fully_sharded import OwnerSharding, ShardLayout, is_sharded, local_tensor
from mlfop.functional.rotation import kronecker_statistics, rotate
from mlfop.functional.soap import BasisStep, power_iteration_basis, soap_update_
from mlfop.optim.block_state import (
    BlockBatch,
    BlockTensors,
    StateStacks,
    check_param,
    layout_of,
    materialize_params,
    moment_dtype,
    plan_batches,
    preconditioner_cost,
    state_dtype,
    state_keys,
    state_shapes,
)
from mlfop.optim.config import SOAPConfig

__all__ = ["SOAP", "SOAP_ARGS_DOC"]

# Optimizer-wide values (counters, the balanced weights' norm EMA): saved in every param group.
_GLOBAL_KEY = "global_state"

SOAP_ARGS_DOC = r"""
    Args:
        params (iterable): parameters or param groups (dicts, each may override any
            hyper-parameter below) or ``(name, parameter)`` pairs.
        lr (float, optional): learning rate :math:`\gamma` (default: 3e-3).
        betas (Tuple[float, float], optional): :math:`(\beta_1, \beta_2)` of the moments, each in
            [0, 1) (default: (0.95, 0.95)).
        shampoo_beta (float, optional): EMA factor :math:`\beta_s` of the Kronecker factors;
            ``None`` uses :math:`\beta_2` (default: None).
        eps (float, optional): :math:`\epsilon` added to :math:`\sqrt{V}`, > 0 (default: 1e-8).
        weight_decay (float, optional): decoupled weight decay :math:`\lambda` (default: 0.01).
        precondition_frequency (int, optional): refresh the bases every :math:`f` steps
            (default: 10).
        max_precond_dim (int, optional): dimensions larger than this keep the identity basis;
            0 rotates nothing (default: 10000).
        merge_dims (bool, optional): merge adjacent small dimensions (product up to
            ``max_precond_dim``) before building factors (default: False).
        precondition_1d (bool, optional): give 1-D parameters a full factor (default: False).
        normalize_grads (bool, optional): divide each update by its RMS (default: False).
        correct_bias (bool, optional): Adam's bias correction in the step size (default: True).
        maximize (bool, optional): maximise the objective (default: False).
        nonfinite (str, optional): what a step with a NaN/Inf gradient (or one so large that its
            squares overflow) does: ``"skip"`` refuses the whole step (parameters and state
            untouched, ``skipped_steps`` incremented, one warning); ``"raise"`` raises
            ``FloatingPointError`` (default: "skip").
        state_dtype (torch.dtype or str, optional): dtype of the moments ``exp_avg`` and
            ``exp_avg_sq``: ``torch.bfloat16`` halves them (factors and bases stay float32, and
            every update is computed in float32); ``None`` keeps the statistics' dtype (default: None).
        batched (bool, optional): step same-shaped blocks together in batched kernels; False
            steps one block at a time, which bounds the extra memory to one block's working
            set (default: True).
        shard_refresh (bool, optional): under DDP, refresh each block's eigenbasis on one rank
            of ``process_group`` and share the results (one all-reduce of the bases per refresh),
            so the refresh work divides by the number of ranks; the step is unchanged (default:
            False). Parameters sharded by FSDP2 are refreshed by their owner ranks anyway.
        process_group: the replicas' group (DDP: the ranks that fold data-parallel shares of
            the batch, for ML-FOP-SOAP); ``None`` uses the world group when ``torch.distributed``
            runs with several ranks (default: None).
"""

_FP32_STATE_KEYS_NOTE = """
    State per parameter (plain tensors, so ``torch.load(weights_only=True)`` and
    ``torch.distributed.checkpoint`` read it): ``step`` (0-d float32, real steps taken),
    ``exp_avg`` (:math:`M`, eigenbasis) and ``exp_avg_sq`` (:math:`V`), parameter-shaped, and
    per rotated block dimension ``i`` a factor ``factor_{i}`` and a basis ``basis_{i}``.
    Statistics are kept in float32 for bf16/fp16 parameters (float64 for float64 ones),
    including after ``load_state_dict``.
"""


class SOAP(torch.optim.Optimizer):
    r"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors (Vyas et al., 2024).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2, \beta_s \text{ (shampoo beta)},
                \epsilon, \lambda \text{ (weight decay)}, f \text{ (precondition frequency)}      \\
            &\textbf{first call}: F_i \leftarrow (1-\beta_s) G_{(i)} G_{(i)}^\top,\;
                Q_i \leftarrow \operatorname{eigh}(F_i) \text{ (descending)},\;
                M, V \leftarrow 0 \quad \text{(no parameter update)}                              \\
            &\textbf{for } t = 1, 2, \dots:                                                      \\
            &\hspace{5mm} g' \leftarrow \operatorname{rot}(G_t) = Q_L^\top G_t Q_R               \\
            &\hspace{5mm} M \leftarrow \beta_1 M + (1-\beta_1) g', \quad
                          V \leftarrow \beta_2 V + (1-\beta_2) g'^2                              \\
            &\hspace{5mm} \theta \leftarrow \theta - \gamma \tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
                          \operatorname{unrot}\big(M / (\sqrt{V} + \epsilon)\big)                 \\
            &\hspace{5mm} \theta \leftarrow \theta (1 - \gamma\lambda)                            \\
            &\hspace{5mm} F_i \leftarrow \beta_s F_i + (1-\beta_s) G_{(i)} G_{(i)}^\top           \\
            &\hspace{5mm} \textbf{if } t \bmod f = 0: \; \pi \leftarrow
                \operatorname{argsort}_\downarrow \operatorname{diag}(Q_i^\top F_i Q_i),\;
                Q_i \leftarrow \operatorname{qr}(F_i Q_i[:, \pi]),\;
                V \leftarrow V[\pi]_i,\;
                M \leftarrow \operatorname{rot}_{new}(\operatorname{unrot}_{old} M)            \\
            &\rule{110mm}{0.4pt}                                                                 \\
       \end{aligned}

    This is the official algorithm (nikhilvyas/SOAP), including its first call (bases only),
    its refresh cadence (calls :math:`f+1, 2f+1, \dots`) and the permutation of :math:`V` at a
    refresh. :math:`M` lives in the eigenbasis and is rotated only when a basis changes, so a
    step costs two rotations. Dimensions above ``max_precond_dim``, 1-D parameters (unless
    ``precondition_1d``) and 0-D parameters keep the identity basis: for them SOAP is Adam
    with decoupled weight decay applied after the update.

    Same-shaped blocks of a param group are stacked and stepped by batched kernels
    (``batched=False``: one block at a time); a regular step reads one value back to the host,
    whatever the number of parameters (whether the gradients are finite).

    A step with a non-finite gradient, or one whose squares would overflow the statistics'
    dtype, is refused as a whole (see ``nonfinite``). A failed
    ``eigh``/QR is retried in float64; if that fails too the previous basis (identity at the
    first call) is kept and ``basis_failures`` is incremented.
    """

    __doc__ = (__doc__ or "") + SOAP_ARGS_DOC + _FP32_STATE_KEYS_NOTE

    config_class: type[SOAPConfig] = SOAPConfig
    # What the checkpoint says it is; SOAP and ML-FOP-SOAP keep the same per-parameter state.
    state_kind = "SOAP"
    loadable_kinds = ("SOAP", "MLFOPSOAP")

    def __init__(
        self,
        params: Iterable[Any],
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
        *,
        maximize: bool = False,
        nonfinite: str = "skip",
        batched: bool = True,
        state_dtype: torch.dtype | str | None = None,
        shard_refresh: bool = False,
        process_group: Any = None,
    ) -> None:
        # Every argument but params and the distributed two is a config field: validated and
        # flattened in one place.
        config = SOAPConfig.from_group(locals())
        self._init_from_config(params, config, shard_refresh, process_group)

    def _init_from_config(self, params: Iterable[Any], config: SOAPConfig, shard_refresh: bool,
                          process_group: Any) -> None:
        """Shared by subclasses: counters, then ``torch.optim.Optimizer`` with plain group values."""
        if not isinstance(shard_refresh, bool):
            raise TypeError(f"shard_refresh must be True or False, got {type(shard_refresh).__name__} ({shard_refresh!r})")
        self.shard_refresh = shard_refresh
        self.process_group = process_group
        self._refresh_sharding: RefreshSharding | None = None
        self.skipped_steps = 0
        self.basis_failures = 0
        self._step_counts: dict[Tensor, int] = {}
        self._stacks = StateStacks()
        self._sharding: OwnerSharding | None = None  # owners of DTensor parameters, built at the first step
        self._targets: dict[Tensor, Tensor] = {}  # during a sharded step: the whole parameters to update
        torch.optim.Optimizer.__init__(self, materialize_params(params, type(self).__name__), config.to_group())

    # ----------------------------------------------------------------- groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyper-parameters and parameters are validated before it is kept."""
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            self.config_class.from_group(group)
            for param in group["params"]:
                check_param(param, type(self).__name__)
            self._check_sharding()
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._sharding = None

    def _check_sharding(self) -> None:
        """DTensor parameters (FSDP2, HSDP) must be row-sharded, and not mixed with plain ones."""
        params = [p for group in self.param_groups for p in group["params"]]
        sharded = [is_sharded(p) for p in params]
        if any(sharded) and not all(sharded):
            raise ValueError(
                f"{type(self).__name__} got {sum(sharded)} DTensor (fully_shard) parameters and "
                f"{len(params) - sum(sharded)} plain ones; fully_shard the root module too, so that every "
                f"parameter is sharded, or build one optimizer for each kind"
            )
        for param in params:
            if is_sharded(param):
                ShardLayout.of(param, type(self).__name__)
        self._is_sharded = all(sharded)

    # Attributes beyond torch's defaults/state/param_groups that pickling and deepcopy keep.
    _pickled_attributes: tuple[str, ...] = ("skipped_steps", "basis_failures", "shard_refresh", "process_group")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._pickled_attributes})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("basis_failures", 0)
        self._stacks = StateStacks()
        self.__dict__.setdefault("shard_refresh", False)
        self.__dict__.setdefault("process_group", None)
        self._sharding, self._targets, self._refresh_sharding = None, {}, None
        self._check_sharding()
        self._read_step_counts()

    def _read_step_counts(self) -> None:
        """Rebuild the host copy of every parameter's step counter from the state (one read)."""
        params = [p for p, entry in self.state.items() if "step" in entry]
        counts = torch.stack([self.state[p]["step"].float().cpu() for p in params]).tolist() if params else []
        self._step_counts = {p: int(count) for p, count in zip(params, counts)}

    # --------------------------------------------------------------------- state dict
    def _global_state(self) -> dict[str, Any]:
        """Optimizer-wide values saved beside the per-parameter state (plain numbers)."""
        return {"kind": self.state_kind, "skipped_steps": self.skipped_steps, "basis_failures": self.basis_failures}

    def _load_global_state(self, global_state: dict[str, Any]) -> None:
        self.skipped_steps = int(global_state.get("skipped_steps", 0))
        self.basis_failures = int(global_state.get("basis_failures", 0))

    def state_dict(self) -> dict[str, Any]:
        """The usual ``{"state", "param_groups"}``; every saved group also holds ``"global_state"``
        (the optimizer kind, counters and the like), because DCP's ``get_optimizer_state_dict``
        keeps only ``state`` and ``param_groups``."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group[_GLOBAL_KEY] = self._global_state()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, after checking that the state fits.

        Refused (``ValueError``, the optimizer unchanged) when the saved groups' values are
        invalid, or a parameter's saved state lacks keys, has others, or has tensors of other
        shapes than this parameter needs (a checkpoint of another model or optimizer). Keys that
        the saved groups lack (a :class:`SOAP` checkpoint loaded into :class:`MLFOPSOAP`) take
        this optimizer's current values. The statistics keep their wide dtype (the base class
        would cast float32 factors of a bf16 parameter to bf16).
        """
        state_dict = self._checked_state_dict(state_dict)
        saved = {
            pid: {key: value for key, value in entry.items() if key != "step" and isinstance(value, Tensor)}
            for pid, entry in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # the base class copied it into the live groups
            group.pop(_GLOBAL_KEY, None)
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        configs = chain.from_iterable([self.config_class.trusted(g)] * len(g["params"]) for g in self.param_groups)
        for pid, param, config in zip(saved_ids, params, configs):
            wide, moments = state_dtype(param), moment_dtype(config, param)
            for key, value in saved.get(pid, {}).items():
                dtype = moments if key in ("exp_avg", "exp_avg_sq") else wide
                self.state[param][key] = value.to(device=param.device, dtype=dtype).contiguous()
            entry = self.state.get(param)
            if entry and "step" in entry:
                entry["step"] = entry["step"].to(device="cpu", dtype=torch.float32)
        self._read_step_counts()
        # (a top-level "global_state": checkpoints written before it moved into the groups)
        groups = state_dict["param_groups"]
        self._load_global_state(state_dict.get(_GLOBAL_KEY, groups[0].get(_GLOBAL_KEY, {}) if groups else {}))

    def _checked_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with missing group keys filled in, after every check of the docstring."""
        owner = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"{owner}.load_state_dict expects a dict with 'state' and 'param_groups' "
                             f"(from optimizer.state_dict()), got {type(state_dict).__name__}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)
        ):
            raise ValueError(
                f"{owner}.load_state_dict: the checkpoint has groups of "
                f"{[len(g['params']) for g in saved_groups]} parameters, this optimizer "
                f"{[len(g['params']) for g in self.param_groups]}; build the optimizer over the same "
                f"parameters, in the same groups, as the one that was saved"
            )
        kinds = {g.get(_GLOBAL_KEY, {}).get("kind") for g in saved_groups} - {None}
        if kinds - set(self.loadable_kinds):
            raise ValueError(
                f"{owner}.load_state_dict: the checkpoint is of {sorted(kinds)}, which keeps another state; "
                f"this optimizer loads checkpoints of {list(self.loadable_kinds)}"
            )
        groups = []
        for saved, group in zip(saved_groups, self.param_groups):
            filled = {**{k: v for k, v in group.items() if k != "params"}, **saved}
            self.config_class.from_group(filled)
            groups.append(filled)
        for saved_group, group in zip(groups, self.param_groups):
            config = self.config_class.trusted(saved_group)
            for pid, param in zip(saved_group["params"], group["params"]):
                entry = state_dict["state"].get(pid)
                if entry:
                    self._check_saved_entry(entry, param, config)
        return {**state_dict, "param_groups": groups}

    def _check_saved_entry(self, entry: dict[str, Any], param: Tensor, config: SOAPConfig) -> None:
        layout = layout_of(config, param)
        expected = state_shapes(param, layout)
        where = f"the saved state of a parameter of shape {tuple(param.shape)}"
        if set(entry) != state_keys(layout):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: {where} has keys {sorted(entry)}, but this "
                f"optimizer keeps {sorted(expected)} for it: the checkpoint is of another optimizer, "
                f"model or max_precond_dim/merge_dims/precondition_1d; load it into the optimizer that saved it"
            )
        for key, shape in expected.items():
            value = entry[key]
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: {where} has {key} of shape {got}, "
                    f"expected {shape}: the checkpoint is of a model with other shapes"
                )

    # --------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step; ``closure`` re-evaluates the loss (with grad enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._gradients()
        sharding = self._owner_sharding()
        if sharding is not None:
            self._step_sharded(sharding, work)
        elif self._accepts(work):
            self._step_gradients(work)
        return loss

    # ------------------------------------------------------------------ sharded parameters
    def _owner_sharding(self) -> OwnerSharding | None:
        """The owner ranks of DTensor parameters (see :mod:`mlfop.fully_sharded`), else ``None``."""
        if self._sharding is None and self._is_sharded:
            pairs = [(self.config_class.trusted(g), p) for g in self.param_groups for p in g["params"]]
            costs = {p: preconditioner_cost(layout_of(config, p)) for config, p in pairs}
            self._sharding = OwnerSharding([p for _, p in pairs], costs.__getitem__, type(self).__name__)
        return self._sharding

    def _sharded_reducer(self, communication_dtype: torch.dtype | None = None) -> ShardedFoldReducer:
        return ShardedFoldReducer(self._sharding.group, self._sharding.device, communication_dtype)

    def _step_sharded(self, sharding: OwnerSharding, work: list[tuple[SOAPConfig, Tensor, Tensor]]) -> None:
        """Owner-rank step: each owner gathers its parameters whole, steps them as one process
        would, and sends every rank its rows back. Every rank keeps a state entry for every
        parameter (empty where another rank owns it), so DCP never sees an empty state."""
        params = [param for _, param, _ in work]
        full = sharding.gather(params, [self._shard_pieces(param, grad) for _, param, grad in work])
        self._take_owned(full)
        owned = [(config, param, full[param][0]) for config, param, _ in work if param in full]
        for param in params:
            self.state[param]  # (an empty entry where another rank owns it)
        self._targets = {param: tensors[1] for param, tensors in full.items()}
        try:
            if self._accepts(owned, self._sharded_reducer()):
                self._step_gradients(owned)
                sharding.scatter(params, self._targets)
        finally:
            self._targets = {}

    def _shard_pieces(self, param: Tensor, grad: Tensor) -> list[Tensor]:
        """This rank's rows of what a parameter's owner needs: the gradient and the parameter."""
        return [local_tensor(grad), local_tensor(param)]

    def _take_owned(self, full: dict[Tensor, list[Tensor]]) -> None:
        """Receive the whole tensors of the owned parameters beyond gradient and parameter."""

    def _step_gradients(self, work: list[tuple[SOAPConfig, Tensor, Tensor]]) -> None:
        """SOAP on ``p.grad``: each batch is initialised (first call) or takes a step."""
        for batch, grads in self._batches(work):
            stacked = batch.stack(grads)
            if batch.config.maximize:
                stacked = -stacked
            statistics = kronecker_statistics(stacked, batch.layout[1], batch_dims=1)
            if batch.step == 0:  # one host read, on first calls only
                self._initialise(batch, statistics, (stacked.reshape(len(batch.params), -1).abs().amax(1) > 0).tolist())
                continue
            tensors = batch.tensors(self._stacks)
            rotated = rotate(stacked, tensors.bases)
            self._update(batch, tensors, momentum_input=rotated, second_moment_input=rotated.square(),
                         factor_statistics=statistics)

    def _gradients(self) -> list[tuple[SOAPConfig, Tensor, Tensor]]:
        """``(config, param, grad)`` for every parameter with a gradient."""
        work = []
        for group in self.param_groups:
            config = self.config_class.trusted(group)
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients; use a dense embedding")
                work.append((config, param, grad))
        return work

    def _batches(
        self, work: list[tuple[Any, Tensor, Tensor]], extra_key: Callable[[Tensor], Hashable] | None = None
    ) -> list[tuple[BlockBatch, list[Tensor]]]:
        """Batches of same-shaped blocks at the same step count, with their gradients.

        Blocks share a batch when they share a param group, a layout, a dtype, a device, a step
        count and ``extra_key(param)`` (ML-FOP-SOAP's reach and head layout). A batch's ``step`` is
        the count its update takes (0: a first call, which initialises).
        """
        entries = [(config, param, grad, layout_of(config, param), self._step_counts.get(param, -1) + 1)
                   for config, param, grad in work]

        def key(entry: tuple[Any, ...]) -> Hashable:
            config, param, _, layout, step = entry
            alone = None if config.batched else id(param)
            return (id(config), layout, param.dtype, param.device, step, alone,
                    None if extra_key is None else extra_key(param))

        plan = plan_batches(entries, key=key, layout=lambda entry: entry[3])
        return [
            (BlockBatch(members[0][0], [e[1] for e in members], [self.state[e[1]] for e in members],
                        members[0][3], members[0][4]), [e[2] for e in members])
            for members in plan
        ]

    def _initialise(self, batch: BlockBatch, statistics: list[Tensor | None], informative: list[bool]) -> None:
        """First call of a batch: state from its statistics; a block whose gradient is all zero
        (not ``informative``) stays waiting for a real first call."""
        self.basis_failures += batch.initialise(statistics, informative)
        for param, ok in zip(batch.params, informative):
            self._step_counts[param] = 0 if ok else -1

    def _update(
        self,
        batch: BlockBatch,
        tensors: BlockTensors,
        *,
        momentum_input: Tensor,
        second_moment_input: Tensor,
        factor_statistics: list[Tensor | None],
        update_scale: Tensor | None = None,
    ) -> None:
        """Advance the step counters and run SOAP's update with the given gradient statistics."""
        config = batch.config
        # A tensor lr stays on its device (no host read), in float64 as a Python float would be.
        lr = config.lr.double() if isinstance(config.lr, Tensor) else config.lr
        batch.advance_steps()
        for param in batch.params:
            self._step_counts[param] = batch.step
        beta1, beta2 = config.betas
        self.basis_failures += soap_update_(
            [self._targets.get(param, param) for param in batch.params],
            tensors.exp_avg,
            tensors.exp_avg_sq,
            tensors.factors,
            tensors.bases,
            momentum_input=momentum_input,
            second_moment_input=second_moment_input,
            factor_statistics=factor_statistics,
            step=batch.step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            factor_beta=config.factor_beta,
            eps=config.eps,
            weight_decay=config.weight_decay,
            precondition_frequency=config.precondition_frequency,
            correct_bias=config.correct_bias,
            normalize_grads=config.normalize_grads,
            update_scale=update_scale,
            basis_step=self._basis_step(),
        )

    def _basis_step(self) -> BasisStep:
        """The refresh's power-iteration step: shared out over the replicas with ``shard_refresh``."""
        if not self.shard_refresh or self._sharding is not None:
            return power_iteration_basis
        if self._refresh_sharding is None:
            group = self.process_group if self.process_group is not None else default_process_group()
            if group is None:
                return power_iteration_basis
            self._refresh_sharding = RefreshSharding(group, self._device())
        return self._refresh_sharding

    def _device(self) -> torch.device:
        """The parameters' device (where every tensor that enters a collective lives)."""
        return self.param_groups[0]["params"][0].device

    def _accepts(self, work: list[tuple[SOAPConfig, Tensor, Tensor]], reducer: ShardedFoldReducer | None = None) -> bool:
        """Whether every gradient is finite and its squares fit the statistics' dtype (one host
        read), on every rank of the ``reducer``'s group; otherwise apply the ``nonfinite`` policy."""
        if not work and reducer is None:
            return True
        grads = [grad for _, _, grad in work]
        # ||g||^2 < max keeps every sum of squares of the tensor finite (and NaN/Inf propagate).
        relative = torch._foreach_mul(torch._foreach_norm(grads, 2), [1.0 / _overflow_bound(param) for _, param, _ in work])
        worst = torch.stack(relative).max() if len(relative) > 1 else relative[0] if relative else torch.zeros(())
        if reducer is not None:
            worst = reducer.any(worst.float().view(1))[0]
        if bool(worst < 1.0):
            return True
        bad = [i for i, value in enumerate(torch.stack(relative).tolist()) if not value < 1.0] if relative else []
        if reducer is not None:  # the same policy on every rank: the strictest of all groups
            configs = [self.config_class.trusted(group) for group in self.param_groups]
            where = "a gradient is not finite or so large that its squares overflow (on one of the ranks)"
        else:
            configs = [work[i][0] for i in bad]
            where = (f"{len(bad)} of {len(work)} gradients are not finite or so large that their squares overflow "
                     f"(the first one for a parameter of shape {tuple(work[bad[0]][1].shape)})")
        self._refuse(configs, where)
        return False

    def _refuse(self, configs: list[SOAPConfig], where: str) -> None:
        """Apply the ``nonfinite`` policy of the offending groups to a refused step."""
        if any(config.nonfinite == "raise" for config in configs):
            raise FloatingPointError(
                f"{type(self).__name__}: {where}; no parameter or state was changed. "
                f"Lower the learning rate or use a GradScaler, or pass nonfinite='skip' to skip such steps."
            )
        self.skipped_steps += 1
        warn_at_caller(
            f"{type(self).__name__} skipped a step: {where}; parameters and state are unchanged "
            f"({self.skipped_steps} step(s) skipped so far). Pass nonfinite='raise' to raise instead.",
            RuntimeWarning,
        )


def _overflow_bound(param: Tensor) -> float:
    r"""The norm below which the squares of a gradient of ``param`` sum to a finite value in the
    statistics' dtype: :math:`\sqrt{\max}`."""
    return math.sqrt(torch.finfo(state_dtype(param)).max)
