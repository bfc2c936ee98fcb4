"""The `attention-lens` typer app: every command registered here, in the order `--help` lists them, and `main()`."""

from __future__ import annotations

import sys

import typer

from .._version import __version__
from ..errors import AttentionLensError
from ..interrupts import Interrupted, interruptible
from .common import as_flags, err
from .concepts import ablate, generate, search
from .decode import decode
from .effects import effects
from .make import fit, train
from .plan import plan
from .score import eval_, specialize
from .show import report, serve

COMMANDS = {"train": train, "fit": fit, "decode": decode, "eval": eval_, "specialize": specialize,
            "effects": effects, "report": report, "serve": serve, "search": search, "ablate": ablate,
            "generate": generate, "plan": plan}
"""Command name -> the function that runs it; each lives in the module of its group (make, decode, score, effects,
show, concepts, plan). A new command is a function in one of those (or a new module) and one entry here."""

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Per-head attention lenses for HuggingFace causal LMs.")
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. User mistakes print one line, never a traceback."""
    _quiet_libraries()
    try:
        with interruptible():
            app(args=argv, prog_name="attention-lens", standalone_mode=False)
    except Interrupted as stop:
        print(stop.message(), file=sys.stderr)
        return stop.exit_code
    except AttentionLensError as error:
        print(f"error: {as_flags(str(error))}", file=sys.stderr)  # plain: one line, however wide the terminal
        return 2
    except OSError as error:  # disk full, permission denied, --out is a file: the user's to fix, in one line
        where = f" ({error.filename})" if error.filename else ""
        print(f"error: {error.strerror or error}{where}; check the path, its permissions and free disk space",
              file=sys.stderr)
        return 2
    except typer.Exit as exit_:
        return exit_.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        return 130
    except typer.TyperException as error:  # usage errors: typer's own (vendored) click exceptions
        context = getattr(error, "ctx", None)
        command = context.command_path if context is not None else "attention-lens"
        print(f"error: {error.format_message().rstrip('.')}; see `{command} --help`", file=sys.stderr)
        return error.exit_code
    return 0


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass
