"""The wheel pip builds from this repository: contents, entry point and dependency ranges.

The wheel is built from a copy of exactly what docker/Dockerfile copies (pyproject.toml and
server/), so a package file that only exists in the working tree, or a module missing from the
package list, fails here rather than in an image build.
"""

from __future__ import annotations

import configparser
import email
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import server
from tests.helpers import REPO

# The GPU image installs this torch; the CPU instructions install the running one.
GPU_IMAGE_TORCH = "2.11.0"


def _setuptools_is_recent() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return Version(setuptools.__version__) >= Version("77")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    shutil.copy(REPO / "pyproject.toml", src)
    for optional in ("README.md", "LICENSE"):
        if (REPO / optional).exists():
            shutil.copy(REPO / optional, src)
    shutil.copytree(REPO / "server", src / "server", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)]
    if _setuptools_is_recent():  # skips fetching setuptools into an isolated build env
        cmd.insert(4, "--no-build-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"wheel build failed:\n{proc.stdout}\n{proc.stderr}"
    (built,) = out.glob("graphserve-*.whl")
    with zipfile.ZipFile(built) as zf:
        yield zf


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def test_wheel_version_is_the_package_version(wheel):
    meta = email.message_from_string(_dist_info(wheel, "METADATA"))
    assert meta["Name"] == "graphserve"
    assert meta["Version"] == server.__version__
    assert Version(f"{sys.version_info.major}.{sys.version_info.minor}") in SpecifierSet(
        meta["Requires-Python"]
    )


def test_wheel_contains_every_module_and_the_tokenizer_corpus(wheel):
    names = set(wheel.namelist())
    for source in (REPO / "server").rglob("*.py"):
        rel = source.relative_to(REPO).as_posix()
        assert rel in names, f"{rel} is missing from the wheel"
    data = [p for p in (REPO / "server" / "data").rglob("*") if p.is_file()]
    assert data, "server/data/ holds the embedded tokenizer's corpus and must not be empty"
    for path in data:
        rel = path.relative_to(REPO).as_posix()
        assert rel in names, f"package data {rel} is missing from the wheel"
    assert not any(n.startswith(("tests/", "docker/", "bench/")) for n in names)


def test_console_script_points_at_the_cli(wheel):
    entry_points = configparser.ConfigParser()
    entry_points.read_string(_dist_info(wheel, "entry_points.txt"))
    target = entry_points["console_scripts"]["graphserve"]
    assert target == "server.cli:main"
    module = target.split(":")[0].replace(".", "/") + ".py"
    assert module in wheel.namelist(), f"the graphserve script would import missing {module}"
    assert "server/__main__.py" in wheel.namelist(), "`python -m server` needs server/__main__.py"


def test_torch_range_keeps_the_preinstalled_builds(wheel):
    """pip must accept the torch already installed instead of fetching a (CUDA) build."""
    torch = pytest.importorskip("torch")
    meta = email.message_from_string(_dist_info(wheel, "METADATA"))
    requirements = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    (torch_req,) = [r for r in requirements if r.name == "torch" and not r.marker]
    installed = Version(torch.__version__)  # local labels (+cpu, +cu130) are ignored by ranges
    assert torch_req.specifier.contains(installed, prereleases=True), (
        f"torch {installed} does not satisfy {torch_req}"
    )
    assert torch_req.specifier.contains(GPU_IMAGE_TORCH)


def test_test_extra_brings_what_the_suite_imports(wheel):
    meta = email.message_from_string(_dist_info(wheel, "METADATA"))
    test_extra = {
        Requirement(r).name.lower()
        for r in meta.get_all("Requires-Dist")
        if Requirement(r).marker and Requirement(r).marker.evaluate({"extra": "test"})
    }
    needed = {"pytest", "pytest-asyncio", "httpx", "openai", "kubernetes", "pyyaml"}
    assert needed <= test_extra, f"the test extra lacks {sorted(needed - test_extra)}"


def _ci_install_commands() -> list[str]:
    """The pip commands .ci/run runs, with the venv prefix dropped: `pip install ...`."""
    script = (REPO / ".ci" / "run").read_text()
    commands = re.findall(r'^\s*"\$VENV/bin/pip" (install .+?)\s*$', script, re.MULTILINE)
    assert commands, ".ci/run installs nothing with the venv's pip"
    return [f"pip {c}" for c in commands]


def test_ci_script_is_valid_bash_and_executable():
    script = REPO / ".ci" / "run"
    assert os.access(script, os.X_OK), ".ci/run must be executable"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    commands = _ci_install_commands()
    assert commands[0] == "pip install torch==2.13.0", "torch must be pinned before the project"
    assert "pip install -e '.[test]'" in commands


def test_readme_gives_the_commands_ci_runs():
    readme = REPO / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not written yet")
    text = readme.read_text()
    for command in _ci_install_commands():
        if "[dev]" in command:  # CI's own addition for ruff
            continue
        assert command in text, f"README.md does not say `{command}`, which CI runs"
    assert "python -m pytest" in text
