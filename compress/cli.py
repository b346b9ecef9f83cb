"""argv -> recipe -> pipeline.run -> summary. Exit codes: 0 all passed, 1 something failed, 2 bad input."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from compress import interrupts
from compress.check import FormatError
from compress.cluster import ClusterError
from compress.data import DataError, load_documents
from compress.model import ModelError
from compress.recipe import RecipeError, load_recipe
from compress.verify.isolated import MeasurementError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
# Piped output (CI logs, `| tee`) gets a table wide enough to read; a terminal uses its own width.
console = Console(width=None if sys.stdout.isatty() else 140)
BAD_INPUT = (RecipeError, ModelError, DataError, ClusterError)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"compress {version('compress')}", highlight=False)
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Quantize Phi-4-family checkpoints, verify every artifact in its runtime, release what passes."""


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    out: Annotated[str | None, typer.Option("--out", help="Run folder (default: runs/<recipe name>); with --cluster also "
                                            "a URI every node can reach: s3://…, gs://…, file://… (or an NFS path).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model to use instead of the recipe's: folder, hub id or builtin:NAME.")] = None,
    max_memory: Annotated[float | None, typer.Option("--max-memory", help="Host memory budget in GiB (default: available memory less 1 GiB); on a cluster, each node's.")] = None,
    cluster: Annotated[str | None, typer.Option("--cluster", help="Run on the Ray cluster at ADDRESS: auto (RAY_ADDRESS or "
                                                "the cluster started on this machine), host:port or ray://host:port.")] = None,
) -> None:
    """Quantize, export, verify and release every variant of RECIPE."""
    try:
        if max_memory is not None and not max_memory > 0:
            raise RecipeError(f"--max-memory must be a positive number of GiB, not {max_memory}")
        parsed = load_recipe(recipe)
        out = out or str(Path("runs") / parsed.name)
        if "://" in out and cluster is None:
            raise RecipeError(f"--out {out}: a URI run folder is for --cluster runs; give a local folder")
        if "://" not in out:
            _check_out(Path(out), model or parsed.model)
        _quiet_libraries()
        if cluster is not None:
            from compress.cluster.driver import run_on_cluster  # Ray is imported only here

            report = run_on_cluster(parsed, str(recipe), out, cluster, model, console, max_memory)
        else:
            from compress.pipeline import run as run_pipeline  # torch is imported only once the recipe is valid

            report = run_pipeline(parsed, str(recipe), Path(out), model, console, max_memory)
    except BAD_INPUT as error:
        _fail(str(error))
    except MeasurementError as error:  # the original model itself would not run: nothing to compare against
        _fail(f"the baseline could not be measured: {error}", 1)
    except KeyboardInterrupt:
        _fail("interrupted; finished stages are kept and the next run on this folder resumes from them", 130)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        _fail(f"no space left on the device while writing {out}; nothing partial was released, and the next run "
              "on this folder resumes from the finished stages", 1)
    released = [v for v in report["variants"] if v["released"]]
    from compress.cluster.store import inside  # no Ray, no pyarrow: where the report is, as --out named the folder

    console.print(f"Report: {inside(out, 'report.md')}  ({len(released)} of {len(report['variants'])} artifact(s) released)")
    raise typer.Exit(0 if len(released) == len(report["variants"]) else 1)


