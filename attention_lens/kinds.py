"""Lens kinds: each kind is one class here, found through one registry; the rest of the package asks the kind.

A kind declares its parameters and their init, how it maps a head's z_h to what meets the unembedding (or straight
to logits), its factored form for the tiled trainer and the evaluator, whether it needs the final residual, and its
closed-form fit if it has one. Adding a kind is one new class with `@register` (tests/test_kinds.py adds one).

Every method takes the `Lens` it serves (its config, parameters and bound model); kinds hold no state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from .errors import AttentionLensError

REGISTRY: dict[str, "LensKind"] = {}
"""Kind name -> its (stateless) kind object, in the order the kinds were registered."""


def register(cls: type["LensKind"]) -> type["LensKind"]:
    """Class decorator: make the kind findable by its `name` (config.json's `kind`, the CLI's --kind / --lens)."""
    if cls.name in REGISTRY:
        raise ValueError(f"a lens kind named {cls.name!r} is already registered")
    REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Forget a kind (tests register temporary ones)."""
    REGISTRY.pop(name, None)


def get_kind(name: str) -> "LensKind":
    try:
        return REGISTRY[name]
    except KeyError:
        raise AttentionLensError(f"unknown lens kind {name!r}; choose one of {', '.join(REGISTRY)}") from None


def kind_names(trainable: bool | None = None, closed_form: bool | None = None) -> list[str]:
    """Registered kind names; only the trainable (or untrained) ones, or those with (or without) a closed-form fit,
    when asked."""
    return [name for name, kind in REGISTRY.items()
            if trainable in (None, kind.trainable) and closed_form in (None, kind.closed_form)]


class LensKind(ABC):
    """One kind of per-head lens. Shapes: z (..., lens head, d_head) holds the lens's heads only."""

    name: ClassVar[str]
    description: ClassVar[str]
    """One line for model cards: what the map is."""
    needs_final_residual: ClassVar[bool] = False
    """Its logits depend on the final residual's norm (the forward pass must capture it)."""
    to_unembedding: ClassVar[bool] = True
    """It maps z_h to a residual-space vector that meets W_U (`unembed_input`); False: straight to logits."""
    model_readout: ClassVar[bool] = True
    """Its logits are the model's readout of `unembed_input` (b_U and soft-cap included); False: a linear map."""
    closed_form: ClassVar[bool] = False
    """`fit` can set it by ridge regression (`set_affine`)."""
    default_reading: ClassVar[str] = "raw"
    """What `decode` shows by default (readings.py): raw tokens, promoted over the prior (trained predictive
    lenses, whose raw tokens are mostly the prior), or the predicted effect of removing the head."""
    reads_effects: ClassVar[bool] = False
    """Trained on measured head effects (`--objective effect`, effect_lens.py): a linear attribution with a learned
    map, fitted by least squares of the measured effects."""

    def parameter_shapes(self, layers: int, heads: int, d_head: int, d_model: int, vocab: int) -> dict[str, tuple]:
        """Name -> shape of each parameter for `layers` x `heads` lens heads; none for untrained kinds."""
        return {}

    @property
    def trainable(self) -> bool:
        return bool(self.parameter_shapes(1, 1, 1, 1, 1))

    def initialize(self, lens: Any) -> None:
        """Set the parameters of a fresh lens (all start at zero); the lens is bound to its model."""

    @abstractmethod
    def hidden(self, lens: Any, z: Tensor, layer: int) -> Tensor:
        """(..., lens head, d_head) -> (..., lens head, d_model), or (..., lens head, vocab) logits."""

    @abstractmethod
    def factors(self, lens: Any, layer: int) -> tuple[Tensor, Tensor | None]:
        """The lens as one (head, vocab, d_head + 1) map of [z_h, 1] and a per-vocab constant (or None):
        logits = ([z_h, 1] @ F_h^T) / divisor + constant (before any soft-cap)."""

    @abstractmethod
    def divisor(self, lens: Any, z: Tensor, layer: int, final_scale: Tensor | None) -> Tensor:
        """Per (..., lens head) divisor of the factored logits."""

    @abstractmethod
    def readout(self, lens: Any, hidden: Tensor, final_scale: Tensor | None) -> Tensor:
        """Logits (..., head, vocab) from `hidden`."""

    def unembed_input(self, lens: Any, hidden: Tensor, final_scale: Tensor | None) -> Tensor:
        """What meets W_U, (..., head, d_model); only kinds with `to_unembedding`."""
        raise AttentionLensError(f"the {self.name} lens maps straight to logits; nothing of it meets W_U")

    def set_affine(self, lens: Any, layer: int, M: Tensor, b: Tensor) -> None:
        """Make the lens of `layer` map z_h to z_h M_h + b_h (M: (head, d_head, d_model), b: (head, d_model))."""
        raise AttentionLensError(f"the {self.name} lens has no closed-form fit; fit makes "
                                 f"{' or '.join(kind_names(closed_form=True))} lenses")


