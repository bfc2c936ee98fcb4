"""Bad files and wrong pairings: a clear AttentionLensError (one line from the CLI), never a traceback or data loss."""

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from attention_lens import AttentionLensError, DataConfig, Lens, TrainConfig, load_model, train
from attention_lens.checkpoint import checkpoint_path
from attention_lens.lens_config import IDENTITY_KEY, WEIGHTS_FILE, identity_hash
from attention_lens.cli import main
from attention_lens.storage import read_tensors, write_tensors
from conftest import make_corpus, make_model_dir

pytestmark = pytest.mark.robustness

PACKAGE = Path(__file__).resolve().parents[2] / "attention_lens"
REQUIRED_FIELDS = ["kind", "layers", "heads", "n_layers", "n_heads", "d_model", "d_head", "vocab", "model"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model, a second one of the same shapes, and a lens directory trained on the first."""
    root = tmp_path_factory.mktemp("corrupt")
    model_dir, other_dir = make_model_dir(root / "model"), make_model_dir(root / "other", seed=1)
    data = DataConfig(data=str(make_corpus(root / "corpus")), seq_len=16, holdout=0.25)
    model = load_model(str(model_dir))
    config = TrainConfig(tokens=64, batch_size=4, lr=1e-2, checkpoint_every=1)
    train(Lens.from_model(model, "affine", layers=[1]), data, config, out=root / "lens")
    return model, load_model(str(other_dir)), data, config, root


@pytest.fixture
def lens_dir(trained, tmp_path) -> Path:
    """A fresh copy of the trained lens directory (with its checkpoint) to damage."""
    return Path(shutil.copytree(trained[4] / "lens", tmp_path / "lens"))


def cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def one_line_error(argv, capsys) -> str:
    """Exit 2 and one `error:` line, last (a progress bar may precede an error that comes mid-run)."""
    code, err = cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error:") and sum(l.startswith("error:") for l in lines) == 1, err
    return lines[-1]


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# ----- never overwrite work by accident -------------------------------------------------------------
@pytest.mark.parametrize("leave", ["lens and checkpoint", "checkpoint only", "lens only"])
def test_train_refuses_an_existing_run_without_resume_or_overwrite(trained, lens_dir, capsys, leave):
    model, _, data, _, _ = trained
    if leave == "checkpoint only":
        (lens_dir / "lens.safetensors").unlink()
    if leave == "lens only":
        shutil.rmtree(lens_dir / "checkpoints")
    before = {p: p.read_bytes() for p in lens_dir.rglob("*") if p.is_file()}
    err = one_line_error(["train", "--model", model.name, "--data", data.data, "--out", lens_dir], capsys)
    assert "--resume or --overwrite" in err
    assert {p: p.read_bytes() for p in lens_dir.rglob("*") if p.is_file()} == before


def test_failed_save_leaves_the_old_lens_whole(trained, lens_dir, monkeypatch):
    model = trained[0]
    before = {p.name: p.read_bytes() for p in lens_dir.iterdir() if p.is_file()}

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        Lens.from_model(model, "affine", layers=[0, 1]).save(lens_dir)
    assert {p.name: p.read_bytes() for p in lens_dir.iterdir() if p.is_file()} == before
    assert not [p for p in lens_dir.iterdir() if p.name.startswith(".")], "temp files are removed"


def test_cli_run_that_fails_on_a_full_disk_keeps_the_lens_and_says_so(trained, lens_dir, monkeypatch, capsys):
    model, _, data, _, _ = trained
    weights = (lens_dir / "lens.safetensors").read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    err = one_line_error(["train", "--model", model.name, "--data", data.data, "--seq-len", 16, "--tokens", 64,
                          "--eval-tokens", 0, "--out", lens_dir, "--overwrite"], capsys)
    assert "No space left" in err
    assert (lens_dir / "lens.safetensors").read_bytes() == weights


# ----- refuse wrong pairings ------------------------------------------------------------------------
def test_lens_of_another_model_names_its_model(trained, lens_dir, capsys):
    model, other = trained[0], trained[1]
    with pytest.raises(AttentionLensError, match=re.escape(model.name)):
        Lens.load(lens_dir, other)
    err = one_line_error(["decode", "--lens", lens_dir, "--model", other.name, "hello"], capsys)
    assert f"made for model {model.name!r}" in err


def test_weights_of_another_kind_are_refused(trained, lens_dir, tmp_path):
    model = trained[0]
    Lens.from_model(model, "full", layers=[1]).save(tmp_path / "full")
    shutil.copy(tmp_path / "full" / "lens.safetensors", lens_dir / "lens.safetensors")
    with pytest.raises(AttentionLensError, match=f"affine lens for model {re.escape(repr(model.name))}"):
        Lens.load(lens_dir)


def test_weights_and_config_of_different_saves_are_refused(trained, lens_dir, tmp_path):
    """What a kill between the two renames of a save could leave: same shapes, another lens."""
    model = trained[0]
    Lens.from_model(model, "affine", layers=[0]).save(tmp_path / "layer0")
    shutil.copy(tmp_path / "layer0" / "lens.safetensors", lens_dir / "lens.safetensors")
    with pytest.raises(AttentionLensError, match="different saves"):
        Lens.load(lens_dir)


@pytest.mark.parametrize("version, message", [("1.0.0", "written by attention-lens 1.0.0"),
                                              ("banana", "not an attention-lens version"),
                                              (7, "not an attention-lens version")])
def test_lens_of_another_major_version_is_refused(trained, lens_dir, capsys, version, message):
    edit_config(lens_dir, version=version)
    with pytest.raises(AttentionLensError, match=message):
        Lens.load(lens_dir)
    if version == "1.0.0":
        assert repr(trained[0].name) in one_line_error(["decode", "--lens", lens_dir, "hi"], capsys)


def test_checkpoint_of_another_model_kind_or_version_is_refused(trained, lens_dir):
    model, other, data, config, _ = trained
    with pytest.raises(AttentionLensError, match=f"another model.*{re.escape(repr(model.name))}"):
        train(Lens.from_model(other, "affine", layers=[1]), data, config, out=lens_dir, resume=True)
    with pytest.raises(AttentionLensError, match="different run.*kind"):
        train(Lens.from_model(model, "full", layers=[1]), data, config, out=lens_dir, resume=True)
    path = checkpoint_path(lens_dir)
    tensors, metadata = read_tensors(path, "")
    write_tensors(path, tensors, {**metadata, "version": "3.0.0"})
    with pytest.raises(AttentionLensError, match="written by attention-lens 3.0.0"):
        train(Lens.from_model(model, "affine", layers=[1]), data, config, out=lens_dir, resume=True)


# ----- corrupt files --------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0, 7, 8, 100, 0.5, -1])
def test_truncated_lens_file(lens_dir, keep):
    weights = lens_dir / "lens.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: int(len(raw) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(AttentionLensError, match="corrupt"):
        Lens.load(lens_dir)


@pytest.mark.parametrize("where", ["header", "data"])
def test_garbled_lens_file(lens_dir, where):
    """A flipped bit in the header breaks the format; one in the data only the checksum sees."""
    weights = lens_dir / "lens.safetensors"
    raw = bytearray(weights.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[10 if where == "header" else 8 + header + 5] ^= 0x40
    weights.write_bytes(bytes(raw))
    with pytest.raises(AttentionLensError, match="corrupt"):
        Lens.load(lens_dir)


def test_lens_with_nan_weights_is_refused(lens_dir):
    lens = Lens.load(lens_dir)
    with torch.no_grad():
        lens.bias[0, 1, 3] = float("nan")
    with pytest.raises(AttentionLensError, match="'bias' holds non-finite values; nothing was saved"):
        lens.save(lens_dir)  # save never writes one...
    state = {name: tensor.detach().clone() for name, tensor in lens.state_dict().items()}
    write_tensors(lens_dir / WEIGHTS_FILE, state, {IDENTITY_KEY: identity_hash(lens.config)})  # ...another writer may
    with pytest.raises(AttentionLensError, match="'bias' is not finite"):
        Lens.load(lens_dir)


def _config_cases():
    wrong_types = {"kind": 3, "layers": "1", "heads": [1.5], "n_layers": "2", "n_heads": True, "d_model": 32.0,
                   "d_head": None, "vocab": [], "model": "m", "training": [], "version": 1}
    cases = [(f"missing {name}", {name: None}) for name in REQUIRED_FIELDS]
    cases += [(f"{name} of the wrong type", {name: value}) for name, value in wrong_types.items()]
    cases += [("negative width", {"d_model": -1}), ("zero heads", {"n_heads": 0}), ("layer out of range", {"layers": [5]}),
              ("unsorted heads", {"heads": [2, 1]}), ("no heads", {"heads": []}), ("unknown kind", {"kind": "magic"}),
              ("huge width", {"d_model": 10**15}), ("absurd width", {"d_model": 10**40})]
    return cases


@pytest.mark.parametrize("case, changes", _config_cases(), ids=[c for c, _ in _config_cases()])
def test_config_with_missing_or_wrong_fields(lens_dir, case, changes):
    config = json.loads((lens_dir / "config.json").read_text())
    for name, value in changes.items():
        if value is None and case.startswith("missing"):
            del config[name]
        else:
            config[name] = value
    (lens_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(AttentionLensError):
        Lens.load(lens_dir)


@pytest.mark.parametrize("text", [b"", b"{", b"[]", b"null", b"\xff\xfe{}", b"[" * 100_000, b'{"n_layers": 1' + b"9" * 5000 + b"}"],
                         ids=["empty", "cut", "list", "null", "not-utf8", "deep", "long-number"])
def test_config_that_is_not_a_json_object(lens_dir, text):
    (lens_dir / "config.json").write_bytes(text)
    with pytest.raises(AttentionLensError, match="config.json"):
        Lens.load(lens_dir)


def test_corrupt_lens_gives_one_cli_line(lens_dir, capsys):
    (lens_dir / "lens.safetensors").write_bytes(b"\x00" * 40)
    assert "corrupt" in one_line_error(["decode", "--lens", lens_dir, "hi"], capsys)


@pytest.mark.parametrize("damage", ["truncate", "flip", "metadata"])
def test_corrupt_checkpoint_refuses_resume_in_one_line(trained, lens_dir, capsys, damage):
    model, _, data, _, _ = trained
    path = checkpoint_path(lens_dir)
    if damage == "metadata":
        tensors, metadata = read_tensors(path, "")
        write_tensors(path, tensors, {**metadata, "progress": "{not json"})
    else:
        raw = bytearray(path.read_bytes())
        if damage == "flip":
            raw[-3] ^= 0x01  # the last byte of the RNG state: only the checksum can tell
        path.write_bytes(bytes(raw[: len(raw) // 2] if damage == "truncate" else raw))
    err = one_line_error(["train", "--model", model.name, "--data", data.data, "--seq-len", 16, "--tokens", 64,
                          "--layers", 1, "--lr", 1e-2, "--holdout", 0.25, "--eval-tokens", 0, "--out", lens_dir,
                          "--resume"], capsys)
    assert "corrupt" in err and "--overwrite" in err


def test_checkpoint_of_a_different_run_names_the_setting(trained, lens_dir, capsys):
    model, _, data, _, _ = trained
    err = one_line_error(["train", "--model", model.name, "--data", data.data, "--seq-len", 16, "--tokens", 64,
                          "--layers", 1, "--lr", 0.5, "--holdout", 0.25, "--eval-tokens", 0, "--out", lens_dir,
                          "--resume"], capsys)
    assert "different run" in err and "lr" in err


def test_nothing_is_unpickled():
    """safetensors and JSON only: torch.load at most with weights_only=True, no pickle at all."""
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        assert not re.search(r"\bimport (c?pickle|dill|joblib)\b|allow_pickle=True|weights_only=False", source), path
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, (path, call)