@app.command()
def verify(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder (compressed-tensors, GPTQ v1, AWQ, ONNX GenAI) or a .gguf file.")],
    baseline: Annotated[str, typer.Option("--baseline", help="The original model: folder, hub id or builtin:NAME.")],
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Take evaluation settings and gates from this recipe.")] = None,
    target: Annotated[list[str], typer.Option("--target", help="Target to verify on (repeatable).")] = ["cpu"],  # noqa: B006
    out: Annotated[Path | None, typer.Option("--out", help="Where the report goes (default: runs/verify-<folder>).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Evaluation text: a .txt file (blank-line separated documents), a .jsonl file (`text`) or builtin:NAME.")] = None,
    windows: Annotated[int | None, typer.Option("--windows", help="Evaluation windows to score (at least 2).")] = None,
) -> None:
    """Check and measure any artifact folder against its baseline; exit 0 if it passes, 1 if not."""
    try:
        parsed = load_recipe(recipe) if recipe else None
        for name in target:
            if name not in ("cpu", "cuda"):
                raise RecipeError(f"unknown target {name!r}; known: cpu, cuda")
        if windows is not None and windows < 2:
            raise RecipeError(f"--windows must be at least 2 (the standard error needs two windows), not {windows}")
        if dataset is not None:
            load_documents(dataset)  # a missing or unreadable file fails here, before any model loads
        _quiet_libraries()
        from compress.check import detect_format
        from compress.verify_folder import verify_folder, verify_recipe

        if detect_format(artifact) == "gguf":
            from compress.runtimes.llama_cpp_tools import missing

            if reason := missing():
                raise FormatError(f"verifying a GGUF file needs llama.cpp: {reason}")
        settings = verify_recipe(artifact, baseline, parsed, target, dataset, windows)
        console.print(evaluation_line(settings.evaluation, recipe, dataset), highlight=False, soft_wrap=True)
        out = out or Path("runs") / f"verify-{artifact.name}"
        report = verify_folder(artifact, baseline, settings, out, console)
    except (*BAD_INPUT, FormatError) as error:
        _fail(str(error))
    except MeasurementError as error:
        _fail(f"the baseline could not be measured: {error}", 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    verdict = "passes" if report["passed"] else "does not pass"
    console.print(f"{artifact} {verdict}. Report: {out / 'report.html'}")
    raise typer.Exit(0 if report["passed"] else 1)


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")]) -> None:
    """Check RECIPE without loading any model."""
    try:
        parsed = load_recipe(recipe)
    except RecipeError as error:
        _fail(str(error))
    names = ", ".join(v.name for v in parsed.variants)
    console.print(f"{recipe}: valid — model {parsed.model}, {len(parsed.variants)} variant(s): {names}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run folder holding report.json.")]) -> None:
    """Rebuild report.md, report.html and report.json of RUN_DIR without recomputing anything."""
    import json

    from compress.report import print_summary, render_files

    source = run_dir / "report.json"
    if not source.is_file():
        _fail(f"{run_dir} holds no report.json; give the folder a `compress run` wrote")
    try:
        data = json.loads(source.read_text())
        render_files(run_dir, data)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        _fail(f"{source} is not a report compress can read ({type(error).__name__}: {error})")
    print_summary(data, console)
    console.print(f"Report: {run_dir / 'report.html'}")


def evaluation_line(evaluation, recipe: Path | None, dataset: str | None) -> str:
    """What `compress verify` scores on, and where that choice came from: its first line."""
    source = "--dataset" if dataset else f"the recipe {recipe}" if recipe else "the default; give your own text with --dataset"
    return (f"Evaluating on {evaluation.dataset} ({source}): {evaluation.windows} windows × {evaluation.seq_len} tokens")


def _quiet_libraries() -> None:
    """The libraries' own progress bars and chatter would fight our display; their logs go to files."""
    interrupts.install()  # every command that runs models: a Ctrl-C is never lost
    for name, value in {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                        "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(name, value)


def _check_out(out: Path, model_spec: str) -> None:
    """Refuse an output folder that is a file, sits inside the model folder, or cannot be written."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output {out} exists and is not a folder")
    model_path = Path(model_spec).expanduser()
    if model_path.is_dir() and out.resolve().is_relative_to(model_path.resolve()):
        raise RecipeError(f"output {out} is inside the model folder {model_spec}; choose a folder outside it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RecipeError(f"output folder {out} is not writable ({error.strerror or error})") from None


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