class ResidualKind(LensKind):
    """Kinds that map z_h to a residual-stream vector x_h = z_h M_h + b_h, read out by the model's final norm and W_U
    as if x_h were the final residual (self-normalized: divided by its own sigma)."""

    @abstractmethod
    def affine_map(self, lens: Any, layer: int) -> tuple[Tensor, Tensor | None]:
        """M (head, d_head, d_model) and b (head, d_model) or None, for the lens's heads of `layer`."""

    def hidden(self, lens: Any, z: Tensor, layer: int) -> Tensor:
        M, b = self.affine_map(lens, layer)
        x = torch.einsum("...hd,hdm->...hm", z, M.to(z.dtype))
        return x if b is None else x + b

    def factors(self, lens: Any, layer: int) -> tuple[Tensor, Tensor | None]:
        """F_h = W_U diag(gamma) C [M_h; b_h]: the final norm is linear up to its per-position divisor. Building F_h
        costs vocab x d_model x d_head once per call; each head-token then costs ~d_head x vocab instead of
        d_model x vocab. The result is a transposed view of a (head, d_head + 1, vocab) tensor: the layout the
        blockwise KL multiplies by, chunk by chunk.

        On a model split over devices the product is formed on the readout's device: W_U and the targets it is
        scored against are vocabulary-sized and already there, while what comes from the layer's device, M_h and
        b_h, is (head, d_head + 1, d_model); forming F_h at home would move vocab x d_model in and the
        (head, d_head + 1, vocab) result, or the targets, out."""
        unembed = lens.model.unembed
        M_b = self._centered_map(lens, layer)  # (head, d_head + 1, d_model), on the readout's device
        device = M_b.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else M_b.dtype
        readout = unembed.readout_matrix(dtype)  # (vocab, d_model): W_U diag(gamma)
        # One 2-D product; a batched einsum copied the (vocab, d_model) readout into its transpose every call.
        factors = (M_b.to(dtype).flatten(0, 1) @ readout.T).view(*M_b.shape[:2], -1).transpose(1, 2)
        return factors, self._constant(unembed)

    def expected_factors(self, lens: Any, layer: int, p: Tensor, p_readout: Tensor) -> tuple[Tensor, Tensor | None]:
        """The factors and constant averaged under distributions p (rows, vocab), in fp32: sum_v p_v F_h[v]
        (head, rows, d_head + 1) and sum_v p_v constant_v (rows,) or None, so the cross term sum_v p_v l_v of the
        factored logits is one d_head-sized dot product per head-token. F_h = W_U diag(gamma) C [M_h; b_h], so
        sum_v p_v F_h[v] = C [M_h; b_h] (p W_U diag(gamma))^T: one (d_head + 1) x d_model product per head-row, given
        p_readout = p W_U diag(gamma) (rows, d_model), formed once per batch for every layer."""
        M_b = self._centered_map(lens, layer).float()  # (head, d_head + 1, d_model)
        constant = self._constant(lens.model.unembed)
        return p_readout @ M_b.transpose(1, 2), None if constant is None else p @ constant.float()

    def _centered_map(self, lens: Any, layer: int) -> Tensor:
        """C [M_h; b_h], (head, d_head + 1, d_model): what W_U diag(gamma) multiplies."""
        unembed = lens.model.unembed
        M, b = self.affine_map(lens, layer)  # on the readout's device (Lens.layer_tensor)
        if b is None:
            b = torch.zeros(M.shape[0], unembed.d_model, device=M.device)
        return unembed.center(torch.cat([M, b[:, None, :]], dim=1))

    def _constant(self, unembed: Any) -> Tensor | None:
        """W_U beta + b_U: what the model's readout adds whatever the input."""
        constant = None
        if unembed.beta is not None:
            constant = unembed.W_U @ unembed.beta
        if unembed.b_U is not None:
            constant = unembed.b_U if constant is None else constant + unembed.b_U
        return constant

    def divisor(self, lens: Any, z: Tensor, layer: int, final_scale: Tensor | None) -> Tensor:
        return lens.model.unembed.scale(self.hidden(lens, z, layer))

    def unembed_input(self, lens: Any, hidden: Tensor, final_scale: Tensor | None) -> Tensor:
        return lens.model.unembed.normalize(hidden)

    def readout(self, lens: Any, hidden: Tensor, final_scale: Tensor | None) -> Tensor:
        return lens.model.unembed.logits(self.unembed_input(lens, hidden, final_scale))


