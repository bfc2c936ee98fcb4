"""Lenses: per-head maps from a head's output z_h to vocabulary logits; build, save and load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from . import hub
from .errors import AttentionLensError
from .lens_config import (CONFIG_FILE, IDENTITY_KEY, KINDS, WEIGHTS_FILE, LensConfig, check_fingerprint,
                          identity_hash, parameter_bytes, read_config)
from .models import Model
from .storage import atomic_write, read_tensors, write_tensors


class Lens(nn.Module):
    """One lens per (layer, head), all of one kind, acting on the heads' d_head-dim outputs z_h.

    - logit:  final norm + W_U applied to o_h = z_h W_O_h alone (self-normalized).
    - dla:    W_U (gamma * C o_h) / sigma_final(pos): direct logit attribution; needs the final residual.
    - affine: final norm + W_U of o_h + z_h B_h + b_h; B_h, b_h zero-init, so untrained it is `logit`.
    - full:   z_h W_h + c_h straight to the vocabulary (the paper's lens, on z_h); init W_O_h W_U^T, b_U.
    """

    def __init__(self, config: LensConfig):
        super().__init__()
        if config.kind not in KINDS:
            raise AttentionLensError(f"unknown lens kind {config.kind!r}; choose one of {', '.join(KINDS)}")
        self.config = config
        shape = (len(config.layers), len(config.heads))
        if config.kind == "affine":
            self.delta = nn.Parameter(torch.zeros(*shape, config.d_head, config.d_model))
            self.bias = nn.Parameter(torch.zeros(*shape, config.d_model))
        elif config.kind == "full":
            self.weight = nn.Parameter(torch.zeros(*shape, config.d_head, config.vocab))
            self.bias = nn.Parameter(torch.zeros(*shape, config.vocab))
        self._layer_index = {layer: i for i, layer in enumerate(config.layers)}
        self._model: Model | None = None

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: Model,
        kind: str = "logit",
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
    ) -> "Lens":
        """A fresh (untrained) lens of `kind` for `model`, covering `layers` x `heads` (default: all)."""
        layers = sorted(set(range(model.n_layers) if layers is None else layers))
        heads = sorted(set(range(model.n_heads) if heads is None else heads))
        _check_range("layer", layers, model.n_layers)
        _check_range("head", heads, model.n_heads)
        config = LensConfig(
            kind=kind,
            layers=layers,
            heads=heads,
            n_layers=model.n_layers,
            n_heads=model.n_heads,
            d_model=model.d_model,
            d_head=model.d_head,
            vocab=model.vocab,
            model=model.fingerprint(),
        )
        if kind == "full":
            check_memory(parameter_bytes(config), "the full lens's parameters")
        lens = cls(config).to(model.device)
        lens.bind(model)
        if kind == "full":
            lens._init_full(model)
        return lens

    @classmethod
    def logit(cls, model: Model) -> "Lens":
        return cls.from_model(model, "logit")

    @classmethod
    def dla(cls, model: Model) -> "Lens":
        return cls.from_model(model, "dla")

    @torch.no_grad()
    def _init_full(self, model: Model) -> None:
        unembed = model.unembed
        for i, layer in enumerate(self.config.layers):
            self.weight[i] = model.W_O[layer, self.config.heads] @ unembed.W_U.T  # (head, d_head, vocab)
            if unembed.b_U is not None:
                self.bias[i] = unembed.b_U

    def bind(self, model: Model) -> "Lens":
        """Attach the frozen model parts (W_O, final norm, W_U); refuses a model with another fingerprint."""
        check_fingerprint(self.config.model, model.fingerprint())
        self._model = model
        return self

    @property
    def model(self) -> Model:
        if self._model is None:
            raise AttentionLensError("this lens is not bound to a model; call lens.bind(model) first")
        return self._model

    # ----- the maps -----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.config.kind

    def layer_index(self, layer: int) -> int:
        try:
            return self._layer_index[layer]
        except KeyError:
            raise AttentionLensError(
                f"layer {layer} is not covered by this lens (it covers layers {self.config.layers})"
            ) from None

    def hidden(self, z: Tensor, layer: int) -> Tensor:
        """The lens's pre-readout vector per head: (..., head, d_head) -> (..., lens head, d_model | vocab).

        z holds all the layer's heads; the lens's heads are selected here. For `full` the result already
        is the logits; for the others it lives in the residual stream.
        """
        z = z[..., self.config.heads, :]
        W_O = self.model.W_O[layer, self.config.heads]  # (head, d_head, d_model)
        if self.kind in ("logit", "dla"):
            return torch.einsum("...hd,hdm->...hm", z, W_O.to(z.dtype))
        i = self.layer_index(layer)
        if self.kind == "affine":
            return torch.einsum("...hd,hdm->...hm", z, (W_O + self.delta[i]).to(z.dtype)) + self.bias[i]
        return torch.einsum("...hd,hdv->...hv", z, self.weight[i].to(z.dtype)) + self.bias[i]

    def vocab_factors(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """The lens as one (head, vocab, d_head + 1) map of [z_h, 1], plus a per-vocab constant.

        Every kind's logits factor as ([z_h, 1] @ F_h^T) / divisor + constant: for logit/dla/affine,
        F_h = W_U diag(gamma) C [M_h; b_h] with M_h = W_O_h (+ B_h), because the final norm is linear up
        to its per-position divisor. Building F_h costs vocab x d_model x d_head once per call; each
        head-token then costs ~d_head x vocab instead of d_model x vocab. The result is a transposed view of
        a (head, d_head + 1, vocab) tensor: that layout is what the blockwise KL multiplies by, chunk by chunk.
        """
        heads = self.config.heads
        if self.kind == "full":
            i = self.layer_index(layer)
            return torch.cat([self.weight[i], self.bias[i][:, None, :]], dim=1).transpose(1, 2), None
        unembed = self.model.unembed
        M = self.model.W_O[layer, heads]  # (head, d_head, d_model)
        b = torch.zeros(len(heads), unembed.d_model, device=M.device)
        if self.kind == "affine":
            i = self.layer_index(layer)
            M, b = M + self.delta[i], self.bias[i]
        M_b = unembed.center(torch.cat([M, b[:, None, :]], dim=1))  # (head, d_head + 1, d_model)
        device = M_b.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else M_b.dtype
        readout = unembed.readout_matrix(dtype)  # (vocab, d_model): W_U diag(gamma)
        # One 2-D product; a batched einsum copied the (vocab, d_model) readout into its transpose every call.
        factors = (M_b.to(dtype).flatten(0, 1) @ readout.T).view(*M_b.shape[:2], -1).transpose(1, 2)
        if self.kind == "dla":
            return factors, None  # attribution adds neither beta nor b_U per head
        constant = None
        if unembed.beta is not None:
            constant = unembed.W_U @ unembed.beta
        if unembed.b_U is not None:
            constant = unembed.b_U if constant is None else constant + unembed.b_U
        return factors, constant

    def divisor(self, z: Tensor, layer: int, final_scale: Tensor | None = None) -> Tensor:
        """Per (..., lens head) divisor of the factored logits: the final norm's sigma of the lens vector."""
        shape = (*z.shape[:-2], len(self.config.heads))
        if self.kind == "full":
            return torch.ones(shape, device=z.device)
        if self.kind == "dla":
            if final_scale is None:
                raise AttentionLensError("the dla lens needs final_scale: sigma of the final residual")
            return final_scale[..., None].expand(shape)
        return self.model.unembed.scale(self.hidden(z, layer))

    def readout(self, hidden: Tensor, final_scale: Tensor | None = None) -> Tensor:
        """Logits (..., head, vocab) from `hidden`; `dla` needs the final norm's scale (...,) per position."""
        if self.kind == "full":
            return hidden
        y = self.unembed_input(hidden, final_scale)
        if self.kind == "dla":
            return y @ self.model.unembed.W_U.T  # a linear attribution: no bias, no soft-cap
        return self.model.unembed.logits(y)

    def unembed_input(self, hidden: Tensor, final_scale: Tensor | None = None) -> Tensor:
        """What meets W_U (logit, affine, dla): the final norm of `hidden`, or for dla the final norm's
        linear action on the head's share of the residual, gamma * C·hidden / sigma(final residual)."""
        unembed = self.model.unembed
        if self.kind == "dla":
            if final_scale is None:
                raise AttentionLensError("the dla lens needs final_scale: sigma of the final residual")
            return unembed.center(hidden) * unembed.gamma / final_scale[..., None, None]
        return unembed.normalize(hidden)

    def logits(self, z: Tensor, layer: int, final_scale: Tensor | None = None) -> Tensor:
        """Per-head logits: z (..., head, d_head) of all the layer's heads -> (..., lens head, vocab).

        A plain function of tensors, so a TransformerLens `hook_z` or nnsight activation works too.
        """
        if z.shape[-2:] != (self.config.n_heads, self.config.d_head):
            raise AttentionLensError(
                f"z must end in (head={self.config.n_heads}, d_head={self.config.d_head}); got {tuple(z.shape)}"
            )
        return self.readout(self.hidden(z, layer), final_scale)

    # ----- files --------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write config.json + lens.safetensors atomically (a crash never leaves a half-written file).

        The weights carry a hash of what the config says the lens is, so a crash between the two writes
        cannot pair new weights with an old config unnoticed.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.state_dict().items()}
        write_tensors(directory / WEIGHTS_FILE, tensors, {IDENTITY_KEY: identity_hash(self.config)})
        config_text = json.dumps(dataclasses.asdict(self.config), indent=2)
        atomic_write(directory / CONFIG_FILE, lambda path: Path(path).write_text(config_text))
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: Model | None = None) -> "Lens":
        """Read a lens directory; with `model`, also bind it (checking the fingerprint)."""
        directory = Path(directory)
        config = read_config(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise AttentionLensError(f"{directory} has no {WEIGHTS_FILE}; it is not a complete lens directory")
        state, metadata = read_tensors(weights, "retrain or restore the lens")
        for name, tensor in state.items():
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise AttentionLensError(f"{weights}: tensor {name!r} is not finite floating point; retrain the lens")
        expected = _tensor_shapes(config, directory / CONFIG_FILE)
        found = {name: tuple(t.shape) for name, t in state.items()}
        if expected != found:
            raise AttentionLensError(
                f"{weights} does not match its config.json ({config.kind} lens for model "
                f"{config.model.get('name')!r}: expected tensors {expected}, found {found})"
            )
        if metadata.get(IDENTITY_KEY, identity_hash(config)) != identity_hash(config):
            raise AttentionLensError(
                f"{weights} and its config.json come from different saves (an interrupted save?); "
                "retrain, or finish the run with `attention-lens train --resume`"
            )
        lens = cls(config)
        lens.load_state_dict(state)
        if model is not None:
            lens.to(model.device).bind(model)
        return lens

    def save_pretrained(self, directory: str | Path, evaluation: dict | None = None) -> Path:
        """`save()` plus a generated README.md model card (model, data, tokens, eval numbers): a Hub-ready folder."""
        directory = self.save(directory)
        hub.write_card(directory, self.config, evaluation)
        return directory

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, model: Model | None = None,
                        revision: str | None = None) -> "Lens":
        """A lens from a local directory or a Hugging Face Hub repo id `owner/name` (needs the Hub online once)."""
        return cls.load(hub.resolve(name_or_path, revision), model)


def _tensor_shapes(config: LensConfig, path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors a lens of `config` holds, built on the meta device so a garbled config allocates nothing."""
    try:
        with torch.device("meta"):
            return {name: tuple(p.shape) for name, p in Lens(config).state_dict().items()}
    except (RuntimeError, OverflowError, ValueError, TypeError) as error:
        raise AttentionLensError(f"{path} describes an impossible lens ({str(error).splitlines()[0]})") from None


def _check_range(what: str, values: Sequence[int], count: int) -> None:
    bad = [v for v in values if not 0 <= v < count]
    if bad:
        raise AttentionLensError(f"{what} {bad[0]} is out of range: the model has {count} {what}s (0-{count - 1})")


def check_memory(needed: int, what: str) -> None:
    """Refuse up front, with the estimate, rather than die of an out-of-memory kill mid-run."""
    available = _available_memory()
    if available is not None and needed > 0.8 * available:
        raise AttentionLensError(
            f"{what} need ~{needed / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of memory is "
            "available; select fewer layers/heads (--layers, --heads) or use the affine kind"
        )


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
