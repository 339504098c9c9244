"""Receive speed: instances per second `dicomnode serve` accepts vs dcmtk's storescp, same files, same sender.

Both receivers get the same synthetic CT instances from the same `dcmsend` (TCP_NODELAY=1 for
sender and receivers: dcmtk leaves Nagle on otherwise). With ``--senders N`` the instances are split
into N series sent by N parallel `dcmsend` processes (one association each), storescp runs with
``--fork`` (a process per association) and the node with each ``--processes`` value
(``node.receive_processes``: processes sharing the port), and with each ``--engine``
(``node.receive_engine``: pynetdicom's server or the node's native upper layer). The node
runs as it does in production (`dicomnode serve`, spool + ledger + fsync per instance) with a long
series quiet time so only receiving is timed. Rounds alternate between the receivers to share any
background load fairly; the best and the median round of each are reported, with the receiver's CPU
time per instance (its processes and their children, median) and how busy the whole machine was
(``/proc/stat``, senders included: near 100% the round was CPU-bound, lower it waited). ``--baseline DIR`` adds the node as the
``dicomnode`` package in DIR runs it (older code, same rounds), to compare before and after in one run.

    .venv/bin/python benchmarks/bench_receive.py --count 200 --size 512 --rounds 3
    .venv/bin/python benchmarks/bench_receive.py --count 400 --senders 4 --processes 1 4
    .venv/bin/python benchmarks/bench_receive.py --count 200 --rounds 2 --engine native
    git archive HEAD~3 dicomnode | tar -x -C /tmp/base && \
    .venv/bin/python benchmarks/bench_receive.py --count 400 --senders 4 --rounds 10 --engine native --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
DICOMNODE = REPO / ".venv" / "bin" / "dicomnode"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(pythonpath: str | None = None) -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1", **({"PYTHONPATH": pythonpath} if pythonpath else {})}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its waited-for children (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(all, idle) CPU ticks of the whole machine since boot (/proc/stat), to tell CPU-bound from waiting."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]  # idle + iowait


def make_series(folder: Path, count: int, size: int) -> int:
    """``count`` 16-bit CT instances of ``size``² pixels in one series; returns the total bytes."""
    ds = dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SeriesInstanceUID = generate_uid()
    rng = np.random.default_rng(0)
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.PixelData = rng.integers(0, 4096, size=(size, size), dtype=np.uint16).tobytes()
        path = folder / f"ct{i:05d}.dcm"
        ds.save_as(path)
        total += path.stat().st_size
    return total


def wait_echo(port: int, aec: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode} before answering C-ECHO")
        if subprocess.run(["echoscu", "-aec", aec, "127.0.0.1", str(port)], capture_output=True, env=env()).returncode == 0:
            return
        time.sleep(0.3)
    raise TimeoutError(f"no C-ECHO answer on port {port} after {timeout} s")


def send(port: int, aec: str, folders: list[Path], count: int) -> float:
    """Send each folder with its own `dcmsend` (all at once); seconds until the last one finished."""
    start = time.perf_counter()
    procs = [subprocess.Popen(["dcmsend", "-v", "-aec", aec, "127.0.0.1", str(port), "+sd", str(folder)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env()) for folder in folders]
    outputs = [p.communicate(timeout=3600)[0] for p in procs]
    seconds = time.perf_counter() - start
    per = count // len(folders)
    for proc, out in zip(procs, outputs):
        if proc.returncode != 0 or f"with status SUCCESS  : {per}" not in out:
            raise RuntimeError(f"dcmsend did not store all {per} instances:\n{out[-2000:]}")
    return seconds


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_node(work: Path, port: int, pythonpath: str | None = None, **node: object) -> subprocess.Popen:
    """``dicomnode serve`` on ``port`` that spools everything and enhances nothing; ``node`` adds node settings,
    ``pythonpath`` a folder whose ``dicomnode`` package runs instead of this tree's."""
    shutil.rmtree(work / "var", ignore_errors=True)
    config = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port, "series_quiet_seconds": 3600, **node},
        "storage": {"root": str(work / "var")},
        "destinations": {"outbox": {"folder": str(work / "outbox")}},
        "rules": [{"name": "bench", "match": {"Modality": "NONE"}, "destinations": ["outbox"]}],
        "logging": {"level": "INFO"},  # the "up" line says every receiving process listens
    }
    path = work / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    log_file = work / "node.log"
    offset = log_file.stat().st_size if log_file.exists() else 0
    proc = subprocess.Popen([str(DICOMNODE), "serve", "--config", str(path)], env=env(pythonpath),
                            stdout=subprocess.DEVNULL, stderr=(work / "node.log").open("ab"))
    wait_echo(port, "DICOMNODE", proc)
    deadline = time.monotonic() + 120
    while " up: " not in log_file.read_bytes()[offset:].decode(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.1)  # with several receiving processes the first answers C-ECHO before the last listens
    return proc


