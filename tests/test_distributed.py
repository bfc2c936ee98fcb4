"""torchrun with 2 gloo processes on CPU trains the same lens as 1 process; a dead rank leaves a resumable run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_corpus, make_model_dir


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    return make_model_dir(root / "model"), make_corpus(root / "corpus", documents=16), root


def _train_args(model, corpus, out, tokens=8 * 16 * 4, extra=()):
    return ["-m", "attention_lens", "train", "--model", str(model), "--data", str(corpus), "--seq-len", "16",
            "--batch-size", "4", "--tokens", str(tokens), "--optimizer", "sgd", "--lr", "0.5", "--eval-tokens", "0",
            "--checkpoint-every", "1", "--out", str(out), "--json", *extra]


def _torchrun(nproc: int, args: list[str], **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _lens(out: Path) -> dict:
    return load_file(out / "lens.safetensors")


def test_two_processes_match_one(paths):
    model, corpus, root = paths
    single = subprocess.run([sys.executable, *_train_args(model, corpus, root / "one")], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    double = _torchrun(2, _train_args(model, corpus, root / "two"))
    stdout, stderr = double.communicate(timeout=600)
    assert double.returncode == 0, stderr
    assert json.loads(stdout)["steps"] == 8  # exactly one JSON document, from rank 0 only
    one, two = _lens(root / "one"), _lens(root / "two")
    assert one.keys() == two.keys()
    for name in one:
        assert one[name].abs().max() > 0  # training moved the lens
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)
    config = json.loads((root / "two" / "config.json").read_text())
    assert config["training"]["world_size"] == 2 and config["training"]["batch_size"] == 4


def test_a_dead_rank_stops_the_run_and_it_resumes(paths):
    model, corpus, root = paths
    out = root / "killed"
    tokens = 40 * 16 * 4
    run = _torchrun(2, _train_args(model, corpus, out, tokens=tokens), start_new_session=True)
    checkpoint = out / "checkpoints" / "last.safetensors"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), "no checkpoint appeared"
    workers = _children_with_rank(run.pid, rank="1")
    assert workers, "rank 1 not found"
    os.kill(workers[0], signal.SIGKILL)
    run.communicate(timeout=300)
    assert run.returncode != 0  # torchrun reports the failure and stops the other rank
    assert not (out / "lens.safetensors").exists() or checkpoint.exists()
    resumed = subprocess.run([sys.executable, *_train_args(model, corpus, out, tokens=tokens, extra=["--resume"])],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == 40


def _children_with_rank(parent: int, rank: str) -> list[int]:
    """Worker processes below `parent` whose environment says RANK=rank."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().split()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
            if _descends_from(int(entry.name), parent):
                found.append(int(entry.name))
    return found


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def test_head_sharding_matches_one_process(paths):
    """--shard-heads: each rank trains its own layers on every window; the gathered lens is the same."""
    model, corpus, root = paths
    single = subprocess.run([sys.executable, *_train_args(model, corpus, root / "whole", tokens=4 * 16 * 4)],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    sharded = _torchrun(2, _train_args(model, corpus, root / "sharded", tokens=4 * 16 * 4, extra=["--shard-heads"]))
    _, stderr = sharded.communicate(timeout=600)
    assert sharded.returncode == 0, stderr
    shards = sorted(p.name for p in (root / "sharded" / "checkpoints").iterdir())
    assert shards == ["shard-0-of-2.step000000004.safetensors", "shard-1-of-2.step000000004.safetensors"]
    whole, parts = _lens(root / "whole"), _lens(root / "sharded")
    for name in whole:
        # The sharded run rebuilds the targets from the gathered final residual: equal up to fp32 rounding.
        torch.testing.assert_close(parts[name], whole[name], atol=1e-4, rtol=1e-3)
    # The shards resume (a longer budget continues from step 4).
    more = _torchrun(2, _train_args(model, corpus, root / "sharded", tokens=6 * 16 * 4,
                                    extra=["--shard-heads", "--resume"]))
    stdout, stderr = more.communicate(timeout=600)
    assert more.returncode == 0, stderr
    assert json.loads(stdout)["steps"] == 6
