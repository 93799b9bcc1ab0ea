"""mlfop: SOAP and ML-FOP-SOAP optimizers for PyTorch."""

from mlfop import functional
from mlfop.optim import SOAP, SOAPConfig

__version__ = "0.1.0.dev0"

__all__ = ["SOAP", "SOAPConfig", "functional", "__version__"]