def start_storescp(work: Path, port: int, fork: bool = False) -> subprocess.Popen:
    out = work / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    proc = subprocess.Popen(["storescp", *(["--fork"] if fork else []), "-aet", "PACS", "-od", str(out), "+xa", str(port)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_echo(port, "PACS", proc)
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="instances per round, all senders together (default 200)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each 16-bit CT (default 512)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per receiver (default 3)")
    parser.add_argument("--senders", type=int, default=1, help="parallel dcmsend processes, one association each (default 1)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1],
                        help="node.receive_processes values to measure (default 1)")
    parser.add_argument("--engine", nargs="+", choices=["native", "pynetdicom"], default=["native", "pynetdicom"],
                        help="node.receive_engine values to measure (default both)")
    parser.add_argument("--baseline", type=Path, help="a folder holding an older dicomnode package: measured too "
                        "(first --engine and --processes value), rounds interleaved")
    args = parser.parse_args(argv)
    for tool in ("dcmsend", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found: apt-get install dcmtk")
    if args.count % args.senders:
        parser.error("--count must be a multiple of --senders")
    fork = args.senders > 1
    receivers = [(f"node {engine}" + (f" x{n}" if len(args.processes) > 1 or n > 1 else ""), n, engine, None)
                 for engine in args.engine for n in args.processes]
    if args.baseline is not None:
        if not (args.baseline / "dicomnode" / "__init__.py").is_file():
            parser.error(f"no dicomnode package in {args.baseline}")
        receivers.insert(0, (f"baseline {args.engine[0]}", args.processes[0], args.engine[0], str(args.baseline.resolve())))
    scp_name = "storescp --fork" if fork else "storescp"
    with tempfile.TemporaryDirectory(prefix="bench_receive_") as tmp:
        work = Path(tmp)
        folders = [work / "data" / f"s{i}" for i in range(args.senders)]
        total = sum(make_series(folder, args.count // args.senders, args.size) for folder in folders)
        print(f"{args.count} CT instances {args.size}x{args.size} 16-bit, {total / args.count / 1e6:.2f} MB each, "
              f"{args.senders} sender(s) in parallel")
        times: dict[str, list[float]] = {name: [] for name, _, _, _ in receivers} | {scp_name: []}
        cpu: dict[str, list[float]] = {name: [] for name in times}
        busy: dict[str, list[float]] = {name: [] for name in times}
        with tqdm(total=(len(receivers) + 1) * args.rounds, desc="rounds", unit="round") as bar:
            for _ in range(args.rounds):
                for name, processes, engine, pythonpath in [*receivers, (scp_name, 0, "", None)]:
                    port = free_port()
                    if processes:
                        proc, aec = start_node(work, port, pythonpath, receive_processes=processes,
                                               receive_engine=engine), "DICOMNODE"
                    else:
                        proc, aec = start_storescp(work, port, fork=fork), "PACS"
                    try:
                        before, ticks = cpu_seconds(proc.pid), machine_ticks()
                        times[name].append(send(port, aec, folders, args.count))
                        cpu[name].append((cpu_seconds(proc.pid) - before) / args.count * 1000)
                        ticks_all, idle = (a - b for a, b in zip(machine_ticks(), ticks))
                        busy[name].append(100.0 * (1 - idle / ticks_all) if ticks_all else float("nan"))
                    finally:
                        stop(proc)
                    if processes:
                        stored = len(list((work / "var" / "series").rglob("*.dcm")))
                        if stored != args.count:
                            raise RuntimeError(f"node spooled {stored} of {args.count} instances")
                    bar.update(1)
    print(f"\n{'receiver':<22} {'best s':>8} {'median s':>9} {'inst/s':>8} {'MB/s':>7} {'ratio':>6} {'median ratio':>13} "
          f"{'CPU ms/inst':>12} {'busy %':>7}")
    scp_rate, scp_median = args.count / min(times[scp_name]), statistics.median(times[scp_name])
    for name, values in times.items():
        best = min(values)
        rate = args.count / best
        print(f"{name:<22} {best:8.2f} {statistics.median(values):9.2f} {rate:8.1f} {total / best / 1e6:7.1f} "
              f"{rate / scp_rate:6.2f} {scp_median / statistics.median(values):13.2f} {statistics.median(cpu[name]):12.2f} "
              f"{statistics.median(busy[name]):7.0f}")
    print(f"\nratio = instances/s over {scp_name}'s (best rounds; median ratio: median rounds; same dcmsend, "
          f"{args.senders} association(s) in parallel, TCP_NODELAY=1, {os.cpu_count()} CPUs; busy %: the whole "
          f"machine's CPU use during the round, senders included, median: near 100 the round was CPU-bound)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
