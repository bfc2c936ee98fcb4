"""What a lens is on disk: LensConfig (config.json), its validation, the model fingerprint check."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from . import strict_json
from .errors import AttentionLensError
from .kinds import REGISTRY, get_kind
from .storage import check_version

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "lens.safetensors"
IDENTITY_KEY = "config_identity"


@dataclass
class LensConfig:
    """What a lens is and which model it belongs to; saved as config.json."""

    kind: str
    """The kind's registered name (logit, dla, affine, full, or one added to attention_lens.kinds)."""
    layers: list[int]
    """Layers the lens covers, ascending."""
    heads: list[int]
    """Heads (in every covered layer) the lens covers, ascending."""
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    vocab: int
    model: dict
    """Fingerprint of the model: name, shapes, hashes of W_U and W_O."""
    training: dict = field(default_factory=dict)
    """How it was trained: data, settings, tokens seen (empty for untrained lenses)."""
    version: str = __version__


def read_config(directory: Path) -> LensConfig:
    path = directory / CONFIG_FILE
    if directory.is_file():  # often config.json itself, or the weights file
        raise AttentionLensError(f"{directory} is a file, not a lens directory; give the directory that holds "
                                 f"{CONFIG_FILE} and {WEIGHTS_FILE} (here: {directory.parent})")
    if not directory.is_dir():
        raise AttentionLensError(f"lens directory {directory} does not exist; train one or use the logit lens")
    if not path.is_file():
        raise AttentionLensError(f"{directory} has no {CONFIG_FILE}; it is not a lens directory")
    try:
        raw = strict_json.loads(path.read_bytes(), str(path))
    except OSError as error:
        raise AttentionLensError(f"cannot read {path}: {error.strerror}") from None
    except (ValueError, RecursionError) as error:  # ValueError: bad JSON, bad UTF-8, a 5000-digit number
        raise AttentionLensError(f"{path} is not valid JSON ({error})") from None
    return _config_from_dict(raw, path)


def _config_from_dict(raw: Any, path: Path) -> LensConfig:
    types = {"kind": str, "layers": list, "heads": list, "n_layers": int, "n_heads": int, "d_model": int,
             "d_head": int, "vocab": int, "model": dict, "training": dict, "version": str}
    if not isinstance(raw, dict):
        raise AttentionLensError(f"{path} must hold a JSON object")
    # The version first: another major version may lay out its config differently.
    model_name = raw["model"].get("name") if isinstance(raw.get("model"), dict) else None
    check_version(raw.get("version", __version__), model_name, path)
    for name, kind in types.items():
        if name in ("training", "version") and name not in raw:
            continue
        value = raw.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise AttentionLensError(f"{path}: field {name!r} is missing or not a {kind.__name__}")
    for name in ("layers", "heads"):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in raw[name]):
            raise AttentionLensError(f"{path}: field {name!r} must be a list of integers")
    if raw["kind"] not in REGISTRY:
        raise AttentionLensError(f"{path}: unknown lens kind {raw['kind']!r}; it should be one of {', '.join(REGISTRY)}")
    for name in ("n_layers", "n_heads", "d_model", "d_head", "vocab"):
        if not 1 <= raw[name] < 2**31:
            raise AttentionLensError(f"{path}: field {name!r} must be a count from 1 to 2**31 - 1, not {raw[name]}")
    for name, count in (("layers", raw["n_layers"]), ("heads", raw["n_heads"])):
        values = raw[name]
        if not values or values != sorted(set(values)) or values[0] < 0 or values[-1] >= count:
            raise AttentionLensError(f"{path}: field {name!r} must list distinct {name} in 0-{count - 1}, ascending")
    known = {f.name for f in dataclasses.fields(LensConfig)}
    return LensConfig(**{k: v for k, v in raw.items() if k in known})


def identity_hash(config: LensConfig) -> str:
    """What the lens is (kind, coverage, shapes, model), not how it was trained or by which version."""
    identity = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("training", "version")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def check_fingerprint(expected: dict, actual: dict) -> None:
    """Same weights are what matter: the name or path (and Hub revision) a model was loaded from may differ."""
    keys = [k for k in expected if k not in ("name", "revision")]
    if any(expected.get(k) != actual.get(k) for k in keys):
        raise AttentionLensError(
            f"this lens was made for model {expected.get('name')!r} ({expected.get('model_type')}, "
            f"{expected.get('n_layers')} layers x {expected.get('n_heads')} heads), not for "
            f"{actual.get('name')!r}; use the model it was made for (--model {expected.get('name')})"
        )


def parameter_bytes(config: LensConfig) -> int:
    """Bytes of the lens's fp32 parameters."""
    shapes = get_kind(config.kind).parameter_shapes(len(config.layers), len(config.heads), config.d_head,
                                                    config.d_model, config.vocab)
    return 4 * sum(math.prod(shape) for shape in shapes.values())
