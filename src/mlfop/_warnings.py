"""Warnings that point at the user's line, not at mlfop's or torch's internals."""

from __future__ import annotations

import sys
import warnings

_INTERNAL = ("mlfop", "torch", "contextlib")


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` with the stack level of the first frame outside mlfop and torch
    (e.g. the user's ``optimizer.step()`` or ``scaler.step(optimizer)``), so that location
    filters and the printed line make sense to the user."""
    frame, level = sys._getframe(1), 2  # level 1 is this function, 2 its caller
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] not in _INTERNAL:
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