@register
class LogitKind(ResidualKind):
    """final norm + W_U applied to o_h = z_h W_O_h alone (self-normalized)."""

    name = "logit"
    description = "final norm + W_U applied to each head's output o_h = z_h W_O_h (untrained, self-normalized)"

    def affine_map(self, lens: Any, layer: int) -> tuple[Tensor, Tensor | None]:
        return lens.model.W_O[layer, lens.config.heads], None


@register
class DlaKind(ResidualKind):
    """W_U (gamma * C o_h) / sigma_final(pos): direct logit attribution; needs the final residual."""

    name = "dla"
    description = "direct logit attribution of each head's output (untrained); heads + rest = the model's logits"
    needs_final_residual = True
    model_readout = False  # an attribution: no beta, no b_U, no soft-cap

    def affine_map(self, lens: Any, layer: int) -> tuple[Tensor, Tensor | None]:
        return lens.model.W_O[layer, lens.config.heads], None

    def _constant(self, unembed: Any) -> Tensor | None:
        return None

    def divisor(self, lens: Any, z: Tensor, layer: int, final_scale: Tensor | None) -> Tensor:
        return _final_scale(final_scale)[..., None].expand(*z.shape[:-2], z.shape[-2])

    def unembed_input(self, lens: Any, hidden: Tensor, final_scale: Tensor | None) -> Tensor:
        """The final norm's linear action on the head's share of the residual: gamma * C·hidden / sigma(final)."""
        unembed = lens.model.unembed
        return unembed.center(hidden) * unembed.gamma / _final_scale(final_scale)[..., None, None]

    def readout(self, lens: Any, hidden: Tensor, final_scale: Tensor | None) -> Tensor:
        return self.unembed_input(lens, hidden, final_scale) @ lens.model.unembed.W_U.T


@register
class AffineKind(ResidualKind):
    """final norm + W_U of o_h + z_h B_h + b_h; B_h, b_h zero-init, so untrained it is `logit`."""

    name = "affine"
    description = "final norm + W_U of o_h + z_h B_h + b_h: a per-head correction of the logit lens, trained"
    closed_form = True
    default_reading = "promoted"

    def parameter_shapes(self, layers: int, heads: int, d_head: int, d_model: int, vocab: int) -> dict[str, tuple]:
        return {"delta": (layers, heads, d_head, d_model), "bias": (layers, heads, d_model)}

    def affine_map(self, lens: Any, layer: int) -> tuple[Tensor, Tensor | None]:
        delta, bias = lens.layer_tensor("delta", layer), lens.layer_tensor("bias", layer)
        return lens.model.W_O[layer, lens.config.heads] + delta, bias

    @torch.no_grad()
    def set_affine(self, lens: Any, layer: int, M: Tensor, b: Tensor) -> None:
        W_O = lens.model.W_O[layer, lens.config.heads].to(M.dtype)
        lens.set_layer("delta", layer, (M - W_O).float())
        lens.set_layer("bias", layer, b.float())


