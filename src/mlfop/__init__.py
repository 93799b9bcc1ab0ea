"""mlfop: SOAP and ML-FOP-SOAP optimizers for PyTorch."""

from mlfop import functional
from mlfop.diagnostics import JSONLinesWriter, TensorBoardWriter
from mlfop.head_layouts import HeadLayout, detect_head_layouts, resolve_head_layouts
from mlfop.optim import MLFOPSOAP, SOAP, FOPConfig, SOAPConfig

__version__ = "0.1.0.dev0"

__all__ = [
    "FOPConfig",
    "HeadLayout",
    "JSONLinesWriter",
    "MLFOPSOAP",
    "SOAP",
    "SOAPConfig",
    "TensorBoardWriter",
    "detect_head_layouts",
    "functional",
    "resolve_head_layouts",
    "__version__",
]
