"""docs/: the CLI and API references are generated from the code and must match what is committed."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, document", [("gen_cli_docs", "cli.md"), ("gen_api_docs", "api.md")])
def test_generated_reference_is_up_to_date(script, document):
    generated = load_script(script).render()
    committed = (ROOT / "docs" / document).read_text(encoding="utf-8")
    assert committed == generated, f"docs/{document} is stale: run `python scripts/{script}.py` and commit it"


def test_cli_reference_covers_every_subcommand_and_option():
    import typer

    from attention_lens.cli import app

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert f"\n## {name}\n" in text
        for param in command.params:
            for option in getattr(param, "opts", []):
                if option.startswith("--"):
                    assert f"`{option}`" in text, (name, option)


def test_docs_link_to_files_that_exist():
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+\.(?:md|ipynb|py|sh))\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).resolve().exists(), f"{page.name} links to missing {target}"


def _readme_example() -> tuple[list[str], list[str]]:
    """The README's first example: its command's arguments and the table lines that follow it."""
    import shlex

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```", 2)[1]
    lines = [line for line in block.splitlines() if line.strip()]
    command = next(line for line in lines if line.startswith("$ attention-lens decode"))
    table = lines[lines.index(command) + 1:]
    return shlex.split(command[len("$ attention-lens "):]), table


def _table_shape(lines: list[str]) -> tuple[str, list[str], list[str]]:
    """(title words, header names, layer column) of a printed decode table: what the README must match."""
    title = " ".join(lines[0].split())
    header = next(line for line in lines if "layer" in line and "┃" in line)
    names = [cell.strip() for cell in header.strip("┃ ").split("┃")]
    layers = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    return title, names, layers


def test_readme_first_example_is_what_decode_prints(tmp_path, capsys):
    """The README's first table has the title, header and layers of a real decode of the main job's recipe (an
    affine lens fitted on SmolLM2): only the tokens in the cells may differ."""
    import attention_lens as al
    from attention_lens.data import DataConfig
    from attention_lens.fit import FitConfig, fit
    from conftest import run_cli

    args, table = _readme_example()
    model = al.load_model("smollm2-135m")
    lens = al.Lens.from_model(model, "affine")
    fit(lens, DataConfig(data="sotu", seq_len=64), FitConfig(tokens=256, batch_size=4))
    directory = lens.save(tmp_path / "lens")
    args = [str(directory) if arg == "lenses/smollm2" else arg for arg in args]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    printed = [line for line in stdout.splitlines() if line.strip()]
    assert _table_shape(table) == _table_shape(printed)
