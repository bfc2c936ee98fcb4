"""Predict a run's memory and time from the model's config alone, before any weight is loaded.

Memory is the sum of what the trainer actually holds (each term names the tensor it stands for); time comes
from the cost model: FLOP and exponentials per token for all lens heads, over the throughput of the hardware
found here (measured on CPUs, a table for known GPUs).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import AttentionLensError
from .fused import COMPILE_MIN_ELEMENTS
from .kinds import get_kind
from .objective import DEFAULT_BLOCK_ROWS, VOCAB_CHUNK

RUNTIME_BYTES = 400 * 2**20
"""Resident memory besides tensors on a CPU: Python with torch 2.13, transformers 5 and attention_lens imported
(measured: 223-239 MiB), the tokenizer, the tokenized corpus (SOTU: ~2.5 M tokens) and the allocator's slack."""
GPU_RUNTIME_BYTES = 512 * 2**20
"""Device memory besides tensors on a GPU: the CUDA context and kernels (typical)."""
COMPILED_KERNELS_BYTES = 100 * 2**20
"""Resident memory Inductor's compiled tile kernels add on a CPU (`fused`; compiler modules, generated code): the
peak of training SmolLM2 layers 20-29, 512 tokens per step, was 65-95 MiB above the same run kept eager."""
TILE_BUFFERS = 16
"""Tile-sized fp32 buffers a training layer holds (the product, the fused kernels' q - p, the gradient's product)
plus what the allocator keeps of freed tiles from layer to layer: training SmolLM2 layers 20-29 at 512 tokens per
step peaked ~150 MiB (16 tiles of 2,304 x 1,024) above the factors, their gradient and their extended copy."""
ADAM_STATE = 3
"""Extra fp32 values per lens parameter while training with Adam: gradient + two moments (SGD: gradient only)."""
GPU_THROUGHPUT = {
    # name fragment: (sustained bf16 FLOP/s, exponentials/s), ~40% of the dense peak.
    "H200": (4.0e14, 1.0e12),
    "H100": (4.0e14, 1.0e12),
    "A100": (1.25e14, 4.0e11),
    "L40": (7.2e13, 2.5e11),
    "L4": (4.8e13, 1.5e11),
    "A10": (5.0e13, 1.5e11),
    "T4": (2.6e13, 8.0e10),
}


@dataclass
class ModelShape:
    """The sizes a plan needs, read from a config."""

    name: str
    model_type: str
    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    vocab: int
    d_mlp: int
    parameters: int
    """Weights the model holds (tied embeddings once)."""


@dataclass
class Costs:
    """Per token, for all lens heads, at `tokens_per_step` tokens per step (bench/cost_model.py prints these)."""

    heads: int
    lens_parameters: int
    lens_flop: float
    """Forward + backward of the lens heads (factored form for logit/dla/affine)."""
    model_flop: float
    """The frozen model's forward pass, 2 FLOP per weight."""
    exps: float
    """Exponentials of the softmax over the vocabulary, per head."""


def costs(shape: ModelShape, kind: str, n_lens_heads: int, tokens_per_step: int, training: bool = True) -> Costs:
    """Counts per token (V vocab, D d_model, d d_head, T tokens per step), per lens head:
    kinds that meet W_U (logit, dla, affine), factored on z_h: 4 (d+1) V + 4 V D (d+1) / T (F_h = W_U diag(g) M_h
    built once per step); kinds straight to the vocabulary (full): 4 (d+1) V; half of each without the backward;
    V exps."""
    width, vocab = shape.d_head + 1, shape.vocab
    passes = 4 if training else 2
    per_head = passes * width * vocab
    if get_kind(kind).to_unembedding:
        per_head += passes * vocab * shape.d_model * width / tokens_per_step
    return Costs(
        heads=n_lens_heads,
        lens_parameters=n_lens_heads * lens_parameters_per_head(kind, shape),
        lens_flop=n_lens_heads * per_head,
        model_flop=2.0 * shape.parameters,
        exps=float(n_lens_heads * vocab),
    )


