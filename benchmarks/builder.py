"""The ONNX builder alone, by depth: peak RSS of `compress.export.builder_stream` building int4 from a folder of
round-to-nearest integer weights (GPTQ v1, W4 g128, head float), on random-weight checkpoints at Phi-4's width.

    python -m benchmarks.builder [--depths 1,2,4,8] [--family phi4] [--head float|int8] [--save]

--save writes benchmarks/results/<date>-<host>-builder-<family>-head-<head>.{json,md}.

The fullsize benchmark measures the same builder inside `compress run`, with the run's other processes beside
it; this one gives its own growth per layer in minutes instead of an hour.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

from benchmarks.common import CACHE, RESULTS, environment
from benchmarks.fullsize import run_tree
from benchmarks.maths import linear_fit
from benchmarks.models import FULL_LAYERS, random_model

RUNS = CACHE / "builder"

OPTIONS = {"float": ["block_size=128", "accuracy_level=4", "hf_token=false",
                     "nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather"],
           "int8": ["block_size=128", "accuracy_level=4", "hf_token=false", "algo_config=rtn",
                    "matmul_mixed_precision=last_matmul:int8"]}


def integer_folder(family: str, layers: int):
    """A GPTQ v1 folder of RTN W4 g128 weights (head float) of a random `family`-width checkpoint."""
    from compress.export.gptq_v1 import write_gptq_v1
    from compress.quantize.streaming import calibrate_streaming
    from compress.recipe import Variant

    work = RUNS / f"builder-{family}-{layers}L"
    shutil.rmtree(work, ignore_errors=True)
    variant = Variant(name="rtn", method="rtn", bits=4, group_size=128, ignore=["lm_head"])
    calibrate_streaming(random_model(family, layers), variant, None, work / "ct", work / "activations")
    return write_gptq_v1(work / "ct", work / "gptq"), work


def measure(family: str, layers: int, head: str) -> dict:
    folder, work = integer_folder(family, layers)
    command = [sys.executable, "-m", "compress.export.builder_stream", "-i", str(folder), "-o", str(work / "onnx"),
               "-p", "int4", "-e", "cpu", "-c", str(work / "cache"), "--extra_options", *OPTIONS[head]]
    result = run_tree(command, work / "builder.log")
    onnx_bytes = sum(f.stat().st_size for f in (work / "onnx").glob("model.onnx*")) if result["returncode"] == 0 else 0
    shutil.rmtree(work, ignore_errors=True)
    return {"layers": layers, "returncode": result["returncode"], "seconds": result["seconds"],
            "peak_gib": round(result["peak_tree_rss_mb"] / 1024, 2),  # the builder is the whole tree here
            "onnx_gib": round(onnx_bytes / 2**30, 2), "others_cpu": result["others_cpu"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1,2,4,8")
    parser.add_argument("--family", default="phi4", choices=["phi4", "phi4-mini"])
    parser.add_argument("--head", default="float", choices=sorted(OPTIONS))
    parser.add_argument("--save", action="store_true", help="write the result to benchmarks/results")
    options = parser.parse_args(argv)
    rows = [measure(options.family, int(depth), options.head) for depth in options.depths.split(",")]
    fit = {}
    if len(rows) > 1:
        intercept, slope = linear_fit([row["layers"] for row in rows], [row["peak_gib"] for row in rows])
        fit = {"gib_per_layer": round(slope, 3), f"at_{FULL_LAYERS[options.family]}_layers_gib":
               round(intercept + slope * FULL_LAYERS[options.family], 2)}
    result = {"environment": environment(), "family": options.family, "head": options.head, "rows": rows,
              "fit": fit, "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python -m benchmarks.builder", *argv_or(argv)])}
    print(json.dumps(result, indent=1))
    if options.save:
        stem = RESULTS / f"{result['date']}-{result['environment']['host']}-builder-{options.family}-head-{options.head}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {stem}.json and .md", file=sys.stderr)


def argv_or(argv) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# The ONNX builder alone, by depth ({result['date']}, {env['host']})", "",
             f"{env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB; onnxruntime-genai "
             f"{env['versions']['onnxruntime-genai']}, load average at start {env['load_average_at_start']}. "
             f"`{result['command']}`.", "",
             f"`compress.export.builder_stream` building int4 (block 128, accuracy level 4, head "
             f"{result['head']}) from a GPTQ v1 folder of RTN weights of a random {result['family']}-width "
             "checkpoint. Peak = largest RSS of the builder's process tree, polled every 0.1 s. Times are slow "
             "where others' CPU (the share of the machine other processes used meanwhile) is high.", "",
             "| layers | peak GiB | ONNX GiB | seconds | others' CPU |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {row['layers']} | {row['peak_gib']:.2f} | {row['onnx_gib']:.2f} | {row['seconds']:.0f} | "
              f"{row['others_cpu']:.2f} |" for row in result["rows"]]
    if result["fit"]:
        lines += ["", "Least-squares fit over the depths: " + ", ".join(f"{key} {value}" for key, value in result["fit"].items())]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
