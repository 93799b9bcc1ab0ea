"""SOAP's per-parameter state: its layout, its allocation, and batches of same-shaped blocks.

State of a parameter (plain tensors, so ``torch.load(weights_only=True)`` and
``torch.distributed.checkpoint`` read it): ``step`` (0-d float32 on the CPU, real steps taken;
-1 while a first call saw only zeros), ``exp_avg`` (:math:`M`, eigenbasis) and ``exp_avg_sq``
(:math:`V`), parameter-shaped, and per rotated block dimension ``i`` a factor ``factor_{i}``
and a basis ``basis_{i}``, all on the parameter's device, in its :func:`state_dtype` (the
moments in :func:`moment_dtype`: bfloat16 on request).

The step works on :class:`BlockBatch` es: the blocks of one param group that share a layout,
dtype, device and step count, stacked along a leading axis so that one batched kernel serves
them all. Their state lives in :class:`StateStacks`: each parameter's tensors are views of
its batch's stacked storage, so a regular step copies no state in or out.
"""

from __future__ import annotations

import math

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mlfop.functional.rotation import block_layout
from mlfop.functional.soap import ema_factors_, first_eigenbasis

__all__ = [
    "Layout",
    "state_dtype",
    "moment_dtype",
    "materialize_params",
    "check_param",
    "layout_of",
    "state_keys",
    "BlockTensors",
    "BlockBatch",
    "StateStacks",
    "plan_batches",
    "preconditioner_cost",
    "MAX_BATCH_ELEMENTS",
]

Layout = tuple[tuple[int, ...], tuple[bool, ...]]

# A batch holds at most this many state elements (moments, factors, bases), so that the
# stacked copies of a model's largest layers stay a bounded working set (512 MiB in float32).
MAX_BATCH_ELEMENTS = 2**27


def state_dtype(param: Tensor) -> torch.dtype:
    """Statistics are at least float32: float32 for (b)f16 parameters, float64 for float64."""
    return torch.promote_types(param.dtype, torch.float32)


def moment_dtype(config: Any, param: Tensor) -> torch.dtype:
    """The dtype of ``exp_avg`` and ``exp_avg_sq``: the group's ``state_dtype``, else the
    statistics' (:func:`state_dtype`)."""
    return getattr(torch, config.state_dtype) if config.state_dtype else state_dtype(param)


def materialize_params(params: Any, owner: str) -> list[Any]:
    """The parameters (or groups) as a non-empty list; a lone tensor is refused."""
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


def check_param(param: Any, owner: str) -> None:
    """Refuse what SOAP cannot optimise: non-tensors, sparse, complex and integer tensors."""
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


def layout_of(config: Any, param: Tensor) -> Layout:
    """``(block_shape, preconditioned)`` of ``param`` under a group's config."""
    return block_layout(
        param.shape,
        max_precond_dim=config.max_precond_dim,
        merge_dims=config.merge_dims,
        precondition_1d=config.precondition_1d,
    )


def state_keys(layout: Layout) -> set[str]:
    """The state keys of a parameter with this layout."""
    rotated = [i for i, flag in enumerate(layout[1]) if flag]
    return {"step", "exp_avg", "exp_avg_sq", *(f"factor_{i}" for i in rotated), *(f"basis_{i}" for i in rotated)}


def state_shapes(param: Tensor, layout: Layout) -> dict[str, tuple[int, ...]]:
    """The shape of every state tensor of ``param``."""
    shapes = {"step": (), "exp_avg": tuple(param.shape), "exp_avg_sq": tuple(param.shape)}
    for i, (size, rotated) in enumerate(zip(*layout)):
        if rotated:
            shapes[f"factor_{i}"] = shapes[f"basis_{i}"] = (size, size)
    return shapes


def _stack(tensors: Sequence[Tensor], shape: Sequence[int]) -> Tensor:
    """``(B, *shape)``: a view for one tensor, else a stacked copy."""
    if len(tensors) == 1:
        return tensors[0].view(1, *shape)
    return torch.stack([t.view(shape) for t in tensors])


@dataclass
class BlockTensors:
    """The stacked state of a batch: moments ``(B, *block)``, factors and bases ``(B, d, d)``."""

    exp_avg: Tensor
    exp_avg_sq: Tensor
    factors: list[Tensor | None]
    bases: list[Tensor | None]


