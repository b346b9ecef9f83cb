"""`compress verify`: check and measure any artifact folder — ours or someone else's — against a baseline.

The same stages and figures as `compress run`, with checks first that name what is broken: a truncated
file, a config that disagrees with its tensors, a tokenizer from another model, a layer far from the
baseline's weights. Nothing is released; the verdict and report are written to the output folder.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from compress import memory
from compress.check import (
    detect_format,
    gguf_problems,
    gguf_tokenizer_problems,
    quantized_layers,
    tokenizer_problems,
    truncation_problems,
    weight_problems,
)
from compress.data import load_documents
from compress.export.onnx_genai import HEAD_NODE, run_builder
from compress.pipeline import baseline_speed_server, baseline_stages, decide, verify_artifact
from compress.recipe import NAME, Gates, Recipe, Target, Variant
from compress.report import write_report
from compress.results import FAIL, NOT_VERIFIED, Artifact, Outcome, Verdict
from compress.runtimes.llama_cpp import gguf_file
from compress.ui import stage
from compress.verify.size import checkpoint_bits, folder_bytes, gguf_bits, onnx_bits_per_weight, read_onnx

RUNTIMES = {"compressed-tensors": "transformers", "gptq": "onnxruntime-genai", "awq": "onnxruntime-genai",
            "onnx": "onnxruntime-genai", "gguf": "llama.cpp"}
DEFAULT_GATES = Gates(max_kld=0.1, min_top1=0.8, max_ppl_ratio=1.2)  # when no recipe names its own


def verify_recipe(folder: Path, baseline: str, recipe: Recipe | None, targets: list[str], dataset: str | None = None,
                  windows: int | None = None) -> Recipe:
    """The settings to verify with: the recipe's evaluation and gates, or defaults, on the targets asked for;
    `dataset` and `windows` replace the evaluation's."""
    base = recipe or Recipe(name=f"verify-{folder.name}", model=baseline, gates=DEFAULT_GATES,
                            variants=[Variant(name="artifact", method="rtn")])
    chosen = {"dataset": dataset, "windows": windows}
    return base.model_copy(update={
        "name": f"verify-{folder.name}",
        "evaluation": base.evaluation.model_copy(update={k: v for k, v in chosen.items() if v is not None}),
        "targets": {t: base.targets.get(t, Target(device=t, required=True)) for t in targets},
        "variants": [Variant(name=_artifact_name(folder), method="rtn")],
    })


def _artifact_name(folder: Path) -> str:
    """The folder's name, or its parent's where the folder is named after its format (release/<variant>/<format>)."""
    import re

    name = folder.parent.name if folder.name in (*RUNTIMES, "onnx-cuda") else (folder.stem if folder.is_file() else folder.name)
    return name if re.fullmatch(NAME, name) else "artifact"


def verify_folder(folder: Path, baseline_spec: str, recipe: Recipe, out: Path, console: Console) -> dict:
    fmt = detect_format(folder)
    console.print(f"   {folder}: {fmt}")
    budget = memory.default_budget()
    info, data, baseline, context = baseline_stages(recipe, "", baseline_spec, out, console, budget)
    variant = recipe.variants[0]
    with stage(console, 4, "Check files") as line:
        problems = gguf_problems(gguf_file(folder)) if fmt == "gguf" else truncation_problems(folder)
        sensitivity = []
        if not problems:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(info.path, local_files_only=True)
            text = "\n\n".join(load_documents(recipe.evaluation.dataset))[:20000]
            if fmt == "gguf":
                problems += gguf_tokenizer_problems(gguf_file(folder), tokenizer, text, out / "work")
            else:
                problems += tokenizer_problems(folder, tokenizer, text)
            if fmt not in ("onnx", "gguf"):
                weights, config_problems = quantized_layers(folder, fmt)
                problems += config_problems
                layer_problems, sensitivity = weight_problems(weights, info.path)
                problems += layer_problems
        line.done("no problems found" if not problems else f"{len(problems)} problem(s): " + "; ".join(problems))
    with stage(console, 5, "Measure") as line:
        # Files that cannot be read whole, or whose config contradicts its tensors, are not run at all.
        fatal = any("truncated" in p or "group_size" in p or "cannot be read" in p or "cannot tokenize" in p for p in problems)
        artifact = _artifact(folder, fmt, variant, out, sensitivity, readable=not fatal)
        if fatal:
            verdicts = {t: Verdict(t, FAIL, {}, problems) for t in recipe.targets}
        else:
            with baseline_speed_server(recipe, info, data, out) as baseline_speed:
                verdicts = verify_artifact(recipe, variant, artifact, baseline, data, out, info, budget, baseline_speed)
            for target, verdict in verdicts.items():
                if problems and verdict.status != NOT_VERIFIED:
                    verdicts[target] = Verdict(target, FAIL, verdict.metrics, problems + verdict.failures, verdict.environment)
        line.done(", ".join(f"{t}: {v.status}" for t, v in verdicts.items()))
    reasons = decide(recipe, verdicts)
    outcome = Outcome(artifact, verdicts, False, reasons or ["verified only: compress verify releases nothing"])
    with stage(console, 6, "Report") as line:
        report = write_report(out, recipe, info, baseline, [outcome], context, console)
        line.done(f"{out / 'report.html'}")
    report["passed"] = not reasons
    return report


def _artifact(folder: Path, fmt: str, variant: Variant, out: Path, sensitivity: list, readable: bool) -> Artifact:
    runnable = folder
    unknown = {"bits_per_weight": float("nan"), "bits_per_weight_all": float("nan")}
    if fmt == "gguf":
        file = gguf_file(folder)
        bits = gguf_bits(file) if readable else unknown
        return Artifact(variant.name, "external", fmt, folder, RUNTIMES[fmt], file.stat().st_size, bits, {}, runnable=file)
    if not readable:
        return Artifact(variant.name, "external", fmt, folder, RUNTIMES[fmt], folder_bytes(folder), unknown, {})
    if fmt in ("gptq", "awq"):
        work = out / "work" / "built-onnx"
        try:
            runnable = run_builder(folder, work, "int4", "cpu", {"accuracy_level": "1", "hf_token": "false",
                                   "nodes_to_exclude": f"{HEAD_NODE},/model/embed_tokens/Gather"},
                                   out / "work" / "cache", out / "work" / "builder.log")
        except RuntimeError:
            runnable = work  # verification then fails with the builder's own sentence
    bits = onnx_bits_per_weight(*read_onnx(folder)) if fmt == "onnx" else _safe_bits(folder)
    details = {"sensitivity_weights": sensitivity}
    return Artifact(variant.name, "external", fmt, folder, RUNTIMES[fmt], folder_bytes(folder), bits, details,
                    runnable=runnable)


def _safe_bits(folder: Path) -> dict:
    try:
        return checkpoint_bits(folder)
    except (ValueError, KeyError, OSError):  # a layout this counter does not know: leave it unmeasured
        return {"bits_per_weight": float("nan"), "bits_per_weight_all": float("nan")}
