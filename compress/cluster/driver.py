"""`compress run --cluster`: compress.pipeline.run's stages with the baseline of each target, each variant's
calibration and build, and each (artifact, target) check as Ray tasks, on the nodes that are their targets.

Preflight, data and the release decision stay on the driver; the run folder is wherever `--out` names it
(compress.cluster.store). A task whose node fails is retried once by Ray, then reported as that variant's (or
that check's) failure in one sentence while the others go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import uuid
from pathlib import Path

from rich.console import Console

from compress import interrupts, memory
from compress.cache import cache_root
from compress.cluster import tasks
from compress.cluster.nodes import Node, Placement, alive_nodes, connect, disconnect, place
from compress.cluster.store import Store
from compress.pipeline import Baseline, baseline_stages, decide
from compress.release import build_manifest, release_is_current
from compress.report import build_report, print_summary, render_files
from compress.results import FAIL, NOT_VERIFIED, Artifact, Outcome, Verdict
from compress.resume import calibration_stamp, released_outcomes, variant_stamp
from compress.ui import progress_bar, stage
from compress.verify.size import folder_bytes

# Waiting this long with nothing finished, the driver looks whether each waiting task's nodes are still there
# and whether a task has waited longer than PLACEMENT_SECONDS for a node to start it.
BACKSTOP_SECONDS = 60
PLACEMENT_SECONDS = float(os.environ.get("COMPRESS_CLUSTER_PLACEMENT_TIMEOUT", 1800))


def run_on_cluster(recipe, recipe_path: str, out: str, address: str, model_spec: str | None = None,
                   console: Console | None = None, max_memory_gib: float | None = None) -> dict:
    """Run every stage of a recipe on the Ray cluster at `address` into the run folder `out` (a path or URI).
    -> the report (also written to the run folder's report.json)."""
    console = console or Console()
    store = Store(out)
    store.check_writable()
    local = store.local or cache_root() / "cluster-runs" / hashlib.sha256(store.uri.encode()).hexdigest()[:16]
    budget = int(max_memory_gib * memory.GIB) if max_memory_gib else memory.default_budget()
    spec = model_spec or recipe.model
    connect(address)
    try:
        nodes = alive_nodes()
        console.print(f"   cluster at {address}: " + "; ".join(_describe(node) for node in nodes), highlight=False)
        run = ClusterRun(recipe, store, nodes, spec, budget)
        info, data, baseline, context = baseline_stages(recipe, recipe_path, spec, local, console, budget,
                                                        bool(max_memory_gib), run.baseline)
        context["cluster"] = {"address": address, "nodes": [dataclasses.asdict(node) for node in nodes], "out": store.uri}
        with stage(console, 4, "Quantize, export, verify (on the cluster)", spinner=False) as line:
            outcomes, kept, stamps, hashes = run.variants(info, baseline, context, console)
            line.done(f"{len(outcomes)} artifact(s) from {len(recipe.variants)} variant(s)"
                      + (f"; unchanged since their release, skipped: {', '.join(kept)}" if kept else ""))
        with stage(console, 5, "Release") as line:
            released = run.release(outcomes, kept, stamps, hashes, context)
            line.done(f"released {len(released)} of {len(outcomes)}" + (f": {', '.join(released)}" if released else ""))
        with stage(console, 6, "Report") as line:
            report = build_report(local, recipe, info, baseline, outcomes, context)
            report["cluster"] = context["cluster"]
            for variant in report["variants"]:
                variant["path"] = store.show(variant["path"])
            render_files(local, report)
            if store.local is None:
                for name in ("report.json", "report.md", "report.html"):
                    store.push(local / name, name)
            print_summary(report, console)
            line.done(f"{store.show('report.md')} and {store.show('report.json')}")
        return report
    finally:
        disconnect()


def _describe(node: Node) -> str:
    labels = ", ".join(f"{k}={v}" for k, v in node.labels.items()) or "no labels"
    return f"{node.id[:8]} ({labels}; {node.cpus} CPU" + (f", {node.gpus} GPU" if node.gpus else "") + ")"


class ClusterRun:
    """One run's tasks: where each may go, what was submitted, and what came back."""

    def __init__(self, recipe, store: Store, nodes: list[Node], spec: str, budget: int):
        self.recipe, self.store, self.nodes, self.spec, self.budget = recipe, store, nodes, spec, budget
        self.placements: dict[str, Placement] = {}
        self.data = None  # RunData with the windows' path relative to the run folder
        self.peak = 0  # the run's largest stage estimate: the memory each task asks for (set with the baseline)
        # Every task reads this back from the run folder first: a local --out that is not shared fails in one sentence.
        self.token = uuid.uuid4().hex
        store.write_json(tasks.TOKEN, {"token": self.token})

    def baseline(self, recipe, info, data, out: Path, budget: int) -> Baseline:
        """Each target's baseline on a node that is that target, all at once (stage 3's `evaluate`)."""
        if self.store.local is None:
            self.store.push(data.windows_file, tasks.WINDOWS)
        self.data = dataclasses.replace(data, windows_file=Path(tasks.WINDOWS))
        self.peak = max(needed for needed, _ in memory.run_estimates(info, recipe, budget).values())
        waiting, missing, results, references = Waiting(self.store, self.token), {}, {}, {}
        for target, where in recipe.targets.items():
            placement = place(self.nodes, where.node_labels, recipe.device(target), self.peak)
            if isinstance(placement, str):
                missing[target] = placement
                continue
            self.placements[target] = placement
            waiting.submit(target, placement, tasks.baseline_task, recipe, target, self.spec, self.data, budget)
        for target, record, error in waiting.finished():
            if error:
                missing[target] = f"the baseline could not be measured on its node: {error}"
            elif "missing" in record:
                missing[target] = record["missing"]
            else:
                results[target], references[target] = record["result"], Path(record["reference"])
        return Baseline(folder_bytes(info.path), results, references, missing)

    def variants(self, info, baseline: Baseline, context: dict, console: Console):
        """Every variant's task, and every (artifact, target) check as its variant's task finishes.
        -> (outcomes in recipe order, variants kept from an earlier release, stamps, files' hashes)."""
        recipe, waiting = self.recipe, Waiting(self.store, self.token)
        stamps, kept, made, failed, checks, hashes = {}, [], {}, {}, {}, {}
        submitted = {}
        for variant in recipe.variants:
            interrupts.check()
            stamps[variant.name] = variant_stamp(recipe, variant, context, stamps)
            reused = released_outcomes(recipe, variant, Path(""), stamps[variant.name], self._current, self._has_device)
            if reused is not None:
                made[variant.name] = [(outcome.artifact, None) for outcome in reused]
                checks.update({(variant.name, i): dict(outcome.verdicts) for i, outcome in enumerate(reused)})
                kept.append(variant.name)
                continue
            placement = self._producer(variant)
            if isinstance(placement, str):
                failed[variant.name] = placement
                continue
            source = submitted.get(variant.from_)
            submitted[variant.name] = waiting.submit(
                ("produce", variant.name), placement, tasks.produce_task, recipe, variant.name,
                self.spec, self.data, self.budget, calibration_stamp(variant, context), source)
        with progress_bar(console) as bar:
            task = bar.add_task("tasks", total=len(submitted))
            for key, record, error in waiting.finished():
                bar.advance(task)
                if key[0] == "produce":
                    name = key[1]
                    if error:
                        failed[name] = f"its task failed: {error}"
                        continue
                    made[name] = record["artifacts"]
                    for index, (artifact, _files) in enumerate(record["artifacts"]):
                        checks[(name, index)], count = self._submit_checks(waiting, name, index, artifact, baseline)
                        bar.update(task, total=bar.tasks[0].total + count)
                else:
                    _, name, index, target = key
                    checks[(name, index)][target] = record if not error else Verdict(
                        target, FAIL, {}, [f"the check on its node failed: {error}"])
        outcomes = []
        for variant in recipe.variants:  # a source comes before the variants that name it in from:
            if variant.from_ in failed and variant.name in failed:  # Ray failed it with its source's error
                failed[variant.name] = f"its source {variant.from_} was not made ({failed[variant.from_]})"
            if variant.name in failed:
                outcomes.append(self._failure(variant, failed[variant.name]))
                continue
            for index, (artifact, files) in enumerate(made[variant.name]):
                verdicts = {target: checks[(variant.name, index)][target] for target in recipe.targets}
                reasons = [] if variant.name in kept else decide(recipe, verdicts)
                outcomes.append(Outcome(artifact, verdicts, not reasons, reasons))
                hashes[(variant.name, index)] = files
        return outcomes, kept, stamps, hashes

    def _has_device(self, device: str) -> bool:
        """Whether a node that is a target of this device is in the cluster (an ONNX variant's task then makes
        onnx-<device> there)."""
        return any(self.recipe.device(target) == device for target in self.placements)

    def _producer(self, variant) -> Placement | str:
        """Where a variant's task runs: any node with CPUs; an ONNX variant with a CUDA target on that target's node
        (the builder makes the onnx-cuda folder only where onnxruntime-genai has CUDA) where one has a GPU."""
        for name, target in self.recipe.targets.items():
            if variant.is_onnx and self.recipe.device(name) == "cuda":
                placement = place(self.nodes, target.node_labels, "cuda", self.peak)
                if not isinstance(placement, str):
                    return dataclasses.replace(placement, gpus=0)  # the builder needs the provider, not the device
        return place(self.nodes, {}, "cpu", self.peak)

    def _submit_checks(self, waiting: Waiting, name: str, index: int, artifact: Artifact,
                       baseline: Baseline) -> tuple[dict, int]:
        """A check task per target the artifact is run on. -> (the verdicts known without one: skipped, no
        node; how many were submitted)."""
        verdicts, count = {}, 0
        for target in self.recipe.targets:
            if target in artifact.skipped:
                status, why = artifact.skipped[target]
                verdicts[target] = Verdict(target, status, {}, [why])
            elif target in baseline.missing:
                verdicts[target] = Verdict(target, NOT_VERIFIED, {}, [baseline.missing[target]])
            else:
                measured = {"result": baseline.results[target], "reference": str(baseline.references[target])}
                waiting.submit(("verify", name, index, target), self.placements[target], tasks.verify_task, self.recipe,
                               target, name, artifact, measured, self.spec, self.data, self.budget, baseline.size_bytes)
                count += 1
        return verdicts, count

    def _failure(self, variant, why: str) -> Outcome:
        """A variant whose task failed: reported with the sentence on every target, never released."""
        fmt = variant.formats[0] if variant.formats else "onnx"
        artifact = Artifact(variant.name, variant.method, fmt, Path("staging") / variant.name / fmt, "not made", 0,
                            {"bits_per_weight": None, "bits_per_weight_all": None}, {"failed": why})
        return Outcome(artifact, {t: Verdict(t, FAIL, {}, [why]) for t in self.recipe.targets}, False, [why])

    def _current(self, folder: Path, stamp: str) -> dict | None:
        """An earlier release's manifest where it is current: its files' hashes checked where the run folder is a
        path; in an object store, its stamp and the names of its files (hashing would download every byte)."""
        if self.store.local:
            return release_is_current(self.store.local / folder, stamp)
        manifest = self.store.read_json(f"{folder}/manifest.json")
        if not manifest or manifest.get("inputs_stamp") != stamp:
            return None
        return manifest if set(self.store.files(str(folder))) - {"manifest.json"} == set(manifest.get("files", {})) else None

    def release(self, outcomes: list[Outcome], kept: list[str], stamps: dict, hashes: dict, context: dict) -> list[str]:
        """Each artifact's manifest into its staging folder, and the released moved into release/ (Store.release)."""
        released, index_of = [], {}
        for position, outcome in enumerate(outcomes):
            artifact = outcome.artifact
            index = index_of[artifact.variant] = index_of.get(artifact.variant, -1) + 1
            if artifact.variant in kept:
                continue
            manifest = build_manifest(outcome, {**context, "inputs_stamp": stamps[artifact.variant]},
                                      hashes.get((artifact.variant, index), {}))
            self.store.write_json(f"{artifact.path}/manifest.json", manifest)
            if outcome.released:
                destination = f"release/{artifact.variant}/{artifact.format}"
                self.store.release(str(artifact.path), destination, "work/retired")
                outcomes[position] = Outcome(dataclasses.replace(artifact, path=Path(destination)), outcome.verdicts, True, [])
                released.append(f"{artifact.variant}/{artifact.format}")
        return released


class Waiting:
    """Submitted tasks by key; `finished()` yields (key, result, None) or (key, None, error sentence) as they end,
    including tasks submitted while it runs. Each task gets the run folder, the run's token and a name under which
    it says it started (tasks.begin)."""

    def __init__(self, store: Store, token: str):
        self.store, self.token = store, token
        self._refs: dict = {}  # ObjectRef -> (key, placement, marker, submitted at)

    def submit(self, key, placement: Placement, function, *arguments):
        import ray

        marker = "-".join(str(part) for part in (key if isinstance(key, tuple) else (key,)))
        ref = ray.remote(function).options(**placement.options()).remote(self.store, self.token, marker, *arguments)
        self._refs[ref] = (key, placement, marker, time.monotonic())
        return ref

    def finished(self):
        import ray

        while self._refs:
            ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=BACKSTOP_SECONDS)
            if not ready:
                yield from self._lost()
                continue
            key = self._refs.pop(ready[0])[0]
            try:
                yield key, ray.get(ready[0]), None
            except ray.exceptions.RayError as error:
                yield key, None, one_sentence(error)

    def _lost(self):
        """The backstop: tasks whose every matching node has left the cluster, and tasks no node has started in
        PLACEMENT_SECONDS, are given up, not waited on (a task that started is never timed out: a calibration
        may take hours)."""
        import ray

        nodes, now = alive_nodes(), time.monotonic()
        for ref, (key, placement, marker, submitted) in list(self._refs.items()):
            if not any(node.matches(placement.labels) for node in nodes):
                why = f"no node in the cluster has labels {placement.where()} any more"
            elif overdue(submitted, now, self.store.exists(f"{tasks.STARTED}/{marker}.json"), PLACEMENT_SECONDS):
                why = (f"no node with labels {placement.where()} started it within {PLACEMENT_SECONDS:.0f} s (its "
                       f"{placement.cpus} CPU(s), {placement.gpus} GPU(s) and {placement.memory / 2**30:.1f} GiB were never "
                       "free there; COMPRESS_CLUSTER_PLACEMENT_TIMEOUT sets the wait)")
            else:
                continue
            ray.cancel(ref, force=True)
            del self._refs[ref]
            yield key, None, why


def overdue(submitted: float, now: float, started: bool, timeout: float) -> bool:
    """Whether a task has waited for a node longer than `timeout` seconds without starting."""
    return not started and now - submitted > timeout


def one_sentence(error) -> str:
    """A task's failure as one line: the exception a task raised, or what Ray says of a lost worker or node."""
    import ray

    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None else error
    if isinstance(cause, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
        return f"its worker or its node died ({type(cause).__name__}), and again when retried"
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
