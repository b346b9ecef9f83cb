"""What a user meets before any model runs: the version, and an install without build warnings."""

import tomllib
from importlib.metadata import version

from conftest import ROOT, run_cli


def test_version_prints_the_installed_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"compress {version('compress')}"


def test_license_is_an_spdx_string_the_build_backend_accepts():
    # A TOML table makes setuptools print a deprecation warning on every install; a string needs setuptools >= 77.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"
    assert "setuptools>=77" in pyproject["build-system"]["requires"]
