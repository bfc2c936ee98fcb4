"""Resumable training state in one atomically written safetensors file (no pickle anywhere)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ._version import __version__
from .errors import AttentionLensError
from .lens import Lens
from .lens_config import check_fingerprint
from .storage import check_version, read_tensors, write_tensors

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


def save_checkpoint(out: Path, lens: Lens, optimizer: torch.optim.Optimizer, progress: Progress, run: dict,
                    path: Path | None = None) -> None:
    """Lens parameters, optimizer state, RNG state, data position and the run's identity, in one file.

    One file written with temp + fsync + rename: a kill at any moment leaves the previous checkpoint whole.
    A lens split over devices is written as one stack per parameter, its optimizer state too: the file is the
    same whatever the placement, so a run can resume under another device map.
    """
    tensors = {f"lens.{name}": t.contiguous() for name, t in lens.tensors().items()}
    optimizer_state = _whole(lens, optimizer.state_dict())
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {
        "progress": json.dumps(progress.__dict__),
        "run": json.dumps(run, sort_keys=True),
        "param_groups": json.dumps(optimizer_state["param_groups"]),
        "model": json.dumps(lens.config.model, sort_keys=True),
        "version": __version__,
    }
    path = path or checkpoint_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, tensors, metadata)


def load_checkpoint(out: Path, lens: Lens, optimizer: torch.optim.Optimizer, run: dict,
                    path: Path | None = None) -> Progress:
    """Restore what save_checkpoint wrote; refuses a checkpoint of a different run, model or version."""
    path = path or checkpoint_path(out)
    if not path.is_file():
        raise AttentionLensError(f"nothing to resume: {path} does not exist; start without `resume`")
    remedy = "delete it or use --overwrite"
    tensors, metadata = read_tensors(path, remedy)
    try:
        saved_run = json.loads(metadata["run"])
        progress = Progress(**json.loads(metadata["progress"]))
        param_groups = json.loads(metadata["param_groups"])
        saved_model = json.loads(metadata.get("model", "{}"))  # checkpoints of 0.1.0 lack it
        if not (isinstance(saved_run, dict) and isinstance(saved_model, dict) and _counts(progress)):
            raise ValueError("malformed metadata")
    except (KeyError, ValueError, TypeError, RecursionError) as error:
        raise AttentionLensError(f"checkpoint {path} is corrupt ({error}); {remedy}") from None
    check_version(metadata.get("version", __version__), saved_model.get("name"), path)
    try:
        check_fingerprint(saved_model, lens.config.model)
    except AttentionLensError as error:
        raise AttentionLensError(f"checkpoint {path} is from another model: {error}") from None
    if saved_run != run:
        now, before = _flatten(run), _flatten(saved_run)
        changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        raise AttentionLensError(
            f"checkpoint {path} is from a different run (differs in: {', '.join(changed)}); "
            "resume with the same settings or use --overwrite"
        )
    try:
        _restore(tensors, param_groups, lens, optimizer)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as error:
        raise AttentionLensError(f"checkpoint {path} does not fit this run ({error}); {remedy}") from None
    return progress


def _restore(tensors: dict, param_groups: list, lens: Lens, optimizer: torch.optim.Optimizer) -> None:
    lens.load_tensors({k[len("lens."):]: v for k, v in tensors.items() if k.startswith("lens.")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value  # load_state_dict moves it to the params
    optimizer.load_state_dict(_placed(lens, {"state": state, "param_groups": param_groups}))
    torch.set_rng_state(tensors["rng.torch"])


def _whole(lens: Lens, optimizer_state: dict) -> dict:
    """The optimizer state of a split lens as that of one stack per parameter (the split runs' per-layer
    tensors concatenated, scalars such as Adam's step taken once); an unsplit lens's as it is."""
    if lens.runs is None:
        return optimizer_state
    names, runs = len(lens.split[0]), len(lens.runs)
    state = optimizer_state["state"]
    whole = {}
    for n in range(names):
        pieces = [state[r * names + n] for r in range(runs) if r * names + n in state]
        if pieces:
            whole[n] = {key: torch.cat([piece[key] for piece in pieces]) if _per_layer(value) else value
                        for key, value in pieces[0].items()}
    groups = [{**group, "params": list(range(names))} for group in optimizer_state["param_groups"]]
    return {"state": whole, "param_groups": groups}


def _placed(lens: Lens, optimizer_state: dict) -> dict:
    """The inverse of `_whole`: per-stack optimizer state cut into the lens's split runs."""
    if lens.runs is None:
        return optimizer_state
    names, runs = len(lens.split[0]), len(lens.runs)
    placed = {}
    for n, entry in optimizer_state["state"].items():
        for r, (start, stop) in enumerate(lens.runs):
            placed[r * names + n] = {key: value[start:stop] if _per_layer(value) else value
                                     for key, value in entry.items()}
    groups = [{**group, "params": list(range(runs * names))} for group in optimizer_state["param_groups"]]
    return {"state": placed, "param_groups": groups}


def _per_layer(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _counts(progress: Progress) -> bool:
    return all(isinstance(n, int) and n >= 0 for n in (progress.step, progress.windows, progress.tokens))


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
