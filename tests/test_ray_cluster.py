"""The Ray cluster path as a cluster user runs it: a head node (`ray start --head`), worker nodes
(`ray start --address`), the featurisation job sent with `ray job submit --working-dir .`, and a
node lost while it featurises part of that job.

The job must still succeed, account for every input, and write the same dataset, byte for byte,
as the same command on the undisturbed cluster.

The head has no CPUs for tasks (as Ray advises for a head node): it runs the job's driver, and
every shard runs on one of two worker nodes of 1 CPU each. The node killed is the first one seen
featurising a molecule, so the kill always lands mid-shard and the other node finishes the job.

Everything runs on this machine and every Ray service listens on 127.0.0.1 only, on ports found
free here. Ray's CLI turns a loopback address into the machine's routable one (so that other hosts
can reach the node); the head keeps 127.0.0.1 with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's
switch for single-host clusters, and worker nodes are started by ``ray start`` with that rewrite
off (:data:`_RAY_START_ON_LOOPBACK`). Only the processes started here are stopped, by their ids.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from flexmol.featurize.task import featurize_shard

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
SHARD_SIZE = 12
TASK_TITLE = f"ray::{featurize_shard.__name__}"  # a Ray worker's process title while it runs a shard

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# `ray start` for a node joining a head on 127.0.0.1, with the loopback rewrite off. The CLI refuses
# to add a node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, so the switch is on in this process only;
# the node's own processes inherit the environment's 0 and keep 127.0.0.1.
_RAY_START_ON_LOOPBACK = (
    "import sys; import ray._private.ray_constants as c, ray._private.services as s; "
    "c.ENABLE_RAY_CLUSTER = True; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)


def _free_ports(n: int, taken: set[int]) -> list[int]:
    """``n`` ports free on 127.0.0.1 and not in ``taken`` (which they join): a port handed to a node
    stays reserved even while nothing listens on it yet (a worker port, say)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)  # held, so the next bind gets another port
            if s.getsockname()[1] not in taken:
                ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    taken.update(ports)
    return ports


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _tail(path: Path, chars: int = 4000) -> str:
    return f"--- {path} ---\n" + (path.read_text(errors="replace")[-chars:] if path.exists() else "(none)")


