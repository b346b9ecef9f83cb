"""`compress run --cluster` on a simulated Ray cluster (a head and two labelled nodes on this machine), inside a
loopback-only network namespace; and the pieces that need no cluster: named targets, the run-folder store,
placement, and a local run never importing Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compress.cluster.nodes import Node, place
from compress.cluster.store import Store
from compress.recipe import RecipeError, load_recipe
from tests.conftest import ROOT, run_cli

EVALUATION = ("evaluation: {dataset: builtin:pydoc-eval, seq_len: 128, windows: 8, new_tokens: 8, speed_runs: 3, "
              "prompts: [Hello], generation_tokens: 8, sensitivity_samples: 0}\n")
HEAD = ("model: builtin:tiny-phi4-mini\ncalibration: {dataset: builtin:pydoc-calib, samples: 8, seq_len: 128, seed: 0}\n"
        + EVALUATION + "gates: {max_kld: 0.5, min_top1: 0.5, max_ppl_ratio: 2.0, max_size_ratio: 0.9}\n")
VARIANTS = """variants:
  - {name: rtn-w4, method: rtn, bits: 4, group_size: 128}
  - {name: onnx-from-rtn, method: onnx-int4, from: rtn-w4, group_size: 128}
  - {name: rtn-g64, method: rtn, bits: 4, group_size: 64}
  - {name: onnx-from-g64, method: onnx-int4, from: rtn-g64, group_size: 64}
"""
PLACES = """targets:
  laptop: {device: cpu, required: true, node_labels: {place: laptop}}
  edge: {device: cpu, node_labels: {place: edge}}
  phone: {device: cpu, node_labels: {place: phone}}
"""


# Any key does for the loopback S3 server; pyarrow's S3 client reads them from the environment.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def namespace_problem() -> str | None:
    """Why the cluster tests cannot run here: they need a loopback-only network namespace (unshare -n, root)."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip is not installed: the cluster tests run Ray only inside a loopback-only network namespace"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, check=False)
    if probe.returncode:
        return f"unshare -n is not allowed here ({probe.stderr.strip() or 'not root'}): Ray must not reach the network"
    return None


def test_targets_are_named_places(write_recipe):
    recipe = load_recipe(write_recipe("name: r\n" + HEAD + PLACES + VARIANTS))
    assert recipe.device("laptop") == "cpu" and recipe.targets["edge"].node_labels == {"place": "edge"}
    assert recipe.devices() == ["cpu"]
    plain = load_recipe(write_recipe("name: r\n" + HEAD + "targets: {cpu: {required: true}, cuda: {}}\n" + VARIANTS))
    assert plain.device("cuda") == "cuda" and plain.devices() == ["cpu", "cuda"]  # the names cpu and cuda still imply theirs
    with pytest.raises(RecipeError, match="laptop: say which device it is"):
        load_recipe(write_recipe("name: r\n" + HEAD + "targets: {cpu: {}, laptop: {node_labels: {a: b}}}\n" + VARIANTS))
    with pytest.raises(RecipeError, match="list a target with device: cpu"):
        load_recipe(write_recipe("name: r\n" + HEAD + "targets: {gpu: {device: cuda}}\n" + VARIANTS))


@pytest.fixture
def s3_run_folder(monkeypatch):
    """A run folder in an S3 bucket on a loopback S3 server (moto: Amazon's S3 API over HTTP, which pyarrow's own
    S3 client talks to as it talks to AWS). -> its URI."""
    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    for key, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    fs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True).create_dir("runs")
    yield f"s3://runs/test?endpoint_override={host}:{port}&scheme=http"
    server.stop()


