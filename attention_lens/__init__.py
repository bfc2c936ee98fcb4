"""attention-lens: what does each attention head write? Per-head lenses for HuggingFace causal LMs."""

from ._version import __version__
from .data import DataConfig
from .decode import DecodeResult, decode
from .effects import EffectsConfig, HeadEffects, head_effects
from .errors import AttentionLensError
from .evaluate import EvalConfig, Evaluation, evaluate, heldout_kl
from .heads import HeadCapture, run_with_heads
from .lens import Lens, LensConfig
from .models import Model, load_model
from .specialize import SpecializeConfig, Specialization, specialize
from .train import TrainConfig, train
from . import notebook  # noqa: E402,F401,I001 (last: it attaches the notebook display to the results above)

__all__ = [
    "__version__", "AttentionLensError", "DataConfig", "DecodeResult", "EffectsConfig", "EvalConfig", "Evaluation",
    "HeadCapture", "HeadEffects", "Lens", "LensConfig", "Model", "SpecializeConfig", "Specialization", "TrainConfig", "decode", "evaluate",
    "head_effects", "heldout_kl", "load_model", "run_with_heads", "specialize", "train",
]
