"""Where models come from: local GGUF files (dequantized once, cached by hash) and Hub ids read offline from a
real Hugging Face cache layout."""

import hashlib
import json
import os
import shutil

import pytest
import torch

import attention_lens as al
import attention_lens.models as models
import attention_lens.sources as sources
from attention_lens import AttentionLensError, load_model
from conftest import make_model_dir
from gguf_tiny import write_tiny_llama_gguf


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "attention-lens-cache"
    monkeypatch.setattr(sources, "CACHE_DIR", directory)
    return directory


@pytest.fixture
def gguf_loads(monkeypatch):
    """The GGUF files transformers was asked to dequantize."""
    calls = []
    load = models._from_pretrained

    def counting(directory, dtype, gguf_file=None):
        if gguf_file is not None:
            calls.append(gguf_file)
        return load(directory, dtype, gguf_file)

    monkeypatch.setattr(models, "_from_pretrained", counting)
    return calls


def test_gguf_file_is_dequantized_once_into_a_cache_keyed_by_its_hash(tmp_path, cache_dir, gguf_loads):
    from transformers import AutoModelForCausalLM

    gguf, original = write_tiny_llama_gguf(tmp_path / "tiny-llama.Q8_0.gguf")
    model = load_model(str(gguf))
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]
    assert [p.name for p in (cache_dir / "models").iterdir()] == [f"tiny-llama.Q8_0-{digest}"]
    assert gguf_loads == [gguf.name] and model.name == str(gguf)

    ids = model.encode("The quick brown fox")
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        logits = model.hf(ids).logits
        assert torch.equal(logits, direct(ids).logits)  # the cache holds exactly what transformers dequantizes
        assert (logits - original(ids).logits).abs().max() < 0.05  # and that is the model, up to Q8_0 rounding
    assert model.tokenizer.decode(ids[0]) == "The quick brown fox"

    load_model(str(gguf))  # from the cache
    shutil.copy(gguf, tmp_path / "renamed.gguf")
    load_model(str(tmp_path / "renamed.gguf"))  # the same bytes under another name: the same cache entry
    assert gguf_loads == [gguf.name]

    with open(gguf, "ab") as f:  # other bytes: another cache entry
        f.write(b"\0" * 32)
    load_model(str(gguf))
    assert gguf_loads == [gguf.name, gguf.name] and len(list((cache_dir / "models").iterdir())) == 2


def _write_hub_cache(hub_cache, repo_id, snapshots, refs):
    """The layout huggingface_hub itself writes: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/<name>."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    for commit, source in snapshots.items():
        for file in sorted(source.iterdir()):
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / file.name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    for name, commit in refs.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache at HF_HOME=tmp holding org/tiny: main (seed 0) and the tag v2 (seed 1)."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))  # read at import; the env is for children
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    main, v2 = "a" * 40, "b" * 40
    _write_hub_cache(home / "hub", "org/tiny",
                     {main: make_model_dir(tmp_path / "seed0", seed=0), v2: make_model_dir(tmp_path / "seed1", seed=1)},
                     {"main": main, "v2": v2})
    return {"main": main, "v2": v2, "dirs": (tmp_path / "seed0", tmp_path / "seed1")}


def _same_weights(model, directory):
    reference = load_model(str(directory))
    return torch.equal(model.hf.lm_head.weight, reference.hf.lm_head.weight)


def test_hub_id_loads_offline_from_the_hub_cache(offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder named org/tiny
    model = load_model("org/tiny")
    assert model.name == "org/tiny" and model.revision is None
    assert _same_weights(model, offline_hub["dirs"][0])
    tagged = load_model("org/tiny", revision="v2")
    assert _same_weights(tagged, offline_hub["dirs"][1]) and tagged.fingerprint()["revision"] == "v2"
    assert _same_weights(load_model("org/tiny", revision=offline_hub["v2"]), offline_hub["dirs"][1])


def test_hub_id_neither_cached_nor_reachable_is_one_clear_error(offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AttentionLensError, match=r"'org/absent' is not a local model .*Hub cannot be reached"):
        load_model("org/absent")
    with pytest.raises(AttentionLensError, match="cannot be reached to fetch it at revision 'v3'"):
        load_model("org/tiny", revision="v3")


def test_a_name_that_is_neither_local_nor_a_hub_id_says_what_is_accepted(tmp_path):
    with pytest.raises(AttentionLensError, match=r"no model .*\.gguf file, or a Hugging Face Hub id"):
        load_model(str(tmp_path / "missing-dir"))


def test_cli_reads_a_hub_model_and_a_hub_lens_offline(offline_hub, tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["decode", "--model", "org/tiny", "--revision", "v2", "--lens", "dla", "--json",
                              "The quick brown fox"], capsys)
    assert code == 0, err
    code, expected, err = run_cli(["decode", "--model", offline_hub["dirs"][1], "--lens", "dla", "--json",
                                   "The quick brown fox"], capsys)
    assert json.loads(out)["heads"] == json.loads(expected)["heads"]

    lens = al.Lens.from_model(load_model("org/tiny", revision="v2"), "affine", layers=[1])
    with torch.no_grad():
        lens.bias.normal_()
    lens.save(tmp_path / "lens")
    _write_hub_cache(tmp_path / "hf-home" / "hub", "org/tiny-lens", {"c" * 40: tmp_path / "lens"}, {"main": "c" * 40})
    code, out, err = run_cli(["decode", "--lens", "org/tiny-lens", "--reading", "raw", "--json", "The quick brown fox"], capsys)
    assert code == 0, err  # the lens names its model (org/tiny) and the revision it was made at (v2)
    ours = al.decode(lens.model, lens, "The quick brown fox", k=10)
    assert json.loads(out)["heads"] == json.loads(json.dumps(ours.to_json()["heads"]))

    code, out, err = run_cli(["decode", "--model", "org/absent", "--lens", "dla", "The quick"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Hub cannot be reached" in err