@pytest.mark.parametrize("uri", ["plain", "file", "s3"])
def test_store_round_trip(tmp_path, uri, request):
    """Every way the run folder is used, through pyarrow.fs: a folder put and taken back byte for byte, JSON
    written whole, a release replacing an older one (in an object store: copied, then deleted), and the listing
    that resuming reads."""
    root = tmp_path / "store"
    store = Store({"plain": str(root), "file": f"file://{root}", "s3": request.getfixturevalue("s3_run_folder") if uri == "s3" else ""}[uri])
    assert (store.local == root) == (uri == "plain")
    folder = tmp_path / "artifact"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(70_000))
    (folder / "sub" / "config.json").write_text('{"a": 1}')
    store.push(folder, "staging/v/fmt")
    assert store.files("staging/v/fmt") == ["model.safetensors", "sub/config.json"]
    store.write_json("staging/v/fmt/manifest.json", {"inputs_stamp": "x"})
    assert store.read_json("staging/v/fmt/manifest.json") == {"inputs_stamp": "x"}
    store.push(folder / "sub" / "config.json", "release/v/fmt/old.json")  # an older release in the way
    store.release("staging/v/fmt", "release/v/fmt", "work/retired")
    assert not store.exists("staging/v/fmt") and store.files("work/retired") == []
    back = tmp_path / "back"
    assert store.pull("release/v/fmt", back)
    assert (back / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert sorted(p.name for p in back.rglob("*") if p.is_file()) == ["config.json", "manifest.json", "model.safetensors"]
    assert not store.pull("release/none", tmp_path / "none") and store.read_json("none.json") is None
    if uri == "s3":  # where a file is, as the user named the run folder, the endpoint's options kept at the end
        assert store.show("report.md").startswith("s3://runs/test/report.md?endpoint_override=127.0.0.1:")


def test_placement_is_checked_before_submitting():
    nodes = [Node("a" * 8, {"place": "laptop"}, 4, 0, 8 << 30), Node("b" * 8, {"place": "laptop"}, 2, 0, 16 << 30),
             Node("c" * 8, {"place": "gpu-box"}, 8, 1, 64 << 30), Node("d" * 8, {}, 0, 0, 1 << 30)]
    laptop = place(nodes, {"place": "laptop"}, "cpu", 12 << 30)
    assert (laptop.cpus, laptop.gpus, laptop.memory) == (2, 0, 12 << 30)  # the smallest laptop's CPUs, whole
    assert laptop.options()["label_selector"] == {"place": "laptop"} and laptop.options()["max_retries"] == 1
    assert place(nodes, {"place": "phone"}, "cpu", 1) == "no node in the cluster has labels {place: phone}"
    assert place(nodes, {"place": "laptop"}, "cuda", 1) == "no node with labels {place: laptop} has a GPU and a CPU Ray may use"
    assert place(nodes, {}, "cuda", 1).gpus == 1
    assert place(nodes[:2], {}, "cuda", 1) == "no node in the cluster has a GPU and a CPU Ray may use"
    assert place(nodes, {}, "cpu", 1 << 40).memory == 64 << 30  # never more than the roomiest node has


def test_an_onnx_variant_expects_a_cuda_folder_only_where_a_gpu_target_is(write_recipe):
    """What a rerun looks for in the run folder: on a cluster, onnx-cuda where a node of a cuda target is in it
    (whatever this machine has)."""
    from compress.resume import expected_formats

    recipe = load_recipe(write_recipe("name: r\n" + HEAD + PLACES + "  gpu: {device: cuda, node_labels: {place: gpu-box}}\n" + VARIANTS))
    onnx, rtn = recipe.variants[1], recipe.variants[0]
    assert expected_formats(recipe, onnx, lambda device: True) == ["onnx", "onnx-cuda"]
    assert expected_formats(recipe, onnx, lambda device: False) == ["onnx"]
    assert expected_formats(recipe, rtn, lambda device: True) == ["compressed-tensors"]


def test_a_task_refuses_a_run_folder_its_node_does_not_share(tmp_path):
    from compress.cluster import tasks

    store = Store(str(tmp_path / "run"))
    store.write_json(tasks.TOKEN, {"token": "driver's"})
    with pytest.raises(RuntimeError, match="is not the driver's on this node: give --out a path every node shares"):
        tasks.begin(Store(str(tmp_path / "elsewhere")), "driver's", "produce-x")  # what a node with its own /tmp sees


def test_a_task_no_node_starts_is_given_up_after_the_placement_timeout():
    from compress.cluster.driver import overdue

    assert overdue(submitted=0.0, now=1801.0, started=False, timeout=1800)
    assert not overdue(submitted=0.0, now=1799.0, started=False, timeout=1800)
    assert not overdue(submitted=0.0, now=10**6, started=True, timeout=1800)  # a long calibration is never cut short


def test_an_onnx_variant_with_a_cuda_target_is_built_on_a_gpu_node(tmp_path, write_recipe):
    from compress.cluster.driver import ClusterRun

    recipe = load_recipe(write_recipe("name: r\n" + HEAD + "targets: {laptop: {device: cpu, node_labels: {place: laptop}}, "
                                      "gpu: {device: cuda, node_labels: {place: gpu-box}}}\n" + VARIANTS))
    nodes = [Node("a" * 8, {"place": "laptop"}, 4, 0, 8 << 30), Node("c" * 8, {"place": "gpu-box"}, 8, 1, 64 << 30)]
    run = ClusterRun(recipe, Store(str(tmp_path / "run")), nodes, "builtin:tiny-phi4-mini", 8 << 30)
    run.peak = 1 << 30
    onnx, rtn = (next(v for v in recipe.variants if v.name == name) for name in ("onnx-from-rtn", "rtn-w4"))
    assert run._producer(onnx).labels == {"place": "gpu-box"} and run._producer(onnx).gpus == 0
    assert run._producer(rtn).labels == {} and run._producer(rtn).cpus == 4


def test_a_run_folder_that_cannot_be_opened_or_written_is_bad_input():
    """Checked before the cluster is joined: one sentence, exit code 2."""
    recipe = str(ROOT / "recipes" / "tiny-phi4-mini.yaml")
    for out, sentence in (("file:///proc/compress-run", "--out file:///proc/compress-run: the run folder cannot be written"),
                          ("nosuch://bucket/run", "--out nosuch://bucket/run:")):
        result = run_cli("run", recipe, "--cluster", "127.0.0.1:9", "--out", out)
        assert result.returncode == 2 and f"error: {sentence}" in result.stdout, result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr


def test_a_local_run_never_imports_ray(tmp_path):
    code = ("import sys; import compress.cli, compress.pipeline, compress.cluster, compress.cluster.store; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    result = run_cli("run", str(ROOT / "recipes" / "tiny-phi4-mini.yaml"), "--out", "s3://bucket/run")
    assert result.returncode == 2 and "a URI run folder is for --cluster runs" in result.stdout


def test_a_cluster_that_cannot_be_joined_is_bad_input(tmp_path):
    """One sentence and exit code 2, in seconds (Ray itself would keep trying for minutes), never a traceback."""
    if reason := namespace_problem():
        pytest.skip(reason)
    recipe = ROOT / "recipes" / "tiny-phi4-mini.yaml"
    # auto alone finds no cluster here, or one another namespace runs, which this one cannot reach: either is one sentence
    cases = [("127.0.0.1:9", {}, "could not join the Ray cluster at 127.0.0.1:9: nothing answers at 127.0.0.1:9 (Connection refused)"),
             ("ray://127.0.0.1:9", {}, "a ray:// address needs Ray's client: pip install 'ray[client]==2.60.0'"),
             ("auto", {"RAY_ADDRESS": "127.0.0.1:9"}, "could not join the Ray cluster at auto: nothing answers at 127.0.0.1:9"),
             ("auto", {}, "could not join the Ray cluster at auto: ")]
    for address, extra, sentence in cases:
        command = f"ip link set lo up && {sys.executable} -m compress.cli run {recipe} --cluster {address} --out {tmp_path / 'run'}"
        environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"COLUMNS": "300", "RAY_USAGE_STATS_ENABLED": "0"} | extra
        result = subprocess.run(["unshare", "-n", "bash", "-c", command], capture_output=True, text=True, env=environment,
                                timeout=120, check=False)
        assert result.returncode == 2 and sentence in " ".join(result.stdout.split()), result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
    """A local run, then on the simulated cluster a run (one variant's worker killed once, another's every time)
    and a rerun into the same file:// run folder. -> (folder, the local report, the first cluster run's report)."""
    if reason := namespace_problem():
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("cluster")
    (folder / "cluster.yaml").write_text("name: places\n" + HEAD + PLACES + VARIANTS)
    # The same recipe without a cluster: laptop and edge are this machine; phone keeps its labels.
    local_places = PLACES.replace(", node_labels: {place: laptop}", "").replace(", node_labels: {place: edge}", "")
    (folder / "local.yaml").write_text("name: places\n" + HEAD + local_places + VARIANTS)
    local = run_cli("run", str(folder / "local.yaml"), "--out", str(folder / "local"))
    assert local.returncode == 0, local.stdout + local.stderr  # phone is not verified, but it is not required
    compress = f"{sys.executable} -m compress.cli run {folder / 'cluster.yaml'} --cluster auto --out file://{folder / 'store'}"
    scratch = folder / "scratch"  # the nodes' own folders (the nodes share this machine's disk, not the run folder)
    scratch.mkdir()
    script = (f"ip link set lo up && ip -o link show > {folder / 'links.txt'} && "
              # the nodes' workers take the fault from the environment the nodes were started in
              f"COMPRESS_CLUSTER_FAULT=rtn-w4:1,rtn-g64:2 COMPRESS_SCRATCH={scratch} {sys.executable} -m compress.cluster.simulate "
              f"--node place=laptop:2 --node place=edge:2 -- bash -c '{compress} > {folder / 'first.log'} 2>&1; "
              f"echo $? > {folder / 'first.rc'}; ls {scratch} > {folder / 'scratch-first.txt'}; "
              f"cp {folder / 'store' / 'report.json'} {folder / 'first-report.json'}; "
              f"{compress} > {folder / 'second.log'} 2>&1; echo $? > {folder / 'second.rc'}; ls {scratch} > {folder / 'scratch-second.txt'}'")
    environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
                   "COLUMNS": "200"}
    finished = subprocess.run(["unshare", "-n", "bash", "-c", script], capture_output=True, text=True, env=environment,
                              timeout=900, check=False)
    logs = "".join((folder / name).read_text() for name in ("first.log", "second.log") if (folder / name).exists())
    assert finished.returncode == 0, finished.stdout + finished.stderr + logs
    return folder, json.loads((folder / "local" / "report.json").read_text()), json.loads((folder / "first-report.json").read_text())


