"""The cluster's nodes: joining it, which nodes are which target, and how a task describes the node it ran on."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field

from compress.cluster import ClusterError
from compress.recipe import labels_text

RAY_LABELS = "ray.io/"  # labels Ray sets itself (node id, ...): not the user's


def connect(address: str) -> None:
    """Join the Ray cluster at `address` (auto, host:port, ray://host:port) as its driver."""
    import ray

    if address.startswith("ray://"):
        try:
            import grpc  # noqa: F401  (ray[client])
            import ray.util.client  # noqa: F401
        except ImportError:
            raise ClusterError(f"--cluster {address}: a ray:// address needs Ray's client: pip install 'ray[client]==2.60.0'") from None
    if reason := unreachable(address):
        raise ClusterError(f"could not join the Ray cluster at {address}: {reason}")
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as error:
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        if address == "auto" and "Could not find any running Ray instance" in first:
            first = "no Ray cluster runs on this machine and RAY_ADDRESS is not set (start one with ray start --head, or give host:port)"
        raise ClusterError(f"could not join the Ray cluster at {address}: {first}") from None


def unreachable(address: str) -> str | None:
    """Why nothing will answer at `address` (checked in seconds: Ray itself keeps trying for minutes), else None.
    `auto` is what Ray makes of it: RAY_ADDRESS, else a cluster whose processes run on this machine, which may be
    one this process cannot reach (another network namespace)."""
    named = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address  # how ray.init reads "auto" (ray 2.60.0)

        try:
            named = canonicalize_bootstrap_address("auto") or ""
        except (ConnectionError, ValueError):  # none found: ray.init says so in its own sentence
            return None
    if not named:
        return None
    host, _, port = named.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return f"{named!r} is not auto, host:port or ray://host:port"
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        return f"nothing answers at {host}:{port} ({error.strerror or error})"
    return None


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@dataclass(frozen=True)
class Node:
    id: str
    labels: dict[str, str]
    cpus: int
    gpus: int
    memory: int  # bytes Ray may hand out to tasks there
    host: str = ""
    resources: dict = field(default_factory=dict)

    def matches(self, labels: dict[str, str]) -> bool:
        return all(self.labels.get(key) == value for key, value in labels.items())


def _users(labels: dict[str, str]) -> dict[str, str]:
    """A node's labels less those Ray sets itself."""
    return {key: value for key, value in labels.items() if not key.startswith(RAY_LABELS)}


def alive_nodes() -> list[Node]:
    import ray

    return [Node(node["NodeID"], _users(node.get("Labels") or {}),
                 int(node["Resources"].get("CPU", 0)), int(node["Resources"].get("GPU", 0)), int(node["Resources"].get("memory", 0)),
                 node.get("NodeManagerHostname") or node.get("NodeManagerAddress", ""), node["Resources"])
            for node in ray.nodes() if node.get("Alive")]


@dataclass(frozen=True)
class Placement:
    """Where a task may run and what it asks for there: every CPU of the smallest such node (speed is timed
    alone on its node), one GPU for a CUDA target, and its memory."""

    labels: dict[str, str]
    cpus: int
    gpus: int
    memory: int

    def where(self) -> str:
        return labels_text(self.labels)

    def options(self) -> dict:
        options = {"num_cpus": self.cpus, "num_gpus": self.gpus, "max_retries": 1}
        if self.memory:
            options["memory"] = self.memory
        if self.labels:
            options["label_selector"] = dict(self.labels)
        return options


def place(nodes: list[Node], labels: dict[str, str], device: str, memory: int) -> Placement | str:
    """The placement for a task on nodes with `labels` and `device`, or why no node can take it (a sentence).
    Checked before anything is submitted: Ray leaves a task no node matches pending forever."""
    where = labels_text(labels)
    fitting = [node for node in nodes if node.matches(labels)]
    if not fitting:
        return f"no node in the cluster has labels {where}"
    fitting = [node for node in fitting if node.cpus >= 1 and (device != "cuda" or node.gpus >= 1)]
    if not fitting:
        return (f"no node with labels {where}" if labels else "no node in the cluster") + " has " \
            + ("a GPU and " if device == "cuda" else "") + "a CPU Ray may use"
    cpus = min(node.cpus for node in fitting)
    room = max(node.memory for node in fitting)
    return Placement(dict(labels), cpus, 1 if device == "cuda" else 0, min(memory, room) if room else 0)


def take_threads() -> int:
    """Inside a task: the CPUs Ray gave it, passed to torch and to the workers (COMPRESS_THREADS, which
    onnxruntime-genai and llama.cpp are given there) explicitly."""
    import ray

    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    os.environ["COMPRESS_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    return threads


def here() -> dict:
    """The node a task runs on, recorded beside every figure measured there."""
    import ray

    from compress.verify.targets import cpu_model

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "labels": _users(context.get_node_labels()), "host": socket.gethostname(), "cpu": cpu_model(),
            "gpu": gpu_model(), "threads": int(os.environ.get("COMPRESS_THREADS", "0")) or None}


def gpu_model() -> str | None:
    """The first GPU's name as nvidia-smi gives it, or None where the node shows none."""
    if not shutil.which("nvidia-smi") or not os.environ.get("CUDA_VISIBLE_DEVICES", "x"):
        return None
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=10, check=False).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return None
    return names[0].strip() or None