def lens_parameters_per_head(kind: str, shape: ModelShape) -> int:
    """What the kind declares for one lens head (affine: B_h and b_h; full: W_h and c_h; logit, dla: none)."""
    shapes = get_kind(kind).parameter_shapes(1, 1, shape.d_head, shape.d_model, shape.vocab)
    return sum(math.prod(dims) for dims in shapes.values())


@dataclass
class Hardware:
    name: str
    flops: float
    """Sustained matmul FLOP/s in the run's dtype."""
    exps: float
    """exp elements/s over vocabulary-sized rows."""
    source: str
    """'measured' (timed here, now) or 'table' (typical for the GPU model)."""


def detect_hardware(device: str, dtype: torch.dtype) -> Hardware:
    """The GPU's row of GPU_THROUGHPUT, or this CPU timed for ~0.5 s (under load the figure is lower)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for fragment, (flops, exps) in GPU_THROUGHPUT.items():
            if fragment in name:
                return Hardware(name, flops, exps, "table")
        return Hardware(name, 1.0e14, 3.0e11, "table (unknown GPU: an A100-class guess)")
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    x = torch.randn(64, 32_768)
    flops = 2 * 1024**3 / _best_seconds(lambda: a @ b)
    exps = x.numel() / _best_seconds(lambda: torch.exp(x))
    return Hardware(f"CPU, {torch.get_num_threads()} threads", flops, exps, "measured")


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


@dataclass
class Memory:
    """Bytes, each the size of the tensors it names."""

    runtime: int
    """The process before the model (CPU runs; see RUNTIME_BYTES)."""
    weights: int
    """The frozen model's parameters in their dtype."""
    readout: int
    """Derived fp32 copies: W_O of every layer (the lens reads per-head slices) and W_U diag(gamma)."""
    lens_parameters: int
    optimizer_state: int
    """Gradients and optimizer moments of the lens parameters (training only)."""
    activations_per_token: int
    """Per token while the targets are computed: the model's logits, log p, p and their product, every lens
    layer's z (the most a token holds at once)."""
    activations: int
    """activations_per_token x tokens per step."""
    layer_activations: int
    """Per step while one lens layer trains: the logits, p and the z not yet used, for every token."""
    layer_workspace: int
    """One lens layer's vocabulary-sized factors, their gradient, the sweep's extended copy and the tiles (freed
    before the next layer); on CPUs, the compiled tile kernels where tiles are large enough to use them."""
    peak: int
    """runtime + weights + readout + lens parameters + optimizer state + the larger of the two phases:
    activations, or layer_activations + layer_workspace."""


