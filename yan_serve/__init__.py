"""yan-serve: training and serving for YAN, a non-autoregressive flow-matching language model."""

from yan_serve.config import PRESETS, YANConfig

__version__ = "0.1.0"

__all__ = ["PRESETS", "YANConfig", "__version__"]
