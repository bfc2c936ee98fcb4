"""The package's modules form no import cycle (function-level imports included), and each imports on its own."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout():
    spec = importlib.util.spec_from_file_location("layout_numbers", ROOT / "scripts" / "layout_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_import_graph_has_no_cycle():
    numbers = layout()
    graph = numbers.import_graph()
    assert "attention_lens.cli.app" in graph and "attention_lens.lens" in graph
    assert "attention_lens.hub" in graph["attention_lens.lens"]  # function-level and `from . import` edges count
    assert numbers.cycles(graph) == []


def test_the_cycle_finder_finds_cycles_through_function_level_imports(tmp_path):
    package = tmp_path / "attention_lens"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("def f():\n    from .sub.b import g\n    return g()\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("from ..a import f\n\ndef g():\n    return 1\n")
    (package / "c.py").write_text("from . import a\n")  # a submodule: lands in a, not in the package
    numbers = layout()
    graph = numbers.import_graph(tmp_path)
    assert graph["attention_lens.c"] == {"attention_lens.a"}
    assert numbers.cycles(graph) == [["attention_lens.a", "attention_lens.sub.b"]]


def test_every_module_imports_on_its_own():
    """Each module imported first, in a process where no other module of the package was imported before it
    (`__main__` runs the CLI when imported: `python -m attention_lens` is tested below)."""
    modules = sorted(name for name in layout().module_files() if name != "attention_lens.__main__")
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'attention_lens' or m.startswith('attention_lens.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as error:\n"
        "        failed.append(f'{name}: {type(error).__name__}: {error}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "attention_lens", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "train" in done.stdout and "generate" in done.stdout, done.stderr[-3000:]


def test_lens_kinds_are_asked_not_compared_and_the_corpus_loop_exists_once():
    """Outside kinds.py nothing branches on a kind's name (the kind object is asked), and only stream.py cuts a
    corpus into windows (every consumer reads HeadStream)."""
    numbers = layout().numbers()
    assert [site for site in numbers["kind_branch_where"] if not site.startswith("attention_lens.kinds:")] == []
    assert [site.split(":")[0] for site in numbers["corpus_loop_where"]] == ["attention_lens.stream"]