@dataclass
class Plan:
    model: ModelShape
    kind: str
    training: bool
    dtype: str
    tokens: int
    batch_size: int
    seq_len: int
    lens_layers: int
    memory: Memory
    hardware: Hardware
    seconds: float
    """Predicted time for `tokens` tokens."""
    devices: dict[str, int] = field(default_factory=dict)
    """With a device map: weight bytes per device ('cpu', 'disk', 0, 1, ...)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan(
    shape: ModelShape,
    kind: str = "affine",
    tokens: int = 20_000,
    batch_size: int = 4,
    seq_len: int = 128,
    layers: list[int] | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    optimizer: str = "adam",
    train_dtype: torch.dtype = torch.float32,
    hardware: Hardware | None = None,
) -> Plan:
    """Memory and time of training a `kind` lens (or, for logit/dla, of reading all heads) on `tokens` tokens of
    the model `shape` describes (see model_shape: read from a config, nothing loaded)."""
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    training = get_kind(kind).trainable
    n_layers = shape.n_layers if layers is None else len(layers)
    lens_heads = n_layers * shape.n_heads
    tokens_per_step = batch_size * seq_len
    model_bytes = torch.finfo(dtype).bits // 8
    low_bytes = torch.finfo(train_dtype).bits // 8
    lens_parameters = 4 * lens_heads * lens_parameters_per_head(kind, shape)
    optimizer_state = (ADAM_STATE if optimizer == "adam" else 1) * lens_parameters if training else 0
    readout = 4 * shape.n_layers * shape.n_heads * shape.d_head * shape.d_model + low_bytes * shape.vocab * shape.d_model
    if model_bytes != 4:
        readout += 4 * shape.vocab * shape.d_model  # W_U read out as fp32
    z_bytes = 4 * n_layers * shape.n_heads * shape.d_head  # every lens layer's z, held until its layer is trained
    fp32_copy = 0 if model_bytes == 4 else 4  # target_distribution reads the logits as fp32
    per_token = (
        shape.vocab * (model_bytes + fp32_copy + 4 + 4 + 4)  # logits, log p, p, p * log p
        + z_bytes
        + model_bytes * (4 * shape.d_model + 3 * shape.d_mlp)  # one layer's forward intermediates
        + 4 * shape.n_heads * seq_len  # one layer's attention probabilities (eager)
    )
    layer_activations = tokens_per_step * (shape.vocab * (model_bytes + 4) + z_bytes)  # logits and p stay
    factors = shape.n_heads * (shape.d_head + 1) * shape.vocab  # (head, d_head + 1, vocab)
    # Training: the factors in the training dtype, their fp32 gradient, the sweep's extended copy (two more rows,
    # sweep.extended_factors) and the tiles. Reading: the factors alone.
    extended = shape.n_heads * (shape.d_head + 3) * shape.vocab
    tile = min(DEFAULT_BLOCK_ROWS, shape.n_heads * tokens_per_step) * min(VOCAB_CHUNK, shape.vocab)
    on_cpu = not device.startswith("cuda")
    tiles = TILE_BUFFERS * 4 * tile if on_cpu else 0  # measured on CPUs only; GPU tiles (one chunk) are not counted
    workspace = factors * (low_bytes + 4) + extended * low_bytes + tiles if training else factors * low_bytes
    if on_cpu and tile >= COMPILE_MIN_ELEMENTS:
        workspace += COMPILED_KERNELS_BYTES
    runtime = RUNTIME_BYTES if on_cpu else GPU_RUNTIME_BYTES
    weights = shape.parameters * model_bytes
    activations = per_token * tokens_per_step
    steady = runtime + weights + readout + lens_parameters + optimizer_state
    peak = steady + max(activations, layer_activations + workspace)
    memory = Memory(runtime, weights, readout, lens_parameters, optimizer_state, per_token, activations,
                    layer_activations, workspace, peak)
    hardware = hardware or detect_hardware(device, train_dtype)
    counts = costs(shape, kind, lens_heads, tokens_per_step, training)
    seconds_per_token = (counts.lens_flop + counts.model_flop) / hardware.flops + counts.exps / hardware.exps
    return Plan(shape, kind, training, str(dtype).removeprefix("torch."), tokens, batch_size, seq_len, n_layers,
                memory, hardware, tokens * seconds_per_token)


def skeleton(config: Any, name: str) -> Any:
    """The model `config` describes on the meta device: every parameter's shape, no memory."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as error:  # transformers raises many types for configs it cannot build
        raise AttentionLensError(f"cannot build a model from the config of {name!r}: {error}") from None


def model_shape(config: Any, name: str) -> ModelShape:
    """Sizes of the model `config` describes, from a weightless (meta-device) instance: exact parameter counts,
    and the head layout read through the architecture table as for a loaded model."""
    from .models import wrap_model

    model = wrap_model(skeleton(config, name), None, name)
    skeleton_model = model.hf
    text = model.config
    d_mlp = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * model.d_model
    return ModelShape(
        name=name,
        model_type=model.model_type,
        n_layers=model.n_layers,
        n_heads=model.n_heads,
        d_head=model.d_head,
        d_model=model.d_model,
        vocab=model.vocab,
        d_mlp=int(d_mlp),
        parameters=sum(p.numel() for p in skeleton_model.parameters()),
    )
