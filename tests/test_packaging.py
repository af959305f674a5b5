"""The wheel holds the text banks and templates (package data), and an installed wheel finds them."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked_copy(dest: Path) -> Path:
    """The repository's tracked files, copied (so the build writes nothing into the working tree)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    for rel in files.stdout.splitlines():
        src = ROOT / rel
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), target)
        elif src.is_file():
            shutil.copy2(src, target)
    return dest


def test_wheel_holds_the_banks(tmp_path):
    src = _tracked_copy(tmp_path / "src")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("textspan-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for bank in ("general", "shapes", "templates", "shapes_templates"):
        assert f"textspan/banks/{bank}.txt" in names, bank
    assert "textspan/data/shapes_clip.safetensors" in names
    for asset in ("atlas.css", "atlas.js"):
        assert f"textspan/atlas_assets/{asset}" in names, asset
    # installed from the wheel alone (no repository beside it), the banks load by name
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    code = ("import textspan, textspan.text as t; assert textspan.__file__.startswith(%r), textspan.__file__; "
            "print(len(t.TextBank.load('general')), len(t.TextBank.load(t.bank_path('templates'))))" % str(target))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(target)), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    n_general, n_templates = map(int, run.stdout.split())
    assert n_general > 3000 and n_templates > 5