@register
class FullKind(LensKind):
    """z_h W_h + c_h straight to the vocabulary (the paper's lens, on z_h); init W_O_h W_U^T, b_U."""

    name = "full"
    description = "z_h W_h + c_h straight to the vocabulary: the Attention Lens paper's map, on z_h"
    to_unembedding = False
    model_readout = False
    default_reading = "promoted"

    def parameter_shapes(self, layers: int, heads: int, d_head: int, d_model: int, vocab: int) -> dict[str, tuple]:
        return {"weight": (layers, heads, d_head, vocab), "bias": (layers, heads, vocab)}

    @torch.no_grad()
    def initialize(self, lens: Any) -> None:
        model = lens.model
        for layer in lens.config.layers:
            # Formed where W_U is; on a split model each layer's (head, d_head, vocab) then travels home once.
            lens.set_layer("weight", layer, model.W_O[layer, lens.config.heads] @ model.unembed.W_U.T)
            if model.unembed.b_U is not None:
                lens.set_layer("bias", layer, model.unembed.b_U)

    # Its parameters are vocabulary-sized: on a split model each use brings one layer's (head, d_head + 1, vocab)
    # to the readout's device, the one vocabulary-sized copy the other kinds never make (see Lens.layer_tensor).
    def hidden(self, lens: Any, z: Tensor, layer: int) -> Tensor:
        weight, bias = lens.layer_tensor("weight", layer), lens.layer_tensor("bias", layer)
        return torch.einsum("...hd,hdv->...hv", z, weight.to(z.dtype)) + bias

    def factors(self, lens: Any, layer: int) -> tuple[Tensor, Tensor | None]:
        weight, bias = lens.layer_tensor("weight", layer), lens.layer_tensor("bias", layer)
        return torch.cat([weight, bias[:, None, :]], dim=1).transpose(1, 2), None

    def divisor(self, lens: Any, z: Tensor, layer: int, final_scale: Tensor | None) -> Tensor:
        return torch.ones(z.shape[:-1], device=z.device)

    def readout(self, lens: Any, hidden: Tensor, final_scale: Tensor | None) -> Tensor:
        return hidden


@register
class EffectKind(DlaKind):
    """dla's form with a learned map: W_U (gamma * C z_h (W_O_h + B_h)) / sigma_final(pos); B_h zero-init, so untrained
    it is `dla`. Trained (`--objective effect`) so that its reading of z_h - z̄_h predicts what removing the head does
    to the output, through later layers too (effect_lens.py)."""

    name = "effect"
    description = ("dla's form with a learned d_head -> d_model map, trained so that its reading of z_h - z̄_h "
                   "predicts what removing the head does to the output (untrained it is dla)")
    default_reading = "effect"
    reads_effects = True

    def parameter_shapes(self, layers: int, heads: int, d_head: int, d_model: int, vocab: int) -> dict[str, tuple]:
        return {"delta": (layers, heads, d_head, d_model)}

    def affine_map(self, lens: Any, layer: int) -> tuple[Tensor, Tensor | None]:
        return lens.model.W_O[layer, lens.config.heads] + lens.layer_tensor("delta", layer), None


def _final_scale(final_scale: Tensor | None) -> Tensor:
    if final_scale is None:
        raise AttentionLensError("attribution lenses (dla, effect) need final_scale: sigma of the final residual")
    return final_scale
