"""An install without build warnings."""

import tomllib

from conftest import ROOT


def test_license_is_an_spdx_string_the_build_backend_accepts():
    # A TOML table makes setuptools print a deprecation warning on every install; a string needs setuptools >= 77.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"
    assert "setuptools>=77" in pyproject["build-system"]["requires"]
