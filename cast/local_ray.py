"""A real Ray head on 127.0.0.1 for one machine: the demo's cluster and the tests' ``ray job submit`` target.

``ray start --head --block --node-ip-address 127.0.0.1`` runs in its own process group with free ports
for every server and agent (another Ray on this machine, an in-process test cluster or another user's,
may hold the defaults, and a job agent that cannot bind never accepts jobs). It is stopped by that
group's id, not ``ray stop``, which would also stop other people's clusters. Every Ray process gets
``RAY_ENV``: without ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray binds the machine's interface address
even when told 127.0.0.1. The venv's bin goes first on PATH, so ``python`` in a job is this interpreter.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    address: str  # the dashboard / job-submission address
    env: dict[str, str]  # environment for the `ray` CLI and job drivers (RAY_ADDRESS set)
    temp_dir: str
    pid: int  # of `ray start --block`, also its process group id
    log: str  # ray start's output
    gcs_address: str = ""  # 127.0.0.1:<port>, what another node joins

    def client(self):
        """A ``JobSubmissionClient`` sending the cluster's token itself (a Ray already used in this process
        has fixed its own auth mode and token)."""
        from ray.job_submission import JobSubmissionClient

        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        return JobSubmissionClient(self.address, headers={"authorization": f"Bearer {token}"})


@contextmanager
def local_ray_head(
    num_cpus: int = 2, object_store_memory: int = 512 * 1024**2, ready_timeout: float = 90.0,
    token: str | None = None,
) -> Iterator[RayHead]:
    """Start a head on 127.0.0.1, yield it once its dashboard and job agent answer, stop it on exit
    (also after an exception or Ctrl-C). ``token``: the cluster's auth token (default: a fresh one); a
    process that joins it as a driver must have had that token in its environment when it imported Ray."""
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dash_port, agent_port = free_port(), free_port(), free_port()
    # Token auth with this cluster's own token: `ray start` refuses token mode without one, and
    # ~/.ray/auth_token (Ray's default) is absent on a fresh machine and shared with other clusters.
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(token or secrets.token_hex(32))
    token_path.chmod(0o600)
    env = {
        **os.environ,
        **RAY_ENV,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_AUTH_TOKEN", None)  # would take precedence over the file
    # Ray's own actors (e.g. Train's placement-group cleaner) find their cluster through RAY_ADDRESS, else
    # by scanning for GCS processes, which fails when this machine runs other Ray clusters too.
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    # On SIGTERM the head first drains its node for up to 30 s (for Ray Serve traffic), and an actor that
    # Ray Train leaves behind makes it wait that long; nothing here needs draining.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    cmd = [
        f"{VENV_BIN}/ray", "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--port", str(port),
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash_port),
        "--dashboard-agent-listen-port", str(agent_port),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--num-cpus", str(num_cpus),
        "--object-store-memory", str(object_store_memory),
        "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]  # fmt: skip
    log_path = Path(temp_dir) / "ray_start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        _wait_ready(address, agent_port, proc, log_path, ready_timeout)
        yield RayHead(address, {**env, "RAY_ADDRESS": address}, temp_dir, proc.pid, str(log_path),
                      gcs_address=f"127.0.0.1:{port}")
    finally:
        with _no_keyboard_interrupt():  # a second Ctrl-C must not cut the stop short
            stop_process_group(proc)


# `ray start --address` refuses to join a cluster under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (a single-node
# switch), and without it resolves 127.0.0.1 to the machine's interface address; the node is therefore
# started the way `ray start --block` does it, on 127.0.0.1, from this small program
_NODE_PROGRAM = """
import sys, time
import ray._private.node, ray._private.parameter
gcs, cpus, store, agent, grpc, metrics, runtime = sys.argv[1], *map(int, sys.argv[2:])
params = ray._private.parameter.RayParams(
    gcs_address=gcs, node_ip_address="127.0.0.1", num_cpus=cpus, object_store_memory=store,
    dashboard_agent_listen_port=agent, metrics_agent_port=grpc, metrics_export_port=metrics,
    runtime_env_agent_port=runtime, node_manager_port=0, min_worker_port=0, max_worker_port=0)
node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("ray node started", flush=True)
while True:
    time.sleep(1)
"""


def start_ray_node(head: RayHead, num_cpus: int = 1, object_store_memory: int = 256 * 1024**2,
                   log_name: str = "ray_node.log") -> subprocess.Popen:
    """Another node of ``head``'s cluster on 127.0.0.1, in its own process group, free ports: what a
    second machine is, for elastic training tests. Killing its group is a spot preemption in miniature;
    ``stop_process_group`` ends it; ``wait_for_nodes`` tells when it joined."""
    ports = [free_port() for _ in range(4)]
    cmd = [sys.executable, "-c", _NODE_PROGRAM, head.gcs_address, str(num_cpus), str(object_store_memory),
           *map(str, ports)]
    with open(Path(head.temp_dir) / log_name, "a") as log:
        return subprocess.Popen(cmd, env=head.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def alive_nodes(head: RayHead) -> int:
    """How many nodes the cluster counts as alive now."""
    token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{head.address}/nodes?view=summary",
                                     headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        summary = json.load(reply)["data"]["summary"]
    return sum(1 for node in summary if node["raylet"]["state"] == "ALIVE")


def wait_for_nodes(head: RayHead, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while alive_nodes(head) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster at {head.address}: not {count} alive nodes after {timeout}s")
        time.sleep(0.5)


@contextmanager
def _no_keyboard_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_ready(address: str, agent_port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """The dashboard answers HTTP and the job agent listens (before that, submissions fail with
    "No available agent")."""
    deadline = time.monotonic() + timeout
    dashboard_up = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()}")
        if not dashboard_up:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                dashboard_up = True
            except urllib.error.HTTPError:  # answered (401 without Ray's auth token): it is up
                dashboard_up = True
            except OSError:
                pass
        if dashboard_up:
            try:
                socket.create_connection(("127.0.0.1", agent_port), timeout=2).close()
                return
            except OSError:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"Ray head at {address} not ready after {timeout}s:\n{log.read_text()}")


def stop_process_group(proc: subprocess.Popen, term_wait: float = 15.0) -> None:
    """SIGTERM the leader, SIGKILL what is left of its group after ``term_wait`` s, reap the leader.

    Only the leader gets SIGTERM: ``ray start --block`` then stops its children in order (a few seconds),
    while a SIGTERM to the whole group leaves raylet and GCS hanging until killed.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    for sig, wait in ((None, term_wait), (signal.SIGKILL, 5.0)):
        if sig is not None and group_alive(proc.pid):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader
            if not group_alive(proc.pid):
                break
            time.sleep(0.2)
    proc.wait(timeout=5)


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` runs (zombies waiting to be reaped do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue  # exited while we looked
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False
