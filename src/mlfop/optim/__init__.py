"""Optimizer classes: validation, state and orchestration of ``mlfop.functional``."""

from mlfop.optim.config import SOAPConfig
from mlfop.optim.soap import SOAP

__all__ = ["SOAP", "SOAPConfig"]
