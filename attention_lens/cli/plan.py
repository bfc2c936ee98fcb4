"""`attention-lens plan`: a run's memory and time, predicted from the model's config before anything loads."""

from __future__ import annotations

import torch
import typer
from rich.console import Console
from rich.table import Table

from ..errors import AttentionLensError
from ..kinds import get_kind
from ..models import DEFAULT_MODEL, resolve_device
from ..placement import parse_device_map, planned_placement
from ..plan import Plan, model_shape, plan as plan_run, skeleton
from ..sources import read_config
from ..train import DTYPES
from .common import emit_json, parse_indices
from .numbers import MAX_BATCH, MAX_TOKENS, within
from .options import AsJson, Device, DeviceMap, Layers, ModelName, Revision, SeqLen


def plan(
    model: ModelName = DEFAULT_MODEL,
    revision: Revision = None,
    kind: str = typer.Option("affine", help="Lens kind: a trainable one (affine, full) plans training; logit or "
                             "dla plans reading every head."),
    layers: Layers = None,
    tokens: int = typer.Option(20_000, help="Tokens to predict the time for.", callback=within(1, MAX_TOKENS)),
    batch_size: int = typer.Option(4, help="Windows per step.", callback=within(1, MAX_BATCH)),
    seq_len: SeqLen = 128,
    dtype: str = typer.Option("float32", help="Training dtype of the vocabulary-sized matmuls: float32 | bfloat16."),
    device: Device = "cpu",
    device_map: DeviceMap = None,
    as_json: AsJson = False,
) -> None:
    """Predict memory (weights, lens, optimizer state, activations, peak) and time, reading only config.json.

    --json: {model, memory, hardware, seconds}."""
    get_kind(kind)  # an unknown kind is one clear error
    if dtype not in DTYPES:
        raise AttentionLensError(f"unknown --dtype {dtype!r}; use {' or '.join(DTYPES)}")
    config = read_config(model, revision)
    shape = model_shape(config, model)
    result = plan_run(shape, kind=kind, tokens=tokens, batch_size=batch_size, seq_len=seq_len,
                      layers=parse_indices(layers, shape.n_layers, "layer"), device=resolve_device(device),
                      train_dtype=DTYPES[dtype])
    if device_map is not None:
        weights_dtype = torch.float32 if result.dtype == "float32" else torch.bfloat16
        result.devices = planned_placement(skeleton(config, model), parse_device_map(device_map), weights_dtype)
    if as_json:
        emit_json(result.to_json())
        return
    Console().print(_memory_table(result))
    for placed, size in result.devices.items():
        Console().print(f"weights on {placed}: {_bytes(size)}")
    hardware = result.hardware
    Console().print(f"time for {result.tokens:,} tokens: ~{_duration(result.seconds)} on {hardware.name} "
                    f"({hardware.flops / 1e9:,.0f} GFLOP/s, {hardware.exps / 1e6:,.0f} M exp/s, {hardware.source})")


def _memory_table(result: Plan) -> Table:
    shape, memory = result.model, result.memory
    what = "training" if result.training else "reading"
    table = Table(title=f"{shape.name} ({shape.model_type}, {shape.parameters / 1e6:,.0f} M parameters, "
                        f"{shape.n_layers} layers x {shape.n_heads} heads): {result.kind} lens, {what} "
                        f"{result.lens_layers} layers, {result.batch_size} x {result.seq_len} tokens per step")
    table.add_column("memory")
    table.add_column("size", justify="right")
    rows = [
        ("runtime (python, libraries, tokenized corpus, allocator)", memory.runtime),
        (f"model weights ({result.dtype})", memory.weights),
        ("derived readout (W_O, W_U diag(gamma))", memory.readout),
        ("lens parameters", memory.lens_parameters),
        ("optimizer state (gradients, Adam moments)", memory.optimizer_state),
        (f"activations ({_bytes(memory.activations_per_token)} per token)", memory.activations),
        ("activations while a lens layer trains", memory.layer_activations),
        ("one lens layer's factors and gradient", memory.layer_workspace),
        ("peak (steady + the larger phase)", memory.peak),
    ]
    for label, value in rows:
        table.add_row(label, _bytes(value))
    return table


def _bytes(value: float) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value:,.0f} B"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
