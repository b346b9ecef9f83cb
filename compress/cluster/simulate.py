"""A Ray cluster simulated on this machine for one command: a head (no CPUs: it schedules, nothing runs there)
and worker nodes with the labels and CPUs given, started, then stopped by this process alone when the command
ends (Cluster.shutdown: never `ray stop`, which ends every Ray process on the machine).

    python -m compress.cluster.simulate --node place=laptop:2 --node place=edge:2 -- \\
        compress run recipe.yaml --cluster auto --out file:///tmp/run

The command finds the cluster through RAY_ADDRESS. Tests and benchmarks run this inside a loopback-only network
namespace (`unshare -n`): Ray would otherwise advertise the machine's routable address and post a usage report.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def parse_node(text: str) -> tuple[dict[str, str], int]:
    """key=value[,key=value…][:cpus] -> (labels, CPUs); the CPUs default to 1."""
    labels_text, _, cpus = text.partition(":")
    labels = dict(pair.split("=", 1) for pair in labels_text.split(",") if pair)
    return labels, int(cpus or 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", action="append", default=[], help="a worker node: key=value[,key=value][:cpus]")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run against the cluster (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_REPORT_URL", "http://127.0.0.1:9/")
    from ray.cluster_utils import Cluster

    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for text in args.node:
            labels, cpus = parse_node(text)
            cluster.add_node(num_cpus=cpus, labels=labels)
        cluster.wait_for_nodes()
        print(f"simulated cluster at {cluster.address}: head and {len(args.node)} node(s) started in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        started = time.perf_counter()
        code = subprocess.run(command, env={**os.environ, "RAY_ADDRESS": cluster.address}, check=False).returncode
        print(f"command finished in {time.perf_counter() - started:.1f} s (exit code {code})", file=sys.stderr, flush=True)
        return code
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
