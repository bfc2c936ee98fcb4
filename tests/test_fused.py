"""The fused per-chunk statistics: the compiled kernel gives the eager math's numbers, the tiled scorer gives the
whole-row scores through it, and a compiler failure falls back to the eager math with one warning."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from attention_lens import fused
from attention_lens.fidelity_tiles import GROUP
from conftest import make_tiny_model
from test_evaluate import assert_same_scores, perturbed_lens, tiled_and_whole


def tile(dtype: torch.dtype, chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Base-2 logits shifted to their maximum, as a sweep holds them, and a probability row per row."""
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(3, 5, chunk, generator=generator) * 4 - 8
    p = torch.softmax(torch.randn(5, chunk, generator=generator) * 3, -1)
    return y.to(dtype), p.to(dtype)


def direct(y: torch.Tensor, p: torch.Tensor) -> dict[str, torch.Tensor]:
    y, p = y.double(), p.double()
    n = y.shape[-1] // GROUP
    strided = torch.stack([y[..., j::n][..., :GROUP].amax(-1) for j in range(n)], -1)
    return {"sum_exp": (2 ** y).sum(-1), "weighted": (2 ** y * y).sum(-1), "cross": (p * y).sum(-1),
            "maxima": torch.cat([strided, y[..., n * GROUP:]], -1), "p_mass": p.sum(-1)}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_equal_a_direct_computation(monkeypatch, compiled, dtype):
    """Every sum in fp32 from the tile's own values (bf16 tiles too: their terms are not rounded to bf16), and the
    group maxima of `_Groups` (a chunk of 1,000 tokens: 125 strided groups of 8; 1,003: three leftovers)."""
    monkeypatch.setattr(fused, "COMPILE_MIN_ELEMENTS", 0 if compiled else math.inf)
    monkeypatch.delenv(fused.DISABLE_VARIABLE, raising=False)
    for chunk in (1000, 1003):
        y, p = tile(dtype, chunk)
        got = fused.chunk_statistics(y, p, GROUP)
        for name, value in direct(y, p).items():
            torch.testing.assert_close(getattr(got, name).double(), value, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{name}, chunk {chunk}: {m}")
        plain = fused.chunk_statistics(y)
        assert plain.weighted is None and plain.cross is None and plain.maxima is None
        torch.testing.assert_close(plain.sum_exp, got.sum_exp)


def test_tiles_through_the_compiled_kernel_give_the_whole_row_scores(monkeypatch):
    monkeypatch.setattr(fused, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.delenv(fused.DISABLE_VARIABLE, raising=False)
    assert_same_scores(*tiled_and_whole(perturbed_lens(make_tiny_model("llama"), "affine")))
    assert not fused._compile_failed


def test_a_compiler_failure_falls_back_to_the_eager_math_once(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(fused, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(fused, "_compiled", {fused._statistics: broken})
    monkeypatch.setattr(fused, "_compile_failed", False)
    monkeypatch.delenv(fused.DISABLE_VARIABLE, raising=False)
    y, p = tile(torch.float32)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        first = fused.chunk_statistics(y, p, GROUP)
        second = fused.chunk_statistics(y, p, GROUP)
    assert [r.getMessage() for r in caplog.records] == [
        "compiling a fused kernel failed (RuntimeError: no C++ compiler found); running eagerly, which is slower"]
    expected = fused._statistics(y, p, GROUP)
    for got in (first, second):
        torch.testing.assert_close(got.sum_exp, expected.sum_exp)
        torch.testing.assert_close(got.cross, expected.cross)


def test_compiling_raises_no_warning(monkeypatch):
    """The CLI's tests run with warnings as errors: Inductor's own deprecation warnings must not surface (they
    would turn into a compiler failure and the slow path)."""
    import warnings

    monkeypatch.setattr(fused, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_compile_failed", False)
    monkeypatch.delenv(fused.DISABLE_VARIABLE, raising=False)
    torch._dynamo.reset()
    y, p = tile(torch.bfloat16, 777)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused.chunk_statistics(y, p, GROUP)
    assert not fused._compile_failed


@pytest.mark.parametrize("length", [64, 67])
def test_group_members_are_the_tokens_whose_maximum_each_group_holds(length):
    values = torch.randn(3, length, generator=torch.Generator().manual_seed(4))
    maxima = fused.group_maxima(values, GROUP)
    groups = torch.arange(maxima.shape[-1]).expand(3, -1)
    ids, valid = fused.group_members(groups, length, GROUP)
    members = values.gather(-1, ids).masked_fill(~valid, -torch.inf).unflatten(-1, (-1, GROUP))
    torch.testing.assert_close(members.amax(-1), maxima)
    assert sorted(ids[0][valid[0]].tolist()) == list(range(length))  # every token in exactly one group