class Node:
    """A `ray start --block` process started here in its own session, and everything below it."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path):
        self.name, self.log = name, log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def tree(self) -> list[psutil.Process]:
        """The start process and its descendants (Ray puts each worker in a process group of its
        own, and a job's driver in a session of its own: the process group is not the node)."""
        try:
            top = psutil.Process(self.proc.pid)
            return [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def shard_in_progress(self) -> str | None:
        """The shard one of this node's workers is featurising, if it has announced a molecule of it
        and has at least half the shard to go (the kill must not race the shard's end). A shard
        task holds its progress file, ``parts/shard-NNNNNN.progress``, open and writes each
        molecule's index there before featurising it."""
        for p in self.tree():
            try:
                if p.cmdline()[:1] and p.cmdline()[0].startswith(TASK_TITLE):
                    for f in p.open_files():
                        path = Path(f.path)
                        if path.suffix == ".progress" and 0 < path.read_text().count("\n") <= SHARD_SIZE // 2:
                            return f"{path.stem}.tar"
            except (psutil.Error, OSError):
                pass
        return None

    def kill(self) -> None:
        """SIGKILL to every process of the node at once, as when its machine goes down."""
        for p in self.tree():
            try:
                p.kill()
            except psutil.Error:
                pass


class Cluster:
    """A head with no CPUs for tasks, and worker nodes of 1 CPU each, all on 127.0.0.1."""

    def __init__(self, root: Path):
        self.root = root
        self.temp = root / "ray"  # short: Ray's Unix socket paths are limited to 107 bytes
        self.nodes: list[Node] = []
        self.taken: set[int] = set()  # every port handed to a node
        self.clients: list[subprocess.Popen] = []  # `ray job submit` processes
        # The environment of an activated virtualenv: a job's `python` is this interpreter.
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "VIRTUAL_ENV": str(BIN.parent), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self.env.pop("RAY_ADDRESS", None)

    def _node_ports(self) -> list[str]:
        """Ports every node opens, all chosen here (Ray would pick some at random, others fixed)."""
        names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
        ports = _free_ports(len(names) + 24, self.taken)
        workers = ",".join(map(str, ports[len(names):]))
        return [f"--{name}={port}" for name, port in zip(names, ports)] + [f"--worker-port-list={workers}"]

    def start_head(self) -> None:
        started = time.perf_counter()
        gcs, dashboard, client, autoscaler_metrics, dashboard_metrics = _free_ports(5, self.taken)
        self.gcs, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        env = {**self.env, "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics),
               "DASHBOARD_METRIC_PORT": str(dashboard_metrics),
               # A node is declared dead after 3 failed health checks 0.5 s apart (Ray's default:
               # 5, 3 s apart): the lost node's shards fail over in ~2 s instead of ~15 s.
               "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}
        argv = [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                *self._node_ports(), f"--temp-dir={self.temp}", "--num-cpus=0", "--disable-usage-stats", "--block"]
        self.nodes.append(Node("head", argv, env, self.root / "head.log"))
        self._wait_for_nodes(1, "the head node")
        self.head_s = time.perf_counter() - started

    def add_nodes(self, n: int) -> list[Node]:
        """``n`` worker nodes, started together, each with a temp dir of its own (as on separate
        machines: two raylets registering at once from one temp dir time out in Ray 2.60)."""
        new = []
        for _ in range(n):
            name = f"node{len(self.nodes) + len(new)}"
            argv = [sys.executable, "-c", _RAY_START_ON_LOOPBACK, "start", f"--address={self.gcs}",
                    "--node-ip-address=127.0.0.1", *self._node_ports(), f"--temp-dir={self.root / name}",
                    "--num-cpus=1", "--disable-usage-stats", "--block"]
            new.append(Node(name, argv, self.env, self.root / f"{name}.log"))
        self.nodes += new
        self._wait_for_nodes(len(self.nodes), f"{n} worker node(s) to join")
        return new

    def _alive_nodes(self) -> int:
        try:
            nodes = _get_json(f"{self.dashboard}/api/v0/nodes?limit=100")["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(n["state"] == "ALIVE" for n in nodes)

    def _wait_for_nodes(self, count: int, what: str, seconds: float = 90) -> None:
        deadline = time.monotonic() + seconds
        while self._alive_nodes() < count:
            dead = [n for n in self.nodes if n.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = (f"{dead[0].name} exited with {dead[0].proc.returncode}" if dead
                       else f"not up after {seconds:.0f} s")
                pytest.fail(f"waiting for {what}: {why}\n" + "\n".join(_tail(n.log) for n in self.nodes))
            time.sleep(0.5)

    def submit(self, sid: str, source: Path, out: Path) -> tuple[subprocess.Popen, Path]:
        """The README's command, `ray job submit --working-dir . -- python ray_jobs/featurize.py ...`,
        from the repository root; returns the process (stopped with the cluster) and its log."""
        log = self.root / f"{sid}.log"
        argv = [str(RAY), "job", "submit", f"--address={self.dashboard}", f"--submission-id={sid}", "--working-dir",
                ".", "--", "python", "ray_jobs/featurize.py", str(source), "--out", str(out), "--modality", "paired",
                "--shard-size", str(SHARD_SIZE), "--no-progress", "featurizer.num_conformers=1"]
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.clients.append(proc)
        return proc, log

    def job_status(self, submission_id: str) -> dict:
        return _get_json(f"{self.dashboard}/api/jobs/{submission_id}")

    def stop(self) -> None:
        """SIGTERM to every process of every node and to the job clients, SIGKILL to whatever is left
        3 s later."""
        procs = [p for node in self.nodes for p in node.tree()]
        procs += [psutil.Process(c.pid) for c in self.clients if c.poll() is None]  # unreaped: still there
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=3)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        for proc in [*self.clients, *(node.proc for node in self.nodes)]:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def cluster():
    if not RAY.exists():
        pytest.skip(f"no Ray cluster can start here: no `ray` command next to {sys.executable}")
    try:
        import aiohttp_cors  # noqa: F401 - installed by ray[default] only
        import ray.dashboard.modules.job.job_head  # noqa: F401 - the job server
    except ImportError as exc:
        pytest.fail(f"ray[default] is not installed ({exc}): `ray job submit` would have no job server. "
                    "Run `bash launch/setup.sh`.")
    root = Path(tempfile.mkdtemp(prefix="flexmol-rc-"))
    c = Cluster(root)
    try:
        c.start_head()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _inputs(path: Path, nci_smi: Path) -> int:
    """124 NCI lines as they come (two are rejected for their elements: copper), then 6 of them
    again: duplicates within a shard (inputs 120, 121 and 123, again in shard 10) and across shards
    (inputs 3, 50 and 99). Returns the number of inputs."""
    lines = [line for line in open(nci_smi).read().splitlines() if line.strip()][:124]
    lines += [lines[i] for i in (120, 121, 3, 50, 99, 123)]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def _succeeded(c: Cluster, sid: str, proc: subprocess.Popen, log: Path, seconds: float = 240) -> None:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"job {sid} still running after {seconds:.0f} s\n{_tail(log)}")
    status = c.job_status(sid)
    assert status["status"] == "SUCCEEDED", f"job {sid}: {status['status']} ({status.get('message')})\n{_tail(log)}"


def _dataset(out: Path) -> dict:
    """What two runs of one command must agree on: each shard's bytes, the rejects, and the
    manifest less its time stamp and duration."""
    manifest = json.loads((out / "manifest.json").read_text())
    for volatile in ("created_utc", "seconds"):
        manifest.pop(volatile)
    shards = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}
    return {"manifest": manifest, "shards": shards, "rejects": (out / "rejects.jsonl").read_text()}


def test_featurize_job_survives_losing_a_node(cluster, nci_smi):
    t = time.perf_counter()
    nodes = cluster.add_nodes(2)
    joined_s = time.perf_counter() - t
    source = cluster.root / "nci.smi"
    n = _inputs(source, nci_smi)

    t = time.perf_counter()
    proc, log_a = cluster.submit("undisturbed", source, cluster.root / "a")
    _succeeded(cluster, "undisturbed", proc, log_a)
    undisturbed_s = time.perf_counter() - t

    # The same command again; the first node seen featurising a molecule is killed outright.
    t = time.perf_counter()
    proc, log_b = cluster.submit("node-lost", source, cluster.root / "b")
    deadline = time.monotonic() + 120
    while not (busy := [(node, shard) for node in nodes if (shard := node.shard_in_progress())]):
        assert proc.poll() is None, f"the job ended before a worker node was seen featurising\n{_tail(log_b)}"
        assert time.monotonic() < deadline, f"no worker node featurised a molecule within 120 s\n{_tail(log_b)}"
        time.sleep(0.05)
    lost_node, lost_shard = busy[0]
    lost_node.kill()
    killed_s = time.perf_counter() - t
    _succeeded(cluster, "node-lost", proc, log_b)
    disturbed_s = time.perf_counter() - t

    log = log_b.read_text()
    assert re.search(rf"\[featurize\] {lost_shard}\b: its node was lost", log), \
        f"{lost_shard} was not run again as a lost node\n{_tail(log_b)}"
    a, b = _dataset(cluster.root / "a"), _dataset(cluster.root / "b")
    counts = b["manifest"]["counts"]
    assert counts["input"] == n == counts["written"] + counts["rejected"], counts
    assert b["manifest"]["rejects_by_reason"] == {"duplicate": 6, "element": 2}, b["manifest"]["rejects_by_reason"]
    assert len(b["shards"]) == -(-n // SHARD_SIZE)
    assert b == a, "the job that lost a node wrote another dataset than the undisturbed one"
    print(f"\n[cluster] head up in {cluster.head_s:.1f} s, 2 nodes joined in {joined_s:.1f} s; undisturbed job "
          f"{undisturbed_s:.1f} s; {lost_node.name} killed {killed_s:.1f} s into the second job, during {lost_shard}; "
          f"that job finished at {disturbed_s:.1f} s")
