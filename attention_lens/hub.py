"""Lenses laid out like Hugging Face repositories: the model card `Lens.save_pretrained` writes, the Hub download
behind `Lens.from_pretrained`."""

from __future__ import annotations

from pathlib import Path

from .kinds import get_kind
from .lens_config import CONFIG_FILE, WEIGHTS_FILE, LensConfig, parameter_bytes
from .sources import REPO_ID, hub_snapshot
from .storage import atomic_write

CARD_FILE = "README.md"


def write_card(directory: Path, config: LensConfig, evaluation: dict | None = None) -> Path:
    """Write the README.md model card of a saved lens; `evaluation` adds numbers (e.g. eval's summary)."""
    card = model_card(config, evaluation)
    atomic_write(directory / CARD_FILE, lambda path: Path(path).write_text(card, encoding="utf-8"))
    return directory / CARD_FILE


def resolve(name_or_path: str | Path, revision: str | None = None) -> Path:
    """The local directory of a lens: the path itself, else the Hub repo `owner/name` (downloaded once, then
    cached)."""
    path = Path(name_or_path).expanduser()
    if path.exists() or not REPO_ID.match(str(name_or_path)):
        return path
    return _download(str(name_or_path), revision)


def _download(repo_id: str, revision: str | None) -> Path:
    return hub_snapshot(repo_id, revision, [CONFIG_FILE, "*.safetensors", CARD_FILE], "lens directory")


def model_card(config: LensConfig, evaluation: dict | None = None) -> str:
    """A README.md for a lens directory: which model, which data, how many tokens, the numbers it scored."""
    model = config.model
    training = config.training
    data = training.get("data") or {}
    rows = [
        ("model", f"`{model.get('name')}` ({model.get('model_type')}, {config.n_layers} layers x {config.n_heads} "
                  f"heads, d_head {config.d_head}, d_model {config.d_model}, vocab {config.vocab})"),
        ("lens kind", f"`{config.kind}`: {get_kind(config.kind).description}"),
        ("layers", _ranges(config.layers, config.n_layers)),
        ("heads per layer", _ranges(config.heads, config.n_heads)),
        ("parameters", f"{parameter_bytes(config) // 4:,}"),
    ]
    if training:
        method = "closed-form ridge fit" if training.get("method") == "fit" else "KL training"
        rows += [
            ("method", method + "".join(f", {k} {training[k]}" for k in ("objective", "optimizer", "lr", "ridge")
                                        if k in training)),
            ("data", f"`{data.get('data')}` (windows of {data.get('seq_len')} tokens, {data.get('holdout')} of the "
                     "documents held out by a hash of their id)"),
            ("tokens seen", f"{tokens:,}" if isinstance(tokens := training.get("tokens_seen"), int) else "unknown"),
        ]
    else:
        rows.append(("training", "none: this lens kind needs no training"))
    rows.append(("attention-lens", config.version))
    numbers = _numbers(training, evaluation)
    lines = [
        "---",
        "library_name: attention-lens",
        "tags:",
        *(f"- {tag}" for tag in ("attention-lens", "interpretability", "attention-heads", f"{config.kind}-lens")),
        "---",
        "",
        f"# {config.kind} attention lens for {model.get('name') or 'an unnamed model'}",
        "",
        "Per-head lenses made with attention-lens: each maps one attention head's output z_h (the head's",
        "slice of the attention output projection's input) to vocabulary logits, for every covered head at once.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
    ]
    if numbers:
        lines += ["## Evaluation", "", "Numbers of the training record (KL and losses, in nats) and those given to "
                  "`save_pretrained(evaluation=...)`, e.g. the summary of `attention-lens eval`.", "",
                  "| metric | value |", "|---|---|",
                  *(f"| {name} | {value:.4g} |" for name, value in numbers.items()), ""]
    lines += [
        "## Use",
        "",
        "```python",
        "import attention_lens as al",
        "",
        f'model = al.load_model("{model.get("name") or "smollm2-135m"}")',
        'lens = al.Lens.from_pretrained("path/or/owner-name", model)  # this directory or its Hub repo',
        'al.decode(model, lens, "The capital of France is")',
        "```",
        "",
        "The lens stores a fingerprint of its model (shapes and hashes of W_U and W_O: "
        f"`{str(model.get('w_u_sha256'))[:12]}…`, `{str(model.get('w_o_sha256'))[:12]}…`) and refuses any other model.",
        "",
        f"Files: `{CONFIG_FILE}` (what the lens is and how it was made), `{WEIGHTS_FILE}` (its parameters).",
        "",
    ]
    return "\n".join(lines)


def _numbers(training: dict, evaluation: dict | None) -> dict[str, float]:
    """Scores worth a table: KL and loss values of the training record, then every number of `evaluation`."""
    numbers = {k: float(v) for k, v in training.items()
               if ("kl" in k or "loss" in k) and isinstance(v, (int, float)) and not isinstance(v, bool)}
    numbers.update({k: float(v) for k, v in (evaluation or {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return numbers


def _ranges(values: list[int], count: int) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'; every index -> 'all N'."""
    if values == list(range(count)):
        return f"all {count}"
    spans: list[list[int]] = []
    for value in values:
        if spans and value == spans[-1][1] + 1:
            spans[-1][1] = value
        else:
            spans.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
