"""``SOAP``: the optimizer class. It validates, keeps state and orchestrates ``mlfop.functional``."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any, Callable

import torch
from torch import Tensor

from mlfop._warnings import warn_at_caller
from mlfop.functional.rotation import block_layout, kronecker_statistics, rotate
from mlfop.functional.soap import ema_factors_, first_eigenbasis, soap_block_update_
from mlfop.optim.config import SOAPConfig

__all__ = ["SOAP"]

# Optimizer-wide values (counters, the balanced weights' norm EMA): saved in every param group.
_GLOBAL_KEY = "global_state"

_SOAP_ARGS_DOC = r"""
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
        nonfinite (str, optional): what a step with a NaN/Inf gradient does: ``"skip"`` refuses
            the whole step (parameters and state untouched, ``skipped_steps`` incremented, one
            warning); ``"raise"`` raises ``FloatingPointError`` (default: "skip").
"""

_FP32_STATE_KEYS_NOTE = """
    State per parameter (plain tensors, so ``torch.load(weights_only=True)`` and
    ``torch.distributed.checkpoint`` read it): ``step`` (0-d float32, real steps taken),
    ``exp_avg`` (:math:`M`, eigenbasis) and ``exp_avg_sq`` (:math:`V`), parameter-shaped, and
    per rotated block dimension ``i`` a factor ``factor_{i}`` and a basis ``basis_{i}``.
    Statistics are kept in float32 for bf16/fp16 parameters (float64 for float64 ones),
    including after ``load_state_dict``.
