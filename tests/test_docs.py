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
