"""`python kill_points.py ARGS...` runs `attention-lens ARGS...` with a fault injected at a file rename.

Every save goes temp file -> fsync -> os.replace, so wrapping os.replace reaches each write without
touching the package. Set in the environment:
  KILL_AT="NAME:N:WHEN"  the N-th rename onto a file called NAME (counted in this process) gets a real
                          SIGKILL, WHEN = "half" (the temp file cut to half its size, then killed before
                          the rename), "whole" (killed before the rename) or "after" (killed just after it)
  SLOW_WRITES=SECONDS     sleep that long around every rename, so a kill sent from outside can land
                          before, during or after a write
"""

import os
import signal
import sys
import time

from attention_lens.cli import main


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no finally: what a kill -9 or the OOM killer does


def _install() -> None:
    name, count, when = (os.environ.get("KILL_AT") or "::").split(":")
    slow = float(os.environ.get("SLOW_WRITES", "0"))
    real_replace = os.replace
    renames = 0

    def replace(source, target, *args, **kwargs):
        nonlocal renames
        chosen = os.path.basename(target) == name and (renames := renames + 1) == int(count)
        if chosen and when == "half":
            os.truncate(source, os.path.getsize(source) // 2)
        if chosen and when in ("half", "whole"):
            _kill()
        time.sleep(slow / 2)
        real_replace(source, target, *args, **kwargs)
        if chosen and when == "after":
            _kill()
        time.sleep(slow / 2)

    os.replace = replace


if __name__ == "__main__":
    _install()
    sys.exit(main(sys.argv[1:]))