class StateStacks:
    """Persistent stacked storage of the batches' state: ``(B, ...)`` tensors whose slices the
    parameters' state entries are views of.

    A batch is bound once (one copy of its state into the stack); afterwards the stack is
    valid as long as every state entry is still the view it was given. When one was replaced
    (``load_state_dict``, a user's assignment) or the batch's members changed, the batch is
    bound anew from the current values. Not part of the optimizer's state: rebuilt on demand.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, ...], tuple[dict[str, Tensor], list[int]]] = {}
        self._owner: dict[int, tuple[int, ...]] = {}

    def bind(self, params: Sequence[Tensor], states: Sequence[dict[str, Any]],
             keys: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, Tensor]:
        """The stacked state of ``params`` (their ``states``' ``keys``, viewed as the shapes)."""
        members = tuple(id(p) for p in params)
        entry = self._entries.get(members)
        if entry is not None and [s[key].data_ptr() for key, _ in keys for s in states] == entry[1]:
            return entry[0]
        stacked = {key: torch.stack([s[key].reshape(shape) for s in states]) for key, shape in keys}
        for key, _ in keys:
            for b, state in enumerate(states):
                state[key] = stacked[key][b].view(state[key].shape)
        for member in members:
            stale = self._owner.get(member)
            if stale is not None and stale != members:
                self._entries.pop(stale, None)
            self._owner[member] = members
        self._entries[members] = (stacked, [s[key].data_ptr() for key, _ in keys for s in states])
        return stacked


@dataclass
class BlockBatch:
    """Same-shaped blocks of one param group that take the same step together."""

    config: Any
    params: list[Tensor]
    states: list[dict[str, Any]]
    layout: Layout
    step: int  # the step count t of this update (after the increment); 0 for a first call

    @property
    def block_shape(self) -> tuple[int, ...]:
        return self.layout[0]

    @property
    def dtype(self) -> torch.dtype:
        return state_dtype(self.params[0])

    def stack(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-parameter tensors (e.g. gradients) as ``(B, *block)`` in the state dtype."""
        # Contiguous first: a channels_last gradient takes the same steps, and a merged block views it.
        return _stack([t.to(self.dtype).contiguous() for t in tensors], self.block_shape)

    def _keys(self) -> list[tuple[str, tuple[int, ...]]]:
        """Each state tensor of a block with its block-view shape."""
        keys = [("exp_avg", self.block_shape), ("exp_avg_sq", self.block_shape)]
        for prefix in ("factor", "basis"):
            keys += [(f"{prefix}_{i}", (size, size)) for i, (size, rotated) in enumerate(zip(*self.layout)) if rotated]
        return keys

    def tensors(self, stacks: StateStacks) -> BlockTensors:
        """The stacked state; for several blocks it lives in ``stacks`` and each parameter's state
        holds views of it, so a step copies nothing in or out."""
        if len(self.params) == 1:
            stacked = {key: self.states[0][key].view(1, *shape) for key, shape in self._keys()}
        else:
            stacked = stacks.bind(self.params, self.states, self._keys())

        def per_dim(prefix: str) -> list[Tensor | None]:
            return [stacked[f"{prefix}_{i}"] if rotated else None for i, rotated in enumerate(self.layout[1])]

        return BlockTensors(stacked["exp_avg"], stacked["exp_avg_sq"], per_dim("factor"), per_dim("basis"))

    def advance_steps(self) -> None:
        """``step += 1`` on every parameter's counter (one multi-tensor op)."""
        torch._foreach_add_([s["step"] for s in self.states], 1.0)

    def initialise(self, factor_statistics: Sequence[Tensor | None], informative: Sequence[bool]) -> int:
        """First call: zero moments, factors from this call's statistics, first bases by ``eigh``.

        A block whose gradient is all zero (``informative`` False, e.g. the zero step that
        ``torch.distributed.checkpoint`` takes on a fresh optimizer) gets ``step = -1``, so that
        its next call initialises again, as if this one never happened. Returns how many bases
        could not be computed (they start as the identity).
        """
        factors = [
            None if stat is None else torch.zeros_like(stat) for stat in factor_statistics
        ]
        ema_factors_(factors, factor_statistics, self.config.factor_beta)
        failures = 0
        bases: list[Tensor | None] = []
        for factor in factors:
            if factor is None:
                bases.append(None)
                continue
            basis, failed = first_eigenbasis(factor)
            bases.append(basis)
            failures += failed
        for b, (param, state) in enumerate(zip(self.params, self.states)):
            state.clear()
            state["step"] = torch.tensor(0.0 if informative[b] else -1.0, dtype=torch.float32)
            moments = moment_dtype(self.config, param)
            state["exp_avg"] = torch.zeros(param.shape, dtype=moments, device=param.device)
            state["exp_avg_sq"] = torch.zeros(param.shape, dtype=moments, device=param.device)
            for i, (factor, basis) in enumerate(zip(factors, bases)):
                if factor is not None:
                    # Row-major, as after load_state_dict: strides steer matmul kernels' rounding.
                    state[f"factor_{i}"] = factor[b].contiguous().clone()
                    state[f"basis_{i}"] = basis[b].contiguous().clone()
        return failures


def preconditioner_cost(layout: Layout) -> int:
    r"""A block's step cost in multiply-adds, to balance owner ranks: the elementwise work and two
    rotations, :math:`n (1 + \sum_i d_i)`, and a refresh, :math:`\sum_i d_i^3`, over the rotated
    dimensions :math:`d_i` of a block of :math:`n` elements."""
    block, rotated = layout
    dims = [size for size, flag in zip(block, rotated) if flag]
    return math.prod(block) * (1 + sum(dims)) + sum(d**3 for d in dims)


def _batch_elements(layout: Layout) -> int:
    block, rotated = layout
    numel = 1
    for size in block:
        numel *= size
    return 2 * numel + sum(2 * size * size for size, flag in zip(block, rotated) if flag)


def plan_batches(items: Iterable[Any], key: Callable[[Any], Hashable], layout: Callable[[Any], Layout]) -> list[list[Any]]:
    """Group ``items`` by ``key`` (order of first appearance, order kept inside a group), then
    cut each group into batches of at most :data:`MAX_BATCH_ELEMENTS` state elements."""
    groups: dict[Hashable, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    batches = []
    for members in groups.values():
        per_block = max(1, MAX_BATCH_ELEMENTS // max(1, _batch_elements(layout(members[0]))))
        batches += [members[i : i + per_block] for i in range(0, len(members), per_block)]
    return batches
