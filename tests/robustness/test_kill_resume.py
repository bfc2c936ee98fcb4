"""kill -9 at any moment, then --resume: the final lens is bit-identical to an uninterrupted run's.

Real subprocesses and real SIGKILLs: one sent from outside at a random moment, three injected at chosen
file writes by kill_points.py (a half-written checkpoint temp file, a whole one not yet renamed, and the
gap between the final lens.safetensors and its config.json). ROBUSTNESS_SEED replays a failing draw.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from attention_lens import AttentionLensError, Lens
from attention_lens.cli import main
from attention_lens.storage import read_tensors
from conftest import make_corpus, make_model_dir

pytestmark = pytest.mark.robustness

REPO = Path(__file__).resolve().parents[2]
KILL_POINTS = Path(__file__).with_name("kill_points.py")
STEPS, BATCH, SEQ_LEN = 14, 2, 16
SEED = int(os.environ.get("ROBUSTNESS_SEED", random.randrange(10**6)))
# Generous: on a loaded 2-core machine importing torch and transformers alone has taken over a minute.
STARTUP_LIMIT_S = 600


def start(argv: list[str], log: Path, **faults: str) -> subprocess.Popen:
    """The CLI in a fresh interpreter (through kill_points.py when faults are given), one thread, CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **faults)
    command = [sys.executable, str(KILL_POINTS)] if faults else [sys.executable, "-m", "attention_lens"]
    return subprocess.Popen(command + argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def finish(process: subprocess.Popen, log: Path) -> int:
    code = process.wait(timeout=STARTUP_LIMIT_S)
    assert code in (0, -signal.SIGKILL), f"exit {code}, seed {SEED}:\n{log.read_text()[-2000:]}"
    return code


def checkpoint_step(out: Path) -> int | None:
    """The step of out's checkpoint, read the way --resume reads it; None when there is none yet."""
    path = out / "checkpoints" / "last.safetensors"
    if not path.exists():
        return None
    return json.loads(read_tensors(path, "")[1]["progress"])["step"]


def temp_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob(".*") if p.is_file())


def test_killed_runs_resume_to_the_identical_lens(tmp_path, capsys):
    model, corpus = make_model_dir(tmp_path / "model"), make_corpus(tmp_path / "corpus")
    args = ["train", "--model", str(model), "--data", str(corpus), "--kind", "affine", "--lr", "1e-2",
            "--tokens", str(STEPS * BATCH * SEQ_LEN), "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN),
            "--holdout", "0.25", "--checkpoint-every", "1", "--eval-tokens", "0"]
    log = tmp_path / "stderr.log"
    straight, out = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = start(args + ["--out", str(straight)], tmp_path / "straight.log")
    draw = random.Random(SEED)
    kills = []

    # 1. From outside, at a random moment once two checkpoints exist: mid-step, mid-write or between.
    victim = start(args + ["--out", str(out)], log, SLOW_WRITES="0.2")
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while (checkpoint_step(out) or 0) < 2 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert checkpoint_step(out) is not None or victim.poll() is not None, \
        f"no checkpoint after {STARTUP_LIMIT_S} s: the machine is too loaded for this test"
    time.sleep(draw.uniform(0, 0.3))
    victim.send_signal(signal.SIGKILL)
    assert finish(victim, log) == -signal.SIGKILL, "the run ended before the kill; slow it down"
    step = checkpoint_step(out)
    kills.append(f"outside kill -9 after checkpoint {step}")
    assert not (out / "lens.safetensors").exists()

    # 2, 3. Inside the k-th checkpoint write of a resumed run: the previous checkpoint must survive whole.
    for when in ("half", "whole"):
        k = draw.randint(1, 3)
        resumed = start(args + ["--out", str(out), "--resume"], log, KILL_AT=f"last.safetensors:{k}:{when}")
        assert finish(resumed, log) == -signal.SIGKILL
        assert checkpoint_step(out) == step + k - 1, f"seed {SEED}"
        assert temp_files(out), "the killed write should have left its temp file"
        step += k - 1
        kills.append(f"{when}-written checkpoint of step {step + 1}, before its rename")

    # 4. Between the final lens.safetensors rename and config.json: a lens directory in no state to load.
    resumed = start(args + ["--out", str(out), "--resume"], log, KILL_AT="lens.safetensors:1:after")
    assert finish(resumed, log) == -signal.SIGKILL
    assert checkpoint_step(out) == STEPS and (out / "lens.safetensors").exists()
    kills.append("after the final lens.safetensors, before config.json")
    with pytest.raises(AttentionLensError, match="no config.json"):
        Lens.load(out)
    assert main(args + ["--out", str(out)]) == 2  # a fresh run refuses to start over the killed one
    assert "--resume" in capsys.readouterr().err

    assert finish(start(args + ["--out", str(out), "--resume"], log), log) == 0
    assert finish(uninterrupted, tmp_path / "straight.log") == 0
    assert (out / "lens.safetensors").read_bytes() == (straight / "lens.safetensors").read_bytes()
    assert Lens.load(out).config.training == Lens.load(straight).config.training
    assert not temp_files(out), f"stale temp files of killed writes are left: {temp_files(out)}, seed {SEED}"
    print(f"seed {SEED}: resumed bit-identically after {len(kills)} kills: " + "; ".join(kills))
