"""mlfop: SOAP and ML-FOP-SOAP optimizers for PyTorch."""

from mlfop import functional
from mlfop.optim import MLFOPSOAP, SOAP, FOPConfig, SOAPConfig

__version__ = "0.1.0.dev0"

__all__ = ["FOPConfig", "MLFOPSOAP", "SOAP", "SOAPConfig", "functional", "__version__"]
