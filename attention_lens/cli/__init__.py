"""The `attention-lens` command line: one module per command group, each command a small function over the
library; `app.py` registers them all on one typer app."""

from .app import app, main

__all__ = ["app", "main"]
