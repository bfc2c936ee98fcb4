"""Files that survive kill -9 and refuse corruption: atomic writes, checksummed safetensors, version checks."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import Tensor

from ._version import __version__
from .errors import AttentionLensError

DIGEST_KEY = "tensors_sha256"
# All metadata goes under one key, as sorted JSON: safetensors writes several keys in a random order,
# and equal tensors should make equal files.
METADATA_KEY = "attention_lens"


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Temp file + fsync + rename: a kill at any moment leaves either the old file or the new one, whole."""
    for stale in path.parent.glob(f".{path.name}.*"):  # left by writes killed before their rename
        stale.unlink(missing_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if os.name == "posix":  # the rename itself survives a power cut only once the directory is synced
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Atomically write a safetensors file whose metadata holds a checksum of the tensors."""
    packed = {METADATA_KEY: json.dumps({**metadata, DIGEST_KEY: tensor_digest(tensors)}, sort_keys=True)}
    atomic_write(path, lambda target: save_file(tensors, target, metadata=packed))


def read_tensors(path: Path, remedy: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a file written by write_tensors; truncated or garbled files are refused.

    safetensors holds no code, so nothing is unpickled; the checksum catches flipped bits in the data,
    which the format's own header checks cannot see. Files without a checksum are read unchecked.
    """
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if METADATA_KEY in metadata:  # files of 0.1.0 have their keys unpacked and no checksum
            metadata = json.loads(metadata[METADATA_KEY])
        if not isinstance(metadata, dict):
            raise ValueError("the metadata is not a JSON object")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, RecursionError) as error:
        raise AttentionLensError(f"{path} is corrupt ({error}); {remedy}") from None
    if DIGEST_KEY in metadata and metadata[DIGEST_KEY] != tensor_digest(tensors):
        raise AttentionLensError(f"{path} is corrupt (its tensors do not match their checksum); {remedy}")
    return tensors, metadata


def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of `tensors`, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_version(version: Any, model_name: Any, where: Path) -> None:
    """Refuse files of another major version of attention-lens: the same numbers may mean something else."""
    try:
        major = int(version.split(".")[0])
    except (AttributeError, ValueError):
        raise AttentionLensError(f"{where}: {version!r} is not an attention-lens version") from None
    if major != int(__version__.split(".")[0]):
        raise AttentionLensError(
            f"{where} belongs to model {model_name!r} and was written by attention-lens {version}, which "
            f"attention-lens {__version__} cannot read; retrain, or install attention-lens=={version}"
        )
