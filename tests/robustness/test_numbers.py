"""Every number every command takes, probed with NaN, ±inf, 0, negatives and huge values.

The options are enumerated from the typer app itself, so a new command or option is probed without touching
this file. The contract, per probe: exit 0 with one strict-JSON document on stdout (no NaN/Infinity), or exit 2
with one line on stderr and nothing written; never a traceback. The probes run `main()` in-process against a
tiny saved model (a subprocess each would cost seconds of interpreter start); the tests that need a real process
(signals, the server, escaping tracebacks) are in the neighbouring files, and `test_refused_in_a_real_process`
drives the installed command.
"""

from __future__ import annotations

import inspect
import json
import math
import typing
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from attention_lens.cli import main
from attention_lens.cli.app import app
from clirun import run
from conftest import make_corpus, make_model_dir

pytestmark = [pytest.mark.robustness, pytest.mark.usefixtures("one_thread")]

HOSTILE_FLOATS = ["nan", "-nan", "inf", "-inf", "1e309", "1e300", "-1e300"]
HOSTILE_INTS = ["nan", "inf", "-inf", str(10**30), str(-10**30)]
# Small settings that keep a probe whose value is accepted quick (seconds on a tiny model).
QUICK = {"tokens": 64, "seq_len": 16, "eval_tokens": 0, "constant_tokens": 64, "bootstrap": 2, "repeats": 2,
         "max_new_tokens": 2, "batch_size": 2, "checkpoint_every": 1000}


def numeric_options() -> list[tuple[str, str, type]]:
    """(command, flag, int | float) for every numeric option of every command registered on the app."""
    found = []
    for info in app.registered_commands:
        command = info.name or info.callback.__name__
        for name, (kind, option, _) in _parameters(info.callback).items():
            if kind in (int, float) and isinstance(option, typer.models.OptionInfo):
                found.append((command, _flag(name, option), kind))
    return found


def _parameters(function) -> dict[str, tuple[type | None, object, bool]]:
    """name -> (int | float | None, its OptionInfo or ArgumentInfo, required) for each parameter of a command."""
    hints = typing.get_type_hints(function, include_extras=True)
    result = {}
    for name, parameter in inspect.signature(function).parameters.items():
        hint, info, default = hints.get(name), parameter.default, parameter.default
        if typing.get_origin(hint) is typing.Annotated:
            hint, *metadata = typing.get_args(hint)
            info = next((m for m in metadata if isinstance(m, typer.models.ParameterInfo)), info)
        elif isinstance(info, typer.models.ParameterInfo):
            default = info.default
        required = default is inspect.Parameter.empty or default is ...
        result[name] = (_base_type(hint), info, required)
    return result


def _base_type(hint) -> type | None:
    while typing.get_origin(hint) in (typing.Union, list, getattr(__import__("types"), "UnionType", None)):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint if hint in (int, float) else None


def _flag(name: str, option) -> str:
    declared = [d for d in (option.param_decls or ()) if d.startswith("--")]
    return declared[0] if declared else "--" + name.replace("_", "-")


OPTIONS = numeric_options()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("numbers")
    return {"model": make_model_dir(root / "model"), "corpus": make_corpus(root / "corpus")}


def probe_args(command: str, world: dict, out_dir: Path, flag: str, value: str) -> tuple[list[str], list[Path]]:
    """argv for `command` with every required input filled in, QUICK settings, and `flag value` last; and the
    paths the command may write (which must not exist after a refusal)."""
    info = next(i for i in app.registered_commands if (i.name or i.callback.__name__) == command)
    params = _parameters(info.callback)
    args: list[str] = []
    outputs: list[Path] = []
    positional: list[str] = []
    for name, (kind, option, required) in params.items():
        is_argument = isinstance(option, typer.models.ArgumentInfo)
        if not (is_argument or isinstance(option, typer.models.OptionInfo)):
            continue  # typer.Context
        decl = None if is_argument else _flag(name, option)
        if decl == flag:
            continue
        if is_argument:
            positional.append("The quick brown fox jumps")
        elif name == "model":
            args += ["--model", str(world["model"])]
        elif name in ("data", "constant_data"):
            args += [decl, str(world["corpus"])]
        elif name == "out":
            suffix = {"report": ".html", "eval": ".json", "specialize": ".json"}.get(command, "")
            outputs.append(out_dir / f"{command}-out{suffix}")
            args += ["--out", str(outputs[-1])]
        elif name == "concept":
            args += ["--concept", "quick, brown"]
        elif name == "heads" and required:
            args += ["--heads", "0.0"]
        elif name == "host":  # valid settings get past the checks to binding, which fails: no server is started
            args += ["--host", "256.0.0.1"]
        elif name == "as_json":
            args.append("--json")
        elif name in QUICK:
            args += [decl, str(QUICK[name])]
        elif required and not is_argument:
            raise AssertionError(f"{command} {decl} is required: teach probe_args a value for it")
    return [command, *args, flag, value, *positional], outputs