"""


def _materialize_params(params: Any, owner: str) -> list[Any]:
    if isinstance(params, Tensor):
        raise TypeError(
            f"{owner} expects an iterable of parameters or param groups, got a single Tensor; "
            f"pass [tensor] or model.parameters()"
        )
    params = list(params)
    if not params:
        raise ValueError(
            f"{owner} got an empty parameter list; pass the parameters to optimise, "
            f"e.g. {owner}(model.parameters())"
        )
    return params


def _check_param(param: Any, owner: str) -> None:
    if not isinstance(param, Tensor):
        raise TypeError(f"{owner} parameters must be tensors, got {type(param).__name__}")
    if param.layout != torch.strided:  # is_sparse is False for CSR/CSC/BSR/BSC layouts
        raise TypeError(f"{owner} does not support sparse parameters (got layout {param.layout}); use dense tensors")
    if param.is_complex():
        raise TypeError(
            f"{owner} does not support complex parameters (got {param.dtype}); "
            f"optimise torch.view_as_real(param) instead"
        )
    if not param.is_floating_point():
        raise TypeError(
            f"{owner} needs floating-point parameters (float16, bfloat16, float32, float64), "
            f"got {param.dtype} of shape {tuple(param.shape)}"
        )


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

    A step with a non-finite gradient is refused as a whole (see ``nonfinite``). A failed
    ``eigh``/QR is retried in float64; if that fails too the previous basis (identity at the
    first call) is kept and ``basis_failures`` is incremented.
    """

    __doc__ = (__doc__ or "") + _SOAP_ARGS_DOC + _FP32_STATE_KEYS_NOTE

    config_class: type[SOAPConfig] = SOAPConfig

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
    ) -> None:
        # Every argument but params is a config field: validated and flattened in one place.
        config = SOAPConfig.from_group(locals())
        self._init_from_config(params, config)

    def _init_from_config(self, params: Iterable[Any], config: SOAPConfig) -> None:
        """Shared by subclasses: counters, then ``torch.optim.Optimizer`` with plain group values."""
        self.skipped_steps = 0
        self.basis_failures = 0
        torch.optim.Optimizer.__init__(self, _materialize_params(params, type(self).__name__), config.to_group())

    # ----------------------------------------------------------------- groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyper-parameters and parameters are validated before it is kept."""
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            self.config_class.from_group(group)
            for param in group["params"]:
                _check_param(param, type(self).__name__)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    # Attributes beyond torch's defaults/state/param_groups that pickling and deepcopy keep.
    _pickled_attributes: tuple[str, ...] = ("skipped_steps", "basis_failures")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._pickled_attributes})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("basis_failures", 0)

    # --------------------------------------------------------------------- state dict
    def _global_state(self) -> dict[str, Any]:
        """Optimizer-wide values saved beside the per-parameter state (plain numbers)."""
        return {"skipped_steps": self.skipped_steps, "basis_failures": self.basis_failures}

    def _load_global_state(self, global_state: dict[str, Any]) -> None:
        self.skipped_steps = int(global_state.get("skipped_steps", 0))
        self.basis_failures = int(global_state.get("basis_failures", 0))

    def state_dict(self) -> dict[str, Any]:
        """The usual ``{"state", "param_groups"}``; every saved group also holds ``"global_state"``
        (counters and the like), because DCP's ``get_optimizer_state_dict`` keeps only ``state``
        and ``param_groups``."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group[_GLOBAL_KEY] = self._global_state()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, but keep the statistics in their wide dtype.

        The base class casts every floating state tensor to its parameter's dtype, which would
        turn fp32 factors of a bf16 parameter into bf16; the saved tensors are put back.
        """
        for group in state_dict["param_groups"]:
            self.config_class.from_group({**self.defaults, **group})
        saved = {
            pid: {key: value for key, value in entry.items() if key != "step" and isinstance(value, Tensor)}
            for pid, entry in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # the base class copied it into the live groups
            group.pop(_GLOBAL_KEY, None)
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for pid, param in zip(saved_ids, params):
            dtype = _state_dtype(param)
            for key, value in saved.get(pid, {}).items():
                self.state[param][key] = value.to(device=param.device, dtype=dtype)
        # (a top-level "global_state": checkpoints written before it moved into the groups)
        groups = state_dict["param_groups"]
        self._load_global_state(state_dict.get(_GLOBAL_KEY, groups[0].get(_GLOBAL_KEY, {}) if groups else {}))

    # --------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step; ``closure`` re-evaluates the loss (with grad enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_gradients()
        return loss

    def _step_gradients(self) -> None:
        """Update every parameter from ``p.grad`` (after the non-finite check)."""
        work = self._gradients()
        if self._gradients_are_finite(work):
            self._update_params(work)

    def _update_params(self, work: list[tuple[SOAPConfig, Tensor, Tensor]]) -> None:
        for config, param, grad in work:
            self._update_param(config, param, grad)

    def _gradients(self) -> list[tuple[SOAPConfig, Tensor, Tensor]]:
        """``(config, param, grad)`` for every parameter with a gradient (``-grad`` to maximise)."""
        work = []
        for group in self.param_groups:
            config = self.config_class.from_group(group)
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients; use a dense embedding")
                work.append((config, param, -grad if config.maximize else grad))
        return work

    def _gradients_are_finite(self, work: list[tuple[SOAPConfig, Tensor, Tensor]]) -> bool:
        """Check every gradient at once; on a NaN/Inf apply the ``nonfinite`` policy."""
        if not work:
            return True
        finite = torch.stack([torch.isfinite(grad).all().to(device="cpu") for _, _, grad in work])
        if bool(finite.all()):
            return True
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        first_config, first_param, _ = work[bad[0]]
        where = (
            f"{len(bad)} of {len(work)} gradients are not finite "
            f"(the first one for a parameter of shape {tuple(first_param.shape)})"
        )
        if any(work[i][0].nonfinite == "raise" for i in bad):
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
        return False

    def _update_param(self, config: SOAPConfig, param: Tensor, grad: Tensor) -> None:
        """SOAP on one parameter: the first call sets up the bases, later calls take a step."""
        layout = self._layout(config, param)
        # Contiguous first, so that a channels_last or strided gradient takes the same steps.
        block = grad.to(dtype=_state_dtype(param), memory_format=torch.contiguous_format).view(layout[0])
        state = self.state[param]
        if _awaits_first_call(state):
            self._init_state(config, param, layout, kronecker_statistics(block, layout[1]), bool(block.any()))
            return
        rotated = rotate(block, _block_tensors(state, layout)[3])
        self._real_step(
            config,
            param,
            state,
            layout,
            momentum_input=rotated,
            second_moment_input=rotated.square(),
            factor_statistics=kronecker_statistics(block, layout[1]),
        )

    def _real_step(
        self,
        config: SOAPConfig,
        param: Tensor,
        state: dict[str, Any],
        layout: tuple[tuple[int, ...], tuple[bool, ...]],
        *,
        momentum_input: Tensor,
        second_moment_input: Tensor,
        factor_statistics: list[Tensor | None],
        update_scale: float | Tensor = 1.0,
    ) -> None:
        """Advance the step counter and run SOAP's update with the given gradient statistics."""
        exp_avg, exp_avg_sq, factors, bases = _block_tensors(state, layout)
        state["step"] += 1
        beta1, beta2 = config.betas
        self.basis_failures += soap_block_update_(
            param,
            exp_avg,
            exp_avg_sq,
            factors,
            bases,
            momentum_input=momentum_input,
            second_moment_input=second_moment_input,
            factor_statistics=factor_statistics,
            step=int(state["step"]),
            lr=float(config.lr),
            beta1=beta1,
            beta2=beta2,
            factor_beta=config.factor_beta,
            eps=config.eps,
            weight_decay=config.weight_decay,
            precondition_frequency=config.precondition_frequency,
            correct_bias=config.correct_bias,
            normalize_grads=config.normalize_grads,
            update_scale=update_scale,
        )

    @staticmethod
    def _layout(config: SOAPConfig, param: Tensor) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        return block_layout(
            param.shape,
            max_precond_dim=config.max_precond_dim,
            merge_dims=config.merge_dims,
            precondition_1d=config.precondition_1d,
        )

    def _init_state(
        self,
        config: SOAPConfig,
        param: Tensor,
        layout: tuple[tuple[int, ...], tuple[bool, ...]],
        factor_statistics: list[Tensor | None],
        informative: bool,
    ) -> None:
        """First call: zero moments, factors from this step's statistics, first bases by ``eigh``.

        An all-zero gradient (``informative=False``, e.g. the zero step that
        ``torch.distributed.checkpoint`` takes on a fresh optimizer) allocates the state with
        ``step = -1``, so that the next call initialises again, as if this one never happened.
        """
        block_shape, preconditioned = layout
        state = self.state[param]
        dtype = _state_dtype(param)
        state["step"] = torch.tensor(0.0 if informative else -1.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros(param.shape, dtype=dtype, device=param.device)
        state["exp_avg_sq"] = torch.zeros(param.shape, dtype=dtype, device=param.device)
        factors: list[Tensor | None] = [
            torch.zeros(size, size, dtype=dtype, device=param.device) if rotated else None
            for size, rotated in zip(block_shape, preconditioned)
        ]
        ema_factors_(factors, factor_statistics, config.factor_beta)
        for i, factor in enumerate(factors):
            if factor is None:
                continue
            basis = first_eigenbasis(factor)
            if basis is None:
                self.basis_failures += 1
                basis = torch.eye(factor.shape[0], dtype=dtype, device=param.device)
            state[f"factor_{i}"] = factor
            state[f"basis_{i}"] = basis


def _awaits_first_call(state: dict[str, Any]) -> bool:
    """No state yet, or only the placeholder left by an all-zero first gradient."""
    return not state or float(state["step"]) < 0


def _state_dtype(param: Tensor) -> torch.dtype:
    """Statistics are at least float32: float32 for (b)f16 parameters, float64 for float64."""
    return torch.promote_types(param.dtype, torch.float32)


def _block_tensors(
    state: dict[str, Any], layout: tuple[tuple[int, ...], tuple[bool, ...]]
) -> tuple[Tensor, Tensor, list[Tensor | None], list[Tensor | None]]:
    """Block-shaped views of the moments and the per-dimension factors and bases."""
    block_shape, preconditioned = layout
    factors = [state[f"factor_{i}"] if rotated else None for i, rotated in enumerate(preconditioned)]
    bases = [state[f"basis_{i}"] if rotated else None for i, rotated in enumerate(preconditioned)]
    return state["exp_avg"].view(block_shape), state["exp_avg_sq"].view(block_shape), factors, bases
