"""Per-head outputs: hooks on the attention output projection that capture every head's z_h."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from .models import Model


@dataclass
class LayerHeads:
    """What one layer's heads wrote at each position of a forward pass."""

    z: Tensor
    """Lens input (batch, pos, head, d_head): z_h, times the post-attention norm's scale s if any."""
    scale: Tensor | None
    """Post-attention norm scale s (batch, pos) for Gemma-style models, else None."""


class HeadCapture:
    """Context manager: during forward passes, record z_h of the chosen layers (and the final residual).

    Use `on_layer` to consume each layer as it is computed instead of keeping all layers in memory.
    The hooks only read activations; the model's outputs are unchanged.
    """

    def __init__(
        self,
        model: Model,
        layers: Iterable[int],
        final_residual: bool = False,
        on_layer: Callable[[int, LayerHeads], None] | None = None,
    ):
        self.model = model
        self.layers = list(layers)
        self.want_final_residual = final_residual
        self.on_layer = on_layer
        self.heads: dict[int, LayerHeads] = {}
        self.final_residual: Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> "HeadCapture":
        for layer in self.layers:
            hook = self._layer_hook(layer)
            self._handles.append(self.model.out_proj(layer).register_forward_hook(hook))
        if self.want_final_residual:
            norm = self.model.hf.get_submodule(self.model.spec.final_norm)
            self._handles.append(norm.register_forward_pre_hook(self._final_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer_hook(self, layer: int):
        model = self.model
        norm = model.post_attn_norm(layer)
        eps = None if norm is None else model.norm_eps(norm)
        device = model.device

        def hook(module, inputs, output):
            # To the readout's device, where lenses compute: under a device map this layer may run on another
            # one, and z_h (d_head per head and token) is the smallest thing of the layer that can cross.
            merged = inputs[0].to(device)  # (batch, pos, head * d_head): the heads' outputs, concatenated
            z = merged.float().unflatten(-1, (model.n_heads, model.d_head))  # (batch, pos, head, d_head)
            scale = None
            if norm is not None:
                # The same shared per-position scale the norm module computes on the block output.
                scale = torch.rsqrt(output.to(device).float().pow(2).mean(-1) + eps)  # (batch, pos)
                z = z * scale[..., None, None]
            heads = LayerHeads(z=z, scale=scale)
            if self.on_layer is not None:
                self.on_layer(layer, heads)
            else:
                self.heads[layer] = heads

        return hook

    def final_scale(self, rows=None) -> Tensor | None:
        """The final norm's divisor sigma per token (batch * pos,), optionally only `rows` of it; None when
        the final residual was not captured. The dla lens divides by it."""
        if self.final_residual is None:
            return None
        residual = self.final_residual.flatten(0, 1)  # (token, d_model)
        return self.model.unembed.scale(residual if rows is None else residual[rows])

    def _final_hook(self, module, inputs):
        self.final_residual = inputs[0].to(self.model.device).float()  # (batch, pos, d_model)


def head_contributions(model: Model, layer: int, heads: LayerHeads) -> Tensor:
    """o_h = z_h @ W_O_h for every head: (batch, pos, head, d_model), the head's write to the residual."""
    return torch.einsum("bphd,hdm->bphm", heads.z, model.W_O[layer])


def output_bias(model: Model, layer: int, heads: LayerHeads) -> Tensor | None:
    """The part of the block output that belongs to no head: b_O times the output gain (and the post-norm's
    per-position scale, if any), (d_model,) or (batch, pos, d_model)."""
    bias = model.b_O(layer)
    if bias is None:
        return None
    bias = bias * model.out_gain(layer)
    return bias if heads.scale is None else heads.scale[..., None] * bias


@torch.no_grad()
def run_with_heads(
    model: Model, input_ids: Tensor, layers: Iterable[int], final_residual: bool = False
) -> tuple[Tensor, HeadCapture]:
    """One forward pass; returns the model's logits (batch, pos, vocab) and the capture."""
    with HeadCapture(model, layers, final_residual=final_residual) as capture:
        logits = model.hf(input_ids=input_ids, use_cache=False).logits
    return logits, capture
