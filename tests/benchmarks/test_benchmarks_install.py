"""The benchmarks ship in the wheel as ``galore_plus_benchmarks`` and run from any folder once installed."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("setuptools")
pytest.importorskip("wheel")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources, installed into a private folder (the editable install is bypassed)."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("galore_plus", "benchmarks"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(base / "wheel")],
                   check=True, cwd=base)
    (wheel,) = (base / "wheel").glob("*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(base / "site"), str(wheel)], check=True, cwd=base)
    return base / "site"


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_installed_main_job_runs_from_another_folder(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shown = _run(installed, elsewhere, "-m", "galore_plus_benchmarks.finetune", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "usage: python -m galore_plus_benchmarks.finetune" in shown.stdout
    ran = _run(installed, elsewhere, "-c",
               "import galore_plus, galore_plus_benchmarks.finetune as f; print(galore_plus.__file__); f.main()",
               "--model-size", "tiny", "--steps", "2", "--pretrain-steps", "2", "--rank", "4", "--seq-len", "16",
               "--batch-size", "2", "--pretrain-batch-size", "2", "--eval-windows", "2",
               "--methods", "adamw", "galore", "--seeds", "0", "--lr", "0.001", "--quiet")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith(str(installed)), "the installed copy of galore_plus must be the one imported"
    assert (elsewhere / "results" / "pretrain" / "results.md").exists()


def test_every_benchmark_is_in_the_wheel(installed, tmp_path):
    names = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py") if path.stem != "__init__")
    assert "bench_step" in names and "finetune" in names
    imported = _run(installed, tmp_path, "-c", "import importlib, sys\n"
                    "for name in sys.argv[1:]: importlib.import_module('galore_plus_benchmarks.' + name)", *names)
    assert imported.returncode == 0, imported.stderr
