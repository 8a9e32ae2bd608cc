"""The installed package stands on its own: split files and tiny model configs travel in the wheel.

The package is built and installed (``pip install --no-deps --no-build-isolation --no-index --target``,
offline) from a copy of the files ``pyproject.toml`` builds from, then used from a subprocess whose working
directory is a temporary folder and whose ``sys.path`` holds the install but not this checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: What pyproject.toml builds the package from: [project] readme, [tool.setuptools] packages and py-modules.
SOURCES = ("pyproject.toml", "README.md", "cli.py", "mdmf_cache", "pipelines")
DATASET_FOLDERS = ("ucf_ARN", "hmdb_ARN", "kinetics_CMN", "ssv2_CMN", "ssv2_OTAM")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder the package was installed into (``--target``)."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"  # built from a copy: an in-tree build would write build/ and *.egg-info into the checkout
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    target = base / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--quiet", "--target", str(target), str(src)],
                         capture_output=True, text=True, timeout=300, cwd=base)
    assert res.returncode == 0, res.stdout + res.stderr
    return target


def _run_installed(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python *args`` with the install first on ``sys.path`` and neither the checkout nor PYTHONPATH on it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(installed), HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_split_files_and_model_configs_are_in_the_installed_package(installed, tmp_path):
    for folder in DATASET_FOLDERS:  # byte for byte the files of the checkout
        shipped = sorted(p.relative_to(REPO) for p in (REPO / "mdmf_cache" / "data" / "splits" / folder).iterdir())
        assert shipped, folder
        for rel in shipped:
            assert (installed / rel).read_bytes() == (REPO / rel).read_bytes(), rel
    code = f"""
import json, sys
from pathlib import Path
repo, target = Path({str(REPO)!r}), Path({str(installed)!r})
assert not any(Path(p or ".").resolve() == repo for p in sys.path), sys.path
import mdmf_cache
from mdmf_cache.clip import backbone
from mdmf_cache.data import datasets
assert Path(mdmf_cache.__file__).is_relative_to(target), mdmf_cache.__file__
found = str(datasets.shipped_splits_dir())
counts = {{}}
for name in ("ucf101", "hmdb51", "kinetics100", "ssv2-small", "ssv2-full"):
    splits = datasets.load_splits(name, None, None)  # no splits folder: the package's own copies
    counts[name] = [[len(splits[s].classes) for s in datasets.SPLITS], [len(splits[s]) for s in datasets.SPLITS]]
from mdmf_cache import heads
for name in heads.METHODS:  # every registered head's module is installed
    assert Path(__import__(heads.REGISTRY[name].module, fromlist=["SPEC"]).__file__).is_relative_to(target), name
print(json.dumps({{"splits_dir": found, "counts": counts, "config_dir": str(backbone.CONFIG_DIR),
                  "models": [m for m in backbone.list_models() if m.startswith("mdmf-")]}}))
"""
    res = _run_installed(installed, tmp_path, "-c", code)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(out["splits_dir"]).resolve() == (installed / "mdmf_cache" / "data" / "splits").resolve()
    assert out["counts"] == {  # method.md §2
        "ucf101": [[70, 10, 21], [9154, 1421, 2745]],
        "hmdb51": [[31, 10, 10], [4280, 1194, 1292]],
        "kinetics100": [[64, 12, 24], [6400, 1200, 2400]],
        "ssv2-small": [[64, 12, 24], [6400, 1200, 2400]],
        "ssv2-full": [[64, 12, 24], [67013, 1926, 2857]],
    }
    assert Path(out["config_dir"]).resolve() == (installed / "mdmf_cache" / "clip" / "model_configs").resolve()
    assert sorted(out["models"]) == ["mdmf-tiny-rn", "mdmf-tiny-vit", "mdmf-tiny-vit3"]


def test_installed_extract_of_a_builtin_dataset_needs_no_splits_option(installed, tmp_path):
    """``mdmf-cache extract ucf101`` from an unrelated folder reads the shipped lists and gets as far as the videos."""
    empty, cwd = tmp_path / "empty", tmp_path / "elsewhere"
    empty.mkdir()
    cwd.mkdir()
    res = _run_installed(installed, cwd, "-c", "import cli; cli.main()", "extract", "ucf101", "--root", str(empty),
                         "--cache-dir", str(tmp_path / "cache"))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"error: none of the {9154 + 1421 + 2745} videos of the split files is under {empty}")
    assert not (tmp_path / "cache").exists() and not any(cwd.iterdir())


def test_make_test_installs_the_test_extra_after_a_plain_install(tmp_path):
    """The README's two install lines in either order: a .venv made by a plain ``pip install -e .`` (its mdmf-cache
    script there, no test extra) still gets the test extra from ``make test``; once installed with it, not again."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "pip", "mdmf-cache"):  # what `python -m venv .venv && pip install -e .` leaves
        (bin_dir / tool).write_text("#!/bin/sh\n")
        (bin_dir / tool).chmod(0o755)
    dry = lambda: subprocess.run(["make", "-n", "test"], cwd=tmp_path, capture_output=True, text=True,  # noqa: E731
                                 check=True).stdout
    assert "pip install -q -e '.[test]'" in dry()
    stamp = tmp_path / ".venv" / ".installed-with-test-extra"
    stamp.touch()
    assert "pip install" not in dry() and "pytest" in dry()