@pytest.mark.slow
def test_cluster_run_places_each_target_on_its_node(cluster_runs):
    folder, _, report = cluster_runs
    assert (folder / "links.txt").read_text().split(":")[1].strip() == "lo" and len((folder / "links.txt").read_text().splitlines()) == 1
    assert (folder / "first.rc").read_text().strip() == "1", (folder / "first.log").read_text()  # rtn-g64 failed
    nodes = {target: result["environment"]["node"] for target, result in report["baseline"]["targets"].items() if "environment" in result}
    assert {t: n["labels"] for t, n in nodes.items()} == {"laptop": {"place": "laptop"}, "edge": {"place": "edge"}}
    assert nodes["laptop"]["node_id"] != nodes["edge"]["node_id"]
    assert report["baseline"]["targets"]["phone"] == {"status": "not-verified", "reason": "no node in the cluster has labels {place: phone}"}
    for variant in report["variants"]:
        for target, result in variant["targets"].items():
            if result["status"] == "pass":
                node = result["environment"]["node"]
                assert node["node_id"] == nodes[target]["node_id"] and node["threads"] == 2 and node["cpu"] and node["host"]
    markdown = (folder / "store" / "report.md").read_text()
    assert "## Where each target was measured" in markdown and "- phone: not verified: no node in the cluster has labels {place: phone}" in markdown


