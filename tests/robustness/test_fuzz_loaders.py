"""Fuzzing: random bytes and random JSON into every reader never raise anything but AttentionLensError.

Readers: load_documents (.txt, .jsonl, directories), Lens.load (config.json, lens.safetensors) and
load_checkpoint. Each test prints how many inputs it tried (pytest -s); hypothesis runs derandomized so
CI is repeatable, ROBUSTNESS_FUZZ_EXAMPLES=N explores further with fresh random inputs.
"""

import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attention_lens import AttentionLensError, Lens
from attention_lens.checkpoint import Progress, checkpoint_path, load_checkpoint, save_checkpoint
from attention_lens.data import load_documents
from conftest import SAMPLE_TEXT, make_tiny_model

pytestmark = pytest.mark.robustness

EXAMPLES = int(os.environ.get("ROBUSTNESS_FUZZ_EXAMPLES", 0))


def fuzz(examples: int):
    return settings(max_examples=EXAMPLES or examples, derandomize=not EXAMPLES, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
TEXTISH = st.one_of(st.binary(max_size=600), st.text(max_size=600).map(lambda t: t.encode("utf-8", "surrogatepass")),
                    st.sampled_from([SAMPLE_TEXT.encode(), b"\xef\xbb\xbf", b"\n\n", b"\x00"]))
JSONL_LINE = st.one_of(JSON.map(json.dumps), st.fixed_dictionaries({"text": st.text(max_size=40)}).map(json.dumps),
                       st.text(max_size=30), st.just('{"text": "\\ud800"}'))


def report(name: str, tried: int) -> None:
    print(f"fuzz {name}: {tried} inputs tried")
    assert tried > 0


def check_documents(documents) -> None:
    assert documents and all(d.text.strip() for d in documents)
    for document in documents:
        document.text.encode("utf-8")  # no lone surrogate reaches the tokenizer


def test_random_bytes_as_text_or_jsonl(tmp_path):
    tried = 0

    @fuzz(300)
    @given(content=TEXTISH, suffix=st.sampled_from([".txt", ".jsonl"]), skip=st.booleans())
    def check(content, suffix, skip):
        nonlocal tried
        tried += 1
        path = tmp_path / f"data{suffix}"
        path.write_bytes(content)
        try:
            check_documents(load_documents(str(path), skip_bad_lines=skip))
        except AttentionLensError:
            pass

    check()
    report("text/jsonl bytes", tried)


def test_random_json_lines(tmp_path):
    tried = 0

    @fuzz(300)
    @given(lines=st.lists(JSONL_LINE, max_size=8), ending=st.sampled_from(["\n", "\r\n"]), skip=st.booleans())
    def check(lines, ending, skip):
        nonlocal tried
        tried += 1
        path = tmp_path / "data.jsonl"
        path.write_bytes(ending.join(lines).encode("utf-8", "surrogatepass"))
        try:
            documents = load_documents(str(path), skip_bad_lines=skip)
        except AttentionLensError as error:
            assert skip or "data.jsonl" in str(error)
            return
        check_documents(documents)
        assert len(documents) <= len(lines)

    check()
    report("jsonl lines", tried)


def test_random_directories(tmp_path):
    tried = 0
    names = st.sampled_from(["a.txt", "b.txt", "sub/c.txt", "d.md", ".hidden.txt"])

    @fuzz(100)
    @given(files=st.dictionaries(names, TEXTISH, max_size=4))
    def check(files):
        nonlocal tried
        tried += 1
        root = tmp_path / "corpus"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        for name, content in files.items():
            (root / name).parent.mkdir(exist_ok=True)
            (root / name).write_bytes(content)
        try:
            check_documents(load_documents(str(root)))
        except AttentionLensError:
            pass

    check()
    report("directories", tried)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model, a lens of it saved, and a checkpoint of a one-step run, to mutate."""
    model = make_tiny_model("llama")
    root = tmp_path_factory.mktemp("fuzz")
    lens = Lens.from_model(model, "affine", layers=[1])
    with torch.no_grad():
        lens.bias.normal_()
    lens.save(root / "lens")
    optimizer = torch.optim.Adam(lens.parameters())
    lens.bias.sum().backward()
    optimizer.step()
    save_checkpoint(root / "lens", lens, optimizer, Progress(step=1, windows=4, tokens=64, loss=0.5), RUN)
    return model, root / "lens"


RUN = {"train": {"lr": 1e-3}, "kind": "affine", "layers": [1]}


def mutations(raw: bytes):
    """The file cut short, bytes overwritten somewhere, or random bytes altogether."""
    position = st.integers(0, len(raw) - 1)
    cut = st.integers(0, len(raw) - 1).map(lambda n: raw[:n])
    overwrite = st.tuples(position, st.binary(min_size=1, max_size=8)).map(
        lambda p: raw[: p[0]] + p[1] + raw[p[0] + len(p[1]):])
    return st.one_of(cut, overwrite, st.binary(max_size=200))


def test_random_config_json(saved, tmp_path):
    lens_dir = shutil.copytree(saved[1], tmp_path / "lens")
    valid = json.loads((lens_dir / "config.json").read_text())
    fields = st.sampled_from(sorted(valid) + ["extra"])
    edits = st.dictionaries(fields, st.one_of(st.just("<delete>"), JSON, st.integers(-3, 3), st.lists(st.integers(-2, 5))),
                            min_size=1, max_size=3)
    tried = 0

    @fuzz(300)
    @given(document=st.one_of(JSON.map(json.dumps), edits.map(lambda e: json.dumps(
        {k: v for k, v in {**valid, **e}.items() if v != "<delete>"}))))
    def check(document):
        nonlocal tried
        tried += 1
        (lens_dir / "config.json").write_text(document)
        try:
            Lens.load(lens_dir)
        except AttentionLensError:
            pass

    check()
    report("config.json", tried)


def test_random_lens_file(saved, tmp_path):
    lens_dir = shutil.copytree(saved[1], tmp_path / "lens")
    raw = (lens_dir / "lens.safetensors").read_bytes()
    tried = 0

    @fuzz(300)
    @given(content=mutations(raw))
    def check(content):
        nonlocal tried
        tried += 1
        (lens_dir / "lens.safetensors").write_bytes(content)
        try:
            lens = Lens.load(lens_dir)
        except AttentionLensError:
            return
        assert all(torch.isfinite(p).all() for p in lens.parameters())

    check()
    report("lens.safetensors", tried)


def test_random_checkpoint(saved, tmp_path):
    model = saved[0]
    out = shutil.copytree(saved[1], tmp_path / "lens")
    raw = checkpoint_path(out).read_bytes()
    tried = 0

    @fuzz(200)
    @given(content=mutations(raw))
    def check(content):
        nonlocal tried
        tried += 1
        checkpoint_path(out).write_bytes(content)
        lens = Lens.from_model(model, "affine", layers=[1])
        try:
            load_checkpoint(out, lens, torch.optim.Adam(lens.parameters()), RUN)
        except AttentionLensError:
            pass

    check()
    report("checkpoint", tried)
