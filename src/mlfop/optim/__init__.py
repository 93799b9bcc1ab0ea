"""Optimizer classes: validation, state and orchestration of ``mlfop.functional``."""

from mlfop.optim.config import FOPConfig, SOAPConfig
from mlfop.optim.mlfop_soap import MLFOPSOAP
from mlfop.optim.soap import SOAP

__all__ = ["FOPConfig", "MLFOPSOAP", "SOAP", "SOAPConfig"]
