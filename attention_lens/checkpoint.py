"""Resumable training state in one atomically written safetensors file (no pickle anywhere)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import AttentionLensError
from .lens import Lens, _atomic_write

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.safetensors"


@dataclass
class Progress:
    """Where a run stands; saved in the checkpoint's metadata."""

    step: int = 0
    windows: int = 0
    """Data windows consumed, so a resumed run continues with the next one."""
    tokens: int = 0
    loss: float | None = None


def checkpoint_path(out: Path) -> Path:
    return out / CHECKPOINT_DIR / CHECKPOINT_FILE


def save_checkpoint(out: Path, lens: Lens, optimizer: torch.optim.Optimizer, progress: Progress, run: dict) -> None:
    """Lens parameters, optimizer state, RNG state, data position and the run's identity, in one file.

    One file written with temp + fsync + rename: a kill at any moment leaves the previous checkpoint whole.
    """
    tensors = {f"lens.{name}": p.detach().cpu().contiguous() for name, p in lens.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {
        "progress": json.dumps(progress.__dict__),
        "run": json.dumps(run, sort_keys=True),
        "param_groups": json.dumps(optimizer_state["param_groups"]),
    }
    path = checkpoint_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda target: save_file(tensors, target, metadata=metadata))


def load_checkpoint(out: Path, lens: Lens, optimizer: torch.optim.Optimizer, run: dict) -> Progress:
    """Restore what save_checkpoint wrote; refuses a checkpoint of a different run."""
    path = checkpoint_path(out)
    if not path.is_file():
        raise AttentionLensError(f"nothing to resume: {path} does not exist; start without --resume")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
        saved_run = json.loads(metadata["run"])
        progress = Progress(**json.loads(metadata["progress"]))
        param_groups = json.loads(metadata["param_groups"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
        raise AttentionLensError(f"checkpoint {path} is corrupt ({error}); delete it or use --overwrite") from None
    if saved_run != run:
        now, before = _flatten(run), _flatten(saved_run)
        changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        raise AttentionLensError(
            f"checkpoint {path} is from a different run (differs in: {', '.join(changed)}); "
            "resume with the same settings or use --overwrite"
        )
    lens.load_state_dict({k[len("lens."):]: v for k, v in tensors.items() if k.startswith("lens.")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value  # load_state_dict moves it to the params
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    torch.set_rng_state(tensors["rng.torch"])
    return progress


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
