"""The command line before any model loads: the version, and `compress verify`'s own evaluation text."""

from importlib.metadata import version

import pytest
from conftest import run_cli

from compress.cli import evaluation_line
from compress.recipe import Evaluation


def test_version_prints_the_installed_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"compress {version('compress')}"


@pytest.mark.parametrize("args, sentence", [
    (["--windows", "0"], "error: --windows must be at least 2 (the standard error needs two windows), not 0"),
    (["--dataset", "no-such-file.txt"], "error: data set file no-such-file.txt does not exist"),
    (["--dataset", "builtin:nope"], "error: unknown built-in data set 'builtin:nope'"),
])
def test_verify_refuses_bad_evaluation_options_in_one_sentence(tmp_path, args, sentence):
    result = run_cli("verify", str(tmp_path), "--baseline", "builtin:tiny-phi4-mini", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.startswith(sentence) and len(result.stdout.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_verify_says_first_which_text_it_scores_on():
    default = evaluation_line(Evaluation(), None, None)
    assert default == ("Evaluating on builtin:pydoc-eval (the default; give your own text with --dataset): "
                       "32 windows × 256 tokens")
    own = evaluation_line(Evaluation(dataset="mine.txt", windows=8), None, "mine.txt")
    assert own.startswith("Evaluating on mine.txt (--dataset): 8 windows")
