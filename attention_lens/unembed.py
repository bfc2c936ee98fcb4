"""The model's frozen readout: final norm, unembedding W_U (+ bias) and optional logit soft-capping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

CENTERED = {"layer": True, "rms": False}
"""Norm kind -> whether the norm subtracts the mean (LayerNorm) before dividing by sigma (RMSNorm does not)."""


@dataclass
class Unembed:
    """Final norm and unembedding as plain tensors, so lenses can apply (and differentiate) them."""

    norm_kind: str
    """'rms' or 'layer'."""
    gamma: Tensor
    """Effective norm gain, (d_model,); Gemma's (1 + w) already folded in."""
    beta: Tensor | None
    """LayerNorm bias, (d_model,), or None."""
    eps: float
    W_U: Tensor
    """Unembedding, (vocab, d_model)."""
    b_U: Tensor | None
    """Unembedding bias, (vocab,), or None."""
    softcap: float | None
    """Final-logit soft-capping (Gemma-2): logits = cap * tanh(logits / cap)."""
    # Not an __init__ field: dataclasses.replace (e.g. with a subset of W_U's rows) must start an empty cache.
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def derived(self, key, build: Callable[[], Any]) -> Any:
        """build(), computed once per key: the weights are frozen, so what is derived from them stays valid."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def readout_matrix(self, dtype: torch.dtype) -> Tensor:
        """W_U diag(gamma), (vocab, d_model), in `dtype`: every lens factor product of every layer and step
        starts from it."""
        return self.derived(("readout", dtype), lambda: (self.W_U * self.gamma).to(dtype))

    @property
    def d_model(self) -> int:
        return self.W_U.shape[1]

    @property
    def vocab(self) -> int:
        return self.W_U.shape[0]

    def center(self, x: Tensor) -> Tensor:
        """Mean-centering C·x for LayerNorm models; identity for RMSNorm."""
        return x - x.mean(-1, keepdim=True) if CENTERED[self.norm_kind] else x

    def scale(self, x: Tensor) -> Tensor:
        """The norm's divisor sigma(x), shape x.shape[:-1], computed as the model's module does."""
        centered = self.center(x.float())
        return torch.sqrt(centered.pow(2).mean(-1) + self.eps)

    def normalize(self, x: Tensor) -> Tensor:
        """gamma * C·x / sigma(x) + beta: what the model's final norm does to x."""
        y = self.center(x.float()) / self.scale(x).unsqueeze(-1) * self.gamma
        return y + self.beta if self.beta is not None else y

    def logits(self, y: Tensor) -> Tensor:
        """Logits of an already-normalized vector y (..., d_model) -> (..., vocab)."""
        # As one 2-D product: a batched (..., d_model) @ (d_model, vocab) runs ~2x slower on CPU.
        out = (y.reshape(-1, y.shape[-1]) @ self.W_U.T.to(y.dtype)).view(*y.shape[:-1], -1)
        if self.b_U is not None:
            out = out + self.b_U.to(out.dtype)
        return self.cap(out)

    def capped_change(self, clean: Tensor, change: Tensor) -> Tensor:
        """How the soft-capped logits move when the raw logits `clean` move by `change` (change itself uncapped)."""
        return self.cap(clean + change) - self.cap(clean) if self.softcap is not None else change

    def cap(self, logits: Tensor) -> Tensor:
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

    def __call__(self, x: Tensor) -> Tensor:
        """Final norm then unembedding of a residual-space vector: the logit lens of x."""
        return self.logits(self.normalize(x))
