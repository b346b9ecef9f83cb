import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests use a baseline cache of their own, never the user's ~/.cache/compress."""
    os.environ["COMPRESS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
DEMO_RECIPE = ROOT / "recipes" / "tiny-phi4-mini.yaml"


def verify_settings(gates: str = "{max_kld: 0.05, min_top1: 0.85}") -> str:
    """A recipe that gives `compress verify` short evaluation settings and these gates."""
    return ("name: verify-settings\nmodel: builtin:tiny-phi4-mini\n"
            "evaluation: {seq_len: 128, windows: 8, new_tokens: 8, prompts: [Hello]}\n"
            f"gates: {gates}\nvariants: [{{name: unused, method: rtn}}]\n")


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `compress` command in a fresh process, as a user runs it."""
    environment = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "compress.cli", *args],
        capture_output=True, text=True, cwd=cwd or ROOT, env=environment, timeout=timeout,
    )


@pytest.fixture
def write_recipe(tmp_path):
    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One `compress run` of the demo recipe, shared by every test that reads its results."""
    out = tmp_path_factory.mktemp("demo") / "run"
    result = run_cli("run", str(DEMO_RECIPE), "--out", str(out))
    return out, result


def run_recipe(tmp_path_factory, name: str, text: str) -> tuple[Path, dict]:
    """`compress run` of a recipe written from `text` into a fresh folder; it must succeed. -> (out, report)."""
    import json

    folder = tmp_path_factory.mktemp(name)
    (folder / "recipe.yaml").write_text(text)
    result = run_cli("run", str(folder / "recipe.yaml"), "--out", str(folder / "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    return folder / "run", json.loads((folder / "run" / "report.json").read_text())


def entry(report: dict, name: str, fmt: str) -> dict:
    """The report's entry for one (variant, format)."""
    return next(v for v in report["variants"] if v["name"] == name and v["format"] == fmt)