def check_contract(code: int, out: str, err: str, outputs: list[Path], what: str) -> None:
    assert "Traceback" not in err, f"{what}: traceback\n{err}"
    if code == 0:
        document = json.loads(out, parse_constant=lambda token: pytest.fail(f"{what}: {token} in --json output"))
        assert isinstance(document, dict), what
        assert all(math.isfinite(x) for x in _floats(document)), what
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), f"{what}: exit {code}\n{err}"
    for path in outputs:
        assert not path.exists(), f"{what}: refused but wrote {path}"


def _floats(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _floats(item)
    elif isinstance(value, list):
        for item in value:
            yield from _floats(item)


def test_every_command_has_numeric_options_to_probe():
    commands = {command for command, _, _ in OPTIONS}
    assert {"train", "fit", "decode", "eval", "specialize", "report", "serve", "search", "ablate",
            "generate"} <= commands
    assert ("fit", "--ridge", float) in OPTIONS and ("serve", "--port", int) in OPTIONS


@pytest.mark.parametrize("command, flag, kind", OPTIONS, ids=[f"{c}{f}" for c, f, _ in OPTIONS])
def test_non_finite_and_huge_values_are_refused_naming_the_option(world, tmp_path, capsys, command, flag, kind):
    """Deterministic: NaN, ±inf and huge values are never valid, for any numeric option."""
    for value in HOSTILE_FLOATS if kind is float else HOSTILE_INTS:
        argv, outputs = probe_args(command, world, tmp_path, flag, value)
        code = main(argv)
        out, err = capsys.readouterr()
        check_contract(code, out, err, outputs, f"{command} {flag} {value}")
        assert code == 2 and flag in err and out == "", f"{command} {flag} {value}: {err}"


HOSTILE = st.sampled_from(["nan", "inf", "-inf", "0", "-0.0", "-1", "1e300", str(10**15), "-1e-300"])
ORDINARY = st.one_of(st.integers(-3, 40).map(str), st.floats(-3, 3, allow_nan=False).map(repr))


def probe(world, directory: Path, capsys, option, value) -> None:
    command, flag, _ = option
    argv, outputs = probe_args(command, world, directory, flag, value)
    code = main(argv)
    out, err = capsys.readouterr()
    event(f"exit {code}")  # --hypothesis-show-statistics: how many probes ran to the end, how many were refused
    check_contract(code, out, err, outputs, f"{command} {flag} {value}")


PROBE_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=40, **PROBE_SETTINGS)
@given(option=st.sampled_from(OPTIONS), value=st.one_of(HOSTILE, ORDINARY))
def test_any_value_either_runs_to_strict_json_or_is_one_line(world, tmp_path_factory, capsys, option, value):
    """Random draws, accepted values included: those run the command to its end on the tiny model."""
    probe(world, tmp_path_factory.mktemp("probe"), capsys, option, value)


@pytest.mark.slow
@settings(max_examples=300, **PROBE_SETTINGS)
@given(option=st.sampled_from(OPTIONS), value=st.one_of(HOSTILE, ORDINARY))
def test_many_more_values(world, tmp_path_factory, capsys, option, value):
    probe(world, tmp_path_factory.mktemp("probe"), capsys, option, value)


def test_refused_in_a_real_process(world, tmp_path):
    """The issue's examples, in the real command: nothing written, one line, no traceback."""
    out = tmp_path / "lens"
    run("fit", "--model", world["model"], "--data", world["corpus"], "--ridge", "nan", "--out", out).assert_one_line_error(
        "--ridge", "finite")
    assert not out.exists()
    run("ablate", "--heads", "0.0", "--concept", "quick", "--scale", "inf", "--json").assert_one_line_error("--scale")
    run("generate", "hello", "--heads", "0.0", "--mode", "scale=nan").assert_one_line_error("scale=nan", "finite")
    run("decode", "-k", 10_000_000, "hello").assert_one_line_error("--k", "at most 1000")
    run("decode", "--model", world["model"], "-k", 999, "hello").assert_one_line_error("vocabulary size")
