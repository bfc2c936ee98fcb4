"""Load a HuggingFace causal LM and expose what lenses need: W_O per head, the readout, a fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .architectures import ArchSpec, arch_spec
from . import strict_json
from .errors import AttentionLensError
from .placement import execution_device, loading_options, parse_device_map, release_with
from .sources import local_directory
from .unembed import Unembed

DEFAULT_MODEL = "smollm2-135m"


@dataclass
class Model:
    """A frozen HF causal LM plus where, in it, the heads and the readout live."""

    hf: nn.Module
    tokenizer: Any
    name: str
    """The name or directory it was loaded from ('' for an in-memory model)."""
    spec: ArchSpec
    revision: str | None = None
    """The Hub revision it was loaded at, when loaded from the Hub at one."""
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def config(self) -> Any:
        return getattr(self.hf.config, "text_config", None) or self.hf.config

    @property
    def model_type(self) -> str:
        return self.hf.config.model_type

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def d_model(self) -> int:
        return self.unembed.d_model

    @property
    def vocab(self) -> int:
        return self.unembed.vocab

    @property
    def device(self) -> torch.device:
        """Where the readout runs, and with it everything vocabulary-sized (W_U, the lenses' factor products,
        the targets): the unembedding's device (its execution device when a device map offloads it)."""
        head = self.hf.get_output_embeddings()
        hook = getattr(head, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        return torch.device(execution) if execution is not None else head.weight.device

    def layer_device(self, layer: int) -> torch.device:
        """Where decoder layer `layer` runs, and so where a lens keeps that layer's parameters: under a device
        map, the device accelerate runs it on; otherwise the model's device."""
        if getattr(self.hf, "hf_device_map", None) is None:
            return self.device
        return execution_device(self.layers[layer]) or self.device

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.get_submodule(self.spec.layers)

    def out_proj(self, layer: int) -> nn.Module:
        return self.layers[layer].get_submodule(self.spec.out_proj)

    def post_attn_norm(self, layer: int) -> nn.Module | None:
        if self.spec.post_attn_norm is None:
            return None
        return self.layers[layer].get_submodule(self.spec.post_attn_norm)

    @property
    def d_head(self) -> int:
        """From config.head_dim or the projection's input width; never d_model / n_heads (Gemma-3)."""
        in_features = self._out_proj_weight(0).shape[0]
        head_dim = getattr(self.config, "head_dim", None)
        if head_dim is None:
            head_dim = in_features // self.n_heads
        if head_dim * self.n_heads != in_features:
            raise AttentionLensError(
                f"{self.model_type}: {self.n_heads} heads x head_dim {head_dim} != output projection "
                f"input width {in_features}; the architecture table entry is wrong for this model"
            )
        return head_dim

    def _out_proj_weight(self, layer: int) -> Tensor:
        """Output projection weight as (in = head x d_head, out = d_model), whatever the module type."""
        weight = module_tensor(self.out_proj(layer), "weight").to(self.device)
        return weight if self.spec.out_proj_is_conv1d else weight.T

    def b_O(self, layer: int) -> Tensor | None:
        """Output-projection bias (d_model,), as the projection holds it: it belongs to no head."""
        bias = module_tensor(self.out_proj(layer), "bias")
        return None if bias is None else bias.to(self.device).float()

    def out_gain(self, layer: int) -> Tensor | float:
        """What multiplies the projection's output on its way to the residual, besides a post-attention norm's
        per-position scale: that norm's gain (d_model,) and a residual multiplier (Granite); 1.0 where none."""
        gain: Tensor | float = 1.0
        if self.spec.residual_multiplier is not None:
            gain = float(getattr(self.config, self.spec.residual_multiplier))
        norm = self.post_attn_norm(layer)
        if norm is not None:
            gain = gain * (module_tensor(norm, "weight").to(self.device).float() + self.spec.norm_weight_offset)
        return gain

    def norm_eps(self, norm: nn.Module) -> float:
        """A norm module's epsilon, whatever its class calls it."""
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or self.spec.norm_eps
        if eps is None:
            raise AttentionLensError(
                f"{self.model_type}: cannot find the epsilon of {type(norm).__name__}; the architecture table "
                "entry needs norm_eps"
            )
        return float(eps)

    @property
    def W_O(self) -> Tensor:
        """Per-head output maps (layer, head, d_head, d_model), fp32; o_h = z_h @ W_O[layer, head].

        The output gain (a Gemma-style post-attention norm's gain, Granite's residual multiplier) is folded
        in, so that with the lens input s·z_h (s: the post-norm's per-position scale, 1 without one) o_h is the
        head's true residual contribution.
        """
        if "W_O" not in self._cache:
            per_layer = []
            for layer in range(self.n_layers):
                w = self._out_proj_weight(layer).float()  # (head * d_head, d_model)
                w = w.reshape(self.n_heads, self.d_head, -1)  # (head, d_head, d_model)
                per_layer.append(w * self.out_gain(layer))
            self._cache["W_O"] = torch.stack(per_layer)
        return self._cache["W_O"]

    @property
    def unembed(self) -> Unembed:
        """The readout as tensors. A logit scale (Cohere's logit_scale, Granite's 1 / logits_scaling) is folded
        into W_U and b_U: logits are linear in them, and every lens computes logits from W_U."""
        if "unembed" not in self._cache:
            norm = self.hf.get_submodule(self.spec.final_norm)
            head = self.hf.get_output_embeddings()
            device = self.device
            W_U = module_tensor(head, "weight").to(device).float()
            b_U = module_tensor(head, "bias")
            weight = module_tensor(norm, "weight")  # OLMo's final LayerNorm has neither weight nor bias
            gamma = torch.ones(W_U.shape[1]) if weight is None else weight.float()
            beta = module_tensor(norm, "bias")
            logit_scale = self.logit_scale
            self._cache["unembed"] = Unembed(
                norm_kind=self.spec.norm_kind,
                gamma=gamma.to(device) + self.spec.norm_weight_offset,
                beta=None if beta is None else beta.to(device).float(),
                eps=self.norm_eps(norm),
                W_U=_scaled(W_U, logit_scale),
                b_U=None if b_U is None else _scaled(b_U.to(device).float(), logit_scale),
                softcap=getattr(self.config, "final_logit_softcapping", None),
            )
        return self._cache["unembed"]

    @property
    def logit_scale(self) -> float:
        """The factor the model multiplies its logits by before any soft-capping (1.0 for most)."""
        scale = 1.0
        if self.spec.logit_multiplier is not None:
            scale *= float(getattr(self.config, self.spec.logit_multiplier))
        if self.spec.logit_divisor is not None:
            scale /= float(getattr(self.config, self.spec.logit_divisor))
        return scale

    def fingerprint(self) -> dict:
        """Identity of the weights a lens depends on, equal for fp32 and bf16 loads of the same model."""
        if "fingerprint" not in self._cache:
            w_o = torch.cat([self._out_proj_weight(layer).flatten() for layer in range(self.n_layers)])
            self._cache["fingerprint"] = {
                "name": self.name,
                "model_type": self.model_type,
                "n_layers": self.n_layers,
                "n_heads": self.n_heads,
                "d_head": self.d_head,
                "d_model": self.d_model,
                "vocab": self.vocab,
                "w_u_sha256": _tensor_hash(module_tensor(self.hf.get_output_embeddings(), "weight")),
                "w_o_sha256": _tensor_hash(w_o),
            }
            if self.revision is not None:  # provenance: a lens directory then reloads its model at that revision
                self._cache["fingerprint"]["revision"] = self.revision
        return self._cache["fingerprint"]

    def encode(self, text: str) -> Tensor:
        """Token ids (1, pos) of a prompt, without special tokens: the lens reads what the text says."""
        try:
            text.encode("utf-8")  # argv bytes that are not UTF-8 arrive as lone surrogates; tokenizers crash on them
        except UnicodeEncodeError:
            raise AttentionLensError("the prompt is not valid UTF-8 text; give it as UTF-8") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise AttentionLensError("the prompt is empty after tokenization; give some text")
        return torch.tensor([ids], device=self.device)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each id's text, in one tokenizer call (per-id calls dominate decoding all positions)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or self.tokenizer.clean_up_tokenization_spaces:
            return self.tokenizer.batch_decode([[i] for i in token_ids])
        # The fast tokenizer's Rust decoder directly: batch_decode spends ~10x longer checking its Python input.
        return backend.decode_batch([[i] for i in token_ids], skip_special_tokens=False)


def module_tensor(module: nn.Module, name: str) -> Tensor | None:
    """A module's parameter, detached; for a module a device map offloaded (its parameter is a meta placeholder
    between forward passes), the real tensor from the offload store accelerate keeps on its hook."""
    tensor = getattr(module, name, None)
    if tensor is None:
        return None
    hook = getattr(module, "_hf_hook", None)
    store = getattr(hook, "weights_map", None)
    if tensor.device.type == "meta" and store is not None:
        return store[name].detach()
    return tensor.detach()


def _scaled(t: Tensor, scale: float) -> Tensor:
    """t * scale, without a copy when scale is 1 (W_U is vocabulary-sized)."""
    return t if scale == 1.0 else t * scale


def _tensor_hash(t: Tensor) -> str:
    """sha256 of the weights rounded to bf16, the canonical dtype, so fp32/bf16 loads agree."""
    raw = t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def load_model(
    source: str | tuple = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> Model:
    """A registered name (smollm2-135m, gemma3-270m), a local HF model directory, a local .gguf file, a Hugging
    Face Hub id `owner/name` (at `revision`: branch, tag or commit; from the Hub cache when offline), or
    (hf_model, tokenizer).

    The frozen model's weights default to fp32 on CPU and bf16 on GPUs; lenses and their statistics work
    in fp32 either way (head outputs are read out as fp32). `device_map` (auto, balanced, sequential or
    {module path: device}, with an optional `max_memory` {device: bytes}) spreads a model too large for one
    device over GPUs, CPU memory and disk with accelerate; the lens then lives on the unembedding's device.
    """
    device = resolve_device(device)
    if dtype is None:
        on_gpu = device.startswith("cuda") or (device_map is not None and torch.cuda.is_available())
        dtype = torch.bfloat16 if on_gpu else torch.float32
    placement = None
    if isinstance(source, tuple):
        hf, tokenizer = source
        name = getattr(hf.config, "_name_or_path", "") or ""
    else:
        directory = local_directory(source, revision, _from_pretrained)
        if device_map is not None:
            placement = loading_options(parse_device_map(device_map), max_memory, directory.name)
        hf, tokenizer = _from_pretrained(directory, dtype, **(placement or {}))
        name = source
    if placement is None:
        hf.to(device)
    else:
        release_with(hf, placement)
    hf.eval().requires_grad_(False)
    return wrap_model(hf, tokenizer, name, revision)


def wrap_model(hf: nn.Module, tokenizer: Any, name: str, revision: str | None = None) -> Model:
    """A Model around an HF causal LM as it is (device, dtype; the meta device works too), its layout checked."""
    model = Model(hf=hf, tokenizer=tokenizer, name=name, spec=arch_spec(hf.config.model_type), revision=revision)
    model.d_head  # validates the head layout now rather than mid-run
    return model


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AttentionLensError("`device` cuda asked for, but no CUDA GPU is visible; use `device` cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise AttentionLensError(f"unknown device {device!r}; use cpu, cuda or auto")
    return device


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _from_pretrained(directory: Path, dtype: torch.dtype, gguf_file: str | None = None, **placement):
    """Tokenizer and model of a local directory (or a GGUF file in it); whatever goes wrong is one line.

    transformers raises many exception types here, some with 70-line validation reports: each step's failure
    becomes one AttentionLensError naming the step, the innermost reason and what to do. `placement`: device-map
    options for from_pretrained (then the weights need not fit in memory: they may be offloaded).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if gguf_file is None:
        _check_config_file(directory / "config.json")
        if not any((directory / name).is_file() for name in TOKENIZER_FILES):
            raise AttentionLensError(
                f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}); save the model's "
                f"tokenizer there too (tokenizer.save_pretrained({str(directory)!r}))"
            )
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    except Exception as error:
        raise AttentionLensError(f"the model config in {directory} is not usable: {_reason(error)}; fix its "
                                 "config.json or save the model again") from None
    if not placement:
        _check_model_memory(config, dtype, directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    except Exception as error:
        raise AttentionLensError(f"could not load the tokenizer in {directory}: {_reason(error)}; check that its "
                                 "tokenizer files are complete, or save them again") from None
    try:
        hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, config=config, dtype=dtype,
                                                  **placement)
    except Exception as error:
        raise AttentionLensError(f"could not load the model in {directory}: {_reason(error)}; check its "
                                 "config.json and weight files, or save the model again") from None
    return hf, tokenizer


def _check_model_memory(config: Any, dtype: torch.dtype, directory: Path) -> None:
    """Count the weights the config implies (on the meta device: nothing allocated) and refuse a model that
    cannot fit, instead of being killed by the kernel mid-load (a config.json missing its sizes means 7B)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as error:
        raise AttentionLensError(f"the model config in {directory} is not usable: {_reason(error)}; fix its "
                                 "config.json or save the model again") from None
    needed = sum(p.numel() for p in skeleton.parameters()) * torch.finfo(dtype).bits // 8
    available = available_memory()
    if available is not None and needed > 0.8 * available:
        raise AttentionLensError(
            f"the model in {directory} needs ~{needed / 2**30:.1f} GiB for its weights but only "
            f"{available / 2**30:.1f} GiB of memory is available; check its config.json (sizes) or use a bigger machine"
        )


def available_memory() -> int | None:
    """Bytes of memory the kernel says are available (Linux), or None where it cannot tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_config_file(path: Path) -> None:
    """config.json must be strict JSON with finite numbers: a NaN epsilon loads fine and poisons every output."""
    try:
        strict_json.loads(path.read_bytes(), str(path))
    except OSError as error:
        raise AttentionLensError(f"cannot read {path}: {error.strerror}") from None
    except (ValueError, RecursionError) as error:
        raise AttentionLensError(f"{path} is not valid JSON ({_reason(error)}); fix or replace it") from None


def _reason(error: BaseException) -> str:
    """The innermost cause's first line: the validation error, not the wrapper's preamble."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__).rstrip(".:")
