"""What runs on a node: a target's baseline, a variant's calibration and build, an artifact's check on a target.

Each task works in a scratch folder of its own laid out as a run folder, takes what it needs from the run
folder (compress.cluster.store) by relative path, calls the same stage a local run calls, puts back what
other nodes will need, and returns small records (relative paths, figures, the node it ran on).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from compress import memory
from compress.cluster.nodes import here, take_threads
from compress.cluster.store import Store

WINDOWS = "data/windows.npz"
TOKEN = "work/cluster-run.json"  # the driver's token for this run: a node that reads it sees the run folder
STARTED = "work/started"  # each task's mark that a node started it (the driver's placement backstop reads them)
# A calibrated variant's saved calibration: what a `from:` variant and a resumed run need of it.
CALIBRATION = ("calibrated", "calibration.json", "awq-scales.safetensors")


OWN_FOLDER = re.compile(r"compress-(?:task|speed)-(\d+)-[a-z0-9_]{8}")  # as own_folder names them


def own_folder(kind: str) -> Path:
    """A new folder of this worker process's own on the node (under COMPRESS_SCRATCH or the system's temporary
    folder), named with its process id; first, the folders of workers that ended without removing theirs (a
    worker killed by the kernel's OOM killer, or by Ray at a run's end) are removed: a checker's copy of an
    8–28 GB artifact must not outlive its worker by more than the next task on the node."""
    root = Path(os.environ.get("COMPRESS_SCRATCH") or tempfile.gettempdir())
    for folder in root.glob("compress-*"):
        if (mine := OWN_FOLDER.fullmatch(folder.name)) and not psutil.pid_exists(int(mine[1])):
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"compress-{kind}-{os.getpid()}-", dir=root))


@contextmanager
def scratch() -> Iterator[Path]:
    """A run folder of this task's own on the node, removed when the task ends."""
    folder = own_folder("task")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def begin(store: Store, token: str, marker: str) -> dict:
    """Refuse to work on a node that does not see the driver's run folder (a local --out that is not shared);
    else mark the task started, take the CPUs Ray gave it, and -> the node it runs on."""
    if (store.read_json(TOKEN) or {}).get("token") != token:
        raise RuntimeError(f"the run folder {store.uri} is not the driver's on this node: give --out a path every "
                           "node shares (NFS) or a URI (s3://, gs://)")
    take_threads()
    node = here()
    store.write_json(f"{STARTED}/{marker}.json", node)
    return node


def _local_data(store: Store, data, run_dir: Path):
    store.pull(WINDOWS, run_dir / WINDOWS)
    return dataclasses.replace(data, windows_file=run_dir / WINDOWS)


def _one_target(recipe, target: str):
    return recipe.model_copy(update={"targets": {target: recipe.targets[target]}})


def baseline_task(store: Store, token: str, marker: str, recipe, target: str, model_spec: str, data, budget: int) -> dict:
    """The original model on this node: -> {"result", "reference"} or {"missing": why}, with the node."""
    from compress.model import inspect_model
    from compress.pipeline import evaluate_baseline

    node = begin(store, token, marker)
    with scratch() as run_dir:
        info = inspect_model(model_spec)
        baseline = evaluate_baseline(_one_target(recipe, target), info, _local_data(store, data, run_dir), run_dir,
                                     budget, placed=True)
        if target in baseline.missing:
            return {"missing": baseline.missing[target], "node": node}
        reference = f"baseline/reference-{target}.npz"
        store.push(baseline.references[target], reference)
        result = baseline.results[target]
        result["environment"]["node"] = node
        return {"result": result, "reference": reference}


