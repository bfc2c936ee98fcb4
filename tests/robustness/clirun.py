"""The real `attention-lens` CLI in a fresh interpreter, for tests that need a process of its own (signals, a
server, a traceback that would escape main())."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 180  # importing torch and transformers takes seconds alone, minutes on a machine shared by many


@dataclass
class Finished:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.err.strip().splitlines()

    def assert_one_line_error(self, *fragments: str) -> None:
        """Exit 2 and exactly one stderr line, starting 'error:', holding every fragment; no traceback."""
        assert self.code == 2, f"exit {self.code}:\n{self.err[-3000:]}"
        assert "Traceback" not in self.err and len(self.lines) == 1 and self.lines[0].startswith("error:"), self.err
        for fragment in fragments:
            assert fragment in self.err, f"{fragment!r} not in {self.err!r}"


def environment() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), COLUMNS="200")


def command(*args) -> list[str]:
    return [sys.executable, "-m", "attention_lens", *map(str, args)]


def run(*args, timeout: float = STARTUP_S, cwd: Path | None = None) -> Finished:
    done = subprocess.run(command(*args), cwd=cwd or REPO, env=environment(), capture_output=True, text=True,
                          timeout=timeout)
    return Finished(done.returncode, done.stdout, done.stderr)


def start(*args, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """The CLI running in the background, its stderr in `log`, stdout discarded."""
    return subprocess.Popen(command(*args), cwd=cwd or REPO, env=environment(), stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))


def wait_for(condition, what: str, process: subprocess.Popen | None = None, timeout: float = STARTUP_S,
             log: Path | None = None):
    """Poll `condition()` until it returns something truthy; fail (with the log) if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (exit {process.returncode}) before {what}:\n"
                                 f"{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")


def handles_sigterm(process: subprocess.Popen) -> bool:
    """True once the process catches SIGTERM, i.e. main() has installed its handlers (Linux: /proc)."""
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
    except OSError:
        return False
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def served_port(log: Path) -> int | None:
    match = re.search(r"explorer on http://127\.0\.0\.1:(\d+)/", log.read_text())
    return int(match.group(1)) if match else None
