"""Bring your own activations: the README's TransformerLens and nnsight snippets, run as written on SmolLM2,
decode like attention-lens's own hooks."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

import attention_lens as al
from attention_lens.heads import run_with_heads

README = Path(__file__).resolve().parents[1] / "README.md"
LAYER, HEAD = 14, 4  # what the snippets decode


@pytest.fixture(scope="module")
def smollm2():
    return al.load_model("smollm2-135m")


def readme_snippet(marker: str) -> str:
    """The README's python block that contains `marker`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    (block,) = [b for b in blocks if marker in b]
    return block


def run_snippet(code: str, model, monkeypatch, tmp_path) -> tuple[dict, str]:
    """Execute a README snippet, its al.load_model handing back the already loaded model; (names, stdout).

    From a file of its own: nnsight reads the source of a `with ...trace()` block back from its file.
    """
    monkeypatch.setattr(al, "load_model", lambda name: model)
    path = tmp_path / "snippet.py"
    path.write_text(code, encoding="utf-8")
    names: dict = {"__name__": "snippet"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(path), "exec"), names)
    return names, printed.getvalue().removesuffix("\n")


def our_logits(model, text: str = "The capital of France is") -> torch.Tensor:
    lens = al.Lens.logit(model)
    _, capture = run_with_heads(model, model.encode(text), [LAYER])
    return lens.logits(capture.heads[LAYER].z, LAYER)  # (batch, pos, head, vocab)


def test_nnsight_snippet_decodes_like_our_hooks(smollm2, monkeypatch, tmp_path):
    pytest.importorskip("nnsight")
    ours = our_logits(smollm2)
    names, printed = run_snippet(readme_snippet("nnsight.TransformersModel"), smollm2, monkeypatch, tmp_path)
    torch.testing.assert_close(names["nnsight_logits"], ours, atol=0, rtol=0)
    assert printed == smollm2.token_text(int(ours[0, -1, HEAD].argmax()))


def test_transformer_lens_snippet_decodes_like_our_hooks(smollm2, monkeypatch, tmp_path):
    """Last in this file: the bridge wraps the model's modules in place."""
    pytest.importorskip("transformer_lens")
    ours = our_logits(smollm2)
    names, printed = run_snippet(readme_snippet("TransformerBridge"), smollm2, monkeypatch, tmp_path)
    theirs = names["tl_logits"]
    assert theirs.shape == ours.shape == (1, 5, smollm2.n_heads, smollm2.vocab)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert printed == smollm2.token_text(int(ours[0, -1, HEAD].argmax()))
