"""Lenses: per-head maps from a head's output z_h to vocabulary logits; build, save and load."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
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

    Each parameter is one (layer, head, ...) stack. On a model split over devices (`--device-map`) the stack is
    cut into runs of consecutive layers that share a device, each run on its layers' device (`devices`, one per
    lens layer; None: one stack). Kinds read a layer's slice with `layer_tensor` and write it with `set_layer`,
    so they never see the cut; the lens file holds the whole stacks either way (`tensors`).
    """

    def __init__(self, config: LensConfig, devices: Sequence[torch.device] | None = None):
        super().__init__()
        self.kind_spec: LensKind = get_kind(config.kind)  # what the lens computes and needs: ask it, not the name
        self.config = config
        shapes = self.kind_spec.parameter_shapes(len(config.layers), len(config.heads), config.d_head,
                                                 config.d_model, config.vocab)
        self._layer_index = {layer: i for i, layer in enumerate(config.layers)}
        self._model: Model | None = None
        self._runs: list[tuple[int, int]] | None = None  # [start, stop) of the lens layers in each split run
        if devices is None:
            for name, shape in shapes.items():
                self.register_parameter(name, nn.Parameter(torch.zeros(shape)))
            return
        if len(devices) != len(config.layers):
            raise ValueError(f"{len(devices)} devices for {len(config.layers)} layers")
        self._runs = _runs(devices)
        # An OrderedDict: ParameterDict sorts a plain dict's keys, and the parameters' order (run by run, each in
        # the kind's order) is what checkpoints map optimizer state by.
        self.split = nn.ModuleList(
            nn.ParameterDict(OrderedDict(
                (name, nn.Parameter(torch.zeros(stop - start, *shape[1:], device=devices[start])))
                for name, shape in shapes.items()))
            for start, stop in self._runs
        )
        self._slot = [(run, i - start) for run, (start, stop) in enumerate(self._runs) for i in range(start, stop)]

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
        lens = cls._placed(config, model)
        lens.bind(model)
        lens.kind_spec.initialize(lens)
        return lens

    @classmethod
    def _placed(cls, config: LensConfig, model: Model) -> "Lens":
        """A zero lens of `config` whose layers live where `model` runs them: one stack on the model's device
        (the readout's) when every layer runs there, else split runs (see the class docstring)."""
        devices = [model.layer_device(layer) for layer in config.layers]
        if not get_kind(config.kind).trainable or all(device == model.device for device in devices):
            return cls(config).to(model.device)
        return cls(config, devices)

    @property
    def is_split(self) -> bool:
        """Its layers' parameters are spread over the devices that run those layers."""
        return self._runs is not None

    @property
    def runs(self) -> list[tuple[int, int]] | None:
        """[start, stop) of the lens layers in each split run, in parameter order; None for one stack."""
        return self._runs

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

    def layer_device(self, layer: int) -> torch.device:
        """Where the parameters of `layer` live (an untrained kind has none: the readout's device)."""
        names = list(self.kind_spec.parameter_shapes(1, 1, 1, 1, 1))
        return self._home(names[0], layer).device if names else self.model.device

    def layer_tensor(self, name: str, layer: int) -> Tensor:
        """Parameter `name`'s slice for `layer` (head, ...), differentiable, on the readout's device.

        A split lens sends the slice from its layer's device to the readout's: what every kind multiplies it
        with (W_O, W_U, the targets, the captured z_h) is there, and for every kind but `full` the slice has no
        vocabulary dimension, so this per-layer copy is the smallest thing that can cross. Its gradient flows
        back to the layer's device, where the parameter and its optimizer state stay.
        """
        if self._runs is None:
            return getattr(self, name)[self.layer_index(layer)]
        return self._home(name, layer).to(self.model.device)

    @torch.no_grad()
    def set_layer(self, name: str, layer: int, value: Tensor) -> None:
        """Overwrite parameter `name`'s slice for `layer` (head, ...) wherever it lives."""
        self._home(name, layer).copy_(value)

    def _home(self, name: str, layer: int) -> Tensor:
        """The slice of `layer` in the stack (or split run) that holds it, on its own device."""
        i = self.layer_index(layer)
        if self._runs is None:
            return getattr(self, name)[i]
        run, row = self._slot[i]
        return self.split[run][name][row]

    def tensors(self) -> dict[str, Tensor]:
        """Each parameter as one (layer, ...) stack on the CPU, detached: what the lens file holds, split or not."""
        if self._runs is None:
            return {name: p.detach().cpu() for name, p in self.named_parameters()}
        names = self.split[0].keys()
        return {name: torch.cat([run[name].detach().cpu() for run in self.split]) for name in names}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """The inverse of `tensors`: every (layer, ...) stack into the parameters, wherever they live."""
        if self._runs is None:
            self.load_state_dict(tensors)
            return
        names = set(self.split[0].keys())
        if set(tensors) != names:
            raise RuntimeError(f"expected tensors {sorted(names)}, got {sorted(tensors)}")
        for run, (start, stop) in zip(self.split, self._runs):
            for name, parameter in run.items():
                parameter.copy_(tensors[name][start:stop])

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
        tensors = {name: t.contiguous() for name, t in self.tensors().items()}  # whole stacks, split or not
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
        if model is None:
            lens = cls(config)
            lens.load_state_dict(state)
            return lens
        lens = cls._placed(config, model)
        lens.load_tensors(state)
        return lens.bind(model)

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


def _runs(devices: Sequence[torch.device]) -> list[tuple[int, int]]:
    """[start, stop) of each run of consecutive equal devices."""
    starts = [i for i in range(len(devices)) if i == 0 or devices[i] != devices[i - 1]]
    return list(zip(starts, starts[1:] + [len(devices)]))


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