@pytest.mark.slow
def test_a_cluster_run_answers_as_a_local_run(cluster_runs):
    """ppl, KLD and top-1 of every artifact on every target equal the local run's, to the last bit: the first
    cluster run's two artifacts, and rtn-g64 and onnx-from-g64, made only by the rerun."""
    folder, local, first = cluster_runs
    rows = {(v["name"], v["format"], t): r["metrics"] for v in local["variants"] for t, r in v["targets"].items() if r["status"] == "pass"}
    keys = ("ppl", "kld", "kld_se", "top1")
    for cluster, expected_rows in ((first, 4), (json.loads((folder / "store" / "report.json").read_text()), 8)):
        compared = 0
        for variant in cluster["variants"]:
            for target, result in variant["targets"].items():
                if result["status"] == "pass":
                    expected = rows[(variant["name"], variant["format"], target)]
                    assert {k: result["metrics"][k] for k in keys} == {k: expected[k] for k in keys}
                    compared += 1
        assert compared == expected_rows
    assert local["baseline"]["targets"]["phone"]["reason"].startswith("no cluster: a node with labels {place: phone} is this target")


@pytest.mark.slow
def test_a_failed_task_is_retried_once_then_that_variant_fails(cluster_runs):
    folder, _, report = cluster_runs
    store = Store(f"file://{folder / 'store'}")
    assert store.read_json("faults/rtn-w4.json") == {"started": 2}  # killed once, retried, then done
    assert store.read_json("faults/rtn-g64.json") == {"started": 3}  # killed twice, given up; the rerun's start made it
    by_name = {v["name"]: v for v in report["variants"]}
    assert by_name["rtn-w4"]["released"] and by_name["onnx-from-rtn"]["released"]
    failed = by_name["rtn-g64"]
    died = "its task failed: its worker or its node died (WorkerCrashedError), and again when retried"
    assert not failed["released"] and failed["not_released_because"] == [died]
    assert by_name["onnx-from-g64"]["not_released_because"] == [f"its source rtn-g64 was not made ({died})"]


