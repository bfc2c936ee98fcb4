"""attention-lens: what does each attention head write? Per-head lenses for HuggingFace causal LMs."""

from ._version import __version__
from .data import DataConfig
from .decode import DecodeResult, decode
from .errors import AttentionLensError
from .evaluate import heldout_kl
from .heads import HeadCapture, run_with_heads
from .lens import Lens, LensConfig
from .models import Model, load_model
from .train import TrainConfig, train

__all__ = [
    "__version__", "AttentionLensError", "DataConfig", "DecodeResult", "HeadCapture", "Lens", "LensConfig",
    "Model", "TrainConfig", "decode", "heldout_kl", "load_model", "run_with_heads", "train",
]
