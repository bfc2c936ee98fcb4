"""Models larger than one device: accelerate's big-model loading behind `--device-map auto|balanced|JSON`."""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from .errors import AttentionLensError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies: fill devices in order (auto, sequential) or spread layers evenly."""


def parse_device_map(text: str | dict | None) -> str | dict | None:
    """A strategy name, a JSON object {module path: device} (inline or a .json file), or None."""
    if text is None or isinstance(text, dict):
        return text
    if text in STRATEGIES:
        return text
    source = text
    path = Path(text).expanduser()
    if path.suffix == ".json" and path.is_file():
        source = path.read_text(encoding="utf-8")
    try:
        mapping = json.loads(source)
    except json.JSONDecodeError:
        mapping = None
    if not isinstance(mapping, dict) or not mapping:
        raise AttentionLensError(
            f"--device-map {text!r} is neither a strategy ({', '.join(STRATEGIES)}) nor a JSON object of module "
            "path -> device (e.g. '{\"model.embed_tokens\": 0, \"model.layers\": 1, \"lm_head\": \"cpu\"}')"
        )
    return {str(module): _device(device) for module, device in mapping.items()}


def _device(value: Any) -> int | str:
    if isinstance(value, int) or value in ("cpu", "disk", "meta") or str(value).startswith("cuda"):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise AttentionLensError(f"device {value!r} in --device-map is not a GPU index, 'cuda:N', 'cpu' or 'disk'")


def loading_options(device_map: str | dict, max_memory: dict | None, owner_hint: str) -> dict:
    """from_pretrained keyword arguments for a device map; disk offload goes to a temporary folder that
    `release_with` removes once the model is gone."""
    try:
        import accelerate  # noqa: F401  (transformers needs it for device maps)
    except ImportError:
        raise AttentionLensError("--device-map needs accelerate: pip install accelerate") from None
    folder = tempfile.mkdtemp(prefix=f"attention-lens-offload-{owner_hint}-")
    options = {"device_map": device_map, "offload_folder": folder}
    if max_memory is not None:
        options["max_memory"] = max_memory
    return options


def release_with(model: Any, options: dict) -> None:
    """Delete the offload folder when `model` is garbage-collected (or at exit)."""
    folder = options.get("offload_folder")
    if folder is not None:
        weakref.finalize(model, shutil.rmtree, folder, True)


def execution_device(module: Any) -> torch.device | None:
    """Where `module` computes: the execution device of an accelerate hook on it or inside it (a part offloaded
    to CPU memory or disk runs on the main device, not where its weights wait), else its weights' device;
    None for a module without weights on a real device."""
    for part in module.modules():
        execution = getattr(getattr(part, "_hf_hook", None), "execution_device", None)
        if execution is not None:
            return torch.device(execution)
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return None


def weight_devices(model: Any) -> dict[str, int]:
    """Bytes of weights per device of a loaded, device-mapped model ('disk' and 'cpu' for offloaded ones)."""
    placement = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device.type}
    totals: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        device = _placed(placement, name)
        totals[str(device)] = totals.get(str(device), 0) + parameter.numel() * parameter.element_size()
    return totals


def _placed(placement: dict, name: str) -> Any:
    best = max((prefix for prefix in placement if prefix == "" or name == prefix or name.startswith(prefix + ".")),
               key=len, default="")
    return placement.get(best, "cpu")


def planned_placement(skeleton: Any, device_map: str | dict, dtype: Any) -> dict[str, int]:
    """Bytes of weights per device a device map would give a weightless (meta-device) model: an explicit map as
    written, a strategy as accelerate would resolve it on this machine's devices and memory."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    if isinstance(device_map, str):
        no_split = getattr(skeleton, "_no_split_modules", None) or []
        max_memory = None
        if device_map.startswith("balanced"):
            max_memory = get_balanced_memory(skeleton, dtype=dtype, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(skeleton, max_memory=max_memory, no_split_module_classes=no_split,
                                           dtype=dtype)
    totals: dict[str, int] = {}
    for name, parameter in skeleton.named_parameters():
        device = str(_placed(device_map, name))
        totals[device] = totals.get(device, 0) + parameter.numel() * dtype.itemsize
    return totals
