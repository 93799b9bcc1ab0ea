"""Head layouts of attention weights: given explicitly, or detected from a model.

A head layout says how one parameter splits into attention heads: ``(num_heads, axis)``, the
weight's ``axis`` cut into ``num_heads`` equal contiguous slices (see
:mod:`mlfop.functional.heads`). The head level of ML-FOP-SOAP computes one beta per slice.

Two entry points:

* :func:`resolve_head_layouts` turns a user's ``heads=`` argument into plain values
  ``{param: (num_heads, axis)}`` for the parameters of an optimizer, validating everything at
  construction time. ``heads`` is ``None`` (no head level), a mapping
  ``{param: (num_heads, axis) | HeadLayout}``, or an ``nn.Module`` to detect layouts from.
* :func:`detect_head_layouts` reads layouts off a model's attention modules.

What detection recognises (module names are those of the child ``Linear`` layers of one
attention module; head counts are always read from that module's attributes or its own
``config``, then checked against the weight shapes):

* separate projections ``q_proj/k_proj/v_proj`` (also ``query/key/value`` and ``q/k/v``): q by
  query heads and k/v by key-value heads (grouped-query attention), all along the output rows;
* a fused projection ``qkv_proj``, ``qkv``, ``Wqkv``, ``query_key_value`` or ``c_attn``: one
  head per ``head_dim`` output rows (query, key and value heads together; this holds for the
  ``[Q; K; V]`` layouts of Phi-3, timm ViTs, GPT-2, MPT, ModernBERT and for the per-head
  interleaved ones of GPT-NeoX, Falcon and BLOOM alike);
* the output projection ``o_proj``, ``out_proj``, ``projection_layer`` (Janus' vision tower),
  ``dense``, ``c_proj``, ``proj``, ``o`` or ``Wo`` next to them: by query heads along the input
  columns;
* ``torch.nn.MultiheadAttention``: ``in_proj_weight`` (or ``q/k/v_proj_weight``) and
  ``out_proj``.

``nn.Linear`` weights are ``(out, in)``; transformers' GPT-2 style ``Conv1D`` weights are
``(in, out)`` and get the transposed axes. Only 2-D weights get layouts: biases and norms stay at
the global level. This covers the trunks of transformers' ``LlamaForCausalLM``,
``Emu3ForCausalLM``, ``Emu3ForConditionalGeneration``, ``JanusForConditionalGeneration`` (trunk
and vision tower), ``Phi3ForCausalLM`` and ``GPT2LMHeadModel``. Where an attention-looking module
gives no readable head count, or its sizes do not agree with the count it declares, detection
leaves those weights at the layer level and says so: one ``UserWarning`` naming them, or, with
``strict=True``, a ``ValueError``.

Nothing here imports ``transformers``; ``Conv1D`` is recognised only if ``transformers`` has
already been imported by the caller.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from mlfop._warnings import warn_at_caller
from mlfop.functional.heads import check_head_layout

__all__ = ["HeadLayout", "resolve_head_layouts", "detect_head_layouts"]

# Child-module names, in order of preference.
_SEPARATE_QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"))
_FUSED_QKV = ("qkv_proj", "qkv", "Wqkv", "query_key_value", "c_attn")
_OUTPUT = ("o_proj", "out_proj", "projection_layer", "dense", "c_proj", "proj", "o", "Wo")
# Attribute names holding head counts and sizes, on the attention module and on its config.
_NUM_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_NUM_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")
_V_HEAD_DIM = ("v_head_dim",)


@dataclass(frozen=True)
class HeadLayout:
    """How one parameter splits into attention heads: ``axis`` cut into ``num_heads`` equal
    contiguous slices.

    ``num_heads`` must be an ``int >= 1``, ``axis`` an ``int`` (negative counts from the end);
    both are checked on construction (``TypeError``/``ValueError``). Whether the layout fits a
    parameter is checked by :meth:`for_shape`.
    """

    num_heads: int
    axis: int

    def __post_init__(self) -> None:
        for name in ("num_heads", "axis"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"HeadLayout.{name} must be an int, got {type(value).__name__} {value!r}")
        if self.num_heads < 1:
            raise ValueError(f"HeadLayout.num_heads must be >= 1, got {self.num_heads}")

    def for_shape(self, shape: Iterable[int]) -> tuple[int, int]:
        """``(num_heads, axis)`` as plain ints for a parameter of this shape (axis made
        non-negative); ``ValueError`` if the axis is out of range or ``num_heads`` does not
        divide it."""
        return check_head_layout(tuple(shape), self.num_heads, self.axis)


def resolve_head_layouts(
    heads: Any, params: Iterable[Any], *, strict: bool = False
) -> dict[Tensor, tuple[int, int]]:
    """Plain head layouts ``{param: (num_heads, axis)}`` for the parameters ``params``.

    ``heads``:

    * ``None``: no head layouts, ``{}``.
    * a mapping ``{param: (num_heads, axis) | HeadLayout}``: each key must be one of ``params``
      (by identity), with at least 2 dimensions (1-D parameters stay at the global level), and
      each layout must fit its shape.
    * an ``nn.Module``: layouts detected by :func:`detect_head_layouts`, kept for the
      parameters in ``params`` (frozen parts of the model are ignored). Weights of
      ``params`` that detection had to leave at the layer level are named in one
      ``UserWarning``, or in a ``ValueError`` if ``strict`` (``strict`` has no effect on the
      other forms).

    ``params`` is an iterable of tensors, or of param-group dicts with a ``"params"`` entry (as
    in ``optimizer.param_groups``). The result follows the order of ``params``; ``axis`` is
    non-negative. Raises ``TypeError`` for a ``heads`` of another type, a key that is not a
    tensor, or a layout that is not a pair of ints / a :class:`HeadLayout`, and ``ValueError``
    for a key that is not among ``params`` or a layout that does not fit its parameter.
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__} {strict!r}")
    ordered = _flatten_params(params)
    if heads is None:
        return {}
    if isinstance(heads, nn.Module):
        layouts, unresolved = _detect(heads)
        wanted = {id(p) for p in ordered}
        _report([u for u in unresolved if id(u[1]) in wanted], strict)
        return {p: layouts[p] for p in ordered if p in layouts}
    if isinstance(heads, Mapping):
        return _explicit(heads, ordered)
    hint = ""
    if isinstance(heads, str):
        hint = " (for strict detection pass the model and strict=True)"
    raise TypeError(
        "heads must be None, an nn.Module to detect head layouts from, or a mapping "
        f"{{param: (num_heads, axis)}}; got {type(heads).__name__}{hint}"
    )


