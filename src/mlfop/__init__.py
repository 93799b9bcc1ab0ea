"""mlfop: SOAP and ML-FOP-SOAP optimizers for PyTorch."""

from mlfop import data, functional
from mlfop.data import StreamBatchSampler, stream_column
from mlfop.diagnostics import JSONLinesWriter, TensorBoardWriter
from mlfop.head_layouts import HeadLayout, detect_head_layouts, resolve_head_layouts
from mlfop.mixed_batches import fold_losses
from mlfop.optim import MLFOPSOAP, SOAP, FOPConfig, SOAPConfig

__version__ = "0.1.0.dev0"

__all__ = [
    "FOPConfig",
    "HeadLayout",
    "JSONLinesWriter",
    "MLFOPSOAP",
    "SOAP",
    "SOAPConfig",
    "StreamBatchSampler",
    "TensorBoardWriter",
    "data",
    "detect_head_layouts",
    "fold_losses",
    "functional",
    "resolve_head_layouts",
    "stream_column",
    "__version__",
]
