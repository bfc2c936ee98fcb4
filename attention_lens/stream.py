"""The one corpus pipeline: documents -> by-document split -> token windows -> batches -> forward pass -> per-layer
head outputs. fit, train (sharded too), eval, search and specialize all read the corpus through `HeadStream`."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator, Sequence

from torch import Tensor

from .data import DataConfig, Document, batches, load_documents, split_by_document, token_windows
from .distributed import World, shard
from .errors import AttentionLensError
from .heads import HeadCapture, run_with_heads
from .models import Model

SPLITS = ("train", "held", "all")
"""Which documents of the by-document split a stream reads: the training side, the held-out side, or all."""


def split_documents(data: DataConfig, split: str) -> list[Document]:
    """The documents of `data` on one side of its by-document split (`split` in SPLITS)."""
    documents = load_documents(data.data, data.skip_bad_lines)
    if split == "all":
        return documents
    train, held = split_by_document(documents, data.holdout)
    return train if split == "train" else held


@dataclass
class HeadBatch:
    """One batch's forward pass: the model's logits and each covered layer's head outputs, given out layer by layer
    so a layer's z is freed once its consumer is done with it."""

    input_ids: Tensor
    """(batch, pos) on the model's device: this process's windows."""
    logits: Tensor
    """The model's logits (batch, pos, vocab)."""
    capture: HeadCapture
    windows: int
    """Windows in the batch over all processes (the global batch)."""
    tokens: int
    """Tokens in the batch over all processes."""

    def z(self, layer: int) -> Tensor:
        """(batch, pos, head, d_head) of every head of `layer`; taken out of the capture (once per layer)."""
        return self.capture.heads.pop(layer).z

    def layers(self, layers: Iterable[int]) -> Iterator[tuple[int, int, Tensor]]:
        """(index, layer, z) for each of `layers` in order, each z popped just before it is used."""
        for index, layer in enumerate(layers):
            yield index, layer, self.z(layer)

    def final_scale(self, positions=None) -> Tensor | None:
        """sigma of the final residual per token, flattened (or at `positions`); None unless it was captured."""
        return self.capture.final_scale(positions)


def forward(model: Model, input_ids: Tensor, layers: Sequence[int], final_residual: bool = False) -> HeadBatch:
    """One batch's forward pass (batch, pos) as a HeadBatch, for callers that bring their own windows."""
    logits, capture = run_with_heads(model, input_ids, layers, final_residual=final_residual)
    return HeadBatch(input_ids=input_ids, logits=logits, capture=capture, windows=input_ids.shape[0],
                     tokens=input_ids.numel())


class HeadStream:
    """Per-layer head outputs of `model` over a corpus, one batch at a time.

    Windows of `data.seq_len` tokens are cut from the chosen documents in an order fixed by `seed`; `start` skips
    that many windows (a resumed run sees exactly what it would have seen) and `windows` caps their number.
    Batches hold `batch_size` windows over all processes of `world`: each process runs the forward pass on its
    share, and a last batch too small to give every process a window is dropped. When the stream ends without a
    single window it raises one clear error naming `what` was too small. Consumers with a token budget stop
    iterating when they have enough: nothing beyond the batch they take is tokenized or run.
    """

    def __init__(self, model: Model, data: DataConfig, layers: Sequence[int] = (), *, split: str = "train",
                 documents: Sequence[Document] | None = None, seed: int = 0, batch_size: int = 4, start: int = 0,
                 windows: int | None = None, final_residual: bool = False, world: World = World(),
                 what: str | None = None):
        if split not in SPLITS:
            raise AttentionLensError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        self.model = model
        self.data = data
        self.layers = list(layers)
        self.documents = split_documents(data, split) if documents is None else list(documents)
        self.seed, self.batch_size, self.start, self.max_windows = seed, batch_size, start, windows
        self.final_residual = final_residual
        self.world = world
        self.what = what or {"train": "training data", "held": "held-out split", "all": "data"}[split]

    def windows(self) -> Iterator[Tensor]:
        """Token windows (seq_len,), in the stream's order, from `start`, at most `windows` of them."""
        windows = token_windows(self.documents, self.model.tokenizer, self.data.seq_len, self.seed, start=self.start)
        return windows if self.max_windows is None else islice(windows, self.max_windows)

    def batches(self) -> Iterator[Tensor]:
        """Global batches (windows, seq_len), CPU; the too-small error when there is not one window."""
        produced = False
        for batch in batches(self.windows(), self.batch_size):
            if batch.shape[0] < self.world.size:
                break  # a last partial batch too small to give every process a window
            produced = True
            yield batch
        if not produced and self.start == 0:  # a resumed run may simply have used all the data
            raise self.too_small()

    def __iter__(self) -> Iterator[HeadBatch]:
        for batch in self.batches():
            local = forward(self.model, shard(batch, self.world).to(self.model.device), self.layers,
                            self.final_residual)
            local.windows, local.tokens = batch.shape[0], batch.numel()  # the global batch's
            yield local

    def too_small(self) -> AttentionLensError:
        return AttentionLensError(f"the {self.what} is too small for one window of {self.data.seq_len} tokens; "
                                  "add text or use shorter windows (seq_len)")