@pytest.mark.slow
def test_no_worker_leaves_its_folders_behind_past_the_next_task(cluster_runs):
    """The workers killed in the first run left their task folders: the retries removed them. The first run's
    kept speed servers' folders outlived its driver (Ray ends its workers without a word): the rerun's tasks
    removed them."""
    folder, _, _ = cluster_runs
    first, second = ((folder / name).read_text().split() for name in ("scratch-first.txt", "scratch-second.txt"))
    assert first and all(name.startswith("compress-speed-") for name in first), first
    assert not set(first) & set(second), (first, second)


def test_a_worker_removes_the_folders_of_workers_that_ended(tmp_path, monkeypatch):
    from compress.cluster.tasks import own_folder, scratch

    monkeypatch.setenv("COMPRESS_SCRATCH", str(tmp_path))
    ended = tmp_path / "compress-task-999999999-abcd_123"  # no such process
    (ended / "artifact").mkdir(parents=True)
    alive = tmp_path / f"compress-speed-{os.getpid()}-abcd_123"
    others = [tmp_path / "compress-notes-999999999-abcd_123", tmp_path / "compress-task-999999999"]
    for path in [alive, *others]:
        path.mkdir()
    made = own_folder("speed")
    assert made.name.startswith(f"compress-speed-{os.getpid()}-") and made.is_dir()
    assert not ended.exists() and alive.is_dir() and all(path.is_dir() for path in others)
    with scratch() as task:
        assert task.name.startswith(f"compress-task-{os.getpid()}-")
    assert not task.exists()


@pytest.mark.slow
def test_a_rerun_resumes_from_the_run_folder(cluster_runs):
    folder, _, _ = cluster_runs
    second = " ".join((folder / "second.log").read_text().split())  # as one line, however the console wrapped it
    assert "unchanged since their release, skipped: rtn-w4, onnx-from-rtn" in second, second
    report = json.loads((folder / "store" / "report.json").read_text())
    assert {v["name"]: v["released"] for v in report["variants"]} == {"rtn-w4": True, "onnx-from-rtn": True, "rtn-g64": True,
                                                                      "onnx-from-g64": True}
    assert Path(folder / "store" / "release" / "rtn-g64" / "compressed-tensors" / "manifest.json").is_file()


