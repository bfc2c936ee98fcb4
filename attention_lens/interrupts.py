"""Ctrl-C (SIGINT) and SIGTERM as one exception, so a command stops cleanly wherever it is.

Every file is written temp file -> rename, so unwinding from any point leaves each file old or new, whole; the
exception says which signal came (exit status 128 + signal) and may carry a hint ("resume with --resume").
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt: `except Exception` must not swallow it."""

    def __init__(self, signum: int, hint: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.hint = hint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def message(self) -> str:
        return "interrupted" + (f"; {self.hint}" if self.hint else "")


@contextmanager
def interruptible() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise `Interrupted`; a second signal exits at once (the files are
    whole either way). Outside the main thread signals cannot be caught: the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []

    def stop(signum: int, frame) -> None:
        if stopping:  # asked twice: the user wants out now, whatever the clean-up is doing
            os._exit(128 + signum)
        stopping.append(signum)
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, stop) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