def detect_head_layouts(model: nn.Module, *, strict: bool = False) -> dict[Tensor, tuple[int, int]]:
    """Head layouts ``{weight: (num_heads, axis)}`` of the attention weights of ``model``.

    See the module docstring for what is recognised. Weights of attention-looking modules
    whose head layout cannot be read are left out and named in one ``UserWarning`` (with the
    reason), or in a ``ValueError`` if ``strict``. ``TypeError`` if ``model`` is not an
    ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"detect_head_layouts needs an nn.Module, got {type(model).__name__}")
    layouts, unresolved = _detect(model)
    _report(unresolved, strict)
    return layouts


# --------------------------------------------------------------------------------------------
# Explicit layouts


def _flatten_params(params: Iterable[Any]) -> list[Tensor]:
    if isinstance(params, Tensor):
        params = [params]
    ordered: list[Tensor] = []
    seen: set[int] = set()
    for item in params:
        group = item["params"] if isinstance(item, Mapping) else [item]
        if isinstance(group, Tensor):
            group = [group]
        for p in group:
            if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
                p = p[1]  # a (name, parameter) pair, as from model.named_parameters()
            if not isinstance(p, Tensor):
                raise TypeError(f"params must hold tensors, got {type(p).__name__}")
            if id(p) not in seen:
                seen.add(id(p))
                ordered.append(p)
    return ordered


def _explicit(heads: Mapping[Any, Any], ordered: list[Tensor]) -> dict[Tensor, tuple[int, int]]:
    index = {id(p): i for i, p in enumerate(ordered)}
    resolved: dict[int, tuple[int, int]] = {}
    for param, layout in heads.items():
        if not isinstance(param, Tensor):
            raise TypeError(f"heads: keys must be parameter tensors, got {type(param).__name__} {param!r}")
        shape = tuple(param.shape)
        if id(param) not in index:
            raise ValueError(
                f"heads: a layout is given for a parameter of shape {shape} that is not among the "
                "optimizer's parameters"
            )
        if isinstance(layout, HeadLayout):
            pass
        elif isinstance(layout, (tuple, list)) and len(layout) == 2:
            layout = HeadLayout(*layout)
        else:
            raise TypeError(
                f"heads: the layout of the parameter of shape {shape} must be (num_heads, axis) or a "
                f"HeadLayout, got {layout!r}"
            )
        if param.dim() < 2:
            raise ValueError(
                f"heads: the parameter of shape {shape} has {param.dim()} dimension(s); head layouts "
                "apply to weights with at least 2 dimensions (biases and norms stay at the global level)"
            )
        try:
            resolved[id(param)] = layout.for_shape(shape)
        except ValueError as error:
            raise ValueError(f"heads: {error}") from None
    return {p: resolved[id(p)] for p in ordered if id(p) in resolved}


# --------------------------------------------------------------------------------------------
# Detection

# (qualified parameter name, parameter, reason)
_Unresolved = tuple[str, Tensor, str]


def _detect(model: nn.Module) -> tuple[dict[Tensor, tuple[int, int]], list[_Unresolved]]:
    layouts: dict[Tensor, tuple[int, int]] = {}
    unresolved: list[_Unresolved] = []
    conv1d = _conv1d_class()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            found, failed = _multihead_attention(prefix, module)
        else:
            found, failed = _attention_module(prefix, module, conv1d)
        for name, param, layout in found:
            if param in layouts and layouts[param] != layout:  # one tensor in two modules (tied)
                unresolved.append((name, param, f"also used with layout {layouts[param]}, here {layout}"))
            else:
                layouts[param] = layout
        unresolved.extend(failed)
    # a tensor that failed anywhere stays at the layer level everywhere
    for _, param, _ in unresolved:
        layouts.pop(param, None)
    return layouts, unresolved


def _report(unresolved: list[_Unresolved], strict: bool) -> None:
    if not unresolved:
        return
    lines = "\n".join(f"  {name}: {reason}" for name, _, reason in unresolved)
    message = (
        f"could not read the attention-head layout of {len(unresolved)} weight(s); they stay at the "
        f"layer level:\n{lines}\nGive their layouts explicitly (heads={{param: (num_heads, axis)}})"
    )
    if strict:
        raise ValueError(message)
    warn_at_caller(message, UserWarning)


def _conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (weight ``(in, out)``), only if transformers is loaded already."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None) if utils is not None else None


def _projection(module: nn.Module | None, conv1d: type | None) -> tuple[Tensor, int, int] | None:
    """``(weight, out_axis, in_axis)`` of a linear projection with a 2-D weight, else None."""
    if module is None:
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return weight, 0, 1
    if conv1d is not None and isinstance(module, conv1d) and getattr(module, "nf", None) == weight.shape[1]:
        return weight, 1, 0
    return None


def _positive_int(owner: Any, names: tuple[str, ...]) -> int | None:
    if owner is None:
        return None
    for name in names:
        try:
            value = getattr(owner, name, None)
        except Exception:  # a config property that cannot be computed
            value = None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _read(module: nn.Module, names: tuple[str, ...]) -> int | None:
    """A count from the module's own attributes, else from its own ``config``."""
    value = _positive_int(module, names)
    if value is None:
        value = _positive_int(getattr(module, "config", None), names)
    return value