def produce_task(store: Store, token: str, marker: str, recipe, name: str, model_spec: str, data, budget: int, stamp: str,
                 source: dict | None = None) -> dict:
    """A variant's calibration or build and every format of it, put into the run folder's staging/.
    `source`: the record of its `from:` variant's task (Ray runs this one after it), None where that was
    released earlier. -> {"artifacts": [(Artifact with relative paths, its files' sha256)], "node"}."""
    from compress.model import inspect_model
    from compress.produce import produce
    from compress.release import file_hashes

    node = begin(store, token, marker)
    _injected_fault(store, name)
    variant = next(v for v in recipe.variants if v.name == name)
    with scratch() as run_dir:
        info = inspect_model(model_spec)
        if not memory.speed_server_fits_beside_every_stage(info, recipe, budget):
            close_speed_servers()
        for owner in filter(None, (name, variant.from_)):  # a calibration saved earlier, the source's calibration
            for part in CALIBRATION:
                store.pull(f"work/{owner}/{part}", run_dir / "work" / owner / part)
        artifacts = produce(variant, recipe, info, data.samples, run_dir, stamp, budget, data.stop_ids)
        records = []
        for artifact in artifacts:
            folders = {artifact.path} | ({artifact.runnable} if artifact.runnable else set())
            for folder in folders:
                store.push(folder, str(folder.relative_to(run_dir)))
            relative = dataclasses.replace(
                artifact, path=artifact.path.relative_to(run_dir),
                runnable=artifact.runnable.relative_to(run_dir) if artifact.runnable else None,
                details={**artifact.details, "log": store.show(f"logs/{name}.log"), "node": node})
            records.append((relative, file_hashes(artifact.path)))
        for part in CALIBRATION:
            if (run_dir / "work" / name / part).exists():
                store.push(run_dir / "work" / name / part, f"work/{name}/{part}")
        if (log := run_dir / "logs" / f"{name}.log").is_file():
            store.push(log, f"logs/{name}.log")
        return {"artifacts": records, "node": node}


def _injected_fault(store: Store, name: str) -> None:
    """For the tests of retries: COMPRESS_CLUSTER_FAULT=variant:times[,variant:times] makes that variant's task end
    its worker process abruptly (as a killed worker or a lost node does) the first `times` times it starts."""
    faults = dict(item.rsplit(":", 1) for item in os.environ.get("COMPRESS_CLUSTER_FAULT", "").split(",") if ":" in item)
    if name not in faults:
        return
    times = faults[name]
    record = f"faults/{name}.json"
    started = (store.read_json(record) or {}).get("started", 0) + 1
    store.write_json(record, {"started": started})
    if started <= int(times):
        os._exit(1)


def verify_task(store: Store, token: str, marker: str, recipe, target: str, name: str, artifact, baseline: dict, model_spec: str, data,
                budget: int, baseline_bytes: int):
    """`artifact` (relative paths) loaded back from the run folder onto this node and checked on `target`, timed
    in turn with the baseline on a CPU as a local run does. -> its Verdict, with the node in its environment."""
    from compress.model import inspect_model
    from compress.pipeline import Baseline, baseline_speed_server, verify_artifact

    node = begin(store, token, marker)
    variant = next(v for v in recipe.variants if v.name == name)
    one = _one_target(recipe, target)
    with scratch() as run_dir:
        info = inspect_model(model_spec)
        local_data = _local_data(store, data, run_dir)
        for folder in {artifact.path, artifact.runnable} - {None}:
            store.pull(str(folder), run_dir / folder)
        reference = run_dir / baseline["reference"]
        store.pull(baseline["reference"], reference)
        local = dataclasses.replace(artifact, path=run_dir / artifact.path,
                                    runnable=run_dir / artifact.runnable if artifact.runnable else None)
        measured = Baseline(baseline_bytes, {target: baseline["result"]}, {target: reference}, {})
        speed = _kept_speed_server(f"{token}-{target}", lambda folder: baseline_speed_server(
            one, info, dataclasses.replace(local_data, windows_file=_copy(local_data.windows_file, folder)), folder))
        verdict = verify_artifact(one, variant, local, measured, local_data, run_dir, info, budget, speed)[target]
        verdict.environment["node"] = node
        return verdict


# The baseline's speed server of this run and target, kept in the worker process between its check tasks (Ray
# reuses a job's workers), as a local run keeps one between artifacts: loaded once per node, not once per check.
_SPEED: dict[str, tuple] = {}  # key -> (KeptServer, its folder)


def _kept_speed_server(key: str, start):
    """The kept server for `key` (`start(folder)` makes it the first time); any other key's is closed first."""
    for other in [k for k in _SPEED if k != key]:
        close_speed_servers(other)
    if key not in _SPEED:
        folder = own_folder("speed")
        _SPEED[key] = (start(folder), folder)
    return _SPEED[key][0]


def close_speed_servers(key: str | None = None) -> None:
    """Close the kept speed server of `key`, or every one (before a stage that needs their memory)."""
    for name in [key] if key else list(_SPEED):
        if name in _SPEED:
            server, folder = _SPEED.pop(name)
            server.close()
            shutil.rmtree(folder, ignore_errors=True)


def _copy(file: Path, folder: Path) -> Path:
    shutil.copy2(file, folder / file.name)
    return folder / file.name
