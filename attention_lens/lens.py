"""Lenses: per-head maps from a head's output z_h to vocabulary logits; build, save and load."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from . import hub, strict_json
from .errors import AttentionLensError
from .kinds import LensKind, get_kind
from .lens_config import (CONFIG_FILE, IDENTITY_KEY, WEIGHTS_FILE, LensConfig, check_fingerprint, identity_hash,
                          parameter_bytes, read_config)
from .models import Model, available_memory
from .storage import atomic_write, read_tensors, write_tensors


class Lens(nn.Module):
    """One lens per (layer, head), all of one kind, acting on the heads' d_head-dim outputs z_h.

    What the map is comes from the kind (`attention_lens.kinds`): logit, dla, affine, full, or any registered one.
    The methods here select the lens's heads and layer, and ask the kind.
    """

    def __init__(self, config: LensConfig):
        super().__init__()
        self.kind_spec: LensKind = get_kind(config.kind)  # what the lens computes and needs: ask it, not the name
        self.config = config
        shapes = self.kind_spec.parameter_shapes(len(config.layers), len(config.heads), config.d_head,
                                                 config.d_model, config.vocab)
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))
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
        materialize: bool = True,
    ) -> "Lens":
        """A fresh (untrained) lens of `kind` for `model`, covering `layers` x `heads` (default: all).

        materialize=False: a skeleton whose parameters are meta placeholders (no memory): `train` with
        shard_heads builds only each process's slice from it, and fills it on the main process at the end.
        """
        get_kind(kind)
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
        if not materialize:
            with torch.device("meta"):
                return cls(config).bind(model)
        check_memory(parameter_bytes(config), f"the {kind} lens's parameters")
        lens = cls(config).to(model.device)
        lens.bind(model)
        lens.kind_spec.initialize(lens)
        return lens

    @property
    def is_skeleton(self) -> bool:
        """Its parameters are meta placeholders (see from_model's materialize)."""
        return any(p.device.type == "meta" for p in self.parameters())

    @classmethod
    def logit(cls, model: Model) -> "Lens":
        return cls.from_model(model, "logit")

    @classmethod
    def dla(cls, model: Model) -> "Lens":
        return cls.from_model(model, "dla")

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

        z holds all the layer's heads; the lens's heads are selected here. For kinds that map straight to the
        vocabulary (`full`) the result already is the logits; for the others it lives in the residual stream.
        """
        return self.kind_spec.hidden(self, z[..., self.config.heads, :], layer)

    def vocab_factors(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """The lens as one (head, vocab, d_head + 1) map of [z_h, 1], plus a per-vocab constant.

        Every kind's logits factor as ([z_h, 1] @ F_h^T) / divisor + constant: for logit/dla/affine,
        F_h = W_U diag(gamma) C [M_h; b_h] with M_h = W_O_h (+ B_h), because the final norm is linear up
        to its per-position divisor. The result is a transposed view of a (head, d_head + 1, vocab) tensor: that
        layout is what the blockwise KL multiplies by, chunk by chunk.
        """
        return self.kind_spec.factors(self, layer)

    def augmented(self, z: Tensor) -> Tensor:
        """[z_h, 1] of the lens's heads, what the factored form multiplies: (..., head, d_head) of all the layer's
        heads -> (..., lens head, d_head + 1)."""
        z = z[..., self.config.heads, :]
        return torch.cat([z, torch.ones(*z.shape[:-1], 1, dtype=z.dtype, device=z.device)], dim=-1)

    def divisor(self, z: Tensor, layer: int, final_scale: Tensor | None = None) -> Tensor:
        """Per (..., lens head) divisor of the factored logits: the final norm's sigma of the lens vector."""
        return self.kind_spec.divisor(self, z[..., self.config.heads, :], layer, final_scale)

    def readout(self, hidden: Tensor, final_scale: Tensor | None = None) -> Tensor:
        """Logits (..., head, vocab) from `hidden`; `dla` needs the final norm's scale (...,) per position."""
        return self.kind_spec.readout(self, hidden, final_scale)

    def unembed_input(self, hidden: Tensor, final_scale: Tensor | None = None) -> Tensor:
        """What meets W_U (logit, affine, dla): the final norm of `hidden`, or for dla the final norm's
        linear action on the head's share of the residual, gamma * C·hidden / sigma(final residual)."""
        return self.kind_spec.unembed_input(self, hidden, final_scale)

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
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.state_dict().items()}
        for name, tensor in tensors.items():  # load() refuses such a lens: never write one
            if not torch.isfinite(tensor).all():
                raise AttentionLensError(f"the {self.kind} lens's {name!r} holds non-finite values; nothing was "
                                         "saved: the fit or training diverged, check its settings and data")
        config_text = strict_json.dumps(dataclasses.asdict(self.config), indent=2)
        directory.mkdir(parents=True, exist_ok=True)
        write_tensors(directory / WEIGHTS_FILE, tensors, {IDENTITY_KEY: identity_hash(self.config)})
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
            "available; select fewer layers or heads, or use the affine kind"
        )


def _available_memory() -> int | None:
    return available_memory()
