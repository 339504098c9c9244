"""A real Ray cluster on loopback for the tests and benchmarks: ``ray start --head`` and one worker node, CPU only.

Both are ``ray start --block`` processes in their own sessions, so stopping them ends everything they started
(their process groups, killed by id). Small settings: one CPU and 100 MB of object store per node, no dashboard,
no usage reporting, a private temp dir, workers at normal priority.

Ray replaces 127.0.0.1 in ``--address``/``--node-ip-address`` with the address other machines would reach this
one at (the route toward a public DNS server; nothing is sent). On a real cluster that is what one wants; here
every peer must stay on loopback, so the nodes are started through a two-line wrapper that answers 127.0.0.1 for
that lookup, and the node under test (a Ray driver) gets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which makes its
lookup answer 127.0.0.1 too (its only other effect is in ``ray start``, which the driver does not run).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from factories import free_port

RAY = Path(sys.executable).with_name("ray")
DRIVER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
_START = ("import sys, ray._private.services as s; s.get_node_ip_address = lambda address=None: '127.0.0.1'; "
          "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return RAY.exists()


class RayCluster:
    """``with RayCluster(workers=1) as cluster: cluster.address`` -> ``127.0.0.1:PORT``."""

    def __init__(self, *, workers: int = 1, cpus_per_node: int = 1, object_store_bytes: int = 100_000_000):
        self.workers = workers
        self.cpus = cpus_per_node
        self.store = object_store_bytes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
        self.procs: list[subprocess.Popen] = []
        # The nodes must not see the driver's switch (DRIVER_ENV): `ray start` refuses to join a worker with it.
        env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        # Ray runs its workers at nice 15 (the raylet first); on a machine shared with other work that starves the
        # actors behind everything else, so the test cluster runs them at the node's own priority.
        self.env = {**env, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "RAY_worker_niceness": "0"}

    def _start(self, args: list[str], log: str) -> None:
        common = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}", "--num-gpus=0",
                  f"--object-store-memory={self.store}", "--disable-usage-stats"]
        self.procs.append(subprocess.Popen([sys.executable, "-c", _START, "start", *args, *common],
                                           stdout=(self.temp / log).open("ab"), stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True))

    def alive_nodes(self) -> int:
        out = subprocess.run([str(RAY), "status", f"--address={self.address}"], capture_output=True, text=True,
                             env={**self.env, **DRIVER_ENV}, timeout=60).stdout  # a driver: stays on loopback
        active = out.split("Active:", 1)[1].split("Pending:", 1)[0] if "Active:" in out else ""
        return sum(1 for line in active.splitlines() if "node_" in line)

    def start(self, timeout: float = 120) -> RayCluster:
        try:
            self._start(["--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.temp}"], "head.log")
            self._wait(1, timeout)
            for i in range(self.workers):
                self._start([f"--address={self.address}"], f"worker{i}.log")
            self._wait(1 + self.workers, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, nodes: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"ray start exited with {dead[0].returncode}:\n{self.logs()}")
            try:
                if self.alive_nodes() >= nodes:
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray cluster: fewer than {nodes} nodes after {timeout} s:\n{self.logs()}")
            time.sleep(1.0)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.temp.glob("*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):  # workers first, then the head
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything of its group still there
            except ProcessLookupError:
                pass
            proc.wait(10)
        self.procs = []
        shutil.rmtree(self.temp, ignore_errors=True)  # Ray's session folders and logs

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
