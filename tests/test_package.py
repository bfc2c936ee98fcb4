"""The package as users get it: `python -m build` makes a wheel and an sdist; the wheel installs into a fresh
venv and gives a working `attention-lens --version`."""

import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import torch

from attention_lens import __version__

ROOT = Path(__file__).resolve().parents[1]


def run(*command, cwd: Path) -> str:
    done = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def copy_source(target: Path) -> Path:
    """The files git would commit (tracked or new, not ignored): what a fresh clone builds from."""
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is not part of the build
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
    return target


def test_wheel_and_sdist_build_and_the_wheel_runs_in_a_fresh_venv(tmp_path):
    source = copy_source(tmp_path / "source")
    dist = tmp_path / "dist"
    # --no-isolation: build with this environment's setuptools instead of downloading one.
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source, cwd=tmp_path)
    (wheel,) = dist.glob("attention_lens-*.whl")
    (sdist,) = dist.glob("attention_lens-*.tar.gz")
    assert wheel.name.startswith(f"attention_lens-{__version__}-py3-none-any")

    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("attention_lens/py.typed", "attention_lens/cli/__init__.py", "attention_lens/report/template.html",
                     "attention_lens/web/static/index.html"):
        assert expected in names, expected
    assert not any(name.startswith(("tests/", "bench/", "scripts/")) for name in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "attention-lens = attention_lens.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    sdist_names = tarfile.open(sdist).getnames()
    root = f"attention_lens-{__version__}"
    assert {f"{root}/pyproject.toml", f"{root}/README.md", f"{root}/attention_lens/py.typed"} <= set(sdist_names)

    # A fresh venv that sees this environment's dependencies (torch, transformers, ...) through a .pth
    # file, so nothing is downloaded; .pth files inside that directory (our editable install) stay inert.
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "dependencies.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    installed = run(python, "-c", "import attention_lens; print(attention_lens.__file__)", cwd=tmp_path)
    assert Path(installed.strip()).is_relative_to(site)  # the wheel's copy, not this checkout
    assert run(environment / "bin" / "attention-lens", "--version", cwd=tmp_path).strip() == __version__