def _join(prefix: str, *names: str) -> str:
    return ".".join(n for n in (prefix, *names) if n)


def _attention_module(prefix: str, module: nn.Module, conv1d: type | None):
    def child(name: str) -> nn.Module | None:
        value = getattr(module, name, None)
        return value if isinstance(value, nn.Module) else None

    separate = None
    for names in _SEPARATE_QKV:
        projections = [_projection(child(n), conv1d) for n in names]
        if all(p is not None for p in projections):
            separate = list(zip(names, projections))
            break
    def first(names: tuple[str, ...]):
        """``(name, projection)`` of the first of ``names`` that is a projection, else ``None``."""
        found = ((name, _projection(child(name), conv1d)) for name in names)
        return next(((name, projection) for name, projection in found if projection is not None), None)

    fused = first(_FUSED_QKV)
    if separate is None and fused is None:
        return [], []
    output = first(_OUTPUT)

    num_heads = _read(module, _NUM_HEADS)
    num_kv = _read(module, _NUM_KV_HEADS)
    if num_kv is None and num_heads is not None:
        groups = _read(module, ("num_key_value_groups",))
        if groups is not None and num_heads % groups == 0:
            num_kv = num_heads // groups
    head_dim = _read(module, _HEAD_DIM)
    v_head_dim = _read(module, _V_HEAD_DIM)

    # (child name, weight, axis along which heads are cut, head count declared for it or None, role)
    weights: list[tuple[str, Tensor, int, int | None, str]] = []
    if separate is not None:
        (q, (wq, aq, _)), (k, (wk, ak, _)), (v, (wv, av, _)) = separate
        weights += [(q, wq, aq, num_heads, "q"), (k, wk, ak, num_kv, "k"), (v, wv, av, num_kv, "v")]
    if fused is not None:
        name, (wf, af, _) = fused
        total = num_heads + 2 * num_kv if num_heads is not None and num_kv is not None else None
        weights.append((name, wf, af, total, "fused"))
    if output is not None:
        name, (wo, _, ao) = output
        weights.append((name, wo, ao, num_heads, "o"))

    if head_dim is None and num_heads is not None:
        # head_dim from the declared head count and a weight that holds exactly the query heads
        for _, weight, axis, _, role in weights:
            if (role == "q" or (role == "o" and v_head_dim is None)) and weight.shape[axis] % num_heads == 0:
                head_dim = weight.shape[axis] // num_heads
                break
        else:
            if fused is not None and num_kv is not None:
                size = fused[1][0].shape[fused[1][1]]
                if size % (num_heads + 2 * num_kv) == 0:
                    head_dim = size // (num_heads + 2 * num_kv)

    found, failed = [], []
    for name, weight, axis, declared, role in weights:
        full = _join(prefix, name, "weight")
        size = weight.shape[axis]
        dim = (v_head_dim or head_dim) if role in ("v", "o") else head_dim
        if dim is None:
            where = f"{type(module).__name__} '{prefix or '<root>'}'"
            if declared is None:
                reason = f"no head count or head size readable on {where}"
            else:
                reason = f"{where} declares {declared} heads, which do not divide axis {axis} (size {size})"
            failed.append((full, weight, reason))
            continue
        if size % dim != 0:
            failed.append((full, weight, f"axis {axis} of size {size} is not a multiple of head_dim={dim}"))
            continue
        heads = size // dim
        if declared is not None and heads != declared:
            failed.append((full, weight, f"axis {axis} of size {size} holds {heads} heads of {dim}, but the "
                           f"module declares {declared}"))
            continue
        found.append((full, weight, (heads, axis)))
    return found, failed


def _multihead_attention(prefix: str, module: nn.MultiheadAttention):
    heads = module.num_heads
    found, failed = [], []
    candidates = []
    if module.in_proj_weight is not None:
        candidates.append(("in_proj_weight", module.in_proj_weight, 3 * heads, 0))
    else:
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            candidates.append((name, getattr(module, name), heads, 0))
    candidates.append(("out_proj.weight", module.out_proj.weight, heads, 1))
    for name, weight, count, axis in candidates:
        if weight is None or weight.dim() != 2:
            continue
        full = _join(prefix, name)
        if weight.shape[axis] % count != 0:
            failed.append((full, weight, f"axis {axis} of size {weight.shape[axis]} does not split into {count}"))
        else:
            found.append((full, weight, (count, axis)))
    return found, failed
