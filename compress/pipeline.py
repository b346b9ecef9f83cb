"""The stages of `compress run`, in order, as plain calls:

preflight -> data -> baseline -> quantize + export -> verify -> gate -> release -> report
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from compress import interrupts, memory, timing
from compress.cache import baseline_key, load_baseline, store_baseline
from compress.data import (
    array_hash,
    calibration_samples,
    chat_prompts,
    evaluation_windows,
    load_documents,
    stop_token_ids,
    token_stream,
)
from compress.model import ModelError, ModelInfo, inspect_model
from compress.produce import produce
from compress.recipe import Recipe, Variant
from compress.release import build_manifest, package_versions, release, write_json_atomic
from compress.report import write_report
from compress.results import FAIL, NOT_VERIFIED, PASS, Artifact, Outcome, Verdict
from compress.resume import calibration_stamp, released_outcomes, variant_stamp
from compress.runtimes import llama_cpp_tools
from compress.ui import progress_bar, stage
from compress.verify.cpu_share import BUSY
from compress.verify.gates import check_gates
from compress.verify.generation import generation_figures
from compress.verify.isolated import (
    KeptServer,
    MeasurementError,
    SpeedServer,
    measure_and_time_in_turn,
    measure_in_subprocess,
)
from compress.verify.size import folder_bytes, onnx_weight_bytes
from compress.verify.targets import availability, free_device_memory


@dataclass(frozen=True)
class RunData:
    windows_file: Path  # npz: windows [W, seq_len], prompt [prompt_tokens]
    samples: np.ndarray  # calibration [samples, seq_len]
    hashes: dict[str, str]
    chat_prompts: list[list[int]]  # generation sanity: fixed prompts in the chat template
    stop_ids: list[int]


@dataclass(frozen=True)
class Baseline:
    size_bytes: int
    results: dict[str, dict]  # target -> worker result (metrics, environment)
    references: dict[str, Path]  # target -> reference npz
    missing: dict[str, str]  # target -> why it could not be measured here


def preflight(recipe: Recipe, model_spec: str, console: Console, out: Path, budget: int,
              max_memory: bool = False) -> ModelInfo:
    """Resolve and inspect the model, check every variant fits it, and refuse early if memory is short."""
    info = inspect_model(model_spec)
    config = info.config
    if any(variant.writes_gguf for variant in recipe.variants) and (reason := llama_cpp_tools.missing()):
        raise ModelError(f"gguf variants need llama.cpp: {reason}")
    input_sizes = {"hidden_size": int(config["hidden_size"]), "intermediate_size": int(config["intermediate_size"])}
    for index, variant in enumerate(recipe.variants):
        groups = {setting[1] for setting in variant.candidate_settings().values() if setting} if variant.method == "auto" \
            else {variant.group_size}
        for name, size in input_sizes.items():
            for group in groups - {-1}:
                if size % group:
                    field = f"candidates: group size {group}" if variant.method == "auto" else f"group_size: {group}"
                    raise ModelError(f"variants[{index}].{field} does not divide the model's {name} {size}")
    gib = 2**30
    console.print(
        f"   model {info.spec}: {info.parameters / 1e6:.1f}M parameters, {info.layers} layers, "
        f"{info.weight_bytes / gib:.2f} GiB as stored ({info.stored_dtype})"
    )
    console.print(f"   memory budget {budget / gib:.1f} GiB" + ("" if max_memory else " (available memory less a margin; set it with --max-memory)"))
    for name, (needed, required) in memory.run_estimates(info, recipe, budget).items():
        fits = needed <= budget
        console.print(f"   {'✓' if fits else ('✗' if required else '–')} {name}: {needed / gib:.1f} GiB"
                      + ("" if fits or required else " — will be reported not verified"), highlight=False)
        if required and not fits:
            raise ModelError(f"{info.spec}: the {name} needs about {needed / gib:.1f} GiB of memory but the budget is "
                             f"{budget / gib:.1f} GiB; raise --max-memory, free memory, or lower the calibration samples")
    _print_time_estimates(recipe, info, console)
    disk_needed, disk_free = estimate_disk(recipe, info), shutil.disk_usage(_existing_parent(out)).free
    console.print(f"   disk needed for the run folder: about {disk_needed / 2**20:.0f} MiB; free {disk_free / 2**20:.0f} MiB")
    if disk_needed > disk_free:
        raise ModelError(f"the run needs about {disk_needed / 2**20:.0f} MiB of disk in {out} but only "
                         f"{disk_free / 2**20:.0f} MiB is free; free some space or choose another --out")
    gpu_targets = [target for target, place in recipe.targets.items() if recipe.device(target) == "cuda" and not place.node_labels]
    if gpu_targets and (free := free_device_memory("cuda")) is not None:
        device_verify = info.weight_bytes + 2 * recipe.evaluation.seq_len * int(config["vocab_size"]) * 4 + 512 * 2**20
        console.print(f"   GPU memory needed to verify: {device_verify / gib:.1f} GiB; free {free / gib:.1f} GiB")
        if device_verify > free and any(recipe.targets[target].required for target in gpu_targets):
            raise ModelError(f"{info.spec} needs about {device_verify / gib:.1f} GiB of GPU memory but only {free / gib:.1f} GiB is free")
    return info


def _print_time_estimates(recipe: Recipe, info: ModelInfo, console: Console) -> None:
    """Each layer-by-layer calibration's estimated time (compress.timing), on this machine's measured rate."""
    rate, amx = timing.machine_rate(), timing.has_amx()
    for variant, layer in timing.calibration_estimates(memory.Shapes.from_info(info), recipe, rate, amx):
        search = f"; AWQ's search about {timing.describe(layer.method)} of each" if variant.method == "awq" else ""
        console.print(f"   time, calibrating {variant.name}: about {timing.describe(layer.total * info.layers)} ({info.layers} layers × "
                      f"{timing.describe(layer.total)}{search}; this CPU multiplies at {rate / 1e9:.0f} GFLOP/s)", highlight=False)


def estimate_disk(recipe: Recipe, info: ModelInfo) -> int:
    """Bytes a run writes, on the generous side: each artifact at most half the stored model (int4/int8
    weights, scales, a float head), a saved calibration per calibrated variant, fp32 graphs where built."""
    artifacts = sum(len(v.formats) + (1 if v.calibrated else 0) for v in recipe.variants)
    fp32_graphs = sum(v.method == "onnx-int8-dynamic" for v in recipe.variants)
    float_gguf = info.weight_bytes if any(v.writes_gguf for v in recipe.variants) else 0  # shared by gguf variants
    return int(info.weight_bytes * 0.5 * artifacts + info.parameters * 4 * fp32_graphs + float_gguf + 64 * 2**20)


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def prepare_data(recipe: Recipe, info: ModelInfo, run_dir: Path) -> RunData:
    """Tokenize the evaluation and calibration sets with the baseline's tokenizer; save the windows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(info.path, local_files_only=True, trust_remote_code=False)
    tokenizer.model_max_length = 1 << 30  # documents are cut into windows here, not by the tokenizer
    if len(tokenizer) > int(info.config["vocab_size"]):
        raise ModelError(f"{info.spec}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                         f"{info.config['vocab_size']}: they belong to different models")
    evaluation, calibration = recipe.evaluation, recipe.calibration
    eval_stream = token_stream(load_documents(evaluation.dataset), tokenizer)
    windows = evaluation_windows(eval_stream, evaluation.seq_len, evaluation.windows, evaluation.dataset)
    prompt = eval_stream[: evaluation.prompt_tokens]
    calib_stream = token_stream(load_documents(calibration.dataset), tokenizer)
    samples = calibration_samples(calib_stream, calibration.seq_len, calibration.samples, calibration.seed, calibration.dataset)
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    windows_file = data_dir / "windows.npz"
    np.savez(windows_file, windows=windows, prompt=prompt)
    hashes = {"evaluation_tokens": array_hash(windows), "calibration_tokens": array_hash(samples)}
    prompts = chat_prompts(tokenizer, evaluation.prompts)
    return RunData(windows_file, samples, hashes, prompts, stop_token_ids(info.path, tokenizer))


def _job(recipe: Recipe, folder: Path, runtime: str, target: str, data: RunData) -> dict:
    evaluation = recipe.evaluation
    return {
        "artifact": str(folder),
        "runtime": runtime,
        "target": target,
        "windows": str(data.windows_file),
        "top_k": evaluation.top_k,
        "new_tokens": evaluation.new_tokens,
        "speed_runs": evaluation.speed_runs,
        "prompts": data.chat_prompts,
        "stop_ids": data.stop_ids,
        "generation_tokens": evaluation.generation_tokens,
    }


def evaluate_baseline(recipe: Recipe, info: ModelInfo, data: RunData, run_dir: Path, budget: int,
                      placed: bool = False) -> Baseline:
    """Perplexity, reference log-probs and speed of the original model on every target present.

    On the CPU the accuracy comes from a layer-at-a-time forward of the checkpoint on disk; speed and
    generations need the whole model in transformers and are measured only where it fits `budget`.
    Cached by model fingerprint, evaluation settings, tokens, device and library versions (compress.cache).
    A target with node labels is measured only where a cluster `placed` this run on its node.
    """
    results, references, missing = {}, {}, {}
    versions = package_versions()
    shapes = memory.Shapes.from_info(info)
    for target, place in recipe.targets.items():
        device = recipe.device(target)
        reason = availability(device) or (None if placed or not place.node_labels else unplaced(place))
        if reason:
            missing[target] = reason
            continue
        reference = run_dir / "baseline" / f"reference-{target}.npz"
        key = baseline_key({
            "model": model_fingerprint(info), "evaluation": recipe.evaluation.model_dump(), "tokens": data.hashes["evaluation_tokens"],
            "prompts": data.chat_prompts, "stop": data.stop_ids, "target": device,
            "versions": {name: versions[name] for name in ("torch", "transformers", "compress")},
        })
        job = {**_job(recipe, info.path, "transformers", device, data), "write_reference": str(reference)}
        if device == "cpu":
            whole = memory.baseline_whole_model_cpu(shapes, recipe.evaluation.seq_len)
            job.update(layerwise=True, activation_budget=memory.activation_budget(budget),
                       spill_dir=str(run_dir / "work" / "baseline-activations"), whole_model=whole <= budget,
                       whole_model_reason=f"the whole model in transformers {memory.describe(whole, budget)}")
        result = load_baseline(key, reference)
        if result is None:
            result = measure_in_subprocess(job, run_dir / "baseline", target)
            if result["continuations"] is not None:
                result["metrics"].update(generation_figures(result["continuations"], set(data.stop_ids), recipe.evaluation.generation_tokens))
            store_baseline(key, result, reference)
            result["cached"] = False
        elif job.get("whole_model", True):
            # Speed is never taken from the cache: speedups compare figures measured in one run.
            fresh = measure_in_subprocess({**job, "speed_only": True}, run_dir / "baseline", target)
            result["metrics"].update({k: v for k, v in fresh["metrics"].items() if k.endswith(("_tps", "_tps_min", "_tps_max", "others_cpu", "rss_mb", "vram_mb"))})
            result["environment"], result["cached"] = fresh["environment"], True
        else:
            result["cached"] = True
        results[target] = result
        references[target] = reference
    return Baseline(folder_bytes(info.path), results, references, missing)


def baseline_speed_server(recipe: Recipe, info: ModelInfo, data: RunData, run_dir: Path) -> KeptServer:
    """The baseline's speed server on the CPU, which artifacts are timed in turn with (verify_artifact)."""
    return KeptServer(_job(recipe, info.path, "transformers", "cpu", data), run_dir / "work" / "baseline-speed", "baseline-speed")


def verify_artifact(recipe: Recipe, variant: Variant, artifact: Artifact, baseline: Baseline, data: RunData, run_dir: Path,
                    info: ModelInfo, budget: int, baseline_speed: KeptServer) -> dict[str, Verdict]:
    """Load the exported artifact back from disk on each target, measure it, and check the gates. On the CPU,
    where the baseline fits beside the artifact, its speed is taken in turn with `baseline_speed`'s."""
    gates = recipe.gates_for(variant).model_dump()
    runtime = artifact.runtime if artifact.runtime in ("transformers", "llama.cpp") else "onnxruntime-genai"
    verdicts = {}
    for target in recipe.targets:
        device = recipe.device(target)
        if target in artifact.skipped:
            status, why = artifact.skipped[target]
            verdicts[target] = Verdict(target, status, {}, [why])
            continue
        missing = baseline.missing.get(target) or availability(device, runtime)
        if missing:
            verdicts[target] = Verdict(target, NOT_VERIFIED, {}, [missing])
            continue
        if device == "cpu" and (needed := _whole_artifact_bytes(artifact, runtime, info, recipe)) > budget:
            verdicts[target] = Verdict(target, NOT_VERIFIED, {}, [f"{runtime} must hold the whole artifact: it {memory.describe(needed, budget)}"])
            continue
        base = baseline.results[target]["metrics"]
        # Speed in turn with the baseline where both fit in memory at once (the CPU), else in the artifact's worker.
        interleave = device == "cpu" and "decode_tps" in base and needed + memory.baseline_whole_model_cpu(
            memory.Shapes.from_info(info), recipe.evaluation.seq_len) <= budget
        job = {**_job(recipe, artifact.runnable or artifact.path, runtime, device, data), "reference": str(baseline.references[target]),
               "skip_speed": interleave}
        job_dir = run_dir / "work" / variant.name / artifact.format
        try:
            if interleave:
                result, base = _measured_and_interleaved(recipe, job, baseline_speed.get(), job_dir)
            else:
                result = measure_in_subprocess(job, job_dir, target)
        except MeasurementError as error:
            verdicts[target] = Verdict(target, FAIL, {}, [f"the artifact could not be run: {error}"])
            continue
        metrics = result["metrics"]
        metrics["size_ratio"] = artifact.size_bytes / baseline.size_bytes
        if "decode_tps" in base:
            metrics["speed_interleaved"] = interleave
            metrics["baseline_others_cpu"] = base.get("others_cpu")
            metrics["decode_speedup"] = metrics["decode_tps"] / base["decode_tps"]
            metrics["prefill_speedup"] = metrics["prefill_tps"] / base["prefill_tps"]
        metrics.update(generation_figures(result["continuations"], set(data.stop_ids), recipe.evaluation.generation_tokens,
                                          baseline.results[target]["continuations"], recipe.evaluation.agreement_tokens))
        failures = check_gates(gates, metrics)
        verdicts[target] = Verdict(target, FAIL if failures else PASS, metrics, failures, result["environment"])
    return verdicts


def _measured_and_interleaved(recipe: Recipe, job: dict, baseline: SpeedServer, job_dir: Path) -> tuple[dict, dict]:
    """The artifact measured, then timed in turn with the baseline. -> (its result, with its speed figures in its
    metrics; the baseline's speed figures)."""
    evaluation = recipe.evaluation
    result, speeds = measure_and_time_in_turn(job, baseline, job_dir, evaluation.prompt_tokens, evaluation.new_tokens,
                                              evaluation.speed_runs)
    metrics = result["metrics"]
    metrics.update(speeds["artifact"])
    metrics.update({f"baseline_{key}": speeds["baseline"][key] for key in ("decode_tps", "prefill_tps")})
    return result, speeds["baseline"]


def _whole_artifact_bytes(artifact: Artifact, runtime: str, info: ModelInfo, recipe: Recipe) -> int:
    """Memory the artifact's runtime needs to hold it: transformers dequantizes to float32 on the CPU."""
    shapes = memory.Shapes.from_info(info)
    if runtime == "transformers":
        return memory.whole_model_cpu(shapes, recipe.evaluation.seq_len)
    if runtime == "llama.cpp":
        return memory.llama_cpp_runtime(artifact.size_bytes, shapes, recipe.evaluation.seq_len)
    return memory.onnx_runtime(onnx_weight_bytes(artifact.runnable or artifact.path), shapes, recipe.evaluation.seq_len)


def decide(recipe: Recipe, verdicts: dict[str, Verdict]) -> list[str]:
    """Why an artifact may not be released: a failed target, or a required target not verified."""
    reasons = []
    for target, verdict in verdicts.items():
        if verdict.status == FAIL:
            reasons.append(f"{target}: " + "; ".join(verdict.failures))
        elif verdict.status == NOT_VERIFIED and recipe.targets[target].required:
            reasons.append(f"{target} is required but was not verified: {verdict.failures[0]}")
    return reasons


def model_fingerprint(info: ModelInfo) -> str:
    """sha256 over config.json and each weight file's name, size and header: cheap even for 14B models."""
    digest = hashlib.sha256((info.path / "config.json").read_bytes())
    for file in sorted(info.path.glob("*.safetensors")):
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            digest.update(file.name.encode() + str(file.stat().st_size).encode() + handle.read(length))
    return digest.hexdigest()


def unplaced(place) -> str:
    """Why a target with node labels is not verified in a run without a cluster."""
    return f"no cluster: a node with labels {place.where()} is this target (run with --cluster ADDRESS)"


def _under_load(metrics: dict) -> str:
    share = metrics.get("others_cpu") or 0.0
    return f" (timed while other processes used {share:.0%} of the CPU)" if share > BUSY else ""


def baseline_stages(recipe: Recipe, recipe_path: str, model_spec: str, out: Path, console: Console, budget: int,
                    max_memory: bool = False, evaluate=evaluate_baseline):
    """Stages 1-3, shared by `compress run` and `compress verify`; `evaluate(recipe, info, data, out, budget)`
    measures the baseline (on a cluster, on each target's node). -> (info, data, baseline, context)."""
    with stage(console, 1, "Preflight") as line:
        info = preflight(recipe, model_spec, console, out, budget, max_memory)
        out.mkdir(parents=True, exist_ok=True)
        line.done(f"{info.spec} is a Phi-3-architecture model and fits in memory")
    with stage(console, 2, "Data") as line:
        data = prepare_data(recipe, info, out)
        line.done(
            f"{recipe.evaluation.windows}×{recipe.evaluation.seq_len} evaluation tokens, "
            f"{recipe.calibration.samples}×{recipe.calibration.seq_len} calibration tokens"
        )
    with stage(console, 3, "Baseline") as line:
        baseline = evaluate(recipe, info, data, out, budget)
        line.done(", ".join(
            f"{target}: ppl {result['metrics']['ppl']:.3f}, "
            + (f"decode {result['metrics']['decode_tps']:.0f} tok/s" + _under_load(result["metrics"]) if "decode_tps" in result["metrics"]
               else f"speed not measured ({result.get('not_measured')})")
            + (" (cached)" if result["cached"] else "")
            for target, result in baseline.results.items()
        ) + "".join(f"; {target}: not verified ({why})" for target, why in baseline.missing.items()))

    context = {
        "recipe": recipe.model_dump(mode="json", by_alias=True),
        "recipe_sha256": recipe.digest(),
        "recipe_path": recipe_path,
        "model": {"spec": info.spec, "path": str(info.path), "fingerprint": model_fingerprint(info), "parameters": info.parameters},
        "data": data.hashes,
        "versions": package_versions(),
    }
    return info, data, baseline, context


def run(recipe: Recipe, recipe_path: str, out: Path, model_spec: str | None = None, console: Console | None = None,
        max_memory_gib: float | None = None) -> dict:
    """Run every stage of a recipe into `out` within a host-memory budget (default: available memory less a
    margin). -> the report (also written to out/report.json)."""
    console = console or Console()
    budget = int(max_memory_gib * memory.GIB) if max_memory_gib else memory.default_budget()
    info, data, baseline, context = baseline_stages(recipe, recipe_path, model_spec or recipe.model, out, console, budget,
                                                    bool(max_memory_gib))
    outcomes: list[Outcome] = []
    stamps: dict[str, str] = {}
    kept: list[str] = []
    # The baseline's speed server stays loaded between artifacts unless a stage needs its memory.
    beside_every_stage = memory.speed_server_fits_beside_every_stage(info, recipe, budget)
    with stage(console, 4, "Quantize, export, verify", spinner=False) as line, \
            baseline_speed_server(recipe, info, data, out) as baseline_speed:
        with progress_bar(console) as bar:
            task = bar.add_task("variants", total=len(recipe.variants))
            for variant in recipe.variants:
                interrupts.check()
                stamps[variant.name] = variant_stamp(recipe, variant, context, stamps)
                reused = released_outcomes(recipe, variant, out, stamps[variant.name])
                if reused is not None:  # resumed: released before from the same inputs, files intact
                    outcomes += reused
                    kept.append(variant.name)
                    bar.advance(task)
                    continue
                bar.update(task, description=f"{variant.name}: quantizing ({variant.method})")
                if not beside_every_stage:
                    baseline_speed.close()
                artifacts = produce(variant, recipe, info, data.samples, out, calibration_stamp(variant, context), budget,
                                    data.stop_ids)
                for artifact in artifacts:
                    bar.update(task, description=f"{variant.name}: verifying {artifact.format}")
                    verdicts = verify_artifact(recipe, variant, artifact, baseline, data, out, info, budget, baseline_speed)
                    reasons = decide(recipe, verdicts)
                    outcomes.append(Outcome(artifact, verdicts, not reasons, reasons))
                bar.advance(task)
        line.done(f"{len(outcomes)} artifact(s) from {len(recipe.variants)} variant(s)"
                  + (f"; unchanged since their release, skipped: {', '.join(kept)}" if kept else ""))

    with stage(console, 5, "Release") as line:
        released = []
        for index, outcome in enumerate(outcomes):
            if outcome.artifact.variant in kept:
                continue
            manifest = build_manifest(outcome, {**context, "inputs_stamp": stamps[outcome.artifact.variant]})
            write_json_atomic(outcome.artifact.path / "manifest.json", manifest)
            if outcome.released:
                destination = out / "release" / outcome.artifact.variant / outcome.artifact.format
                moved_to = release(outcome.artifact.path, destination, out / "work" / "retired")
                outcomes[index] = Outcome(Artifact(**{**outcome.artifact.__dict__, "path": moved_to}), outcome.verdicts, True, [])
                released.append(f"{outcome.artifact.variant}/{outcome.artifact.format}")
        line.done(f"released {len(released)} of {len(outcomes)}" + (f": {', '.join(released)}" if released else "")
                  + (f"; kept {len(kept)} variant(s) released earlier" if kept else ""))

    with stage(console, 6, "Report") as line:
        report = write_report(out, recipe, info, baseline, outcomes, context, console)
        line.done(f"{out / 'report.md'} and {out / 'report.json'}")
    return report