@pytest.mark.slow
def test_a_run_folder_in_an_s3_bucket(cluster_runs, tmp_path):
    """--out s3://…: a one-node cluster run into a bucket on a loopback S3 server started in the namespace, then a
    rerun that finds the releases unchanged in the bucket; the same figures as a local run's."""
    folder, local, _ = cluster_runs
    (tmp_path / "s3.yaml").write_text("name: places\n" + HEAD + "targets: {laptop: {device: cpu, required: true, node_labels: "
                                      "{place: laptop}}}\n" + VARIANTS.split("  - {name: rtn-g64")[0])
    uri = "s3://runs/phi?endpoint_override=127.0.0.1:9000&scheme=http"
    (tmp_path / "bucket.py").write_text(f"""import sys, time
from pathlib import Path
from pyarrow import fs
from compress.cluster.store import Store
if sys.argv[1] == "create":  # once the server answers
    s3 = fs.S3FileSystem(endpoint_override="127.0.0.1:9000", scheme="http", allow_bucket_creation=True)
    for _ in range(150):
        try:
            s3.create_dir("runs")
            break
        except OSError:
            time.sleep(0.2)
else:  # the run folder, copied out before the server ends
    Store("{uri}").pull("", Path("{tmp_path / 'bucket'}"))
""")
    python = sys.executable
    compress = f"{python} -m compress.cli run {tmp_path / 's3.yaml'} --cluster auto --out '{uri}'"
    runs = (f"{compress} > {tmp_path / 'first.log'} 2>&1; echo $? > {tmp_path / 'first.rc'}; "
            f"{compress} > {tmp_path / 'second.log'} 2>&1; echo $? > {tmp_path / 'second.rc'}")
    (tmp_path / "runs.sh").write_text(runs + "\n")
    script = (f"ip link set lo up && {{ {python} -m moto.server -H 127.0.0.1 -p 9000 > {tmp_path / 'moto.log'} 2>&1 & moto=$!; }} && "
              f"{python} {tmp_path / 'bucket.py'} create && "
              f"{python} -m compress.cluster.simulate --node place=laptop:2 -- bash {tmp_path / 'runs.sh'}; "
              f"{python} {tmp_path / 'bucket.py'} pull; kill $moto")
    environment = {**os.environ, **S3_CREDENTIALS, "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/", "COLUMNS": "200"}
    finished = subprocess.run(["unshare", "-n", "bash", "-c", script], capture_output=True, text=True, env=environment,
                              timeout=600, check=False)
    logs = "".join((tmp_path / name).read_text() for name in ("first.log", "second.log") if (tmp_path / name).exists())
    assert finished.returncode == 0 and (tmp_path / "first.rc").read_text().strip() == "0", finished.stdout + finished.stderr + logs
    first = " ".join((tmp_path / "first.log").read_text().split())
    assert "Report: s3://runs/phi/report.md?endpoint_override=127.0.0.1:9000&scheme=http" in first, first
    second = " ".join((tmp_path / "second.log").read_text().split())
    assert (tmp_path / "second.rc").read_text().strip() == "0" and "unchanged since their release, skipped: rtn-w4, onnx-from-rtn" in second, second
    bucket = tmp_path / "bucket"
    report = json.loads((bucket / "report.json").read_text())
    assert all(v["released"] for v in report["variants"]) and len(report["variants"]) == 2
    for name, fmt in (("rtn-w4", "compressed-tensors"), ("onnx-from-rtn", "onnx")):
        assert (bucket / "release" / name / fmt / "manifest.json").is_file() and not (bucket / "staging" / name / fmt).exists()
        measured = next(v for v in report["variants"] if v["name"] == name)["targets"]["laptop"]["metrics"]
        expected = next(v for v in local["variants"] if v["name"] == name)["targets"]["laptop"]["metrics"]
        assert {k: measured[k] for k in ("ppl", "kld", "top1")} == {k: expected[k] for k in ("ppl", "kld", "top1")}
